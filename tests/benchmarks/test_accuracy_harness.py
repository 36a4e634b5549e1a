"""The accuracy study's analysis (``benchmarks/accuracy.py``): per-fold calibration of the out-of-fold
predictions, the threshold chosen there (never on test), means over seeds, the rendered tables.

Hand-made run folders stand in for ``medvox cv`` output (the real one is covered by tests/engine/test_cv.py);
the numbers are checked against values computed here independently.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import accuracy
from medvox.metrics.calibration import rescale_folds
from medvox.metrics.classification import best_threshold, compute_metrics
from medvox.metrics.decision import Decision
from medvox.run import FORMAT_VERSION, read_predictions, write_json, write_predictions

CLASSES = ["0", "1"]


def _write_run(kept, ids, y, raw, folds, temps, test):
    """A kept run folder in the format `medvox cv` writes, through medvox's own writers: the OOF file with the
    raw and the per-fold calibrated probabilities (the final ones, which the decision is chosen on), the test
    ensemble's file and a cv_summary.json."""
    calibrated = rescale_folds(raw, folds, list(temps))
    decision = Decision.fit(y, calibrated, CLASSES, rule="youden", fitted_on="the pooled calibrated OOF (by hand)")
    write_predictions(kept / "oof_predictions.csv", ids, ids, y, calibrated, CLASSES, decision, raw=raw,
                      calibrated=calibrated, extra={"fold": [str(int(k)) for k in folds]})
    t_ids, yt, pt = test
    write_predictions(kept / "test_predictions.csv", t_ids, t_ids, yt, pt, CLASSES, decision)
    per_fold = [{"auc": 0.7 + 0.01 * k, "accuracy": 0.6} for k in range(2)]
    summary = {"format_version": FORMAT_VERSION, "classes": CLASSES, "decision": decision.to_json(),
               "calibration": [{"temperature": t} for t in temps], "cv": {"auc": {"mean": 0.75}}, "oof": {"auc": 0.7},
               "test": {"per_fold": per_fold, "ensemble": {"auc": 0.8}, "ensemble_tta": {"auc": 0.81}}}
    write_json(kept / "cv_summary.json", summary)


def _fake_cv(kept, rng, temps=(0.5, 2.0)):
    """Two folds whose raw scores are on different scales; returns the arrays written."""
    kept.mkdir(parents=True)
    ids, y_all, p_all, f_all = [], [], [], []
    for k in range(2):
        y = rng.integers(0, 2, 60)
        p1 = np.clip(0.35 * y + 0.65 * rng.random(60), 0.01, 0.99)
        ids += [f"f{k}c{i}" for i in range(60)]
        y_all.append(y), p_all.append(p1), f_all.append(np.full(60, k))
    y, p1, folds = np.concatenate(y_all), np.concatenate(p_all), np.concatenate(f_all)
    yt = rng.integers(0, 2, 80)
    pt = np.clip(0.4 * yt + 0.6 * rng.random(80), 0.01, 0.99)
    _write_run(kept, ids, y, np.stack([1 - p1, p1], 1), folds, temps,
               ([f"t{i}" for i in range(80)], yt, np.stack([1 - pt, pt], 1)))
    for k in range(2):
        (kept / f"fold_{k}").mkdir()
        (kept / f"fold_{k}" / "metrics.json").write_text(json.dumps({"epochs_run": 10 + k}))
    # the values as the files hold them (9 significant digits)
    p1 = read_predictions(kept / "oof_predictions.csv").raw[:, 1]
    pt = read_predictions(kept / "test_predictions.csv").probs[:, 1]
    return y, p1, folds, yt, pt


def _sharper_copy(src, dest):
    """``src``'s run with the same cases and labels and sharper out-of-fold probabilities."""
    shutil.copytree(src, dest)
    oof, test = read_predictions(dest / "oof_predictions.csv"), read_predictions(dest / "test_predictions.csv")
    temps = [c["temperature"] for c in json.loads((dest / "cv_summary.json").read_text())["calibration"]]
    p = oof.raw[:, 1] * 0.5 + 0.5 * (oof.labels == 1)
    _write_run(dest, oof.ids, oof.labels, np.stack([1 - p, p], 1), oof.folds, temps, (test.ids, test.labels, test.probs))
    return dest


def _write_timings(out, names, seed=0):
    """``run``'s timings.json for finished jobs ``{key: recipe name}``."""
    timings = {k: {"name": n, "seed": seed, "rc": 0, "wall_seconds": 1.0, "cpu_seconds": 1.0, "device": "cpu"}
               for k, n in names.items()}
    (out / "timings.json").write_text(json.dumps(timings))


