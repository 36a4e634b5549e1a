"""``benchmarks/cnn64_fusion.py`` on the kept runs it analyses (real predictions, read from the repository): the
28^3 CNN recovered from a fused run, the 64^3 fold folders aligned to its split, and the recipe's last steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import cnn64_fusion as cf
from medvox.metrics.classification import best_threshold, compute_metrics
from medvox.cv.summary import load_predictions, rescale

RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_runs"
CPU = RUNS / "cpu_2026-11-26-auto64aa" / "kept" / "auto64aa_s0"
GPU = RUNS / "h100_2026-11-26" / "folds" / "r18_64_s0"


def test_the_cpu_runs_cnn_ensemble_is_recovered_from_its_fused_predictions():
    ids, y, folds, oof, test_ids, yt, cnn_test = cf.cpu_run(CPU)
    summary = json.loads((CPU / "cv_summary.json").read_text())
    assert len(ids) == len(y) == len(folds) == len(oof) == summary["oof"]["n"]
    assert len(test_ids) == len(yt) == summary["test"]["n"]
    assert np.allclose(cnn_test.sum(1), 1.0, atol=1e-6) and cnn_test.min() > -1e-6
    # the un-mixed probabilities are the calibrated TTA ensemble the run recorded before its fusion
    assert roc_auc_score(yt, cnn_test[:, 1]) == pytest.approx(summary["test"]["ensemble_tta_calibrated"]["auc"], abs=1e-4)
    assert roc_auc_score(y, oof[:, 1]) == pytest.approx(summary["fusion"]["oof_auc"]["cnn"], abs=1e-6)


def test_fold_folders_are_calibrated_and_put_in_the_cpu_runs_order():
    ids, y, folds, _, test_ids, _, _ = cf.cpu_run(CPU)
    cnn = cf.fold_folders(GPU, ids, y, folds, test_ids)
    assert cnn.oof.shape == (len(ids), 2) and cnn.test.shape == (len(test_ids), 2)
    _, p, _, rows = load_predictions(GPU / "fold_3" / "val_predictions.csv")
    t = json.loads((GPU / "fold_3" / "calibration.json").read_text())["temperature"]
    where = {c: i for i, c in enumerate(ids)}
    assert np.allclose(cnn.oof[[where[r["case_id"]] for r in rows]], rescale(p, t), atol=1e-9)
    assert t != pytest.approx(1.0) and not np.allclose(rescale(p, t), p)  # the temperature did something


def test_a_run_on_another_split_is_refused():
    ids, y, folds, _, test_ids, _, _ = cf.cpu_run(CPU)
    moved = folds.copy()
    moved[:2] = (moved[:2] + 1) % 5  # two cases in another fold: not the split the fold folders were trained on
    with pytest.raises(ValueError, match="not the same CV split"):
        cf.fold_folders(GPU, ids, y, moved, test_ids)


def test_recipe_tail_fuses_at_the_oof_best_weight_and_thresholds_on_oof(rng):
    n, m = 400, 200
    y, yt = (rng.random(n) < 0.25).astype(int), (rng.random(m) < 0.25).astype(int)
    folds = np.arange(n) % 5

    def probs(labels, signal):  # a weak score, so that an informative descriptor has something to add
        s = 1 / (1 + np.exp(-(signal * (labels - 0.5) * 2 + rng.normal(0, 1.5, len(labels)))))
        return np.stack([1 - s, s], 1)

    oof, test = probs(y, 0.6), probs(yt, 0.6)
    x = np.c_[y + rng.normal(0, 0.7, n), rng.normal(size=n)]
    xt = np.c_[yt + rng.normal(0, 0.7, m), rng.normal(size=m)]
    plain = cf.recipe_tail(y, folds, oof, yt, test, x, xt, fuse=False)
    assert plain["fusion_weight"] == 0.0
    assert plain["threshold"] == best_threshold(y, oof, "youden")  # on OOF, never on test
    assert plain["test"]["accuracy"] == compute_metrics(yt, test, threshold=plain["threshold"])["accuracy"]
    fused = cf.recipe_tail(y, folds, oof, yt, test, x, xt, fuse=True)
    assert fused["fusion_weight"] > 0 and fused["oof_auc"] > plain["oof_auc"] + 0.02
    # the oracle diagnosis: the best test ACC among thresholds with test balanced ACC >= 0.82
    separable = np.stack([1 - yt * 0.9 - 0.05, yt * 0.9 + 0.05], 1)
    assert cf.recipe_tail(y, folds, oof, yt, separable, x, xt, fuse=False)["oracle_accuracy_at_ba"] == 1.0
    noise = rng.random(m)
    assert cf.recipe_tail(y, folds, oof, yt, np.c_[1 - noise, noise], x, xt, fuse=False)["oracle_accuracy_at_ba"] is None


def test_permuted_descriptors_get_little_weight_and_cost_little(rng):
    from benchmarks import fusion_noise as fn

    n, m = 600, 300
    y, yt = (rng.random(n) < 0.25).astype(int), (rng.random(m) < 0.25).astype(int)
    folds = np.arange(n) % 5

    def probs(labels):
        s = 1 / (1 + np.exp(-(1.2 * (labels - 0.5) * 2 + rng.normal(0, 1.0, len(labels)))))
        return np.stack([1 - s, s], 1)

    oof, test = probs(y), probs(yt)
    x = np.c_[y + rng.normal(0, 0.5, n), rng.normal(size=(n, 3))]  # informative, unless permuted
    xt = np.c_[yt + rng.normal(0, 0.5, m), rng.normal(size=(m, 3))]
    informative = cf.recipe_tail(y, folds, oof, yt, test, x, xt, fuse=True)["fusion_weight"]
    trials = [fn.permuted_trial(y, folds, oof, yt, test, x, xt, seed) for seed in range(5)]
    assert informative >= 0.3 and all(t["weight"] < informative for t in trials)
    for t in trials:
        assert t["oof_auc_gain"] >= 0  # the weight is the OOF-best, w = 0 included
        if t["weight"] == 0:
            assert t["test_auc_change"] == 0
        assert t["test_auc_change"] > -0.03
