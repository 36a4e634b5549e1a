"""ECE, Brier and temperature scaling: hand values, MONAI/sklearn references, synthetic models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.metrics import CalibrationErrorMetric
from sklearn.metrics import brier_score_loss

from medvox.metrics.calibration import (
    apply_temperature,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def _calibrated_model(n=20000, k=3, seed=0):
    """Labels drawn from softmax(true logits): the true logits are perfectly calibrated."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_ece_by_hand():
    # conf 0.8 (correct) in bin (0.7, 0.8]: gap 0.2; conf 0.6 (correct) in (0.5, 0.6]: gap 0.4
    assert expected_calibration_error([1, 0], [[0.2, 0.8], [0.6, 0.4]], n_bins=10) == pytest.approx(0.3)
    # positive-class version: p1 0.8 with y=1 -> 0.2; p1 0.4 with y=0 -> 0.4
    assert expected_calibration_error([1, 0], [[0.2, 0.8], [0.6, 0.4]], 10, "positive") == pytest.approx(0.3)
    bins = reliability_bins([1, 0], [[0.2, 0.8], [0.6, 0.4]], n_bins=10)
    assert bins["count"] == [0, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    assert bins["confidence"][7] == pytest.approx(0.8) and bins["accuracy"][0] is None


def _monai_ece(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """MONAI's equal-width 15-bin expected calibration error of one binary event (torchmetrics gives the same)."""
    metric = CalibrationErrorMetric(num_bins=15, include_background=True, calibration_reduction="expected",
                                    metric_reduction="mean")
    return metric(y_pred=confidence.float().view(1, 1, -1), y=correct.float().view(1, 1, -1)).item()


def test_ece_matches_monai():
    logits, labels = _calibrated_model(2000, 4, seed=1)
    probs = (logits * 2).softmax(1)
    # top-label ECE: the calibration of the event "the arg-max class is right" at the max probability
    conf, pred = probs.max(1)
    assert expected_calibration_error(labels, probs) == pytest.approx(_monai_ece(conf, pred == labels), abs=1e-5)
    p1 = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    y = (torch.rand(2000, generator=torch.Generator().manual_seed(4)) < p1**2).long()
    assert expected_calibration_error(y, p1, mode="positive") == pytest.approx(_monai_ece(p1, y), abs=1e-5)


def test_ece_of_calibrated_model_is_near_zero():
    logits, labels = _calibrated_model()
    assert expected_calibration_error(labels, logits.softmax(1)) < 0.015
    rng = np.random.default_rng(0)
    p1 = rng.random(50000)
    y = (rng.random(50000) < p1).astype(int)
    assert expected_calibration_error(y, p1, mode="positive") < 0.01


def test_temperature_scaling_fixes_over_confidence():
    logits, labels = _calibrated_model()
    over = logits * 5
    before = expected_calibration_error(labels, over.softmax(1))
    t = fit_temperature(over, labels)
    assert isinstance(t, float) and t == pytest.approx(5.0, rel=0.1)
    after = expected_calibration_error(labels, apply_temperature(over, t).softmax(1))
    assert before > 0.1 and after < 0.02 and after < before / 5
    np_out = apply_temperature(over.numpy(), t)
    assert isinstance(np_out, np.ndarray)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(over, 0.0)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(over[:, 0], labels)


def test_brier_by_hand_and_sklearn():
    # binary: ((1 - 0.8)^2 + (0 - 0.4)^2) / 2 = (0.04 + 0.16) / 2
    assert brier_score([1, 0], [[0.2, 0.8], [0.6, 0.4]]) == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    y, p1 = rng.integers(0, 2, 100), rng.random(100)
    assert brier_score(y, p1) == pytest.approx(brier_score_loss(y, p1))
    # 3 classes: [0.7, 0.2, 0.1] for y=0 -> 0.09 + 0.04 + 0.01; [0.3, 0.3, 0.4] for y=2 -> 0.09 + 0.09 + 0.36
    assert brier_score([0, 2], [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]) == pytest.approx((0.14 + 0.54) / 2)


def test_calibration_metrics_plain_types():
    out = calibration_metrics(np.array([0, 1, 1], dtype=np.int64), np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]],
                                                                          dtype=np.float32))
    assert set(out) == {"ece", "ece_positive", "brier", "n_bins"}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert "ece_positive" not in calibration_metrics([0, 1, 2], np.eye(3))
    with pytest.raises(ValueError, match="binary"):
        expected_calibration_error([0, 1, 2], np.eye(3), mode="positive")
