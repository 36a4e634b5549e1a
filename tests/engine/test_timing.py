"""The ETA line and the forecast's record: the fold's time left from the measured epoch, the whole cv's with the
folds still to train and the forecast's overheads, and the forecast found again for any fold of its config."""

from __future__ import annotations

import dataclasses
import datetime as dt

from medvox.config import ExperimentConfig, TrainConfig
from medvox.engine import timing
from medvox.engine.timing import Forecast, cv_position, duration_text, eta_line


def _forecast() -> Forecast:
    return Forecast(total_s=3000.0, fold_s=590.0, epoch_s=14.0, fold_fixed_s=30.0, summary_s=50.0, folds=5,
                    epochs=40, made_at=0.0)


def test_the_fold_eta_counts_the_epochs_left():
    line = eta_line(10, 40, 30.0, now=0.0)
    end = dt.datetime.fromtimestamp(30 * 30.0).strftime("%H:%M")
    assert line == f"ETA: fold ~ 15 min (30 epochs left at 30.0 s); done ~ {end}"
    assert "cv ~" not in line  # medvox train: no cross-validation around it
    assert eta_line(39, 40, 20.0, now=0.0).startswith("ETA: fold ~ 20 s (1 epoch left at 20.0 s)")


def test_the_cv_eta_adds_the_folds_still_to_train_and_the_summary():
    fc = _forecast()
    # fold 2 of 5 after epoch 10: 30 epochs + the fold's fixed part, then 3 folds of 40 epochs each, the summary
    line = eta_line(10, 40, 15.0, fc, timing.CvPosition(2, 5, 3), now=0.0)
    total = 30 * 15.0 + 30.0 + 3 * (40 * 15.0 + 30.0) + 50.0
    assert f"cv ~ {duration_text(total)} (fold 2/5; 3 more folds to train, then the summary)" in line
    assert line.startswith(f"ETA: fold ~ {duration_text(30 * 15.0 + 30.0)} (30 epochs left at 15.0 s)")
    last = eta_line(40, 40, 15.0, fc, timing.CvPosition(5, 5, 0), now=0.0)
    assert "fold ~ 0 s (0 epochs left" in last and "cv ~ 50 s (fold 5/5; the summary)" in last
    assert [duration_text(s) for s in (45, 89.4, 720, 5700)] == ["45 s", "89 s", "12 min", "1 h 35 min"]


def test_cv_position_holds_only_within_its_block():
    assert timing.current_position() is None
    with cv_position(1, 3, 2):
        assert timing.current_position() == timing.CvPosition(1, 3, 2)
    assert timing.current_position() is None


def test_a_forecast_is_found_for_every_fold_of_its_config():
    cfg = ExperimentConfig(train=TrainConfig(recipe="auto", recipe_applied=True, epochs=12))
    fc = _forecast()
    timing.remember(cfg, fc)
    fold = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold=3, resume=True))
    assert timing.forecast_for(fold) is fc
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=13))
    assert timing.forecast_for(other) is None
    assert fc.record() == {"forecast_min": 50.0, "fold_min": 9.83, "epoch_s": 14.0, "summary_min": 0.83,
                           "folds": 5, "epochs": 40}
