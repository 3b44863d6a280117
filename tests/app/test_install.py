"""A non-editable install (`pip install .`) carries the configs: the app runs from anywhere."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from _train_utils import TINY, env

ROOT = Path(__file__).resolve().parents[2]


def test_non_editable_install_runs_the_default_config_from_another_folder(tmp_path: Path) -> None:
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "outputs", "multirun", "runs", ".*cache"
    )
    for name in ("pyproject.toml", "README.md", "metagrad", "configs"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(path, src / name)

    # A fresh environment that sees this environment's packages (torch, no download) but not
    # the checkout: a .pth file lists their folders. Works inside a virtual environment and
    # outside one (`--system-site-packages` would see the base interpreter's instead). The
    # folders' own .pth files (an editable install of metagrad) are not run. Without its own
    # pip, the host's pip and setuptools build and install into it, offline.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "host_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy only: a PYTHONPATH pointing at a checkout would shadow it.
    clean_env = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import metagrad.train as t; print(t.__file__); print(t.config_dir())"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env,
    )
    module_file, configs = where.stdout.split()
    assert Path(module_file).is_relative_to(venv), module_file
    assert Path(configs).is_relative_to(venv) and (Path(configs) / "train.yaml").is_file()
    assert (Path(configs) / "experiment" / "maml_sine.yaml").is_file()

    run = subprocess.run(
        [str(python), "-m", "metagrad.train", "hydra.run.dir=run", *TINY, "outer_steps=1"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tensorboard --logdir" in run.stdout
    result = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert result["outer_steps"] == 1

    # The README's "your own model and data" example, exactly: its file, its command, run from
    # the user's own folder against this non-editable install (sizes shrunk).
    readme = (ROOT / "README.md").read_text()
    user_file = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class Blobs" in b
    )
    command = next(
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
        for line in block.splitlines()
        if "mylab" in line
    )
    (elsewhere / "mylab.py").write_text(user_file)
    args = shlex.split(command)[3:]  # after "python -m metagrad.train"
    byo = subprocess.run(
        [
            str(python),
            "-m",
            "metagrad.train",
            *args,
            "hydra.run.dir=byo",
            "horizon=5",
            "outer_steps=2",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env,
    )
    assert byo.returncode == 0, byo.stderr[-3000:]
    config = (elsewhere / "byo" / ".hydra" / "config.yaml").read_text()
    assert "_target_: mylab.Net" in config and "_target_: mylab.Blobs" in config
    assert "test/accuracy" in json.loads((elsewhere / "byo" / "metrics.json").read_text())["final"]
