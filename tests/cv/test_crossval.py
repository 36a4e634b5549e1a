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


def _as_nifti(npz_path, case_ids, folder):
    """The .npz cases ``<split>_<index>`` as NIfTI files in ``folder`` (made here)."""
    npz = np.load(npz_path)
    folder.mkdir()
    for cid in case_ids:
        split, index = cid.rsplit("_", 1)
        volume = npz[f"{split}_images"][int(index)]  # (D, H, W) uint8
        # medvox arrays are (z, y, x) of the RAS grid: NIfTI stores (x, y, z)
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), folder / f"{cid}.nii.gz")
    return folder


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
    from medvox.metrics.classification import best_threshold, compute_metrics

    summary = json.loads((cv_run / "cv_summary.json").read_text())
    decision = summary["decision"]
    assert decision["rule"] == "youden" and 0.0 <= decision["threshold"] <= 1.0
    oof = _rows(cv_run / "oof_predictions.csv")
    classes = summary["classes"]
    labels = np.array([classes.index(r["label"]) for r in oof])
    calibrated = []
    for r in oof:  # recomputed here by hand: p_k^(1/T) normalised
        t = summary["calibration"][int(r["fold"])]["temperature"]
        p = np.array([float(r[f"raw_prob_{c}"]) for c in classes]) ** (1.0 / t)
        calibrated.append(p / p.sum())
    calibrated = np.array(calibrated)
    assert decision["threshold"] == pytest.approx(best_threshold(labels, calibrated, rule="youden"), abs=1e-6)
    assert summary["oof"]["balanced_accuracy"] == pytest.approx(
        compute_metrics(labels, calibrated, threshold=decision["threshold"])["balanced_accuracy"])

    test = summary["test"]
    assert test["final"] == "ensemble_tta_calibrated"
    rows = _rows(cv_run / "test_predictions.csv")
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    expected = compute_metrics(y, p, threshold=decision["threshold"])
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        assert test["final_at_threshold"][name] == pytest.approx(expected[name])
    # the CSV's labels are the run's decisions: p1 >= the OOF threshold, not the argmax
    at_threshold = [classes[int(v >= decision["threshold"])] for v in p[:, 1]]
    assert [r["predicted"] for r in rows] == at_threshold
    fold_val = _rows(cv_run / "fold_0" / "val_predictions.csv")  # a fold's own: at its validation threshold
    fold_t = json.loads((cv_run / "fold_0" / "metrics.json").read_text())["final"]["val"]["decision"]["threshold"]
    assert [r["predicted"] for r in fold_val] == [classes[int(float(r["prob_1"]) >= fold_t)] for r in fold_val]
    table = (cv_run / "cv_table.md").read_text()
    assert f"{decision['threshold']:.3f}" in table and "youden" in table
    # the folds column: each fold's (calibrated) validation cases at that threshold, as the pooled column
    folds = np.array([int(r["fold"]) for r in oof])
    per_fold = [compute_metrics(labels[folds == k], calibrated[folds == k], threshold=decision["threshold"])
                for k in range(summary["folds"])]
    at = summary["cv_at_decision"]
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "f1"):
        assert at[name]["per_fold"] == pytest.approx([m[name] for m in per_fold], abs=1e-6)
        mean, std = np.mean([m[name] for m in per_fold]), np.std([m[name] for m in per_fold], ddof=1)
        assert f"| {name} | {mean:.3f} +- {std:.3f} [" in table
    argmax_auc = summary["cv"]["auc"]
    assert f"| auc | {argmax_auc['mean']:.3f} +- {argmax_auc['std']:.3f} [" in table  # the fold models' own
    assert "At the run's decision: calibrated p(" in table


def test_cv_plots_final_and_keep_last(cv_run):
    """--plots final: no per-epoch images, the curves drawn once; keep_last=false: no last.pt once done."""
    for k in range(3):
        fold = cv_run / f"fold_{k}"
        assert not list(fold.glob("*_epoch_*.png"))
        assert (fold / "loss_curve.png").stat().st_size > 0 and (fold / "learning_curves.png").is_file()
        assert (fold / "confusion_matrix_val_final.png").is_file() and (fold / "roc_curve_val_final.png").is_file()
        assert not (fold / "last.pt").exists() and (fold / "best.pt").is_file()


