"""Plots are written as real, non-blank PNGs; ROC legends carry scikit-learn's AUC; gaps are tolerated."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from matplotlib import image as mpimg
from sklearn.metrics import roc_auc_score

from medvox import plots


def _check_png(path, min_side=150):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    assert float(img[..., :3].std()) > 0.01  # not blank


def _history(n=6, ema=True, gaps=False):
    hist = []
    for e in range(1, n + 1):
        val = {"loss": 1 / e, "auc": 0.5 + e / 20, "accuracy": 0.5 + e / 25, "f1": 0.4 + e / 30,
               "balanced_accuracy": 0.5 + e / 28}
        entry = {"epoch": e, "lr": 1e-3 * 0.8**e, "train": {"loss": 1.2 / e}, "val": val}
        if ema:
            entry["val_ema"] = {k: v * 1.01 for k, v in val.items()}
        hist.append(entry)
    if gaps:
        hist[1]["val"]["auc"] = None
        hist[2]["val"]["loss"] = float("nan")
        hist[3]["train"] = {}
        del hist[4]["lr"]
        hist[0]["val"] = {"auc": None, "loss": None}
    return hist


@pytest.fixture
def captured(monkeypatch):
    """Record every figure's legend texts before it is saved."""
    texts = []
    original = plots._save

    def _save(fig, path):
        texts.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", _save)
    return texts


@pytest.mark.parametrize("gaps", [False, True])
def test_history_plots(tmp_path, gaps):
    hist = _history(gaps=gaps)
    _check_png(plots.plot_loss_curve(hist, tmp_path / "loss.png"))
    _check_png(plots.plot_learning_curves(hist, tmp_path / "sub" / "curves.png"), min_side=400)
    _check_png(plots.plot_learning_curves(_history(ema=False), tmp_path / "noema.png"))
    _check_png(plots.plot_loss_curve([], tmp_path / "empty.png"), min_side=100)


def _axes_as_drawn(fig) -> list[dict]:
    """Each axis's title, labels, limits, ticks and legend as the saved PNG shows them."""
    fig.canvas.draw()
    return [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "xlim": ax.get_xlim(),
             "xticks": list(ax.get_xticks()),
             "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None}
            for ax in fig.axes]


@pytest.mark.parametrize("epochs", [1, 2, 45])
def test_learning_curves_have_integer_epochs_and_each_loss_labelled(tmp_path, monkeypatch, epochs):
    figures = []
    original = plots._save

    def _save(fig, path):
        figures.append(_axes_as_drawn(fig))
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", _save)
    plots.plot_learning_curves(_history(n=epochs), tmp_path / "curves.png", train_loss="LDAM")
    epoch_axes = [ax for ax in figures[0] if ax["xlabel"] == "epoch"]
    assert len(epoch_axes) == 6  # loss, accuracy, AUC, F1, balanced accuracy, LR
    for ax in epoch_axes:
        lo, hi = sorted(ax["xlim"])
        shown = [t for t in ax["xticks"] if lo - 1e-9 <= t <= hi + 1e-9]
        assert shown and all(float(t).is_integer() for t in shown), (ax["title"], shown)
        assert shown == [1] if epochs == 1 else max(shown) <= epochs + 5
    (loss,) = [ax for ax in epoch_axes if ax["title"] == "Loss"]
    assert loss["ylabel"] == "train loss (LDAM)" and [ax["ylabel"] for ax in figures[0]].count("val loss (CE)") == 1
    assert loss["legend"] == ["train loss (LDAM)", "val loss (CE), raw", "val loss (CE), EMA"]
    plots.plot_loss_curve(_history(n=epochs, ema=False), tmp_path / "loss.png")
    assert figures[1][0]["legend"] == ["train loss", "val loss (CE), raw"]


def test_confusion_matrix(tmp_path):
    _check_png(plots.plot_confusion_matrix([[5, 1], [2, 7]], ["a", "b"], tmp_path / "cm2.png", "CM"))
    cm = np.diag([10, 8, 0, 4]) + 1  # a class with no predictions right, row sums > 0
    cm[2] = 0  # and one with no samples at all: row % must not divide by zero
    _check_png(plots.plot_confusion_matrix(cm, list("wxyz"), tmp_path / "cm4.png"))
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix([[1, 2, 3]], ["a"], tmp_path / "bad.png")


def test_roc_auc_text_equals_sklearn(tmp_path, captured):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(80), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    _check_png(plots.plot_roc(y, probs, ["neg", "pos"], tmp_path / "roc.png", "ROC"))
    (auc_text,) = re.findall(r"AUC = ([0-9.]+)", captured[-1][0])
    assert float(auc_text) == pytest.approx(roc_auc_score(y, p1), abs=5e-4)
    assert captured[-1][0] == f"AUC = {roc_auc_score(y, p1):.3f}"
    y4 = rng.integers(0, 4, 120)
    p4 = rng.dirichlet(np.ones(4), 120)
    _check_png(plots.plot_roc(y4, p4, list("abcd"), tmp_path / "roc4.png"))
    for c, text in enumerate(captured[-1]):
        assert text == f"{'abcd'[c]} (AUC = {roc_auc_score(y4 == c, p4[:, c]):.3f})"


def test_pr_and_one_class(tmp_path, captured):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p1 = rng.random(60)
    _check_png(plots.plot_pr(y, p1, ["n", "p"], tmp_path / "pr.png"))
    assert captured[-1][0].startswith("AP = ")
    _check_png(plots.plot_pr(rng.integers(0, 3, 60), rng.dirichlet(np.ones(3), 60), list("abc"), tmp_path / "pr3.png"))
    _check_png(plots.plot_roc(np.zeros(10, int), rng.random(10), ["n", "p"], tmp_path / "roc1.png"))


def test_reliability(tmp_path, captured):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    before = rng.dirichlet(np.ones(3) * 0.3, 300)
    after = (before + 0.5) / (before + 0.5).sum(1, keepdims=True)
    _check_png(plots.plot_reliability(y, before, after, tmp_path / "rel.png"))
    assert any(t.startswith("before (ECE = ") for t in captured[-1])
    _check_png(plots.plot_reliability(y, before, None, tmp_path / "rel1.png"))
    assert not math.isnan(float(re.findall(r"ECE = ([0-9.]+)", " ".join(captured[-1]))[0]))
