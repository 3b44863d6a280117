"""Checkpoints: written atomically, read without running code, checked before use."""

from __future__ import annotations

import errno
import os
import pickle
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "FORMAT",
    "load_checkpoint",
    "save_checkpoint",
    "validate_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"

#: Written into every checkpoint; a different value is refused on reading.
FORMAT = "metagrad-checkpoint-2"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a temporary file of this writer, then a rename.

    A run killed while writing, or a full disk, leaves the previous checkpoint intact. The
    payload should hold only tensors, numbers, strings, lists and dicts, so `load_checkpoint`
    can read it with `weights_only=True`.

    Raises:
        CheckpointError: the file could not be written (full disk, permissions); the previous
            checkpoint is unchanged and the message says so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = (
            f"the last good checkpoint {path} is unchanged"
            if path.is_file()
            else "no checkpoint was written before"
        )
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise CheckpointError(
            f"could not write the checkpoint {path}: {why}; {kept}. Free space (or fix the "
            "folder's permissions) and resume"
        ) from None
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)` (tensors and plain data only).

    Raises:
        FileNotFoundError: there is no file at `path`.
        CheckpointError: the file is empty, truncated, corrupted, not a metagrad checkpoint,
            or holds anything but tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (a write that never finished?); it cannot be resumed. Start a "
            "new run in another folder"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable metagrad checkpoint (corrupted, truncated, or holding "
            f"objects other than tensors and plain data: {reason}); it was not used. Start a "
            "new run in another folder"
        ) from None
    validate_checkpoint(data, path)
    return data


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid metagrad checkpoint: {what}; it was not used")


def validate_checkpoint(data: Any, path: Path) -> None:
    """Check the structure and types of a loaded checkpoint before anything uses it."""
    if not isinstance(data, Mapping):
        raise _fail(path, f"it holds a {type(data).__name__}, not a mapping")
    if data.get("format") != FORMAT:
        raise _fail(path, f"format {data.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("config", str), ("job", Mapping), ("loop", Mapping), ("torch_rng", Tensor)):
        if not isinstance(data.get(key), kind):
            raise _fail(path, f"'{key}' is missing or not a {kind.__name__}")
    loop = data["loop"]
    for key in ("step", "nonfinite_total", "nonfinite_in_a_row"):
        value = loop.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(path, f"loop counter '{key}' is {value!r}")
    rng = data["torch_rng"]
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise _fail(path, "the random-number state is malformed")
    by_rank = data.get("rng_by_rank", [rng])
    if not isinstance(by_rank, list) or not all(
        isinstance(s, Tensor) and s.dtype == torch.uint8 and s.dim() == 1 for s in by_rank
    ):
        raise _fail(path, "the per-process random-number states are malformed")
    choices = data.get("choices", {})
    if not isinstance(choices, Mapping) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in choices.items()
    ):
        raise _fail(path, "'choices' is malformed")
