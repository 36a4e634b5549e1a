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
            digest.json              blake2b of the whole store and a CRC-32 per row (see check_store)
            skipped_cases.json       only with skip_bad: what was dropped and why

The dataset hash names the source (absolute path and columns), not its contents: a touched file keeps
the folder and the splits, and only that case's row is rebuilt. The plan hash covers only what
changes the arrays (spacing, shape, normalisation, dtype, code version), so a new config gets a new
plan folder and an old config finds its old one again.

The cache verifies what it serves (:func:`check_store`): on every hit the store's ``.npy`` header must
match ``index.json`` and the file must hold exactly that many bytes (a truncated store would otherwise fail
every later run with "mmap length is greater than file size"), and every row's CRC-32 must match the one
written when the row was built (a store zeroed or overwritten in place would otherwise be served as a hit).
``prepare`` rebuilds what is damaged, with a message: the bad rows, or the whole store when it cannot be
read. Cost on a hit, AdrenalMNIST3D at 64^3 (1584 rows, a 792 MiB float16 store in the page cache), on a
2-core AMD EPYC VM shared with other jobs (load ~5): ``prepare`` hit 0.46 s without, 0.98 s with the check
(min of 7 interleaved runs; medians 0.55 / 1.08 s); :func:`row_checksums` alone 0.22-0.30 s (zlib CRC-32,
~3 GB/s; blake2b-128 would take 1.0 s, sha1 0.47 s). From a cold disk the read dominates, and training
reads those pages next anyway.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
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


def row_checksums(images: Any, chunk_bytes: int = 64 << 20) -> list[int]:
    """``zlib.crc32`` of each row's bytes (``images`` ``(N, ...)``, e.g. a memory map), read in chunks."""
    return store_checksums(images, chunk_bytes, whole=False)["rows"]


def store_checksums(images: Any, chunk_bytes: int = 64 << 20, whole: bool = True) -> dict[str, Any]:
    """``{"blake2b": array_digest(images), "rows": row_checksums(images)}`` in one pass over the bytes
    (``whole=False``: the rows only). What ``digest.json`` holds."""
    import zlib

    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{images.dtype}{tuple(images.shape)}".encode())
    rows, per_chunk = [], max(1, chunk_bytes // max(1, images[:1].nbytes))
    for start in range(0, len(images), per_chunk):
        chunk = np.ascontiguousarray(images[start : start + per_chunk])
        view = memoryview(chunk.reshape(-1).view(np.uint8))
        if whole:
            digest.update(view)
        step = chunk[:1].nbytes
        rows += [zlib.crc32(view[i : i + step]) for i in range(0, len(view), step)]
    return {"blake2b": digest.hexdigest(), "rows": rows} if whole else {"rows": rows}


def check_store(folder: Path, index: dict[str, Any]) -> tuple[str, list[int] | None] | None:
    """What is wrong with ``folder/images.npy``, or None when it is what ``index.json`` and ``digest.json`` say.

    Returns ``(what, bad_rows)``: ``bad_rows`` lists the rows whose CRC-32 differs from ``digest.json``'s, or is
    None when the store cannot be used at all (a bad header, a shape or dtype other than the index's, a size other
    than the header's). A ``digest.json`` without row checksums checks sizes only (the caller writes them).
    """
    import numpy as np

    store = folder / "images.npy"
    try:
        with open(store, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
    except (OSError, ValueError) as exc:
        return f"images.npy has no valid .npy header ({type(exc).__name__}: {str(exc)[:80]})", None
    want = (tuple(index.get("shape") or ()), str(np.dtype(index.get("dtype") or "V")))
    if (tuple(shape), str(dtype)) != want or fortran:
        return f"images.npy holds {tuple(shape)} {dtype}, index.json says {want[0]} {want[1]}", None
    need = offset + math.prod(shape) * dtype.itemsize
    size = store.stat().st_size
    if size != need:
        return f"images.npy is {size:,} bytes but its header needs {need:,} (truncated or overwritten)", None
    known = read_json(folder / "digest.json")
    rows = known.get("rows") if isinstance(known, dict) else None
    if not isinstance(rows, list) or len(rows) != shape[0]:
        return None
    got = row_checksums(np.load(store, mmap_mode="r"))
    bad = [i for i, (a, b) in enumerate(zip(got, rows, strict=True)) if a != b]
    return (f"{len(bad)} of {shape[0]} rows differ from the checksums written when they were built", bad) if bad else None


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
