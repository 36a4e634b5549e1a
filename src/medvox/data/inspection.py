"""Open every case once: is it a usable 3D volume, and what are its shape, spacing and intensities?

One record per case feeds both ``check`` (problems) and the fingerprint (statistics), so an image
is decoded once per change: records are cached by file signature (path, size, mtime) and a second
``prepare`` of unchanged files decodes nothing. Files are read by a thread pool: gzip inflation
and NumPy reductions release the GIL, and threads need no process start-up or pickling.
In-memory arrays (MedMNIST) are checked vectorised, in chunks.

A file's statistics are computed slab by slab from the voxels in their stored type (``io.open_image``),
never from a float32 copy of the whole volume, so inspecting a volume needs about its own stored size
(a 640^3 int16 CT: see :func:`_volume_stats`). The numbers are those of the whole array at once (min,
max, percentiles of the same strided subsample, the same seeded foreground sample); mean and std are
accumulated in float64.

Besides errors, a record yields warnings on every run, cached or not (:func:`record_warnings`): a sheared
grid (the shear is not applied), a spacing ratio above ``MAX_ANISOTROPY``, an axis of fewer than
``MIN_AXIS`` or more than ``MAX_AXIS`` voxels, or axes more than ``MAX_SHAPE_RATIO`` times apart.
"""

from __future__ import annotations

import math
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
RECORD_VERSION = 2  # bump when a record gains fields: older cached records are inspected again
MAX_ANISOTROPY = 20.0  # coarsest / finest spacing above this: a warning (e.g. 0.1 x 0.1 x 10 mm)
MIN_AXIS, MAX_AXIS, MAX_SHAPE_RATIO = 8, 1024, 50.0  # voxels per axis outside these: a warning


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (transient: it disappears when done)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def inspect_cases(cases: list[Case], workers: int | None = None, cache: dict[str, Any] | None = None,
                  progress: bool = True, max_mb: float | None = None) -> tuple[list[dict | None], list[Problem]]:
    """Inspect every case: a record per case (None when unusable) and the problems found.

    Args:
        cases: the cases, files or in-memory arrays.
        workers: reader threads (default: the CPUs granted to this process, `medvox.machine.available_cpus`).
        cache: ``{case signature: record}`` from an earlier run; hits are not decoded. Updated in place
            with the new good records.
        progress: show a progress bar for large sets.
        max_mb: refuse, before decoding, a file whose reading needs more memory (``data.max_volume_mb``).

    Cases naming the same file(s) (10,000 rows pointing at one image) are inspected once.
    """
    records: list[dict | None] = [None] * len(cases)
    problems: list[Problem] = []
    keys: dict[int, str | None] = {}
    in_memory, todo = [], []
    first_of: dict[str, int] = {}
    same: dict[int, int] = {}
    for i, c in enumerate(cases):
        if c.array is None and (not c.images or c.meta.get("escapes")):
            continue  # a path that escapes the data folder is reported by the source and never opened
        keys[i] = inspection_key(c)
        if c.array is None and keys[i] in first_of:
            same[i] = first_of[keys[i]]  # the same file(s) as an earlier case: its result is this one's
            continue
        if keys[i] is not None:
            first_of[keys[i]] = i
        hit = cache.get(keys[i]) if cache is not None and keys[i] is not None else None
        if hit is not None and hit.get("v") == RECORD_VERSION:
            records[i] = hit
        else:
            (in_memory if c.array is not None else todo).append(i)

    def keep(i: int, record: dict | None) -> None:
        records[i] = record
        if record is not None and keys[i] is not None and cache is not None:
            cache[keys[i]] = record

    for i, record, found in _inspect_arrays([cases[i] for i in in_memory], in_memory):
        keep(i, record)
        problems += found
    found_by: dict[int, list[Problem]] = {}
    workers = max(1, min(workers or available_cpus(), len(todo) or 1))
    with progress_bar(progress and len(todo) >= 50) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("checking images", total=len(todo))
        results = pool.map(lambda case: inspect_case(case, max_mb), [cases[i] for i in todo])
        for i, (record, found) in zip(todo, results, strict=True):
            bar.advance(task)
            keep(i, record)
            found_by[i] = found
    for i, first in same.items():
        records[i] = records[first]
        found_by[i] = [Problem(p.what, p.fix, level=p.level) for p in found_by.get(first, [])]
    for i in sorted(found_by):
        problems += [_locate(p, cases[i], i) for p in found_by[i]]
    for i, record in enumerate(records):
        if record is not None:
            problems += [_locate(Problem(what, fix, level="warning"), cases[i], i)
                         for what, fix in record_warnings(record)]
    return records, problems


