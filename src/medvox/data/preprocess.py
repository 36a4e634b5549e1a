"""Preprocess a volume once: resample to the plan's spacing, normalise, center crop/pad.

Orientation is already RAS (``io.read_image``). Resampling uses ``scipy.ndimage.zoom`` with
``grid_mode=True``: voxel *centres* and the field of view are preserved, so a structure stays at
its physical position (order 1 for images). Along an axis that is made coarser (factor f < 1) the volume
is first smoothed with a Gaussian of sigma (1/f - 1) / 2 input voxels (scikit-image's anti-aliasing
rule): linear interpolation alone samples the input at the output's centres, so a structure a few voxels
thick comes out thicker or thinner by up to ~30 % depending on where it sits between them (aliasing);
after the filter, by less than ~10 %. Plans made before this rule (no ``antialias`` key) keep plain
interpolation, so their checkpoints see what they were trained on. Padding uses the channel's background
(its minimum after normalisation: air for CT, 0 for masks).

Example:
    >>> x = preprocess_case(case, plan)  # (C, D, H, W) float32, plan["target_shape"] spatially
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medvox.data import io as image_io
from medvox.data.inspection import progress_bar
from medvox.data.sources import Case
from medvox.errors import DataError
from medvox.machine import available_cpus

_FLOAT16_MAX = 60000.0
# below this many files, spawning workers (about 2 s of imports each) costs more than it saves
MIN_FILES_FOR_PROCESSES = 64


def preprocess_volume(array: np.ndarray, meta: dict[str, Any], plan: dict[str, Any],
                      overwrite: bool = False) -> np.ndarray:
    """Resample, normalise and crop/pad one volume.

    Args:
        array: ``(D, H, W)`` or ``(C, D, H, W)`` in RAS array order (as ``read_image`` returns it).
        meta: needs ``spacing`` in array axis order (mm); 1.0 is assumed when absent.
        plan: ``target_spacing``, ``target_shape`` and per-channel ``normalization``.
        overwrite: ``array`` may be used as scratch space (the anti-aliasing filter runs in place): a 640^3
            volume then needs one float32 copy of itself instead of two (``preprocess_case`` owns its array).

    Returns:
        float32 array ``(C, *plan["target_shape"])``.
    """
    x = np.asarray(array, dtype=np.float32)
    overwrite = overwrite or not np.may_share_memory(x, array)  # a converted copy is ours to overwrite
    x = x[None] if x.ndim == 3 else x
    norms = plan["normalization"]
    if len(norms) != x.shape[0]:
        raise ValueError(f"the plan has {len(norms)} channel(s) but the volume has {x.shape[0]}: give each case the "
                         "channels the plan was made from (a 4D file's 4th axis, or one image per channel)")
    factors = np.asarray(meta.get("spacing", [1.0, 1.0, 1.0]), float) / np.asarray(plan["target_spacing"], float)
    out = []
    for channel, norm in zip(x, norms, strict=True):
        channel = resample(channel, factors, antialias=bool(plan.get("antialias", False)), overwrite=overwrite)
        channel = normalize(channel, norm)
        out.append(crop_or_pad(channel, plan["target_shape"], float(channel.min())))
    return np.stack(out).astype(np.float32, copy=False)


def resample(x: np.ndarray, factors: np.ndarray, antialias: bool = True, overwrite: bool = False) -> np.ndarray:
    """One channel ``(D, H, W)`` zoomed by ``factors`` (output / input voxels per axis), linear, voxel centres
    kept; ``antialias``: axes with a factor below 1 are Gaussian-filtered first (sigma (1/f - 1) / 2).

    Example: a slab 3 voxels thick, shifted by 0-7 voxels, resized from 64 to 28 voxels across it; its
    thickness measured back on the input grid:

        >>> slab = np.zeros((4, 4, 64), np.float32); slab[..., 21:24] = 1
        >>> f = np.array([1, 1, 28 / 64])
        >>> seen = [[float(resample(np.roll(slab, k, axis=2), f, aa)[0, 0].sum() / f[2]) for k in range(8)]
        ...         for aa in (False, True)]
        >>> [(round(min(t), 2), round(max(t), 2)) for t in seen]
        [(2.29, 3.92), (2.8, 3.31)]
    """
    factors = np.asarray(factors, dtype=float)
    if np.allclose(factors, 1.0, rtol=1e-3):
        return x
    if antialias:
        sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
        if sigma.max() > 0 and overwrite and x.flags.writeable:  # in place: scipy filters line by line
            ndimage.gaussian_filter(x, sigma, mode="nearest", output=x)
        elif sigma.max() > 0:
            x = ndimage.gaussian_filter(x, sigma, mode="nearest")
    return ndimage.zoom(x, factors, order=1, mode="nearest", grid_mode=True)


def normalize(x: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """One channel ``(D, H, W)`` by the plan's scheme: ct | zscore | minmax | none."""
    scheme = norm["scheme"]
    if scheme == "ct":  # global statistics: the same HU maps to the same value in every scan
        lo, hi = norm["clip"]
        return ((np.clip(x, lo, hi) - norm["mean"]) / norm["std"]).astype(np.float32)
    if scheme == "zscore":  # per image: MRI intensities have no absolute scale
        lo, hi = np.percentile(x, norm.get("clip_percentiles", [0.5, 99.5]))
        x = np.clip(x, lo, hi)
        return ((x - x.mean()) / max(float(x.std()), 1e-8)).astype(np.float32)
    if scheme == "minmax":
        return ((x - norm["min"]) / (norm["max"] - norm["min"])).astype(np.float32)
    if scheme == "none":
        return x.astype(np.float32, copy=False)
    raise ValueError(f"unknown normalization scheme {scheme!r}")