def test_cv_skips_finished_folds(cv_run, tiny_medmnist, capsys, caplog, monkeypatch):
    """...and, given the original command line's --gpu on a machine without one, says so once, not per fold."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = {k: (cv_run / f"fold_{k}" / "best.pt").stat().st_mtime_ns for k in range(3)}
    with caplog.at_level("WARNING", logger="medvox"):
        assert main(["cv", "--data", str(tiny_medmnist), "--output", str(cv_run.parent), *CV_ARGS, "--gpu"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert before == {k: (cv_run / f"fold_{k}" / "best.pt").stat().st_mtime_ns for k in range(3)}
    warned = [r.getMessage() for r in caplog.records if "no CUDA device is visible" in r.getMessage()]
    assert warned == ["--gpu/--multi_gpu was given but no CUDA device is visible: all 3 folds and the test "
                      "ensemble on the CPU"]
    from medvox.engine.setup import use_gpu

    caplog.clear()  # outside `medvox cv` each step warns for itself again
    assert use_gpu(True, "--gpu", "predicting") is False and "predicting on the CPU" in caplog.text


def test_cv_runs_its_test_ensemble_on_the_device_it_trained_on(cv_run, tiny_medmnist, tmp_path, monkeypatch):
    """`medvox cv --gpu` predicts its test ensemble (with TTA) on the GPU it trained on, not on the CPU. No GPU
    here: CUDA is reported present to the device choice (:func:`inference_device`) and the device each member is asked for is recorded (then loaded on the CPU)."""
    import shutil

    import torch

    from medvox.inference import models as inference

    shutil.copytree(cv_run, tmp_path / "resnet10")
    asked, real_load, real_device = [], inference.load_model, inference.inference_device
    monkeypatch.setattr(inference, "load_model", lambda path, device="cpu": asked.append(device) or real_load(path))
    with monkeypatch.context() as m:  # what inference_device answers on a machine with a GPU
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "current_device", lambda: 0)
        cuda = real_device(True)
    assert cuda == torch.device("cuda", 0) and real_device(False) == torch.device("cpu")
    monkeypatch.setattr(inference, "inference_device", lambda gpu: cuda if gpu else real_device(gpu))
    assert main(["cv", "--data", str(tiny_medmnist), "--output", str(tmp_path), *CV_ARGS, "--gpu"]) == 0
    assert asked == [cuda] * 3
    summary = json.loads((tmp_path / "resnet10" / "cv_summary.json").read_text())
    assert summary["test"] == json.loads((cv_run / "cv_summary.json").read_text())["test"] | {
        "members": summary["test"]["members"]}  # the same numbers (the members' paths are the copy's)


def test_predict_gpu_flag_without_a_gpu_predicts_on_the_cpu(cv_run, tiny_medmnist, tmp_path, caplog):
    val = _rows(cv_run / "fold_0" / "val_predictions.csv")[:2]
    folder = _as_nifti(tiny_medmnist, [r["case_id"] for r in val], tmp_path / "nifti")
    outs = [tmp_path / "cpu.csv", tmp_path / "gpu.csv"]
    assert main(["predict", "--run", str(cv_run), str(folder), "--out", str(outs[0])]) == 0
    assert main(["predict", "--run", str(cv_run), str(folder), "--out", str(outs[1]), "--gpu"]) == 0
    assert _rows(outs[0]) == _rows(outs[1]) and "no CUDA device is visible: predicting on the CPU" in caplog.text


def test_predict_from_the_run_folder_matches_validation(cv_run, tiny_medmnist, tmp_path):
    fold = cv_run / "fold_0"
    val = _rows(fold / "val_predictions.csv")[:6]
    folder = _as_nifti(tiny_medmnist, [r["case_id"] for r in val], tmp_path / "nifti")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(fold / "best_ema.pt"), str(folder), "--out", str(out),
                 "--uncalibrated"]) == 0
    got = {r["case_id"]: r for r in _rows(out)}
    assert set(got) == {r["case_id"] for r in val}
    for r in val:
        for c in ("prob_0", "prob_1"):
            assert float(got[r["case_id"]][c]) == pytest.approx(float(r[c]), abs=1e-4)
        assert got[r["case_id"]]["status"] == "ok"
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["decision"]["threshold"] is None and "checkpoint file" in doc["decision"]["fitted_on"]
    # the fold folder, calibrated: the fold's validation threshold moved through its temperature, so the
    # labels are those of its val_predictions.csv (at the threshold on the raw probabilities)
    assert main(["predict", "--run", str(fold), str(folder), "--out", str(out)]) == 0
    got, doc = {r["case_id"]: r for r in _rows(out)}, json.loads(out.with_suffix(".json").read_text())
    assert "validation set" in doc["decision"]["fitted_on"] and 0.0 < doc["decision"]["threshold"] < 1.0
    assert [got[r["case_id"]]["predicted"] for r in val] == [r["predicted"] for r in val]


@pytest.fixture(scope="module")
def fused_run(cv_run, tmp_path_factory):
    """The finished run summarised again with ``feature_fusion`` (a copy: the other tests keep theirs)."""
    import shutil

    from medvox.config import from_dict
    from medvox.cv.summary import summarize
    from medvox.data import prepare

    run = tmp_path_factory.mktemp("fused") / "resnet10"
    shutil.copytree(cv_run, run)
    cfg = from_dict(json.loads((run / "fold_0" / "config.json").read_text()))
    prepared = prepare(cfg.data, progress=False)
    summarize(run, [run / f"fold_{k}" for k in range(3)], prepared, feature_fusion=True, progress=False)
    return run, prepared


def test_cv_feature_fusion_is_fitted_out_of_fold_and_mixed_at_the_oof_weight(fused_run):
    """Each fold's feature model is fitted without that fold's cases; the weight is the best OOF AUC of the
    mixture with the calibrated CNN; threshold and test ensemble use the mixture."""
    from medvox.descriptors import feature_matrix, make_feature_model, predict_json
    from medvox.metrics.classification import best_threshold, compute_metrics
    from medvox.run import read_predictions

    run, prepared = fused_run
    summary = json.loads((run / "cv_summary.json").read_text())
    fusion = summary["fusion"]
    w = fusion["weight"]
    assert 0.0 <= w <= 1.0 and fusion["n_features"] == len(feature_matrix(prepared.images[:1], progress=False)[0])
    oof = _rows(run / "oof_predictions.csv")
    feat_rows = _rows(run / "features" / "oof_predictions.csv")
    assert [r["case_id"] for r in feat_rows] == [r["case_id"] for r in oof]
    index = {c.id: i for i, c in enumerate(prepared.cases)}
    _, x = feature_matrix(prepared.images[[index[r["case_id"]] for r in oof]], progress=False)
    labels = np.array([prepared.classes.index(r["label"]) for r in oof])
    folds = np.array([int(r["fold"]) for r in oof])
    p_feat = np.array([[float(r[f"prob_{c}"]) for c in prepared.classes] for r in feat_rows])
    for k in range(3):  # refitted here on the other folds only
        model = make_feature_model().fit(x[folds != k], labels[folds != k])
        np.testing.assert_allclose(p_feat[folds == k], model.predict_proba(x[folds == k]), atol=1e-6)
        doc = json.loads((run / "features" / f"fold_{k}.json").read_text())
        np.testing.assert_allclose(predict_json(doc, x[folds == k]), p_feat[folds == k], atol=1e-6)
    oof_file = read_predictions(run / "oof_predictions.csv")
    y, p_cnn = oof_file.labels, oof_file.calibrated
    assert oof_file.decision.probabilities == "fused"
    aucs = {c["weight"]: c["auc"] for c in json.loads((run / "features" / "fusion.json").read_text())["curve"]}
    assert aucs[w] == max(aucs.values())
    fused = (1 - w) * p_cnn + w * p_feat
    assert summary["oof"]["auc"] == pytest.approx(compute_metrics(y, fused)["auc"])
    np.testing.assert_allclose(oof_file.probs, fused, atol=1e-8)
    assert summary["decision"]["threshold"] == pytest.approx(best_threshold(y, fused, rule="youden"), abs=1e-6)

    test = summary["test"]
    assert test["final"] == "fused"
    test_file = read_predictions(run / "test_predictions.csv")
    yt, pt = test_file.labels, test_file.probs
    p_tfeat = read_predictions(run / "features" / "test_predictions.csv").probs
    if w < 1:  # what remains after taking the feature part out is the calibrated TTA ensemble's
        cnn = (pt - w * p_tfeat) / (1 - w)
        assert compute_metrics(yt, cnn)["auc"] == pytest.approx(test["ensemble_tta_calibrated"]["auc"], abs=1e-5)
    assert test["fused"]["auc"] == pytest.approx(compute_metrics(yt, pt)["auc"], abs=1e-6)
    assert test["final_at_threshold"]["accuracy"] == pytest.approx(
        compute_metrics(yt, pt, threshold=summary["decision"]["threshold"])["accuracy"])


def test_predict_from_a_fused_run_folder_reproduces_its_test_predictions(fused_run, tiny_medmnist, tmp_path):
    """`medvox predict --run <fused run> --tta` on NIfTI copies of test cases gives the fused test ensemble's
    probabilities; the CSV's calibrated_prob_ columns hold the CNN alone."""
    run, _ = fused_run
    rows = _rows(run / "test_predictions.csv")[:5]
    folder = _as_nifti(tiny_medmnist, [r["case_id"] for r in rows], tmp_path / "nifti")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), str(folder), "--out", str(out), "--tta"]) == 0
    weight = json.loads((run / "cv_summary.json").read_text())["fusion"]["weight"]
    assert json.loads(out.with_suffix(".json").read_text())["feature_fusion_weight"] == weight
    got = {r["case_id"]: r for r in _rows(out)}
    for r in rows:
        assert float(got[r["case_id"]]["prob_1"]) == pytest.approx(float(r["prob_1"]), abs=1e-4)
    # the labels are the run's own decisions, at the threshold its reported metrics are at
    decision = json.loads((run / "cv_summary.json").read_text())["decision"]
    assert json.loads(out.with_suffix(".json").read_text())["decision"]["threshold"] == decision["threshold"]
    assert [got[r["case_id"]]["predicted"] for r in rows] == [r["predicted"] for r in rows]
    probs = {r["case_id"]: float(r["prob_1"]) for r in rows}
    # a run whose threshold sits between these cases' probabilities: predict follows it, not the argmax
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    summary = json.loads((moved / "cv_summary.json").read_text())
    v = np.sort(list(probs.values()))
    gap = int(np.argmax(np.diff(v)))  # the widest gap: the recomputed probabilities cannot cross it
    summary["decision"]["threshold"] = cut = float((v[gap] + v[gap + 1]) / 2)
    (moved / "cv_summary.json").write_text(json.dumps(summary))
    assert main(["predict", "--run", str(moved), str(folder), "--out", str(out), "--tta"]) == 0
    labels = {r["case_id"]: r["predicted"] for r in _rows(out)}
    assert labels == {c: "1" if v >= cut else "0" for c, v in probs.items()}
    assert len(set(labels.values())) == 2
    for flag, rule in (("--argmax", "--argmax"), ("--uncalibrated", "--uncalibrated")):
        assert main(["predict", "--run", str(run), str(folder), "--out", str(out), flag]) == 0
        doc = json.loads(out.with_suffix(".json").read_text())
        assert doc["decision"]["rule"] == "argmax" and rule in doc["decision"]["fitted_on"]
        if flag == "--argmax":  # the same probabilities, labelled by the most probable class
            assert [r["predicted"] for r in _rows(out)] == [
                "1" if probs[r["case_id"]] > 0.5 else "0" for r in _rows(out)]
    if weight > 0:
        assert main(["predict", "--run", str(run), str(folder), "--out", str(out), "--tta"]) == 0
        cnn = {r["case_id"]: float(r["calibrated_prob_1"]) for r in _rows(out)}
        assert any(abs(cnn[r["case_id"]] - float(r["prob_1"])) > 1e-3 for r in rows)


