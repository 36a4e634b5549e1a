"""What a fold draws while it trains: ``--plots best_last`` draws an epoch's confusion matrix and ROC only where
the raw weights' monitor improved and for the last epoch (and keeps those two); ``--plots all`` draws every
epoch's; the learning curves are redrawn at most every ``CURVES_EVERY_S`` and always drawn whole at the end."""

from __future__ import annotations

import json
import math

import pytest

from medvox.cli import main
from medvox.engine import artifacts, timing
from medvox.engine.trainer import FoldTrainer
from tests.reliability.helpers import FAST, MIL

EPOCHS = 5


pytestmark = pytest.mark.usefixtures("clean_process")


@pytest.fixture
def drawn(monkeypatch):
    """Every epoch image tag and every curves draw (the number of epochs in the history it drew)."""
    seen = {"images": [], "curves": []}
    real_images, real_curves = artifacts.epoch_plots, FoldTrainer._curves

    def images(run_dir, tag, *args, **kwargs):
        seen["images"].append(tag)
        return real_images(run_dir, tag, *args, **kwargs)

    def curves(self):
        seen["curves"].append(len(self.history))
        return real_curves(self)

    monkeypatch.setattr(artifacts, "epoch_plots", images)
    monkeypatch.setattr(FoldTrainer, "_curves", curves)
    return seen


def _train(data, out, plots: str) -> dict:
    argv = ["train", "--data", str(data), *MIL, *FAST, "--epochs", str(EPOCHS), "--folds", "2", "--target-shape",
            "16", "16", "16", "--early_stopping", "0", "--deterministic", "--plots", plots, "--monitor", "loss", "--output", str(out)]
    assert main(argv) == 0
    return json.loads((out / "mil" / "fold_0" / "metrics.json").read_text())


def _improving(history: list[dict]) -> list[int]:
    """The epochs where the raw weights' validation loss improved on every earlier epoch."""
    best, out = math.inf, []
    for entry in history:
        if entry["val"]["loss"] < best:
            best = entry["val"]["loss"]
            out.append(entry["epoch"])
    return out


def test_best_last_draws_only_improving_epochs_and_the_last(tiny_medmnist, tmp_path, monkeypatch, drawn):
    monkeypatch.setattr(timing, "CURVES_EVERY_S", 1e9)  # no redraw between the first epoch and the end
    metrics = _train(tiny_medmnist, tmp_path, "best_last")
    improving = _improving(metrics["history"])
    expected = sorted(set(improving) | {EPOCHS})
    epoch_tags = [t for t in drawn["images"] if t.startswith("epoch_")]
    assert epoch_tags == [f"epoch_{e:03d}" for e in expected]
    assert metrics["best"]["raw"]["epoch"] == improving[-1]
    fold = tmp_path / "mil" / "fold_0"
    kept = sorted(p.name for p in fold.glob("confusion_matrix_epoch_*.png"))
    assert kept == sorted({f"confusion_matrix_epoch_{e:03d}.png" for e in (improving[-1], EPOCHS)})
    assert {"val_final", "test_final"} <= set(drawn["images"])
    # after the first epoch, then whole at the end
    assert drawn["curves"] == [1, EPOCHS]
    assert (fold / "learning_curves.png").stat().st_size > 0 and (fold / "loss_curve.png").stat().st_size > 0


def test_all_draws_every_epoch_and_the_curves_follow_the_interval(tiny_medmnist, tmp_path, monkeypatch, drawn):
    monkeypatch.setattr(timing, "CURVES_EVERY_S", 0.0)  # every epoch is past the interval
    _train(tiny_medmnist, tmp_path, "all")
    assert [t for t in drawn["images"] if t.startswith("epoch_")] == [f"epoch_{e:03d}" for e in range(1, EPOCHS + 1)]
    assert drawn["curves"] == [*range(1, EPOCHS + 1), EPOCHS]
    fold = tmp_path / "mil" / "fold_0"
    assert len(list(fold.glob("roc_curve_epoch_*.png"))) == EPOCHS
