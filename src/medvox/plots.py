"""Training curves, confusion matrix, ROC, precision-recall and reliability diagrams as PNG files.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas on save, without
``pyplot``: no display is needed, no global figure registry fills up (nothing to forget to close),
and each figure is cleared right after it is written. The Agg backend is also selected at import,
before any ``pyplot`` import, unless ``pyplot`` is already loaded (a notebook keeps its backend).

``history`` is the trainer's list of per-epoch dicts::

    {"epoch": 1, "lr": 1e-4, "train": {"loss": 0.7}, "val": {"loss": 0.6, "auc": 0.8, ...},
     "val_ema": {...}}  # "val_ema" only with EMA

Missing keys, ``None`` and NaN values leave gaps in the curves instead of failing.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "cm.png"
    >>> plot_confusion_matrix([[5, 1], [2, 7]], ["benign", "malignant"], out).name
    'cm.png'
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless (servers, DDP workers); keep a notebook's own backend
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from medvox.metrics.calibration import expected_calibration_error, reliability_bins  # noqa: E402
from medvox.metrics.classification import _class_names, _validate  # noqa: E402

_CURVES = (("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", "AUC"), ("f1", "F1"),
           ("balanced_accuracy", "Balanced accuracy"))
_STYLES = {"train": ("tab:blue", "-"), "val": ("tab:orange", "-"), "val_ema": ("tab:green", "--")}
_LABELS = {"train": "train", "val": "val (raw)", "val_ema": "val (EMA)"}
_WEIGHTS = {"val": "raw", "val_ema": "EMA"}


def plot_loss_curve(history: Sequence[dict], path: str | Path, title: str = "Loss",
                    train_loss: str | None = None) -> Path:
    """Train and validation loss per epoch (raw and EMA when present).

    Args:
        history: per-epoch dicts (see the module docstring).
        path: PNG to write; parent folders are created.
        title: figure title.
        train_loss: the training loss's name for its label (e.g. ``"LDAM"``; the validation loss is always the
            cross-entropy).

    Returns:
        ``path`` as a ``Path``.
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _plot_metric(ax, history, "loss", sections=("train", "val", "val_ema"), train_loss=train_loss)
    ax.set(title=title, xlabel="epoch")
    return _save(fig, path)