def test_summarised_again_without_fusion_the_run_forgets_it(fused_run, tmp_path):
    """A fused run summarised again with fusion off drops the fusion's files, so that predict, compare and
    report do not mix in a feature model the summary no longer has."""
    import shutil

    from medvox.cv.summary import summarize
    from medvox.run import Run

    src, prepared = fused_run
    run = tmp_path / "resnet10"
    shutil.copytree(src, run)
    assert Run(run).fusion is not None or json.loads((run / "cv_summary.json").read_text())["fusion"]["weight"] == 0
    summary = summarize(run, [run / f"fold_{k}" for k in range(3)], prepared, progress=False)
    assert "fusion" not in summary and summary["test"]["final"] == "ensemble_tta_calibrated"
    assert not (run / "features").exists() and Run(run).fusion is None
    oof = Run(run).oof()  # the CNN's own OOF, per-fold calibrated, unmixed
    assert oof.decision.probabilities == "calibrated"
    np.testing.assert_allclose(oof.probs, oof.calibrated)


def test_accuracy_harness_fold_level_figures_from_fold_folders_match_the_summary(cv_run, tmp_path):
    """`benchmarks/accuracy.py folds` on a run's fold folders alone (a GPU session's runs whose summary never
    ran, nor its calibration) gives the pooled OOF AUCs (uncalibrated, and per-fold calibrated: the summary's
    pooled OOF of a run without fusion) and the no-TTA ensemble's test AUC that `medvox cv` wrote."""
    import shutil

    from benchmarks import accuracy
    from medvox.metrics.classification import compute_metrics
    from medvox.run import read_predictions

    run = tmp_path / "resnet10"
    shutil.copytree(cv_run, run)
    summary = json.loads((run / "cv_summary.json").read_text())
    oof = read_predictions(run / "oof_predictions.csv")  # the raw and the per-fold calibrated OOF `medvox cv` wrote
    raw_auc = compute_metrics(oof.labels, oof.raw if oof.raw is not None else oof.probs)["auc"]
    for name in ("cv_summary.json", "oof_predictions.csv", "test_predictions.csv", *(f"fold_{k}/{w}" for k in range(3) for w in (
            "best.pt", "best_ema.pt", "best.safetensors", "best_ema.safetensors", "calibration.json"))):
        (run / name).unlink(missing_ok=True)
    got = accuracy.fold_level(run)
    assert got["oof_auc"] == pytest.approx(raw_auc, abs=1e-9)
    assert got["oof_auc_calibrated"] == pytest.approx(summary["oof"]["auc"], abs=1e-9)
    assert got["test_ensemble_auc"] == pytest.approx(summary["test"]["ensemble"]["auc"], abs=1e-6)
    assert got["val_auc"] == pytest.approx(summary["cv"]["auc"]["per_fold"], abs=1e-9)
    table = accuracy.render_fold_level([got, accuracy.fold_level(cv_run)])  # and from the summary itself
    assert table.count(f"| {got['oof_auc']:.3f} | {got['oof_auc_calibrated']:.3f} |") == 2


