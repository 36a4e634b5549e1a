"""`medvox cv` on real AdrenalMNIST3D: every fold, the summary files, out-of-fold predictions that cover
each pool case exactly once, the test-set ensemble; `medvox predict` from the run folder alone on NIfTI
files reproduces the in-training validation probabilities."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medvox.cli import main

pytestmark = pytest.mark.slow

CV_ARGS = ["--model", "resnet10", "--epochs", "2", "--batch_size", "8", "--folds", "3", "--ema_decay", "0.9",
           "--early_stopping", "0", "--threads", "2", "--plots", "final", "--set", "train.keep_last=false"]


@pytest.fixture(scope="module")
def cv_run(tiny_medmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    assert main(["cv", "--data", str(tiny_medmnist), "--output", str(out), *CV_ARGS]) == 0
    return out / "resnet10"


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cv_writes_summary_oof_and_test_ensemble(cv_run, tiny_medmnist):
    for k in range(3):
        fold = cv_run / f"fold_{k}"
        assert json.loads((fold / "metrics.json").read_text())["status"] == "complete"
        assert (fold / "calibration.json").is_file() and (fold / "best_ema.pt").is_file()
    summary = json.loads((cv_run / "cv_summary.json").read_text())
    assert summary["folds"] == 3
    auc = summary["cv"]["auc"]
    assert len(auc["per_fold"]) == 3
    assert auc["mean"] == pytest.approx(np.mean(auc["per_fold"]))
    assert auc["std"] == pytest.approx(np.std(auc["per_fold"], ddof=1))
    lo, hi = auc["ci95"]
    eps = 1e-9  # the bootstrap mean of identical folds may differ from them in the last bit
    assert min(auc["per_fold"]) - eps <= lo <= auc["mean"] <= hi <= max(auc["per_fold"]) + eps

    oof = _rows(cv_run / "oof_predictions.csv")
    npz = np.load(tiny_medmnist)
    n_pool = len(npz["train_labels"]) + len(npz["val_labels"])
    ids = [r["case_id"] for r in oof]
    assert len(ids) == n_pool and len(set(ids)) == n_pool  # every pool case exactly once
    assert {r["fold"] for r in oof} == {"0", "1", "2"}
    assert summary["oof"]["n"] == n_pool

    test = summary["test"]
    assert test["n"] == len(npz["test_labels"]) and len(test["members"]) == 3
    assert 0.0 <= test["ensemble"]["auc"] <= 1.0 and "ensemble_tta" in test
    assert len(test["per_fold"]) == 3
    rows = _rows(cv_run / "test_predictions.csv")
    assert len(rows) == len(npz["test_labels"]) and "spread" in rows[0]
    assert "auc" in (cv_run / "cv_table.md").read_text()


def test_cv_decision_threshold_is_chosen_on_calibrated_oof(cv_run):
    """The threshold comes from the pooled OOF predictions, each fold rescaled by its own temperature;
    the test ensemble's threshold metrics are those of test_predictions.csv at that threshold."""
    from medvox.evaluation.metrics import best_threshold, compute_metrics

    summary = json.loads((cv_run / "cv_summary.json").read_text())
    decision = summary["decision"]
    assert decision["rule"] == "youden" and 0.0 <= decision["threshold"] <= 1.0
    oof = _rows(cv_run / "oof_predictions.csv")
    classes = summary["classes"]
    labels = np.array([classes.index(r["label"]) for r in oof])
    calibrated = []
    for r in oof:  # recomputed here by hand: p_k^(1/T) normalised
        t = summary["calibration"][int(r["fold"])]["temperature"]
        p = np.array([float(r[f"prob_{c}"]) for c in classes]) ** (1.0 / t)
        calibrated.append(p / p.sum())
    calibrated = np.array(calibrated)
    assert decision["threshold"] == pytest.approx(best_threshold(labels, calibrated, rule="youden"), abs=1e-6)
    assert decision["oof"]["balanced_accuracy"] == pytest.approx(
        compute_metrics(labels, calibrated, threshold=decision["threshold"])["balanced_accuracy"])

    test = summary["test"]
    assert test["final"] == "ensemble_tta_calibrated"
    rows = _rows(cv_run / "test_predictions.csv")
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    expected = compute_metrics(y, p, threshold=decision["threshold"])
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        assert test["final_at_threshold"][name] == pytest.approx(expected[name])
    table = (cv_run / "cv_table.md").read_text()
    assert f"{decision['threshold']:.3f}" in table and "youden" in table


def test_cv_plots_final_and_keep_last(cv_run):
    """--plots final: no per-epoch images, the curves drawn once; keep_last=false: no last.pt once done."""
    for k in range(3):
        fold = cv_run / f"fold_{k}"
        assert not list(fold.glob("*_epoch_*.png"))
        assert (fold / "loss_curve.png").stat().st_size > 0 and (fold / "learning_curves.png").is_file()
        assert (fold / "confusion_matrix_val_final.png").is_file() and (fold / "roc_curve_val_final.png").is_file()
        assert not (fold / "last.pt").exists() and (fold / "best.pt").is_file()


def test_cv_skips_finished_folds(cv_run, tiny_medmnist, capsys):
    before = {k: (cv_run / f"fold_{k}" / "best.pt").stat().st_mtime_ns for k in range(3)}
    assert main(["cv", "--data", str(tiny_medmnist), "--output", str(cv_run.parent), *CV_ARGS]) == 0
    assert "already finished" in capsys.readouterr().out
    assert before == {k: (cv_run / f"fold_{k}" / "best.pt").stat().st_mtime_ns for k in range(3)}


def test_predict_from_the_run_folder_matches_validation(cv_run, tiny_medmnist, tmp_path):
    fold = cv_run / "fold_0"
    val = _rows(fold / "val_predictions.csv")[:6]
    npz = np.load(tiny_medmnist)
    folder = tmp_path / "nifti"
    folder.mkdir()
    for r in val:
        split, index = r["case_id"].rsplit("_", 1)
        volume = npz[f"{split}_images"][int(index)]  # (D, H, W) uint8
        # medvox arrays are (z, y, x) of the RAS grid: NIfTI stores (x, y, z)
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), folder / f"{r['case_id']}.nii.gz")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(fold / "best_ema.pt"), str(folder), "--out", str(out),
                 "--uncalibrated"]) == 0
    got = {r["case_id"]: r for r in _rows(out)}
    assert set(got) == {r["case_id"] for r in val}
    for r in val:
        for c in ("prob_0", "prob_1"):
            assert float(got[r["case_id"]][c]) == pytest.approx(float(r[c]), abs=1e-4)
        assert got[r["case_id"]]["status"] == "ok"
