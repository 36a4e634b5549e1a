"""Everything a fold writes besides checkpoints: metrics.json, CSV and TensorBoard logs, plots,
prediction tables. Only rank 0 calls these."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from medvox.metrics.classification import to_jsonable


def _flatten(entry: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif not isinstance(value, list):
            out[name] = value
    return out


class EpochLogger:
    """Appends one row per epoch to ``log.csv`` and sends the epoch's scalars to the tracker ``train.logger``
    names (:mod:`medvox.engine.trackers`: TensorBoard by default), which logs the config as hyperparameters."""

    def __init__(self, run_dir: Path, cfg=None):
        self.csv_path = run_dir / "log.csv"
        self.run_dir, self.cfg = run_dir, cfg
        self._tracker = None

    def _track(self):
        if self._tracker is None and self.cfg is not None:
            from medvox.engine.trackers import create_tracker

            self._tracker = create_tracker(self.cfg, self.run_dir) or False  # False: csv, log.csv alone
        return self._tracker or None

    def rewrite(self, history: list[dict]) -> None:
        """Rewrite the CSV from the full history (so a resumed run has no duplicate rows)."""
        rows = [_flatten(to_jsonable(h)) for h in history]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def log(self, entry: dict, history: list[dict]) -> None:
        self.rewrite(history)
        tracker = self._track()
        if tracker is None:
            return
        tracker.log_metrics(_scalars(entry), step=entry["epoch"])
        if hasattr(tracker, "experiment") and tracker.name == "tensorboard":
            tracker.experiment.flush()  # the events of each epoch are on disk as it ends

    def close(self, final: dict | None = None, status: str = "success", step: int | None = None) -> None:
        """End the tracker's run; ``final``: the final weights' figures (``{"val": {...}, "test": {...}}``),
        logged at ``step`` as ``final/val/auc``, ... and, for TensorBoard's hparams view, ``hp_metric`` (the
        final validation value of ``train.monitor``)."""
        tracker = self._tracker or None
        if tracker is None:
            return
        if final:
            scalars = _scalars({split: final[split] for split in ("val", "test") if split in final}, "final/")
            monitor = (final.get("val") or {}).get(self.cfg.train.monitor)
            if isinstance(monitor, (int, float)) and tracker.name == "tensorboard":
                scalars["hp_metric"] = monitor
            if scalars:
                tracker.log_metrics(scalars, step=step)
        tracker.finalize(status)
        self._tracker = None


def _scalars(entry: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of an epoch's entry (or of the final figures) as ``{"val/auc": 0.71, ...}``; the epoch
    number itself, lists (confusion matrices) and missing values are left out."""
    return {f"{prefix}{key}": float(value) for key, value in _flatten(to_jsonable(entry)).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}


def epoch_plots(run_dir: Path, tag: str, labels: np.ndarray, probs: np.ndarray, metrics: dict,
                classes: list[str], decision=None) -> list[Path]:
    """Confusion matrix (at ``decision``, a :class:`~medvox.metrics.decision.Decision`, else the argmax) and ROC
    curve images for one evaluation (``tag`` e.g. ``epoch_003``); the title says which decision."""
    from medvox import plots

    cm_path = run_dir / f"confusion_matrix_{tag}.png"
    roc_path = run_dir / f"roc_curve_{tag}.png"
    at = decision.text() if decision is not None else "argmax"
    plots.plot_confusion_matrix(metrics["confusion_matrix"], classes, cm_path, title=f"Confusion matrix ({tag}, {at})")
    if len(np.unique(labels)) > 1:
        plots.plot_roc(labels, probs, classes, roc_path, title=f"ROC ({tag})")
        return [cm_path, roc_path]
    return [cm_path]


def prune_epoch_plots(run_dir: Path, keep_epochs: set[int]) -> None:
    """``--plots best_last``: delete per-epoch images except those of the kept epochs."""
    for pattern in ("confusion_matrix_epoch_*.png", "roc_curve_epoch_*.png"):
        for path in run_dir.glob(pattern):
            try:
                epoch = int(path.stem.rsplit("_", 1)[1])
            except ValueError:
                continue
            if epoch not in keep_epochs:
                path.unlink(missing_ok=True)

