"""Errors medvox raises on purpose: the CLI prints them as one clear message, no traceback."""

from __future__ import annotations


class MedvoxError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class DataError(MedvoxError):
    """The input data has problems; the message lists every one (row, file, what, fix)."""

    exit_code = 1


class CheckpointError(MedvoxError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""

    exit_code = 1


class UsageError(MedvoxError):
    """A command line that names no run, two runs, or settings a command does not take."""

    exit_code = 2


class TrainingError(MedvoxError):
    """Training cannot go on (e.g. a non-finite loss); nothing good on disk is overwritten."""

    exit_code = 3


def unpickling_refusal(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one plain line.

    PyTorch's own text is several paragraphs with terminal escape codes, and it suggests loading with
    ``weights_only=False``; medvox never does that. What matters to the user is which Python object the
    file would have built (``Unsupported global: GLOBAL os.system``), when PyTorch names it.
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it would build the Python object {found.group(1)} (unpickling it could run code)"
    return "it holds pickled Python objects, not only tensors and plain data (unpickling it could run code)"


def is_garbage_pickle(exc: BaseException, path) -> bool:
    """An unpickling error from bytes that are not a (complete) pickle, rather than a refused object:
    cut-off files ("truncated"), or a file that starts like neither a pickle (protocol opcode 0x80) nor
    a torch zip archive ("PK") and so fails on its first byte ("Unsupported operand", "invalid load key").
    A real pickle of a newer protocol also reports "Unsupported operand": that one is a refusal."""
    text = str(exc)
    if "truncated" in text:
        return True
    if "Unsupported operand" in text or "invalid load key" in text:
        try:
            with open(path, "rb") as fh:
                head = fh.read(2)
        except OSError:
            return False
        return not (head[:1] == b"\x80" or head == b"PK")
    return False


def damaged_file_message(path, exc: BaseException, what: str, fix: str) -> str:
    """What to say about a weights file that cannot be unpickled because its bytes are broken (not a
    refusal): which file, its size, the likely cause, ``fix``, and the loader's own first line."""
    from pathlib import Path

    size = Path(path).stat().st_size
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return (f"cannot load {what} {path} ({size:,} bytes): the file is damaged, truncated (an interrupted "
            f"download or copy?) or not a PyTorch checkpoint; {fix} [{type(exc).__name__}: {detail[:200]}]")
