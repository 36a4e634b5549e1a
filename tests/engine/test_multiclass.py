"""Three imbalanced classes (a grade, not malignant/benign) through the whole `--recipe auto` route: cross-
validation with the descriptor fusion, the summary, `medvox report` and `medvox predict` from the run folder.

The cases are real AdrenalMNIST3D volumes (binary masks) relabelled by the size of the mask (below the 50th
percentile: grade 1; to the 80th: grade 2; above: grade 3), so the descriptors (the foreground's voxel count)
separate the grades almost perfectly while a CNN trained for two epochs does not: the OOF-chosen fusion must
lean on the descriptors, and the decision (class weights chosen on the pooled OOF predictions, the multi-class
counterpart of the binary threshold) must hold for the OOF, the test ensemble, the CSVs and `medvox predict`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medvox.cli import main

pytestmark = pytest.mark.slow

GRADES = ("1", "2", "3")


@pytest.fixture(scope="module")
def graded_npz(medmnist_28, tmp_path_factory):
    src = np.load(medmnist_28)
    counts = {"train": 90, "val": 30, "test": 30}
    images = {s: src[f"{s}_images"][:n] for s, n in counts.items()}
    size = {s: (v > 0).reshape(len(v), -1).sum(1) for s, v in images.items()}
    pool = np.concatenate([size["train"], size["val"]])
    cuts = np.quantile(pool, [0.5, 0.8])
    path = tmp_path_factory.mktemp("graded") / "graded.npz"
    np.savez(path, **{f"{s}_images": images[s] for s in counts},
             **{f"{s}_labels": (1 + np.searchsorted(cuts, size[s], side="right"))[:, None] for s in counts})
    return path


@pytest.fixture(scope="module")
def graded_run(graded_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("graded_runs")
    args = ["cv", "--data", str(graded_npz), "--output", str(out), "--recipe", "auto", "--model", "resnet10",
            "--epochs", "2", "--folds", "3", "--threads", "2", "--plots", "final", "--set", "train.keep_last=false",
            "--time-budget", "0"]
    assert main(args) == 0
    return out / "resnet10"


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_three_grades_are_trained_fused_and_summarised(graded_run, graded_npz):
    from medvox.metrics.classification import compute_metrics
    from medvox.run import read_predictions

    summary = json.loads((graded_run / "cv_summary.json").read_text())
    config = json.loads((graded_run / "fold_0" / "config.json").read_text())
    assert summary["classes"] == list(GRADES)
    # the recipe saw the 5:3:2 imbalance and chose the weighted loss
    assert config["loss"]["name"] == "weighted_CE" and config["train"]["feature_fusion"] is True
    decision = summary["decision"]  # Youden's rule for 3 classes: class weights maximising balanced accuracy
    weights = decision["class_weights"]
    assert decision["rule"] == "youden" and decision["threshold"] is None
    assert len(weights) == 3 and np.prod(weights) == pytest.approx(1.0)
    oof_file = read_predictions(graded_run / "oof_predictions.csv")  # the fused OOF the decision was chosen on
    at_argmax = compute_metrics(oof_file.labels, oof_file.probs, class_names=list(GRADES))
    assert summary["oof"]["balanced_accuracy"] >= at_argmax["balanced_accuracy"]  # the pooled OOF at the decision
    assert summary["oof"]["class_weights"] == weights
    fold_val = json.loads((graded_run / "fold_0" / "metrics.json").read_text())["final"]["val"]
    assert len(fold_val["at_val_threshold"]["class_weights"]) == 3  # each fold's own, on its validation set
    fusion = summary["fusion"]
    assert fusion["oof_auc"]["features"] > 0.95  # the grades are the mask's size
    # the fusion weight minimises the OOF log-loss (the decision is chosen after it), not the macro AUC
    # (which a two-epoch CNN's nearly constant output leaves at the descriptors' from w = 0.05 on)
    assert fusion["criterion"] == "log_loss" and fusion["weight"] >= 0.5
    ll = fusion["oof_log_loss"]
    assert ll["fused"] <= min(ll["cnn"], ll["features"]) and fusion["oof_auc"]["fused"] > 0.95
    assert at_argmax["accuracy"] > 0.75 and at_argmax["balanced_accuracy"] > 0.7
    test = summary["test"]
    assert test["final"] == "fused" and test["fused"]["auc"] > 0.9
    assert test["final_at_threshold"]["class_weights"] == weights
    assert np.array(test["fused"]["confusion_matrix"]).shape == (3, 3)
    assert np.array(test["fused"]["confusion_matrix"]).sum() == 30
    oof = _rows(graded_run / "oof_predictions.csv")  # prob_: the final (calibrated, fused) probabilities
    assert len(oof) == 120 and sorted({r["fold"] for r in oof}) == ["0", "1", "2"]
    probs = np.array([[float(r[f"prob_{g}"]) for g in GRADES] for r in oof])
    assert np.allclose(probs.sum(1), 1, atol=1e-6)  # a mixture of two distributions is one
    predicted = [GRADES[k] for k in (probs * weights).argmax(1)]  # the CSV's labels are the weighted decision
    assert [r["predicted"] for r in oof] == predicted
    labels = np.array([GRADES.index(r["label"]) for r in oof])
    ba = np.mean([(np.array(predicted)[labels == c] == GRADES[c]).mean() for c in range(3)])
    assert ba == pytest.approx(summary["oof"]["balanced_accuracy"], abs=1e-6)
    table = (graded_run / "cv_table.md").read_text()
    assert "| auc |" in table and "(chosen on the pooled OOF log-loss: CNN " in table
    assert "At the run's decision: the largest weighted fused probability (class weights 1: " in table


def test_report_and_predict_handle_three_grades(graded_run, graded_npz, tmp_path, capsys):
    import nibabel as nib

    html = tmp_path / "report.html"
    assert main(["report", str(graded_run), "--out", str(html)]) == 0
    text = html.read_text(encoding="utf-8")
    assert all(f">{g}<" in text for g in GRADES)  # each grade is named in the report's tables
    rows = _rows(graded_run / "test_predictions.csv")[:4]
    npz = np.load(graded_npz)
    folder = tmp_path / "nifti"
    folder.mkdir()
    for r in rows:
        volume = npz["test_images"][int(r["case_id"].rsplit("_", 1)[1])]
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), folder / f"{r['case_id']}.nii.gz")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(graded_run), str(folder), "--out", str(out), "--tta"]) == 0
    got = {r["case_id"]: r for r in _rows(out)}
    for r in rows:
        for g in GRADES:
            assert float(got[r["case_id"]][f"prob_{g}"]) == pytest.approx(float(r[f"prob_{g}"]), abs=1e-4)
        assert got[r["case_id"]]["predicted"] == r["predicted"]
    summary = json.loads((graded_run / "cv_summary.json").read_text())
    used = json.loads(out.with_suffix(".json").read_text())["decision"]
    assert used["class_weights"] == summary["decision"]["class_weights"] and used["rule"] == summary["decision"]["rule"]
    assert "Confusion matrix at the largest weighted fused probability (class weights" in text
    # one fold folder: its validation weights, moved through its temperature
    fold_out = tmp_path / "fold.csv"
    assert main(["predict", "--run", str(graded_run / "fold_0"), str(folder), "--out", str(fold_out)]) == 0
    used = json.loads(fold_out.with_suffix(".json").read_text())["decision"]
    assert len(used["class_weights"]) == 3 and "validation set" in used["fitted_on"]
    # exporting that fold prints the same weights, with the deployer's precision
    capsys.readouterr()
    assert main(["export", str(graded_run), "--fold", "0", "--out", str(tmp_path / "export"),
                 "--format", "torchscript"]) == 0
    weights = ", ".join(f"{g}: {w:.6g}" for g, w in zip(GRADES, used["class_weights"], strict=True))
    assert f"(class weights {weights}) (youden, chosen on fold 0's validation set" in capsys.readouterr().out
