"""The time a job is forecast to take and how far it has got: the auto recipe's forecast, the position of the
fold being trained in its cross-validation, and the ETA line each epoch logs.

The forecast is made where the recipe is applied (:func:`medvox.recipe.apply_recipe`, on the command line or in
``cross_validate`` / ``train``) and looked up by the config it was made for (:func:`remember`,
:func:`forecast_for`): ``medvox cv`` records it in ``cv_summary.json`` beside the time the run took. The
cross-validation sets the fold's position (:func:`cv_position`) around each fold's training, so the trainer's
epoch line can give the whole run's ETA as well as the fold's (:func:`eta_line`).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

# The learning curves (loss_curve.png, learning_curves.png) are redrawn after an epoch when this many seconds have
# passed since they were last drawn, and always after the first epoch a process runs and at the fold's end: on a
# CPU one draw takes about a second, a fifth of a small model's epoch.
CURVES_EVERY_S = 30.0

@dataclass(frozen=True)
class Forecast:
    """The seconds a cross-validation is forecast to take on this machine, from measured throughput.

    Attributes:
        total_s: all of it: ``folds * fold_s + summary_s``.
        fold_s: one fold: ``epochs * epoch_s + fold_fixed_s``.
        epoch_s: one epoch (training, validation of the raw and the EMA weights, checkpoints, plots).
        fold_fixed_s: once per fold (start, the final weights' evaluation and plots, the slimmed ``last.pt``).
        summary_s: the summary after the folds (the test ensemble with TTA, calibration, fusion).
        folds, epochs: what it was forecast for.
        made_at: when (``time.time()``), so the time the run took can be measured from it.
    """

    total_s: float
    fold_s: float
    epoch_s: float
    fold_fixed_s: float
    summary_s: float
    folds: int
    epochs: int
    made_at: float = field(default_factory=time.time)

    def record(self) -> dict[str, Any]:
        """The figures ``cv_summary.json`` keeps (minutes, except the epoch's seconds)."""
        return {"forecast_min": round(self.total_s / 60, 2), "fold_min": round(self.fold_s / 60, 2),
                "epoch_s": round(self.epoch_s, 2), "summary_min": round(self.summary_s / 60, 2),
                "folds": self.folds, "epochs": self.epochs}


def _key(cfg) -> str:
    """The config a forecast stands for, without what differs between the folds of one run."""
    from medvox.config import to_dict

    doc = to_dict(cfg)
    doc["train"] = {k: v for k, v in doc["train"].items() if k not in ("fold", "resume")}
    return json.dumps(doc, sort_keys=True, default=str)


_FORECASTS: dict[str, Forecast] = {}


def remember(cfg, forecast: Forecast) -> None:
    """Keep ``forecast`` for the resolved config ``cfg`` (the recipe's result) for this process."""
    _FORECASTS[_key(cfg)] = forecast


def forecast_for(cfg) -> Forecast | None:
    """The forecast made for ``cfg`` (any of its folds) in this process, if one was."""
    return _FORECASTS.get(_key(cfg))


@dataclass(frozen=True)
class CvPosition:
    """The fold being trained in a cross-validation: ``number`` of ``folds`` (from 1), and how many folds are
    still to train after it (folds already finished are reused, not trained)."""

    number: int
    folds: int
    to_train_after: int


_POSITION: contextvars.ContextVar[CvPosition | None] = contextvars.ContextVar("medvox_cv_position", default=None)


@contextlib.contextmanager
def cv_position(number: int, folds: int, to_train_after: int):
    """Within the block, the trainer knows it trains fold ``number`` of ``folds`` of a cross-validation."""
    token = _POSITION.set(CvPosition(number, folds, to_train_after))
    try:
        yield
    finally:
        _POSITION.reset(token)


def current_position() -> CvPosition | None:
    return _POSITION.get()


def duration_text(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"1 h 35 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def eta_line(epoch: int, epochs: int, epoch_s: float, forecast: Forecast | None = None,
             position: CvPosition | None = None, now: float | None = None) -> str:
    """The ETA after ``epoch`` of ``epochs``, from the measured ``epoch_s`` per epoch: the fold's, and under a
    cross-validation (``position``) the whole run's, with the forecast's per-fold and summary overheads when
    there is one. Early stopping can end a fold sooner: these are the times to the last epoch.

    Example:
        >>> eta_line(10, 40, 30.0, now=0)[:42]
        'ETA: fold ~ 15 min (30 epochs left at 30.0'
    """
    now = time.time() if now is None else now
    left = max(0, epochs - epoch)
    fixed = forecast.fold_fixed_s if forecast is not None else 0.0
    fold_s = left * epoch_s + (fixed if left else 0.0)
    parts = [f"fold ~ {duration_text(fold_s)} ({left} epoch{'s' if left != 1 else ''} left at {epoch_s:.1f} s)"]
    total_s = fold_s
    if position is not None:
        later = position.to_train_after * (epochs * epoch_s + fixed)
        summary = forecast.summary_s if forecast is not None else 0.0
        total_s = fold_s + later + summary
        then = (f"{position.to_train_after} more fold{'s' if position.to_train_after != 1 else ''} to train, then "
                if position.to_train_after else "")
        parts.append(f"cv ~ {duration_text(total_s)} (fold {position.number}/{position.folds}; {then}the summary)")
    end = _dt.datetime.fromtimestamp(now + total_s).strftime("%H:%M")
    return f"ETA: {', '.join(parts)}; done ~ {end}"
