"""Shared by the reliability tests: run the real CLI, snapshot folders, the tiny-model flags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# a MIL model small enough that a run writes kilobytes, not hundreds of megabytes
MIL_KWARGS = {"instance": "slab", "slab_size": 3, "slab_stride": 2, "channels": [8], "embed_dim": 16,
              "attention_dim": 8}
MIL = ["--model", "mil", "--set", f"model.kwargs={json.dumps(MIL_KWARGS)}"]
FAST = ["--threads", "1", "--batch_size", "4"]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: ``{path: (size, mtime_ns, sha256)}`` (folders: ``("dir",)``)."""
    out: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_dir() and not p.is_symlink():
                out[str(p) + "/"] = ("dir",)
            else:
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_nothing_written(before: dict, after: dict, lock_root: Path | None = None) -> None:
    """Nothing changed, nothing new, nothing gone; except (when ``lock_root`` is given) empty ``*.lock``
    files directly in ``lock_root``: ``prepare`` takes a file lock on the dataset before it checks it."""
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    gone = sorted(before.keys() - after.keys())
    new = sorted(k for k in after.keys() - before.keys()
                 if not (lock_root is not None and Path(k).parent == Path(lock_root) and k.endswith(".lock")
                         and after[k][0] == 0))
    assert (changed, gone, new) == ([], [], [])


def medvox(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
           **kwargs) -> subprocess.CompletedProcess:
    """``python -m medvox.cli ARGS`` in a subprocess; text stdout/stderr captured."""
    return subprocess.run([sys.executable, "-m", "medvox.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
                          **kwargs)


def popen_medvox(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m medvox.cli ARGS`` with stdout+stderr into ``log`` (read it after it ends)."""
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "medvox.cli", *map(str, args)], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})})


def comparable(metrics: dict) -> dict:
    """metrics.json without its wall-clock fields (``history[*]["time"]``)."""
    metrics = json.loads(json.dumps(metrics))
    for entry in metrics["history"]:
        entry.pop("time")
    return metrics


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code run by merely loading a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
