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
    """Appends one row per epoch to ``log.csv`` and scalars to TensorBoard (``tensorboard/``)."""

    def __init__(self, run_dir: Path):
        self.csv_path = run_dir / "log.csv"
        self.tb_dir = run_dir / "tensorboard"
        self._writer = None

    def _tb(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional at run time
                return None
            self._writer = SummaryWriter(log_dir=str(self.tb_dir))
        return self._writer

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
        writer = self._tb()
        if writer is None:
            return
        for key, value in _flatten(to_jsonable(entry)).items():
            if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                writer.add_scalar(key, value, entry["epoch"])
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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

