"""A run folder is the user's data: one writer at a time, and a refused run changes nothing.

`RunFolder` takes an exclusive lock before anything is written (`fcntl.flock`, released by
the kernel when the process dies, so a killed run's lock is taken over by the next one), names
the holder when the folder is busy, writes the run's records (`.hydra/`) only once every check
has passed, and removes what it created itself when the run is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import RunRefused

__all__ = ["RunFolder", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunFolder:
    """The folder of one run.

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self._lock_file: Any = None
        try:
            self.was_empty = not self.path.exists() or not any(self.path.iterdir())
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise RunRefused(
                f"cannot create or read the run folder {self.path}: permission denied; choose "
                "another hydra.run.dir"
            ) from None
        except OSError as e:
            raise RunRefused(
                f"cannot create the run folder {self.path}: {e.strerror or e}; choose another "
                "hydra.run.dir"
            ) from None
        if not os.access(self.path, os.W_OK):
            raise RunRefused(
                f"the run folder {self.path} is not writable; choose another hydra.run.dir"
            )

    # ------------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Take the folder's exclusive lock, or refuse naming the run that holds it."""
        lock_path = self.path / LOCK_NAME
        f = open(lock_path, "a+")  # noqa: SIM115 (held for the run's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                info = json.loads(holder)
                who = (
                    f"process {info.get('pid')} on {info.get('host')}, started "
                    f"{info.get('started')}"
                )
            except (ValueError, AttributeError):
                who = "another process"
            raise RunRefused(
                f"the run folder {self.path} is in use by {who}; wait for it to finish or stop "
                "it, or choose another hydra.run.dir"
            ) from None
        f.seek(0)
        f.truncate()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        f.write(json.dumps(info))
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        """Release the lock (the lock file is removed)."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            self._lock_file.close()
            self._lock_file = None

    def refused(self) -> None:
        """Undo what this object created: the lock file, and the folder if it was new."""
        self.release()
        if self.was_empty and self.path.is_dir():
            with contextlib.suppress(OSError):
                self.path.rmdir()  # Hydra created it for this run; leave nothing behind

    # ------------------------------------------------------------------ records
    def write_records(self, config_yaml: str, hydra_yaml: str | None, overrides: list[str]) -> None:
        """Write `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` of a new run."""
        folder = self.path / ".hydra"
        folder.mkdir(exist_ok=True)
        (folder / "config.yaml").write_text(config_yaml)
        if hydra_yaml is not None:
            (folder / "hydra.yaml").write_text(hydra_yaml)
        (folder / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))

    def append_resume(self, overrides: list[str], step: int) -> None:
        """Append one entry to `.hydra/resumes.yaml`: when, from which step, with what."""
        folder = self.path / ".hydra"
        folder.mkdir(exist_ok=True)
        path = folder / "resumes.yaml"
        history = []
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            history = loaded if isinstance(loaded, list) else []
        history.append(
            {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "from_step": step,
                "overrides": list(overrides),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        path.write_text(yaml.safe_dump(history))