def crop_or_pad(x: np.ndarray, shape: list[int], value: float) -> np.ndarray:
    """Center crop / pad ``(D, H, W)`` to ``shape`` (an odd remainder goes to the end)."""
    for axis, size in enumerate(shape):
        have = x.shape[axis]
        if have > size:
            start = (have - size) // 2
            x = np.take(x, range(start, start + size), axis=axis)
        elif have < size:
            before = (size - have) // 2
            widths = [(0, 0)] * x.ndim
            widths[axis] = (before, size - have - before)
            x = np.pad(x, widths, constant_values=value)
    return x


def read_case(case: Case) -> tuple[np.ndarray, dict[str, Any]]:
    """A case's volume ``(C, D, H, W)`` and meta: its in-memory array, or all its channel files."""
    if case.array is not None:
        array = np.asarray(case.array)
        return (array[None] if array.ndim == 3 else array), {"spacing": [1.0, 1.0, 1.0]}
    arrays, metas = [], []
    for path in case.images or []:
        array, meta = image_io.read_image(path)
        arrays.append(array[None] if array.ndim == 3 else array)
        metas.append(meta)
    if not arrays:
        raise DataError(f"case {case.id}: no image")
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), metas[0]  # one channel file: no copy


def preprocess_case(case: Case, plan: dict[str, Any]) -> np.ndarray:
    """Read and preprocess one case (``predict`` uses it on new files): ``(C, *target_shape)`` float32."""
    array, meta = read_case(case)
    # a file's array was just read for this call; an in-memory case's (an npz row) is shared with its source
    return preprocess_volume(array, meta, plan, overwrite=case.array is None)


def _store_row(case: Case, plan: dict[str, Any], store: str, row: int, images: np.ndarray | None = None) -> None:
    """Preprocess one case straight into row ``row`` of the memory-mapped store (a worker's job)."""
    x = preprocess_case(case, plan)
    own = images is None
    images = np.load(store, mmap_mode="r+") if own else images
    if images.dtype == np.float16 and float(np.abs(x).max()) > _FLOAT16_MAX:
        raise DataError(f"case {case.id}: values up to {np.abs(x).max():.3g} overflow float16 storage; "
                        "use --normalization ct/zscore/minmax")
    images[row] = x
    if own:
        images.flush()


def build_images(store: Path, cases: list[Case], plan: dict[str, Any], rows: list[int],
                 workers: int | None = None, progress: bool = True) -> None:
    """Preprocess ``cases[r]`` into ``store[r]`` for every ``r`` in ``rows`` (the store exists).

    In-memory cases run in this process (pickling them would cost more than the work); file cases
    run in a pool of spawned processes (safe next to CUDA and threads), or in this process when
    ``workers`` is 1 or there are fewer than ``MIN_FILES_FOR_PROCESSES`` of them.
    """
    memory = [r for r in rows if cases[r].array is not None]
    files = [r for r in rows if cases[r].array is None]
    workers = max(1, min(workers or available_cpus(), len(files) or 1))
    with progress_bar(progress and len(rows) >= 50) as bar:
        task = bar.add_task("preprocessing", total=len(rows))
        if memory:
            _build_in_memory(store, cases, plan, memory, bar, task)
        if workers == 1 or len(files) < MIN_FILES_FOR_PROCESSES:
            images = np.load(store, mmap_mode="r+")
            for r in files:
                _store_row(cases[r], plan, str(store), r, images)
                bar.advance(task)
            images.flush()
        elif files:
            _build_in_processes(store, cases, plan, files, workers, bar, task)


def _build_in_processes(store: Path, cases: list[Case], plan: dict[str, Any], rows: list[int], workers: int,
                        bar, task) -> None:
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_store_row, _picklable(cases[r]), plan, str(store), r) for r in rows]
            for future in futures:
                future.result()
                bar.advance(task)
    except BrokenProcessPool as exc:
        raise DataError("a preprocessing worker process died (out of memory? or a script that calls prepare() "
                        "without `if __name__ == '__main__':`); retry with --workers 1 to see the error") from exc


def _build_in_memory(store: Path, cases: list[Case], plan: dict[str, Any], rows: list[int], bar, task) -> None:
    images = np.load(store, mmap_mode="r+")  # opened once: thousands of MedMNIST rows
    for r in rows:
        _store_row(cases[r], plan, str(store), r, images)
        bar.advance(task)
    images.flush()


def _picklable(case: Case) -> Case:
    """The case without cached signatures or big meta: only what the worker needs."""
    return Case(id=case.id, group=case.group, images=case.images, label=case.label, row=case.row)