def test_accuracy_harness_fuse_matches_medvox_cv_fusion(cv_run, fused_run, tmp_path):
    """`benchmarks/accuracy.py fuse` (a kept run, fused afterwards from its predictions alone) gives what
    `medvox cv --set train.feature_fusion=true` gives at its end: weight, fused OOF, threshold, test mixture."""
    import shutil

    from benchmarks import accuracy

    src = tmp_path / "src" / "kept" / "resnet10_s0"
    shutil.copytree(cv_run, src)
    (tmp_path / "src" / "timings.json").write_text(json.dumps(
        {"resnet10_s0": {"name": "r10", "seed": 0, "rc": 0, "wall_seconds": 100.0, "cpu_seconds": 150.0}}))
    accuracy.fuse_kept(src, tmp_path / "out", name="r10f")
    got_dir, (want_dir, _) = tmp_path / "out" / "kept" / "r10f_s0", fused_run
    got, want = (json.loads((d / "cv_summary.json").read_text()) for d in (got_dir, want_dir))
    assert got["fusion"]["weight"] == want["fusion"]["weight"] and set(got["fusion"]) == set(want["fusion"])
    assert got["probabilities"] == want["probabilities"] == "fused" and got["test"]["final"] == want["test"]["final"]
    assert got["oof"]["auc"] == pytest.approx(want["oof"]["auc"], abs=1e-9)
    assert got["decision"]["threshold"] == pytest.approx(want["decision"]["threshold"], abs=1e-6)
    for name in ("oof_predictions.csv", "test_predictions.csv"):
        a, b = _rows(got_dir / name), _rows(want_dir / name)
        assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
        assert [float(r["prob_1"]) for r in a] == pytest.approx([float(r["prob_1"]) for r in b], abs=1e-6)
    spread = [r["spread"] for r in _rows(got_dir / "test_predictions.csv")]  # the CNN members', as medvox cv keeps
    assert spread == [r["spread"] for r in _rows(want_dir / "test_predictions.csv")] and len(set(spread)) > 1
    assert got["test"]["fused"]["auc"] == pytest.approx(want["test"]["fused"]["auc"], abs=1e-9)
    timing = json.loads((tmp_path / "out" / "timings.json").read_text())["r10f_s0"]
    assert timing["name"] == "r10f" and timing["wall_seconds"] == pytest.approx(100.0 + timing["fusion_seconds"])
    assert _rows(src / "test_predictions.csv") != _rows(got_dir / "test_predictions.csv") or got["fusion"]["weight"] == 0


