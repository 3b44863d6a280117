"""A Hydra callback that checks the run folder can be created before Hydra creates it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["RunFolderCheck", "creatable"]


def creatable(path: Path) -> str | None:
    """Why `path` cannot be created (or written) as a folder, or None if it can."""
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


class RunFolderCheck(Callback):
    """Refuse, in one line and before anything is created, a run folder that cannot be made."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        why = creatable(Path(str(config.hydra.run.dir)))
        if why is not None:
            print(
                f"Refused: cannot create the run folder {config.hydra.run.dir}: {why}; choose "
                "another hydra.run.dir",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