def record_warnings(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(what, fix)`` for what is usable but odd about an image: a sheared grid, extreme anisotropy or shape."""
    out = []
    shear = float(record.get("shear_deg") or 0.0)
    if shear > 0:
        out.append((f"sheared grid: the voxel axes are {shear:.3g} degrees off perpendicular (a tilted CT gantry?); "
                    "medvox resamples along the voxel axes and drops the shear",
                    "resample the image onto an orthogonal grid first if the shear matters"))
    spacing = [float(v) for v in record.get("spacing") or []]
    if spacing and min(spacing) > 0 and max(spacing) / min(spacing) > MAX_ANISOTROPY:
        out.append((f"extreme anisotropy: spacing {' x '.join(f'{v:g}' for v in spacing)} mm (D x H x W), "
                    f"{max(spacing) / min(spacing):.0f}x between the finest and the coarsest axis",
                    "check the voxel size in the header; along the coarse axis the volume holds little 3D detail"))
    shape = [int(v) for v in record.get("shape") or []]
    if shape and (min(shape) < MIN_AXIS or max(shape) > MAX_AXIS or max(shape) / min(shape) > MAX_SHAPE_RATIO):
        out.append((f"extreme shape: {' x '.join(map(str, shape))} voxels (D x H x W)",
                    "check that this is the 3D volume meant (not a thin slab, a 2D stack or a mosaic); medvox "
                    "resamples it to the plan's grid"))
    return out


def _locate(p: Problem, case: Case, index: int) -> Problem:
    p.row, p.case_id, p.case_index = case.row, case.id, index
    p.file = p.file or case.file
    return p


def inspect_case(case: Case, max_mb: float | None = None) -> tuple[dict | None, list[Problem]]:
    """Read a file-based case (all channels) and check it; the record is None when it is unusable.

    Warnings are not returned here: they follow from the record (:func:`record_warnings`).
    """
    volumes, problems = [], []
    written = [w for w in case.meta.get("written", []) if w]
    written = written if len(written) == len(case.images) else [str(p) for p in case.images]
    for path, name in zip(case.images, written, strict=True):
        try:
            volumes.append(image_io.open_image(path, max_mb))
        except image_io.ImageError as exc:
            problems.append(Problem(exc.what, exc.fix, file=name))
        except Exception as exc:  # noqa: BLE001 - any failure to read is a problem to report
            problems.append(Problem(f"unreadable ({type(exc).__name__}: {exc})", "re-export the file",
                                    file=name))
    if problems:
        return None, problems
    return inspect_volumes(volumes)


def inspect_volumes(volumes: list[image_io.Volume]) -> tuple[dict | None, list[Problem]]:
    """The record and problems of one case's opened channel images (:func:`inspect_case` after reading them;
    ``predict`` gives the volume it has read, ``Volume(array, meta)``, so a file is decoded once). The record is
    None when the case is unusable; the problems carry no row or file (the caller knows the case)."""
    shapes = {tuple(v.data.shape[-3:]) for v in volumes}
    if len(shapes) > 1:
        return None, [Problem(f"the channel images differ in shape {sorted(shapes)}",
                              "resample every channel of a case onto one grid (e.g. PET onto CT)")]
    stats = [_volume_stats(v, c) for v in volumes for c in range(v.channels)]
    problems = [Problem(what, fix) for s in stats for what, fix in _stat_problems(s)]
    meta = volumes[0].meta
    record = {
        "v": RECORD_VERSION,
        "shape": [int(n) for n in volumes[0].data.shape[-3:]],
        "channels": sum(v.channels for v in volumes),
        "spacing": [float(v) for v in meta["spacing"]],
        "source_orientation": meta.get("source_orientation", "RAS"),  # an in-memory array is taken as RAS
        "modality": [v.meta.get("modality") for v in volumes for _ in range(v.channels)],
        "dtype": meta.get("dtype"),
        "shear_deg": max(float(v.meta.get("shear_deg") or 0.0) for v in volumes),
        "stats": stats,
    }
    return (None if problems else record), problems


def _volume_stats(volume: image_io.Volume, c: int) -> dict[str, Any]:
    """Statistics of channel ``c`` ``(D, H, W)``, slab by slab; percentiles from a strided subsample.

    The numbers of the whole float32 array at once: ``values`` is the channel in C order without NaN/Inf,
    the subsample every ``step``-th of them, the foreground sample seeded. Peak memory is the volume as
    stored plus one 16 MB slab: a 640^3 int16 CT (500 MiB of voxels, 3.3 MB as .nii.gz) is inspected at 581 MiB
    peak RSS above the interpreter's (3.2 GiB over a whole float32 copy); ``resource.getrusage`` in a fresh
    process (``tests/data/test_io_checks.py``).
    """
    size = math.prod(volume.channel(c).shape)
    n_finite, lo, hi, total = 0, math.inf, -math.inf, 0.0
    for slab in volume.slabs(c):  # pass 1: count, min, max, sum
        finite = slab.reshape(-1) if np.isfinite(slab).all() else slab[np.isfinite(slab)]
        n_finite += finite.size
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            total += float(finite.sum(dtype=np.float64))
    n_bad = size - n_finite
    if n_finite == 0:
        return {"n_nonfinite": n_bad, "min": None, "max": None}
    step = max(1, n_finite // _SAMPLE_VOXELS)
    mean = total / n_finite
    subs, squares, offset = [], 0.0, 0
    for slab in volume.slabs(c):  # pass 2: the strided subsample and the squared deviations
        finite = slab[np.isfinite(slab)] if n_bad else slab.reshape(-1)
        subs.append(finite[(-offset) % step::step].copy())  # a copy: a view would keep the whole slab alive
        offset += finite.size
        squares += float(np.square(finite - mean, dtype=np.float64).sum())
    sub = np.concatenate(subs)
    stats = {"n_nonfinite": n_bad, "min": lo, "max": hi, "mean": mean, "std": math.sqrt(squares / n_finite),
             "integer": bool(np.all(sub == np.round(sub)))}
    p = np.percentile(sub, [0.5, 50, 99.5])
    stats.update(p00_5=float(p[0]), p50=float(p[1]), p99_5=float(p[2]))
    stats["fg"] = _foreground_sample(volume, c, lo) if not n_bad else _sample(sub[sub > lo])
    return stats


def _foreground_sample(volume: image_io.Volume, c: int, lo: float) -> list[float]:
    """:func:`_sample` of the foreground voxels of channel ``c``: the body for CT-like data (> -500 HU with
    enclosed air such as the lungs filled in, slice by slice, on an in-plane thinned grid), else everything
    above the minimum (the background). The latter can be most of the volume: it is counted slab by slab and
    only the sampled voxels are gathered, in the order ``_sample`` would take them."""
    x = volume.channel(c)
    if lo > -500:
        counts = [int(np.count_nonzero(slab > lo)) for slab in volume.slabs(c)]
        total = sum(counts)
        if total <= _FG_SAMPLE:
            return _sample(np.concatenate([slab[slab > lo] for slab in volume.slabs(c)]))
        picks = np.random.default_rng(0).choice(total, _FG_SAMPLE, replace=False)  # as _sample draws them
        out = np.empty(_FG_SAMPLE, np.float32)
        start = 0
        for slab, n in zip(volume.slabs(c), counts, strict=True):
            inside = (picks >= start) & (picks < start + n)
            if inside.any():
                out[inside] = slab[slab > lo][picks[inside] - start]
            start += n
        return np.round(out.astype(np.float64), 3).tolist()
    step = max(1, int(np.ceil(np.sqrt(x.size / (4 * _SAMPLE_VOXELS)))))
    parts = []
    for slab in volume.slabs(c):  # in-plane thinning keeps large CTs cheap
        thin = slab[:, ::step, ::step]
        body = thin > -500
        for k in range(body.shape[0]):
            body[k] = _fill_holes(body[k])
        parts.append(thin[body])
    return _sample(np.concatenate(parts))


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
                channel = flat[b, c].astype(np.float32).reshape(stack.shape[2:])
                stats.append(_volume_stats(image_io.Volume(channel, {}), 0))
                continue
            sub = flat[b, c, ::step]
            stats.append({"n_nonfinite": 0, "min": lo[b, c], "max": hi[b, c], "mean": float(mean[b, c]),
                          "std": float(std[b, c]), "integer": not is_float,
                          "p00_5": float(pct[0, b, c]), "p50": float(pct[1, b, c]), "p99_5": float(pct[2, b, c]),
                          "fg": _sample(sub[sub > lo[b, c]])})
        problems = [_locate(Problem(what, fix), case, i) for s in stats for what, fix in _stat_problems(s)]
        record = {"v": RECORD_VERSION, "shape": [int(v) for v in stack.shape[2:]], "channels": int(stack.shape[1]),
                  "spacing": [1.0, 1.0, 1.0], "source_orientation": "RAS", "modality": [None] * stack.shape[1],
                  "dtype": str(stack.dtype), "stats": stats}
        yield i, (None if problems else record), problems


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage  # imported on use: SciPy's import is part of every warm start-up otherwise

    return ndimage.binary_fill_holes(mask)