@pytest.fixture(scope="module")
def native_run(tiny_medmnist, tmp_path_factory):
    """A fused CV run whose CNN sees 16^3 (the 28^3 volumes resized): the descriptors stay on the 28^3 grid."""
    out = tmp_path_factory.mktemp("native")
    args = [*CV_ARGS, "--target-shape", "16", "16", "16", "--set", "train.feature_fusion=true"]
    assert main(["cv", "--data", str(tiny_medmnist), "--output", str(out), *args]) == 0
    return out / "resnet10"


def test_descriptors_stay_on_the_native_grid_when_the_cnn_input_is_coarser(native_run, tiny_medmnist, tmp_path):
    """The feature models are fitted on descriptors of the native 28^3 volumes (refitted here from them, not
    from the CNN's 16^3 input), the grid is recorded with its plan, and `medvox predict --run` on NIfTI
    copies of test cases preprocesses them for both and reproduces the fused test predictions."""
    import dataclasses

    from medvox.config import from_dict
    from medvox.data import prepare
    from medvox.descriptors import feature_matrix, make_feature_model

    cfg = from_dict(json.loads((native_run / "fold_0" / "config.json").read_text()))
    cnn = prepare(cfg.data, progress=False)
    native = prepare(dataclasses.replace(cfg.data, target_shape=None), progress=False)
    assert cnn.images.shape[2:] == (16, 16, 16) and native.images.shape[2:] == (28, 28, 28)
    assert cnn.plan["target_spacing"] == pytest.approx([1.75] * 3)  # the whole volume, resized
    summary = json.loads((native_run / "cv_summary.json").read_text())
    assert summary["fusion"]["grid"] == {"target_shape": [28, 28, 28], "target_spacing": [1.0, 1.0, 1.0],
                                         "same_as_input": False}
    assert json.loads((native_run / "features" / "plan.json").read_text()) == native.plan
    assert summary["fusion"]["weight"] > 0

    oof, feat_rows = _rows(native_run / "oof_predictions.csv"), _rows(native_run / "features" / "oof_predictions.csv")
    index = {c.id: i for i, c in enumerate(native.cases)}
    rows = [index[r["case_id"]] for r in oof]
    labels = np.array([native.classes.index(r["label"]) for r in oof])
    folds = np.array([int(r["fold"]) for r in oof])
    p_feat = np.array([float(r["prob_1"]) for r in feat_rows])
    for images, same in ((native.images, True), (cnn.images, False)):
        _, x = feature_matrix(images[rows], progress=False)
        refit = np.zeros(len(rows))
        for k in range(3):
            refit[folds == k] = make_feature_model().fit(x[folds != k], labels[folds != k]).predict_proba(
                x[folds == k])[:, 1]
        assert np.allclose(refit, p_feat, atol=1e-6) == same

    test_rows = _rows(native_run / "test_predictions.csv")[:5]
    folder = _as_nifti(tiny_medmnist, [r["case_id"] for r in test_rows], tmp_path / "nifti")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(native_run), str(folder), "--out", str(out), "--tta"]) == 0
    got = {r["case_id"]: float(r["prob_1"]) for r in _rows(out)}
    for r in test_rows:
        assert got[r["case_id"]] == pytest.approx(float(r["prob_1"]), abs=1e-4)
