"""Where preprocessed data lives on disk, how it is keyed, and how concurrent runs share it.

Layout (``root`` = ``cfg.cache_dir`` or ``$MEDVOX_CACHE`` or ``~/.cache/medvox``)::

    root/<dataset hash>.lock         flock: one process builds, the others wait and then read
    root/<dataset hash>/
        dataset.json                 what the hash stands for (source, kind, columns)
        inspect.json                 per-case image records keyed by file signature (check is free next time)
        splits_k5_seed0.json         the folds: independent of preprocessing, so they survive a new plan
        <plan hash>/
            plan.json  fingerprint.json
            images.npy               (N, C, D, H, W) float16/float32, opened with mmap_mode="r"
            index.json               per-row case id, label and key = hash(plan, input file signature)
            skipped_cases.json       only with skip_bad: what was dropped and why

The dataset hash names the source (absolute path and columns), not its contents: a touched file keeps
the folder and the splits, and only that case's row is rebuilt. The plan hash covers only what
changes the arrays (spacing, shape, normalisation, dtype, code version), so a new config gets a new
plan folder and an old config finds its old one again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medvox.config import DataConfig

CACHE_VERSION = 1  # bump when preprocessing code changes what it writes for the same plan


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$MEDVOX_CACHE``, else ``~/.cache/medvox``."""
    root = cfg.cache_dir or os.environ.get("MEDVOX_CACHE") or "~/.cache/medvox"
    return Path(root).expanduser()


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hex digest of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()[:n]


def file_signature(path: Path) -> str:
    """``path|size|mtime_ns`` of a file; for a DICOM folder, the same for every file in it."""
    path = Path(path).absolute()
    if path.is_dir():
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
        return f"{path}|dir|{stable_hash(entries)}"
    try:
        st = path.stat()
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def case_signature(case: Any) -> str:
    """What a case's input is: its files' signatures, or a hash of an in-memory array's bytes."""
    if case.array is not None:
        sig = case.meta.get("_signature")
        if sig is None:  # hashing 400 MB of MedMNIST-64 takes a while: once per case object
            digest = hashlib.blake2b(memoryview(case.array.tobytes()), digest_size=16).hexdigest()
            sig = case.meta["_signature"] = f"array|{case.array.dtype}|{list(case.array.shape)}|{digest}"
        return sig
    return " + ".join(file_signature(p) for p in case.images or [])


def inspection_key(case: Any) -> str | None:
    """The key of a case's inspection record in ``inspect.json``: a file case's signature, or the one its
    source gave an in-memory case (an npz row names its file); None for other arrays, whose content
    hash would cost as much as inspecting them again."""
    if case.array is None:
        return case_signature(case)
    return case.meta.get("_signature")


def dataset_hash(cfg: DataConfig, kind: str, source: Path) -> tuple[str, dict[str, Any]]:
    """The dataset folder's name and what it stands for (for ``dataset.json``)."""
    ident: dict[str, Any] = {"source": str(Path(source).expanduser().absolute()), "kind": kind}
    if kind == "manifest":
        ident.update(image_cols=list(cfg.image_cols), label_col=cfg.label_col, group_col=cfg.group_col,
                     fold_col=cfg.fold_col, id_col=cfg.id_col)
    return stable_hash(ident), ident


def plan_hash(plan: dict[str, Any]) -> str:
    """Hash of the plan entries that change the preprocessed arrays, and nothing else."""
    keys = ("target_spacing", "target_shape", "normalization", "storage_dtype")
    # "antialias" only when set: a plan from before it keeps its hash (and its store, made without it)
    extra = {"antialias": True} if plan.get("antialias") else {}
    return stable_hash({"version": CACHE_VERSION, **{k: plan[k] for k in keys}, **extra})


def case_key(plan_id: str, signature: str) -> str:
    return stable_hash([plan_id, signature], n=24)


def array_digest(images: Any, chunk_bytes: int = 64 << 20) -> str:
    """blake2b of an array's dtype, shape and bytes, read in chunks (a memory map reads ~1 GB/s)."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{images.dtype}{tuple(images.shape)}".encode())
    rows = max(1, chunk_bytes // max(1, images[:1].nbytes))
    for start in range(0, len(images), rows):
        digest.update(np.ascontiguousarray(images[start : start + rows]).tobytes())
    return digest.hexdigest()


def store_digest(store: Path) -> str:
    """:func:`array_digest` of a store (``images.npy``) through a memory map.

    Written once beside the store when it is built (``digest.json``), so a run that names the data it
    trained on (``runinfo.content_hash``) does not read gigabytes at every start.
    """
    import numpy as np

    return array_digest(np.load(store, mmap_mode="r"))


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created, empty); other holders wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """The parsed file, or ``default`` when it is missing or unreadable (a cache is never trusted blindly)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