def plot_learning_curves(history: Sequence[dict], path: str | Path, train_loss: str | None = None) -> Path:
    """A 2 x 3 grid: loss, accuracy, AUC, F1, balanced accuracy (train / raw / EMA), and the LR."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label) in zip(axes, _CURVES, strict=False):
        _plot_metric(ax, history, key, sections=("train", "val", "val_ema"), train_loss=train_loss)
        ax.set(title=label, xlabel="epoch")
    epochs, lrs = _series(history, None, "lr")
    axes[5].plot(epochs, lrs, color="tab:purple", marker=".")
    axes[5].set(title="Learning rate", xlabel="epoch")
    _epoch_axis(axes[5], epochs)
    if np.isfinite(lrs).any() and np.nanmin(lrs) > 0:
        axes[5].set_yscale("log")
    fig.suptitle("Learning curves")
    return _save(fig, path)


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Counts (left) and row-normalised percentages (right); rows are the true class.

    Args:
        cm: ``(K, K)`` counts (nested list or array), rows = true, columns = predicted.
        class_names: ``K`` names.
        path: PNG to write.
        title: figure title.
    """
    counts = np.asarray(cm, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"cm must be a square (K, K) matrix, got shape {counts.shape}")
    names = _class_names(class_names, counts.shape[0])
    rows = counts.sum(axis=1, keepdims=True)
    pct = np.divide(100 * counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = counts.shape[0]
    fig = Figure(figsize=(2 * (2.5 + 0.55 * k), 2.5 + 0.55 * k), layout="constrained")
    for ax, data, fmt, label in zip(fig.subplots(1, 2), (counts, pct), ("{:.0f}", "{:.1f}%"),
                                    ("counts", "row %"), strict=True):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        _annotate(ax, data, fmt, fontsize=max(6, 12 - k // 2))
        ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=label)
        ax.set_xticklabels(names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticklabels(names)
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc(y_true: Any, probs: Any, class_names: Sequence[str], path: str | Path, title: str = "ROC") -> Path:
    """ROC curve with the AUC in the legend: binary (class 1 positive) or one-vs-rest per class.

    Classes absent from ``y_true`` (or present in every sample) have no ROC and are left out.
    """
    y, p = _validate(y_true, probs)
    names = _class_names(class_names, p.shape[1])
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for c in _scored_classes(y, p):
        fpr, tpr, _ = skm.roc_curve(y == c, p[:, c])
        auc = skm.roc_auc_score(y == c, p[:, c])
        label = f"AUC = {auc:.3f}" if p.shape[1] == 2 else f"{names[c]} (AUC = {auc:.3f})"
        ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    _legend(ax, "lower right")
    return _save(fig, path)


def plot_pr(y_true: Any, probs: Any, class_names: Sequence[str], path: str | Path,
            title: str = "Precision-recall") -> Path:
    """Precision-recall curves with average precision (AP) in the legend and the prevalence line."""
    y, p = _validate(y_true, probs)
    names = _class_names(class_names, p.shape[1])
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for c in _scored_classes(y, p):
        precision, recall, _ = skm.precision_recall_curve(y == c, p[:, c])
        ap = skm.average_precision_score(y == c, p[:, c])
        label = f"AP = {ap:.3f}" if p.shape[1] == 2 else f"{names[c]} (AP = {ap:.3f})"
        line = ax.step(recall, precision, where="post", lw=2, label=label)[0]
        ax.axhline(float(np.mean(y == c)), color=line.get_color(), ls=":", lw=1)  # a random classifier
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=title)
    _legend(ax, "lower left")
    return _save(fig, path)


def plot_reliability(y_true: Any, probs_before: Any, probs_after: Any | None, path: str | Path,
                     n_bins: int = 15, title: str = "Reliability") -> Path:
    """Reliability diagram (top-label confidence vs accuracy) before and after calibration, with ECE.

    Args:
        y_true: ``(N,)`` labels.
        probs_before: ``(N, K)`` uncalibrated probabilities.
        probs_after: ``(N, K)`` calibrated probabilities, or ``None``.
        path: PNG to write.
        n_bins: equal-width confidence bins.
        title: figure title.
    """
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    diagram, hist = fig.subplots(1, 2)
    diagram.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    sets = [("before", probs_before, "tab:red"), ("after", probs_after, "tab:blue")]
    for name, probs, color in (s for s in sets if s[1] is not None):
        bins = reliability_bins(y_true, probs, n_bins)
        ece = expected_calibration_error(y_true, probs, n_bins)
        conf = [np.nan if v is None else v for v in bins["confidence"]]
        acc = [np.nan if v is None else v for v in bins["accuracy"]]
        diagram.plot(conf, acc, marker="o", color=color, label=f"{name} (ECE = {ece:.3f})")
        centres = (np.asarray(bins["edges"][:-1]) + np.asarray(bins["edges"][1:])) / 2
        hist.bar(centres, bins["count"], width=1 / n_bins, alpha=0.5, color=color, label=name)
    diagram.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy", title=title)
    diagram.legend(loc="upper left")
    hist.set(xlim=(0, 1), xlabel="confidence", ylabel="samples", title="Confidence histogram")
    hist.legend(loc="upper left")
    return _save(fig, path)


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int], spacing: Sequence[float],
                      ) -> list[tuple[str, np.ndarray, float, tuple[str, str, str, str]]]:
    """The axial, coronal and sagittal slices through voxel ``centre`` of a ``(D, H, W)`` RAS array (D
    inferior->superior, H posterior->anterior, W left->right), to draw with ``origin="lower"``.

    Returns:
        ``(name, 2D slice, aspect ratio from spacing, (left, right, bottom, top) orientation letters)`` per view.
    """
    d, h, w = (int(c) for c in centre)
    sd, sh, sw = (float(s) for s in spacing)
    return [(f"axial (slice {d})", volume[d], sh / sw, ("L", "R", "P", "A")),
            (f"coronal (row {h})", volume[:, h], sd / sw, ("L", "R", "I", "S")),
            (f"sagittal (column {w})", volume[:, :, w], sd / sh, ("P", "A", "I", "S"))]


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """The grey window of a volume: its 0.5th to 99.9th percentile (a small bright lesion keeps its contrast)."""
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.9]))
    return lo, hi if hi > lo else lo + 1.0


def draw_slice(ax, image: np.ndarray, aspect: float, letters: Sequence[str], window: tuple[float, float],
               fontsize: int = 9) -> None:
    """A slice of :func:`orthogonal_slices` in grey, without ticks, its orientation letters at the edges."""
    ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    left, right, bottom, top = letters
    for x, y, text, ha, va in ((0.01, 0.5, left, "left", "center"), (0.99, 0.5, right, "right", "center"),
                               (0.5, 0.01, bottom, "center", "bottom"), (0.5, 0.99, top, "center", "top")):
        ax.text(x, y, text, transform=ax.transAxes, color="yellow", ha=ha, va=va, fontsize=fontsize)


