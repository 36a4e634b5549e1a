"""Checkpoints: written atomically, loaded safely, never overwritten with non-finite weights.

A checkpoint is a pickle, so it is always loaded with ``weights_only=True``: a file crafted to run
code is refused. It is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one, so a crash (or SIGKILL) leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from medvox.errors import CheckpointError, TrainingError


def _check_finite(state: dict[str, Any], what: str) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingError(
                f"refusing to write {what}: tensor {key!r} holds NaN/Inf values; the previous checkpoint "
                "is kept. Lower the learning rate, enable gradient clipping (--grad_clip) or use --precision fp32."
            )


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically; model weights in ``obj['model']``/``obj['ema']`` must be finite."""
    path = Path(path)
    for key in ("model", "ema"):
        if isinstance(obj.get(key), dict):
            _check_finite(obj[key], f"{path.name} ({key})")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise TrainingError(
                f"no space left on the device while writing {path}; the previous checkpoint is intact. "
                "Free some space (or choose another --output) and continue with --resume."
            ) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a medvox checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for unsafe files, RuntimeError for corrupt ones
        raise CheckpointError(
            f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}. Checkpoints are loaded with "
            "weights_only=True, so a file that would run code is refused; a truncated file cannot be read."
        ) from exc
