"""Dataset fingerprint and preprocessing plan, in the manner of nnU-Net's experiment planning.

The fingerprint describes the cross-validation pool (never the held-out test cases, so they cannot
leak into preprocessing): spacings, shapes, orientations, intensity statistics per channel from
foreground samples, class counts and a modality guess. The plan turns it into decisions:

* target spacing: the median spacing; for strongly anisotropic data (coarse axis > 3x the others
  and 3x fewer voxels) the coarse axis takes the 10th percentile instead (nnU-Net's rule);
* target shape: the native shape when all cases already share shape and spacing (MedMNIST),
  else the median resampled shape rounded up to a multiple of 16; an axis above ``max_size``
  keeps the whole field of view by coarsening that axis's spacing rather than cropping;
* normalisation per channel: CT -> clip to the foreground [0.5, 99.5] percentiles (or
  ``ct_window``) and z-score with global foreground statistics; MRI/PET -> per-image percentile
  clip and z-score; uint8-like data (MedMNIST masks) -> "minmax" to [0, 1] with global bounds;
* storage dtype: float16 for normalised data (values of order 1: the round-trip error is below
  1e-3 relative), float32 for ``normalization="none"`` (raw intensities).

The plan also keeps ``input_range``: the smallest and largest spacing, shape and field of view per axis over
the pool's cases, and per channel the lowest 0.5th and highest 99.5th intensity percentile of a case and the
narrowest and widest 0.5-99.5 band. ``predict`` compares every new case with it (:func:`range_warnings`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.data.sources import Case

AXES = "(C, D, H, W): D inferior->superior, H posterior->anterior, W left->right (RAS)"
_SCHEMES = {"CT": "ct", "MRI": "zscore", "PET": "zscore", "other": "minmax"}
_DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "PT": "PET"}


def make_fingerprint(cases: list[Case], records: list[dict], classes: list[str]) -> dict[str, Any]:
    """Summarise the pool cases and their inspection records (aligned lists).

    Returns:
        A JSON-safe dict: ``n_cases``, ``classes``, ``class_counts``, ``channels``, ``spacings``,
        ``shapes`` (array axis order), their medians, ``orientations``, ``intensity`` (per channel)
        and ``modality`` (per channel guess).
    """
    if not records:
        raise ValueError("cannot fingerprint an empty dataset")
    spacings = np.array([r["spacing"] for r in records], dtype=float)
    shapes = np.array([r["shape"] for r in records], dtype=int)
    channels = int(records[0]["channels"])
    counts = Counter(c.label for c in cases if c.label is not None)
    intensity = [_channel_intensity(records, ch) for ch in range(channels)]
    return {
        "n_cases": len(cases),
        "classes": list(classes),
        "class_counts": [int(counts.get(i, 0)) for i in range(len(classes))],
        "channels": channels,
        "spacings": spacings.round(6).tolist(),
        "shapes": shapes.tolist(),
        "spacing_median": np.median(spacings, axis=0).round(6).tolist(),
        "shape_median": np.median(shapes, axis=0).tolist(),
        "orientations": dict(Counter(r["source_orientation"] for r in records)),
        "intensity": intensity,
        "modality": [_guess_modality(stats) for stats in intensity],
        "input_range": input_range(records),
    }


AXIS_NAMES = ("z", "y", "x")  # the array axes D, H, W (RAS: inferior->superior, posterior->anterior, left->right)
RANGE_FACTOR = 1.5  # spacing, shape, field of view and intensity band width: outside [min / 1.5, max * 1.5]
RANGE_MARGIN = 0.5  # intensity percentiles: outside [lowest - 0.5 w, highest + 0.5 w], w = the training band
RANGE_TOLERANCE = (f"spacing, shape, field of view and intensity band width outside [train min / {RANGE_FACTOR:g}, "
                   f"train max x {RANGE_FACTOR:g}]; the 0.5th / 99.5th intensity percentile beyond the training "
                   f"cases' lowest / highest by more than {RANGE_MARGIN:g} x the training band")


def input_range(records: list[dict]) -> dict[str, Any]:
    """The range of the cases' inspection records (see the module docstring), JSON-safe.

    Returns:
        ``{"spacing": {"min": [z, y, x], "max": [...]}, "shape": {...}, "fov_mm": {...}, "intensity": [per channel
        {"p00_5_min", "p99_5_max", "band_min", "band_max"}]}``.
    """
    spacing = np.array([r["spacing"] for r in records], dtype=float)
    shape = np.array([r["shape"] for r in records], dtype=float)
    fov = spacing * shape

    def span(a: np.ndarray, digits: int = 6) -> dict[str, list[float]]:
        return {"min": a.min(axis=0).round(digits).tolist(), "max": a.max(axis=0).round(digits).tolist()}

    intensity = []
    for ch in range(int(records[0]["channels"])):
        if any("p00_5" not in r["stats"][ch] for r in records):
            break  # a record without percentiles: no intensity range
        lo = np.array([r["stats"][ch]["p00_5"] for r in records], dtype=float)
        hi = np.array([r["stats"][ch]["p99_5"] for r in records], dtype=float)
        intensity.append({"p00_5_min": _round(lo.min()), "p99_5_max": _round(hi.max()),
                          "band_min": _round((hi - lo).min()), "band_max": _round((hi - lo).max())})
    return {"spacing": span(spacing), "shape": {k: [int(v) for v in vals] for k, vals in span(shape).items()},
            "fov_mm": span(fov, 3), "intensity": intensity}


def range_warnings(record: dict[str, Any], trained: dict[str, Any]) -> list[str]:
    """Where a case's inspection record lies outside a plan's ``input_range`` (tolerance: :data:`RANGE_TOLERANCE`),
    one short code per finding, e.g. ``"spacing_z 10 mm > train max 3 mm"``; empty when it lies inside."""
    out = []
    spacing = [float(v) for v in record["spacing"]]
    shape = [int(v) for v in record["shape"]]
    measures = (("spacing", spacing, " mm"), ("shape", shape, " voxels"),
                ("fov", [s * n for s, n in zip(spacing, shape, strict=True)], " mm"))
    for (name, values, unit), key in zip(measures, ("spacing", "shape", "fov_mm"), strict=True):
        lo, hi = trained[key]["min"], trained[key]["max"]
        for axis, value, a, b in zip(AXIS_NAMES, values, lo, hi, strict=True):
            code = _outside(f"{name}_{axis}", value, a, b, unit)
            if code:
                out.append(code)
    ranges = trained.get("intensity") or []
    for ch, (stats, band) in enumerate(zip(record["stats"], ranges, strict=False)):
        tag = f"[channel {ch}]" if len(ranges) > 1 else ""
        margin = RANGE_MARGIN * (band["p99_5_max"] - band["p00_5_min"])
        if stats["p00_5"] < band["p00_5_min"] - margin:
            out.append(f"intensity_p0.5{tag} {_num(stats['p00_5'])} < train lowest {_num(band['p00_5_min'])}")
        if stats["p99_5"] > band["p99_5_max"] + margin:
            out.append(f"intensity_p99.5{tag} {_num(stats['p99_5'])} > train highest {_num(band['p99_5_max'])}")
        code = _outside(f"intensity_band{tag}", stats["p99_5"] - stats["p00_5"], band["band_min"], band["band_max"], "")
        if code:
            out.append(code)
    return out


def _outside(name: str, value: float, lo: float, hi: float, unit: str) -> str | None:
    if value > hi * RANGE_FACTOR:
        return f"{name} {_num(value)}{unit} > train max {_num(hi)}{unit}"
    if value < lo / RANGE_FACTOR:
        return f"{name} {_num(value)}{unit} < train min {_num(lo)}{unit}"
    return None


def _num(value: float) -> str:
    return f"{float(value):.4g}"


def _channel_intensity(records: list[dict], ch: int) -> dict[str, Any]:
    stats = [r["stats"][ch] for r in records]
    fg = np.concatenate([np.asarray(s["fg"], dtype=np.float64) for s in stats] or [np.zeros(0)])
    if fg.size == 0:
        fg = np.array([s["mean"] for s in stats])
    p = np.percentile(fg, [0.5, 50, 99.5])
    hints = Counter(r["modality"][ch] for r in records if r.get("modality") and r["modality"][ch])
    return {
        "min": float(min(s["min"] for s in stats)),
        "max": float(max(s["max"] for s in stats)),
        "median_case_min": float(np.median([s["min"] for s in stats])),
        "median_case_max": float(np.median([s["max"] for s in stats])),
        "fg_mean": float(fg.mean()), "fg_std": float(fg.std()),
        "fg_p00_5": float(p[0]), "fg_p50": float(p[1]), "fg_p99_5": float(p[2]),
        "integer": bool(all(s.get("integer", False) for s in stats)),
        "modality_tag": hints.most_common(1)[0][0] if hints else None,
        # a thinned sample: the plan's CT statistics after clipping to a window chosen later
        "fg_sample": [round(float(v), 2) for v in fg[:: max(1, fg.size // 5000)]],
    }


def _guess_modality(stats: dict[str, Any]) -> str:
    """DICOM tag first; else uint8-like -> "other"; HU-like range -> "CT"; anything else "MRI"."""
    if stats["modality_tag"] in _DICOM_MODALITY:
        return _DICOM_MODALITY[stats["modality_tag"]]
    if stats["integer"] and stats["min"] >= 0 and stats["max"] <= 255:
        return "other"
    if stats["median_case_min"] <= -500 and stats["median_case_max"] >= 300:
        return "CT"
    return "MRI"


def make_plan(fingerprint: dict[str, Any], cfg: DataConfig, max_size: int = 128) -> dict[str, Any]:
    """Decide target spacing, target shape, normalisation and storage dtype; ``cfg`` overrides win.

    A ``target_shape`` given without a ``target_spacing`` keeps the median field of view (the spacing
    becomes extent / shape: the 64^3 MedMNIST release with ``target_shape=[28, 28, 28]`` is resized to
    28^3, not cropped); with both, the volume is resampled to the spacing and center-cropped/padded.
    """
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes"], dtype=float)
    uniform = bool(np.all(shapes == shapes[0]) and np.allclose(spacings, spacings[0], rtol=1e-3)
                   and shapes[0].max() <= max_size)  # already one grid (MedMNIST): keep it
    if cfg.target_spacing:
        spacing = np.asarray(cfg.target_spacing, dtype=float)
    else:
        spacing = spacings[0].copy() if uniform else _target_spacing(spacings, shapes)
    if cfg.target_shape:
        shape = [int(v) for v in cfg.target_shape]
        if not cfg.target_spacing:  # a shape alone keeps the (median) field of view: resize, do not crop
            spacing = np.median(shapes * spacings, axis=0) / np.asarray(shape, dtype=float)
    elif uniform and np.allclose(spacing, spacings[0], rtol=1e-3):
        shape = [int(v) for v in shapes[0]]
    else:
        shape, spacing = _target_shape(spacings, shapes, spacing, max_size, fixed=bool(cfg.target_spacing))
    normalization = [_normalization(stats, modality, cfg) for stats, modality in
                     zip(fingerprint["intensity"], fingerprint["modality"], strict=True)]
    counts = fingerprint["class_counts"]
    nonzero = [c for c in counts if c > 0]
    return {
        "target_spacing": [round(float(v), 5) for v in spacing],
        "target_shape": shape,
        "normalization": normalization,
        "storage_dtype": "float32" if all(n["scheme"] == "none" for n in normalization) else "float16",
        "in_channels": int(fingerprint["channels"]),
        "modality": list(fingerprint["modality"]),
        "classes": list(fingerprint["classes"]),
        "class_counts": list(counts),
        "n_cases": int(fingerprint["n_cases"]),
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 4) if nonzero else 1.0,
        "axes": AXES,
        "antialias": True,  # downsampling low-pass filters first (preprocess.resample); absent in older plans
        # the pool's spacing, shape, field of view and intensity range, for predict's warnings; absent in older plans
        **({"input_range": fingerprint["input_range"]} if fingerprint.get("input_range") else {}),
    }


def _target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing; nnU-Net's 10th-percentile rule on the coarse axis of anisotropic data."""
    target = np.median(spacings, axis=0)
    size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > 3 * max(target[others])
    aniso_voxels = size[worst] * 3 < min(size[others])
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(coarse, max(target[others]) + 1e-5)  # never finer than the fine axes
    return target