def plot_sample_slices(groups: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], spacing: Sequence[float],
                       path: str | Path, title: str = "Sample cases") -> Path:
    """The central axial, coronal and sagittal slices of a few volumes, one row of cases per group (class).

    Args:
        groups: ``(heading, [(case caption, (D, H, W) RAS volume), ...])`` per row; a group without cases
            gets its heading and "no case".
        spacing: ``(sD, sH, sW)`` mm, for the aspect ratios.
        path: PNG to write.
        title: figure title.
    """
    per_row = max([len(cases) for _, cases in groups] + [1])
    fig = Figure(figsize=(5.4 * per_row, 2.35 * len(groups) + 0.5), layout="constrained")
    rows = fig.subfigures(max(len(groups), 1), 1, squeeze=False)[:, 0]
    for row, (heading, cases) in zip(rows, groups, strict=False):
        row.suptitle(heading, fontsize=11, fontweight="bold", x=0.01, ha="left")
        cells = row.subfigures(1, per_row, squeeze=False)[0]
        for cell, (caption, volume) in zip(cells, cases, strict=False):
            volume = np.asarray(volume, dtype=np.float32)
            window = intensity_window(volume)
            centre = [n // 2 for n in volume.shape]
            for ax, (name, image, aspect, letters) in zip(cell.subplots(1, 3), orthogonal_slices(volume, centre, spacing),
                                                          strict=True):
                draw_slice(ax, image, aspect, letters, window, fontsize=7)
                ax.set_title(name.split(" ")[0], fontsize=8)
            cell.suptitle(caption, fontsize=9)
        if not cases:
            cells[0].text(0.5, 0.5, "no case", ha="center", va="center", color="grey")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    fig.clear()  # release the artists now rather than at garbage collection
    return path


def _series(history: Sequence[dict], section: str | None, key: str) -> tuple[list[int], np.ndarray]:
    """``(epochs, values)`` of ``history[i][section][key]``; missing, None or NaN -> NaN (a gap)."""
    epochs, values = [], []
    for i, entry in enumerate(history):
        node = entry if section is None else entry.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, (list, tuple)):  # e.g. one LR per parameter group: plot the first
            value = value[0] if value else None
        epochs.append(int(entry.get("epoch", i + 1)))
        values.append(_finite(value))
    return epochs, np.asarray(values, dtype=float)


def _finite(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _plot_metric(ax, history: Sequence[dict], key: str, sections: Sequence[str],
                 train_loss: str | None = None) -> None:
    """``key`` per epoch for each section, integer epochs on the x axis. The loss is drawn with the training
    loss on its own (left) axis, labelled ``train loss (<train_loss>)``, and the validation cross-entropy on a
    right axis, labelled ``val loss (CE)``: a margin loss such as LDAM's is not on the cross-entropy's scale."""
    _epoch_axis(ax, _series(history, None, "epoch")[0])
    handles = []
    for section in sections:
        epochs, values = _series(history, section, key)
        if not np.isfinite(values).any():
            continue
        target = ax
        label = _LABELS[section]
        if key == "loss" and section != "train":
            if not hasattr(ax, "_medvox_val_axis"):
                ax._medvox_val_axis = ax.twinx()
                ax._medvox_val_axis.set_ylabel("val loss (CE)")
            target, label = ax._medvox_val_axis, f"val loss (CE), {_WEIGHTS[section]}"
        elif key == "loss":
            label = "train loss" + (f" ({train_loss})" if train_loss else "")
            ax.set_ylabel(label)
        color, ls = _STYLES[section]
        handles += target.plot(epochs, values, color=color, ls=ls, marker="." if len(epochs) < 40 else None,
                               label=label)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.grid(alpha=0.3)


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Whole epochs on the x axis, also for one epoch (a view one epoch wide around it: a narrower one would get
    fractional ticks)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(epochs) and max(epochs) - min(epochs) < 1:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)


def _annotate(ax, data: np.ndarray, fmt: str, fontsize: int) -> None:
    threshold = data.max() / 2 if data.max() > 0 else 1
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                color="white" if value > threshold else "black")


def _scored_classes(y: np.ndarray, p: np.ndarray) -> list[int]:
    candidates = [1] if p.shape[1] == 2 else range(p.shape[1])
    return [c for c in candidates if 0 < int((y == c).sum()) < len(y)]


def _legend(ax, loc: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize=8)
    else:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center", transform=ax.transAxes)
