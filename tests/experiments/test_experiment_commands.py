"""Every `python -m metagrad.train` command written in an experiment's README composes and
builds with the current options (sweeps: each swept value), so the pages do not fall behind."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "app"))
from _train_utils import compose_cfg  # noqa: E402

from metagrad.train import build  # noqa: E402


def _commands() -> list[tuple[str, str]]:
    found = []
    for readme in sorted(ROOT.glob("experiments/**/README.md")):
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "metagrad.train" in line:
                    found.append((str(readme.relative_to(ROOT)), line.strip()))
    return found


COMMANDS = _commands()


def _variants(args: list[str]) -> list[list[str]]:
    """One override list per value of a swept (comma-separated) override."""
    swept = [a for a in args if "=" in a and "," in a.split("=", 1)[1] and "[" not in a]
    if not swept:
        return [args]
    key, values = swept[0].split("=", 1)
    return [[f"{key}={v}" if a == swept[0] else a for a in args] for v in values.split(",")]


@pytest.mark.parametrize(
    "where, line", COMMANDS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(COMMANDS)]
)
def test_readme_command_composes_and_builds(where: str, line: str) -> None:
    args = shlex.split(line, comments=True)
    args = args[args.index("metagrad.train") + 1 :]
    args = [a for a in args if a != "-m" and not a.startswith("hydra")]
    for overrides in _variants(args):
        cfg = compose_cfg(*overrides, "outer_steps=1", "eval_tasks=6")
        build(cfg)


def test_there_are_commands_to_check() -> None:
    assert len(COMMANDS) >= 8
