"""Every code block and shell command of the README runs as written (long loops and runs
shortened), so the page a newcomer reads first stays true."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "tests" / "app"))
from _train_utils import env  # noqa: E402

PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
SHELL = [
    line.strip()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S)
    for line in block.splitlines()
    if line.strip()
]
# Shell lines covered elsewhere, with where.
ELSEWHERE = {
    'pip install -e ".[dev]"': "tests/app/test_install.py installs into a fresh environment",
    "pytest": "this suite",
    "scripts/check": "CI runs it (.ci/run)",
}
USER_FILE = next(b for b in PYTHON if "class Blobs(TensorTask)" in b)

# Loops shortened for the test: (pattern, replacement) per block, applied in order.
SHORTER = [("range(30)", "range(2)"), ("range(1000)", "range(3)")]


@pytest.mark.parametrize(
    "code", [b for b in PYTHON if b is not USER_FILE], ids=lambda c: c.splitlines()[0][:40]
)
def test_python_block_runs(code: str) -> None:
    for old, new in SHORTER:
        code = code.replace(old, new)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def _quick(args: list[str]) -> list[str]:
    """The command with small sizes: outer steps and horizons shrunk, evaluation made small."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key == "outer_steps":
            a = f"outer_steps={max(1, int(value) // 10)}"
        elif key == "horizon":
            a = f"horizon={max(2, int(value) // 40)}"
        out.append(a)
    keys = {a.split("=")[0] for a in out}
    if "outer_steps" not in keys:
        out.append("outer_steps=1")
    if "horizon" not in keys:
        out.append("horizon=5")
    return out + ["eval_tasks=6", "meta_batch=2", "val_every=1", "checkpoint_every=1"]


def _command(line: str) -> list[str]:
    args = shlex.split(line.split("#")[0])
    if args[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    if args[:3] == ["python", "-m", "metagrad.train"]:
        return [sys.executable, *args[1:]]
    raise AssertionError(f"the README shows a command this test does not know: {line!r}")


@pytest.mark.parametrize("line", SHELL, ids=lambda s: s[:60])
def test_shell_command_runs(line: str, tmp_path: Path) -> None:
    command = line.split("#")[0].strip()
    if command in ELSEWHERE or "outputs/run1" in command:  # run1: the pair test below
        return
    (tmp_path / "mylab.py").write_text(USER_FILE)
    args = _command(command)
    app = args.index("metagrad.train") + 1
    head, tail = args[:app], args[app:]
    if "--help" in tail:
        proc = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True)
        assert proc.returncode == 0 and "inner_optim:" in proc.stdout
        return
    if "-m" in tail:  # a launcher needs a cluster: check that the command composes
        tail = [a for a in tail if a != "-m"] + ["--cfg", "hydra"]
        proc = subprocess.run(
            [*head, *tail], cwd=tmp_path, env=env(), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "launcher" in proc.stdout
        return
    if not any(a.startswith("hydra.run.dir=") for a in tail):
        tail.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run(
        [*head, *_quick(tail)], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run folder:" in proc.stdout


def test_resume_commands_continue_the_first_run(tmp_path: Path) -> None:
    """The two commands that start and continue outputs/run1, in order, in one folder."""
    pair = [line for line in SHELL if "outputs/run1" in line]
    assert len(pair) == 2
    for line in pair:
        args = _command(line)
        app = args.index("metagrad.train") + 1
        proc = subprocess.run(
            [*args[:app], *_quick(args[app:])],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished 4 outer steps" in proc.stdout