def test_threshold_is_chosen_on_per_fold_calibrated_oof(tmp_path):
    rng = np.random.default_rng(0)
    temps = (0.5, 2.0)
    y, p1, folds, yt, pt = _fake_cv(tmp_path / "kept" / "r18_s0", rng, temps)
    res = accuracy.medvox_result(tmp_path / "kept" / "r18_s0", rule="youden")
    # calibration by hand: p^(1/T), renormalised, fold by fold
    t = np.where(folds == 0, temps[0], temps[1])
    a, b = (1 - p1) ** (1 / t), p1 ** (1 / t)
    cal = np.stack([a, b], 1) / (a + b)[:, None]
    thr = best_threshold(y, cal, rule="youden")
    test = np.stack([1 - pt, pt], 1)
    expected = compute_metrics(yt, test, threshold=thr)
    assert res["chosen"]["threshold"] == pytest.approx(thr)
    assert res["chosen"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert res["argmax"]["accuracy"] == pytest.approx(compute_metrics(yt, test)["accuracy"])
    assert res["oof_auc_calibrated"] == pytest.approx(compute_metrics(y, cal)["auc"])
    assert res["single_fold_auc"] == pytest.approx(0.705) and res["epochs_run"] == [10, 11]
    assert res["at_accuracy"]["threshold"] == pytest.approx(best_threshold(y, cal, rule="accuracy"))


def test_collect_means_over_seeds_and_renders(tmp_path):
    rng = np.random.default_rng(1)
    timings = {}
    for seed in (0, 1):
        _fake_cv(tmp_path / "kept" / f"r18_s{seed}", rng)
        timings[f"r18_s{seed}"] = {"name": "r18", "seed": seed, "rc": 0, "wall_seconds": 60.0 * (seed + 1),
                                   "cpu_seconds": 100.0, "device": "cpu"}
    (tmp_path / "runs").mkdir()
    for seed, auc in ((0, 0.88), (1, 0.86)):
        test = {"auc": auc, "accuracy": 0.8, "balanced_accuracy": 0.7, "f1": 0.5}
        (tmp_path / "runs" / f"monai_ce_s{seed}.json").write_text(json.dumps({"test": test, "best_val_auc": 0.9}))
        timings[f"monai_ce_s{seed}"] = {"name": "monai_ce", "seed": seed, "rc": 0, "wall_seconds": 50.0,
                                        "cpu_seconds": 50.0, "device": "cuda"}
    timings["r18_s2"] = {"name": "r18", "seed": 2, "rc": None, "unfinished": "stopped", "wall_seconds": 5.0}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    results = accuracy.collect(tmp_path, "youden")
    r18, monai = results["recipes"]["r18"], results["recipes"]["monai_ce"]
    assert r18["n_seeds"] == 2 and r18["wall_seconds_mean"] == pytest.approx(90.0)  # the unfinished run is left out
    aucs = [results["runs"][f"r18_s{s}"]["test"]["auc"] for s in (0, 1)]
    assert r18["auc"]["mean"] == pytest.approx(np.mean(aucs)) and r18["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert monai["auc"]["mean"] == pytest.approx(0.87) and monai["auc"]["std"] == pytest.approx(np.std([0.88, 0.86], ddof=1))
    md = accuracy.render(results, {"r18": "python -m medvox cv ..."})
    assert "| **monai_ce**: plain MONAI ResNet-18 (CE), argmax | 2 | 0.870 ± 0.014 |" in md
    assert "MedMNIST v2: ResNet-18 + ACS (published) | 1 | 0.839 | 0.754" in md
    assert "`r18`: `python -m medvox cv ...`" in md


def test_job_commands_carry_the_recipe_and_seed(tmp_path):
    cmd, result = accuracy.job_command("r10s1", 2, tmp_path, gpu=True, threads=1, extra=["--epochs", "5"])
    assert cmd[1:4] == ["-m", "medvox", "cv"] and result == tmp_path / "runs" / "r10s1_s2"
    assert cmd[cmd.index("--seed") + 1] == "2" and cmd[cmd.index("--split-seed") + 1] == "2"
    assert 'model.kwargs={"stem_stride": 1}' in cmd and "--gpu" in cmd and cmd[-2:] == ["--epochs", "5"]
    cmd, result = accuracy.job_command("monai_wce", 1, tmp_path, gpu=False, threads=None)
    assert "monai_baseline.py" in cmd[1] and cmd[cmd.index("--loss") + 1] == "weighted_CE"


def test_run_jobs_with_a_relative_out_keeps_results_where_the_report_reads_them(tmp_path, monkeypatch):
    """Each job runs with ``out`` as its working folder, so ``--out`` given relative used to nest the runs
    (out/out/runs/...) where nothing was kept or cleaned; the harness now resolves it first."""
    script = ("import pathlib, sys; run = pathlib.Path(sys.argv[1]); (run / 'fold_0').mkdir(parents=True); "
              "(run / 'cv_summary.json').write_text('{}'); (run / 'fold_0' / 'metrics.json').write_text('{}'); "
              "(run / 'fold_0' / 'best.pt').write_text('weights')")

    def fake_job(name, seed, out, gpu, threads, smoke=False, extra=None):  # what medvox cv --output does
        run = out / "runs" / f"{name}_s{seed}"
        return [sys.executable, "-c", script, str(run)], run

    monkeypatch.setattr(accuracy, "job_command", fake_job)
    monkeypatch.chdir(tmp_path)
    accuracy.run_jobs([("r18", 0)], Path("acc"), 1, False, None, None, drop_checkpoints=True)
    run = tmp_path / "acc" / "runs" / "r18_s0"
    assert (run / "cv_summary.json").is_file() and not (tmp_path / "acc" / "acc").exists()
    assert not (run / "fold_0" / "best.pt").exists()  # checkpoints dropped
    kept = tmp_path / "acc" / "kept" / "r18_s0"
    assert (kept / "cv_summary.json").is_file() and (kept / "fold_0" / "metrics.json").is_file()
    timings = json.loads((tmp_path / "acc" / "timings.json").read_text())
    assert timings["r18_s0"]["rc"] == 0 and timings["r18_s0"]["cpu_seconds"] > 0


def test_preflight_names_the_interpreter_and_the_missing_module(tmp_path):
    bare = tmp_path / "bare-python"  # an interpreter that has nothing installed: `python -I -S`
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare.chmod(0o755)
    problem = accuracy.preflight([("r18", 0)], python=str(bare))
    assert problem is not None and str(bare) in problem and "No module named" in problem and ".venv/bin/python" in problem
    assert accuracy.preflight([("r18", 0)]) is None  # the test environment has medvox and its dependencies


def test_recipes_are_compared_with_the_reference_of_the_same_seed(tmp_path):
    """The paired section is `medvox compare`'s DeLong test of the same cases, signed recipe minus r18."""
    from medvox.metrics.stats import delong_test

    rng = np.random.default_rng(3)
    _fake_cv(tmp_path / "kept" / "r18_s0", rng)
    other = _sharper_copy(tmp_path / "kept" / "r18_s0", tmp_path / "kept" / "r18_mixup_s0")
    _write_timings(tmp_path, {"r18_s0": "r18", "r18_mixup_s0": "r18_mixup"})
    results = accuracy.collect(tmp_path, "youden")
    (row,) = results["paired"]
    assert row["recipe"] == "r18_mixup" and row["seed"] == 0
    load = lambda path: list(csv.DictReader(open(path)))  # noqa: E731
    ref, new = load(tmp_path / "kept" / "r18_s0" / "oof_predictions.csv"), load(other / "oof_predictions.csv")
    y = np.array([r["label"] == "1" for r in ref], dtype=int)
    temps = [c["temperature"] for c in json.loads((other / "cv_summary.json").read_text())["calibration"]]

    def calibrated(rows):  # both runs are compared on their per-fold calibrated OOF, rescaled here by hand
        p, t = (np.array([float(r[k]) for r in rows]) for k in ("raw_prob_1", "fold"))
        t = np.array(temps)[t.astype(int)]
        return p ** (1 / t) / (p ** (1 / t) + (1 - p) ** (1 / t))

    d = delong_test(y, calibrated(ref), calibrated(new))
    assert row["oof"]["diff"] == pytest.approx(-d["diff"]) and row["oof"]["diff"] > 0.05
    assert row["oof"]["p"] == pytest.approx(d["p_value"]) and row["oof"]["p"] < 0.01
    assert row["test"]["diff"] == pytest.approx(0.0)  # the test predictions were copied unchanged
    md = accuracy.render(results, {})
    assert "## Paired against r18" in md and f"| r18_mixup | 0 | {row['oof']['auc_reference']:.3f} -> " in md


def test_report_writes_the_results_json_and_rebuilds_the_tables_from_it_alone(tmp_path, capsys):
    """`report --out` keeps one compact summary per run (accuracy.json); `report` without --out renders the same
    Markdown from that file once the run folders are gone."""
    rng = np.random.default_rng(4)
    acc = tmp_path / "acc"
    _fake_cv(acc / "kept" / "r18_s0", rng)
    _sharper_copy(acc / "kept" / "r18_s0", acc / "kept" / "r18_mixup_s0")
    _write_timings(acc, {"r18_s0": "r18", "r18_mixup_s0": "r18_mixup"})
    md = tmp_path / "report" / "accuracy.md"
    md.parent.mkdir()
    assert accuracy.main(["report", "--out", str(acc), "--md", str(md)]) == 0
    first, results = md.read_text(), json.loads(md.with_suffix(".json").read_text())
    assert set(results["runs"]) == {"r18_s0", "r18_mixup_s0"} and len(results["paired"]) == 1
    shutil.rmtree(acc)
    md.unlink()
    assert accuracy.main(["report", "--md", str(md)]) == 0
    assert md.read_text() == first and "## Paired against r18" in first
    assert json.loads(md.with_suffix(".json").read_text()) == results  # read, not rewritten
    capsys.readouterr()


def test_report_merge_adds_new_runs_to_the_kept_results(tmp_path):
    """`report --out NEW --merge`: the runs and paired rows already in accuracy.json stay (their folders are
    gone), a run of the same name in NEW replaces its entry, and the per-recipe means cover them all."""
    rng = np.random.default_rng(6)
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_cv(old / "kept" / "r18_s0", rng)
    _sharper_copy(old / "kept" / "r18_s0", old / "kept" / "r18_mixup_s0")
    _write_timings(old, {"r18_s0": "r18", "r18_mixup_s0": "r18_mixup"})
    md = tmp_path / "accuracy.md"
    assert accuracy.main(["report", "--out", str(old), "--md", str(md)]) == 0
    before = json.loads(md.with_suffix(".json").read_text())
    shutil.rmtree(old)
    _fake_cv(new / "kept" / "r18_s1", rng)
    _write_timings(new, {"r18_s1": "r18"}, seed=1)
    assert accuracy.main(["report", "--out", str(new), "--md", str(md), "--merge"]) == 0
    after = json.loads(md.with_suffix(".json").read_text())
    assert list(after["runs"]) == ["r18_s0", "r18_mixup_s0", "r18_s1"]
    assert after["runs"]["r18_s0"] == before["runs"]["r18_s0"]
    assert after["paired"] == before["paired"]  # r18_mixup's seed-0 pair kept, no pair for seed 1
    assert after["recipes"]["r18"]["n_seeds"] == 2 and after["recipes"]["r18"]["seeds"] == [0, 1]
    assert "| r18_mixup | 0 |" in md.read_text()
    with pytest.raises(ValueError, match="--rule youden"):
        accuracy.collect(new, "f1", after)


def test_the_committed_report_is_what_its_results_json_renders():
    """benchmarks/accuracy.md is `accuracy.py report` of benchmarks/accuracy.json (+ accuracy_notes.md): edit the
    notes, then run `python benchmarks/accuracy.py report`."""
    md = Path(accuracy.__file__).with_name("accuracy.md")
    results = json.loads(md.with_suffix(".json").read_text(encoding="utf-8"))
    assert accuracy.report_text(results, md) == md.read_text(encoding="utf-8")


def test_paired_section_falls_back_to_the_bootstrap_for_three_classes(tmp_path):
    """DeLong is binary: with three classes the row carries the paired bootstrap of the macro AUC."""
    from medvox.metrics.stats import paired_bootstrap_auc
    from tests.conftest_runs import write_synthetic_run

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 150)
    ids = [f"c{i}" for i in range(len(y))]

    def probs(sharp):
        z = rng.normal(size=(len(y), 3)) + sharp * np.eye(3)[y]
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    pa, pb = probs(0.5), probs(2.0)
    runs = {}
    for key, name, p in (("r18_s0", "r18", pa), ("r50_s0", "r50", pb)):
        write_synthetic_run(tmp_path / key, ids, list(y), p, classes=("a", "b", "c"))
        runs[key] = {"name": name, "seed": 0, "kept": str(tmp_path / key)}
    (row,) = accuracy.paired_against(runs, n_boot=300)
    expected = paired_bootstrap_auc(y, pa, pb, n_boot=300, seed=0)
    assert row["oof"]["diff"] == pytest.approx(-expected["diff"]) and row["oof"]["diff"] > 0.1
    assert row["oof"]["p"] == pytest.approx(expected["p_boot"]) and row["oof"]["auc"] is None
    md = accuracy.render({"rule": "youden", "recipes": {}, "paired": [row]}, {})
    assert f"| r50 | 0 |  | {row['oof']['diff']:+.3f}" in md


def test_fold_commands_are_the_jobs_cv_flags_as_one_train_per_fold(tmp_path):
    cv, _ = accuracy.job_command("auto64aa", 1, tmp_path, gpu=True, threads=1)
    folds = accuracy.fold_commands(cv)
    assert len(folds) == 5
    for k, cmd in enumerate(folds):
        at = cv.index("cv")
        # `medvox cv` trains fold k with fold=k and resume=True: the same config as this command's
        assert cmd == [*cv[:at], "train", *cv[at + 1:], "--fold", str(k), "--resume"]
    # as many folds as the command's last --folds: the smoke flags, then --extra on top
    smoke, _ = accuracy.job_command("auto64aa", 1, tmp_path, gpu=False, threads=1, smoke=True)
    assert len(accuracy.fold_commands(smoke)) == 2
    more, _ = accuracy.job_command("r18", 0, tmp_path, gpu=False, threads=1, smoke=True, extra=["--folds", "3"])
    assert [c[-2] for c in accuracy.fold_commands(more)] == ["0", "1", "2"]


def test_fold_parallel_runs_the_summary_after_its_folds_and_keeps_a_failed_jobs_models(tmp_path, monkeypatch):
    """Each fold is a process of its own; the job's `medvox cv` starts when all have finished, and the job is
    timed from its first fold to the summary. A job with a failed fold is recorded as failed and its
    summary never starts; a failed summary keeps the folds' checkpoints (dropped only on success)."""
    stamp = ("import pathlib, sys, time; run = pathlib.Path(sys.argv[1]); run.mkdir(parents=True, exist_ok=True); "
             "name = sys.argv[2]; (run / (name + '.start')).write_text(repr(time.time())); time.sleep(0.3); "
             "(run / 'fold_0').mkdir(exist_ok=True); (run / 'fold_0' / 'best.pt').write_text('weights'); "
             "(run / (name + '.end')).write_text(repr(time.time())); sys.exit(int(sys.argv[3]))")

    def fake_job(name, seed, out, gpu, threads, smoke=False, extra=None):
        run = out / "runs" / f"{name}_s{seed}"
        return [sys.executable, "-c", stamp, str(run), "summary", "1" if name == "r50" else "0"], run

    def fake_folds(cv_cmd):
        run, name = cv_cmd[3], Path(cv_cmd[3]).name
        return [[sys.executable, "-c", stamp, run, f"fold{k}", "1" if (name == "mil_s0" and k == 1) else "0"]
                for k in range(3)]

    monkeypatch.setattr(accuracy, "job_command", fake_job)
    monkeypatch.setattr(accuracy, "fold_commands", fake_folds)
    accuracy.run_jobs([("r18", 0), ("mil", 0), ("r50", 0)], tmp_path, 4, False, None, None, drop_checkpoints=True,
                      fold_parallel=True)
    timings = json.loads((tmp_path / "timings.json").read_text())
    read = lambda run, name: float((tmp_path / "runs" / run / name).read_text())  # noqa: E731
    ends = [read("r18_s0", f"fold{k}.end") for k in range(3)]
    assert read("r18_s0", "summary.start") >= max(ends)
    r18 = timings["r18_s0"]
    assert r18["rc"] == 0 and r18["wall_seconds"] >= read("r18_s0", "summary.end") - read("r18_s0", "fold0.start")
    assert r18["cpu_seconds"] > 0 and "folds in parallel" in r18["device"]
    assert (tmp_path / "kept" / "r18_s0").is_dir() and not (tmp_path / "runs" / "r18_s0" / "fold_0" / "best.pt").exists()
    # a failed fold: the job fails, its summary is not started
    assert timings["mil_s0"]["rc"] == 1 and "mil_s0_fold1" in timings["mil_s0"]["failed"]
    assert not (tmp_path / "runs" / "mil_s0" / "summary.start").exists()
    # a failed summary: recorded, and the folds' checkpoints stay for a rerun
    assert timings["r50_s0"]["rc"] == 1 and (tmp_path / "runs" / "r50_s0" / "fold_0" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(
        [f"{j}_fold{k}.log" for j in ("r18_s0", "mil_s0", "r50_s0") for k in range(3)] + ["r18_s0.log", "r50_s0.log"])
