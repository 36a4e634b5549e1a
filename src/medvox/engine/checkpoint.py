"""Checkpoints: written atomically, loaded safely, never overwritten with non-finite weights.

A checkpoint is a pickle, so it is always loaded with ``weights_only=True``: a file crafted to run
code is refused. It is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one, so a crash (or SIGKILL) leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medvox.errors import (
    CheckpointError,
    TrainingError,
    damaged_file_message,
    is_garbage_pickle,
    unpickling_refusal,
)

TEMP_SUFFIX = ".tmp"  # what the atomic writers name their temp files: .<name>.<random>.tmp

# What last.pt holds only so that --resume continues exactly; a finished fold's last.pt drops it (for a
# ResNet-10 the optimizer's two moments and the EMA copy are 3 of its 4 model-sized parts).
RESUME_STATE_KEYS = ("optimizer", "schedule", "scaler", "rng", "ema", "bad_epochs")


def without_resume_state(state: dict[str, Any], status: str) -> dict[str, Any]:
    """``state`` (a full last.pt) without :data:`RESUME_STATE_KEYS`: the weights of its epoch, the config,
    plan, classes and history, marked with the fold's final ``status`` ("complete" | "early_stopped")."""
    return {**{k: v for k, v in state.items() if k not in RESUME_STATE_KEYS}, "status": status}


def finished_status(state: dict[str, Any]) -> str | None:
    """The status a finished fold's slim last.pt records ("complete" | "early_stopped"): it cannot be resumed
    from. None for a last.pt that still holds the optimizer state."""
    return state.get("status") if "optimizer" not in state else None


def _check_finite(state: dict[str, Any], what: str) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingError(
                f"refusing to write {what}: tensor {key!r} holds NaN/Inf values; the previous checkpoint "
                "is kept. Lower the learning rate, enable gradient clipping (--grad_clip) or use --precision fp32."
            )


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(fh)`` into a temp file beside it, fsync, then rename over ``path``.

    A crash leaves the old file (plus, at worst, a ``.<name>.*.tmp`` that ``remove_stale_temp_files``
    deletes on the next start); a full disk raises a clear ``TrainingError`` and keeps the old file.
    """
    _atomic_write_all([(path, write)])


def _atomic_write_all(files: list[tuple[Path, Callable[[Any], None]]]) -> None:
    """Write every file to its temp file first (fsynced), then rename them all over their targets.

    Files that belong together (``best.pt`` and ``best.safetensors``) are then replaced within
    microseconds of each other instead of one whole save apart; if any write fails, none is replaced.
    """
    temps: list[str] = []
    try:
        for path, write in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            share_permissions(tmp)
        for tmp, (path, _) in zip(temps, files, strict=True):
            os.replace(tmp, path)
    except OSError as exc:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            names = " and ".join(str(path) for path, _ in files)
            raise TrainingError(
                f"no space left on the device while writing {names}; the previous checkpoint is intact. "
                "Free some space (or choose another --output) and continue with --resume."
            ) from exc
        raise
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: dict[str, Any], path: str | Path, safetensors_metadata: dict[str, str] | None = None) -> None:
    """``torch.save`` to ``path`` atomically; model weights in ``obj['model']``/``obj['ema']`` must be finite.

    With ``safetensors_metadata``, ``obj['model']`` is also written as ``path`` with the suffix
    ``.safetensors`` (see :func:`atomic_save_safetensors`), and the two files are replaced together.
    """
    path = Path(path)
    for key in ("model", "ema"):
        if isinstance(obj.get(key), dict):
            _check_finite(obj[key], f"{path.name} ({key})")
    files = [(path, lambda fh: torch.save(obj, fh))]
    if safetensors_metadata is not None:
        data = _safetensors_bytes(obj["model"], safetensors_metadata)
        files.append((path.with_suffix(".safetensors"), lambda fh: fh.write(data)))
    _atomic_write_all(files)


def atomic_save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """The weights alone as ``safetensors`` (no pickle: safe to load anywhere), atomically, finite only."""
    path = Path(path)
    _check_finite(state_dict, path.name)
    data = _safetensors_bytes(state_dict, metadata)
    _atomic_write(path, lambda fh: fh.write(data))


def _safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """Tensors are stored as independent contiguous CPU copies (safetensors refuses strided or shared
    storage, and channels-last convolution weights are strided)."""
    from safetensors.torch import save as safetensors_bytes

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return safetensors_bytes(tensors, metadata=metadata)


def safetensors_epoch(path: str | Path) -> int | None:
    """The ``epoch`` in a safetensors file's metadata; None when the file or the field is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return int((fh.metadata() or {})["epoch"])
    except Exception:  # a missing or damaged file, no metadata, no epoch: safetensors raises its own types
        return None


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files that a killed writer left in ``folder`` (each can be as large as a
    checkpoint, and a run preempted many times would otherwise fill the disk). Call it before writing."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a medvox checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the safe unpickler met something other than tensors and plain data
        if not is_garbage_pickle(exc, path):
            raise CheckpointError(
                f"refused to load checkpoint {path}: {unpickling_refusal(exc)}. medvox loads checkpoints with "
                "weights_only=True and never runs code from a file: use a checkpoint medvox wrote, or re-save only "
                "the tensors in a trusted environment (torch.save(model.state_dict(), ...) or safetensors)."
            ) from exc
        damaged = exc
    except Exception as exc:  # corrupt or cut-off files raise OSError, RuntimeError, KeyError, EOFError, ...
        damaged = exc
    raise CheckpointError(damaged_file_message(path, damaged, "checkpoint", "use another checkpoint of the run "
                                               "(best.pt or best_ema.pt).")) from damaged


def share_permissions(path) -> None:
    """mkstemp creates 0600 files; give the result the usual permissions (0666 minus the umask), so a
    team can read a shared results folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
