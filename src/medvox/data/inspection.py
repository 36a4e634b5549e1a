"""Open every case once: is it a usable 3D volume, and what are its shape, spacing and intensities?

One record per case feeds both ``check`` (problems) and the fingerprint (statistics), so an image
is decoded once per change: records are cached by file signature (path, size, mtime) and a second
``prepare`` of unchanged files decodes nothing. Files are read by a thread pool: gzip inflation
and NumPy reductions release the GIL, and threads need no process start-up or pickling.
In-memory arrays (MedMNIST) are checked vectorised, in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medvox.data import io as image_io
from medvox.data.cache import inspection_key
from medvox.data.report import Problem
from medvox.data.sources import Case
from medvox.machine import available_cpus

_SAMPLE_VOXELS = 256_000  # percentiles from a strided subsample of at most this many voxels
_FG_SAMPLE = 400  # foreground voxels kept per case and channel for the global intensity statistics
_CHUNK_VOXELS = 8_000_000  # in-memory cases are reduced together, this many voxels at a time


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (transient: it disappears when done)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def inspect_cases(cases: list[Case], workers: int | None = None, cache: dict[str, Any] | None = None,
                  progress: bool = True) -> tuple[list[dict | None], list[Problem]]:
    """Inspect every case: a record per case (None when unusable) and the problems found.

    Args:
        cases: the cases, files or in-memory arrays.
        workers: reader threads (default: the CPUs granted to this process, `medvox.machine.available_cpus`).
        cache: ``{case signature: record}`` from an earlier run; hits are not decoded. Updated in place
            with the new good records.
        progress: show a progress bar for large sets.
    """
    records: list[dict | None] = [None] * len(cases)
    problems: list[Problem] = []
    keys: dict[int, str | None] = {}
    in_memory, todo = [], []
    for i, c in enumerate(cases):
        if c.array is None and (not c.images or c.meta.get("escapes")):
            continue  # a path that escapes the data folder is reported by the source and never opened
        keys[i] = inspection_key(c) if cache is not None else None
        hit = cache.get(keys[i]) if keys[i] is not None else None
        if hit is not None:
            records[i] = hit
        else:
            (in_memory if c.array is not None else todo).append(i)

    def keep(i: int, record: dict | None) -> None:
        records[i] = record
        if record is not None and keys[i] is not None:
            cache[keys[i]] = record

    for i, record, found in _inspect_arrays([cases[i] for i in in_memory], in_memory):
        keep(i, record)
        problems += found
    workers = max(1, min(workers or available_cpus(), len(todo) or 1))
    with progress_bar(progress and len(todo) >= 50) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("checking images", total=len(todo))
        for i, (record, found) in zip(todo, pool.map(inspect_case, [cases[i] for i in todo]), strict=True):
            bar.advance(task)
            keep(i, record)
            problems += [_locate(p, cases[i], i) for p in found]
    return records, problems


def _locate(p: Problem, case: Case, index: int) -> Problem:
    p.row, p.case_id, p.case_index = case.row, case.id, index
    p.file = p.file or case.file
    return p


def inspect_case(case: Case, reader: Callable | None = None) -> tuple[dict | None, list[Problem]]:
    """Read a file-based case (all channels) and check it; the record is None when it is unusable."""
    reader = reader or image_io.read_image
    arrays, metas, problems = [], [], []
    written = [w for w in case.meta.get("written", []) if w]
    written = written if len(written) == len(case.images) else [str(p) for p in case.images]
    for path, name in zip(case.images, written, strict=True):
        try:
            array, meta = reader(path)
        except image_io.ImageError as exc:
            problems.append(Problem(exc.what, exc.fix, file=name))
            continue
        except Exception as exc:  # noqa: BLE001 - any failure to read is a problem to report
            problems.append(Problem(f"unreadable ({type(exc).__name__}: {exc})", "re-export the file",
                                    file=name))
            continue
        arrays.append(array if array.ndim == 4 else array[None])
        metas.append(meta)
    if problems:
        return None, problems
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        return None, [Problem(f"the channel images differ in shape {sorted(shapes)}",
                              "resample every channel of a case onto one grid (e.g. PET onto CT)")]
    volume = np.concatenate(arrays)
    stats = [_volume_stats(channel) for channel in volume]
    problems = [Problem(what, fix) for s in stats for what, fix in _stat_problems(s)]
    record = {
        "shape": [int(v) for v in volume.shape[1:]],
        "channels": int(volume.shape[0]),
        "spacing": [float(v) for v in metas[0]["spacing"]],
        "source_orientation": metas[0]["source_orientation"],
        "modality": [m.get("modality") for m in metas for _ in range(m["channels"])],
        "stats": stats,
    }
    return (None if problems else record), problems


def _volume_stats(x: np.ndarray) -> dict[str, Any]:
    """Statistics of one channel ``(D, H, W)``; percentiles from a strided subsample."""
    finite = np.isfinite(x)
    n_bad = int(x.size - np.count_nonzero(finite))
    values = x[finite] if n_bad else x.reshape(-1)
    if values.size == 0:
        return {"n_nonfinite": n_bad, "min": None, "max": None}
    step = max(1, values.size // _SAMPLE_VOXELS)
    sub = values[::step]
    lo, hi = float(values.min()), float(values.max())
    stats = {"n_nonfinite": n_bad, "min": lo, "max": hi, "mean": float(values.mean()),
             "std": float(values.std()), "integer": bool(np.all(sub == np.round(sub)))}
    p = np.percentile(sub, [0.5, 50, 99.5])
    stats.update(p00_5=float(p[0]), p50=float(p[1]), p99_5=float(p[2]))
    stats["fg"] = _sample(_foreground(x, lo) if not n_bad else sub[sub > lo])
    return stats


def _foreground(x: np.ndarray, lo: float) -> np.ndarray:
    """Foreground voxels: the body for CT-like data (> -500 HU with enclosed air such as the lungs
    filled in, slice by slice), else everything above the minimum (the background)."""
    if lo > -500:
        return x[x > lo]
    step = max(1, int(np.ceil(np.sqrt(x.size / (4 * _SAMPLE_VOXELS)))))
    x = x[:, ::step, ::step]  # in-plane thinning keeps large CTs cheap
    body = x > -500
    for k in range(body.shape[0]):
        body[k] = _fill_holes(body[k])
    return x[body]


def _sample(fg: np.ndarray) -> list[float]:
    """A seeded sample of at most ``_FG_SAMPLE`` foreground voxels."""
    if fg.size > _FG_SAMPLE:
        fg = fg[np.random.default_rng(0).choice(fg.size, _FG_SAMPLE, replace=False)]
    return np.round(fg.astype(np.float64), 3).tolist()


def _stat_problems(stats: dict[str, Any]) -> list[tuple[str, str]]:
    if stats["n_nonfinite"]:
        return [(f"{stats['n_nonfinite']} NaN/Inf voxel(s)", "fix the export (NaN usually means a failed "
                 "resampling or division) or remove the case")]
    if stats["min"] == stats["max"]:
        # an error by default: a blank volume is almost always a failed export, not a real scan
        return [(f"constant volume (every voxel = {stats['min']:g})",
                 "re-export the image or remove the case (--skip-bad drops such cases)")]
    return []


def _inspect_arrays(cases: list[Case], indices: list[int]):
    """Yield ``(index, record, problems)`` for in-memory cases, reduced in vectorised chunks."""
    size = max((c.array.size for c in cases), default=1)
    step = max(1, _CHUNK_VOXELS // size)
    for start in range(0, len(cases), step):
        chunk, where = cases[start:start + step], indices[start:start + step]
        if len({np.shape(c.array) for c in chunk}) > 1:  # not one stack: case by case
            for case, i in zip(chunk, where, strict=True):
                yield from _array_chunk([case], [i])
            continue
        yield from _array_chunk(chunk, where)


def _array_chunk(chunk: list[Case], indices: list[int]):
    stack = np.stack([c.array for c in chunk])
    if stack.ndim == 4:
        stack = stack[:, None]
    if stack.ndim != 5 or min(stack.shape[2:]) == 1:
        for case, i in zip(chunk, indices, strict=True):
            yield i, None, [_locate(Problem(f"not a 3D volume (array shape {np.shape(case.array)})",
                                            "in-memory cases must be (D, H, W) or (C, D, H, W)"), case, i)]
        return
    flat = stack.reshape(stack.shape[0], stack.shape[1], -1)
    step = max(1, flat.shape[2] // 32_768)  # many small volumes: a thinner subsample per case suffices
    is_float = np.issubdtype(flat.dtype, np.floating)
    n_bad = (~np.isfinite(flat)).sum(axis=2) if is_float else np.zeros(flat.shape[:2], int)
    with np.errstate(invalid="ignore"):  # NaN/Inf cases are redone one by one below
        lo, hi = flat.min(axis=2).astype(float), flat.max(axis=2).astype(float)
        mean, std = flat.mean(axis=2, dtype=np.float32), flat.std(axis=2, dtype=np.float32)
        pct = np.percentile(flat[:, :, ::step], [0.5, 50, 99.5], axis=2)
    for b, (case, i) in enumerate(zip(chunk, indices, strict=True)):
        stats = []
        for c in range(flat.shape[1]):
            if is_float and n_bad[b, c]:
                stats.append(_volume_stats(flat[b, c].astype(np.float32)))
                continue
            sub = flat[b, c, ::step]
            stats.append({"n_nonfinite": 0, "min": lo[b, c], "max": hi[b, c], "mean": float(mean[b, c]),
                          "std": float(std[b, c]), "integer": not is_float,
                          "p00_5": float(pct[0, b, c]), "p50": float(pct[1, b, c]), "p99_5": float(pct[2, b, c]),
                          "fg": _sample(sub[sub > lo[b, c]])})
        problems = [_locate(Problem(what, fix), case, i) for s in stats for what, fix in _stat_problems(s)]
        record = {"shape": [int(v) for v in stack.shape[2:]], "channels": int(stack.shape[1]),
                  "spacing": [1.0, 1.0, 1.0], "source_orientation": "RAS", "modality": [None] * stack.shape[1],
                  "dtype": str(stack.dtype), "stats": stats}
        yield i, (None if problems else record), problems


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage  # imported on use: SciPy's import is part of every warm start-up otherwise

    return ndimage.binary_fill_holes(mask)