def _target_shape(spacings: np.ndarray, shapes: np.ndarray, spacing: np.ndarray, max_size: int,
                  fixed: bool) -> tuple[list[int], np.ndarray]:
    """Median resampled shape rounded up to a multiple of 16, at most ``max_size`` per axis.

    An axis that would exceed ``max_size`` keeps its whole field of view at a coarser spacing;
    when the user fixed the spacing it is kept and the volume is center-cropped instead.
    """
    resampled = np.median(shapes * spacings / spacing, axis=0)
    spacing = spacing.copy()
    shape = []
    for axis, size in enumerate(resampled):
        if size > max_size and not fixed:
            spacing[axis] *= size / max_size
        shape.append(int(min(max_size, 16 * math.ceil(round(float(size), 3) / 16))))
    return shape, spacing


def _normalization(stats: dict[str, Any], modality: str, cfg: DataConfig) -> dict[str, Any]:
    scheme = cfg.normalization or ("ct" if cfg.ct_window else _SCHEMES[modality])
    if scheme == "ct":
        fg = np.asarray(stats["fg_sample"], dtype=np.float64)
        lo, hi = cfg.ct_window if cfg.ct_window else (stats["fg_p00_5"], stats["fg_p99_5"])
        clipped = np.clip(fg, lo, hi) if fg.size else np.array([lo, hi], dtype=float)
        return {"scheme": "ct", "clip": [_round(lo), _round(hi)], "mean": _round(clipped.mean()),
                "std": _round(max(clipped.std(), 1e-6))}
    if scheme == "zscore":
        return {"scheme": "zscore", "clip_percentiles": [0.5, 99.5]}
    if scheme == "minmax":
        lo, hi = stats["median_case_min"], stats["median_case_max"]
        return {"scheme": "minmax", "min": _round(lo), "max": _round(hi if hi > lo else lo + 1.0)}
    if scheme == "none":
        return {"scheme": "none"}
    raise ValueError(f"unknown normalization {scheme!r}: use ct, zscore, minmax or none")


def _round(value: float, digits: int = 5) -> float:
    """Plan numbers to 5 significant digits: stable hashes, readable JSON."""
    value = float(value)
    return 0.0 if value == 0 else round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))
