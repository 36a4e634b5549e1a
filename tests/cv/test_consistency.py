"""One run, one number per figure: cv_summary.json, cv_table.md, the report's HTML, `medvox compare --json`
and the prediction files agree, and every `predicted` follows from its row and the recorded decision."""

from __future__ import annotations

import csv
import html as htmllib
import json
import re
import shutil

import numpy as np
import pytest

from medvox.cli import main
from medvox.metrics.classification import compute_metrics
from medvox.metrics.decision import Decision
from medvox.run import Run, read_predictions

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run_dir(cv_runs):
    return cv_runs["resnet10"]


def _table_cells(table: str) -> dict[str, list[str]]:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("metric", "---"):
            out[cells[0]] = cells[1:]
    return out


def test_every_figure_shown_twice_is_the_same(run_dir, tmp_path):
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    run = Run(run_dir)
    oof, test = run.oof(), run.test()
    decision = Decision.from_json(summary["decision"])
    assert oof.decision == decision and test.decision == decision  # the files record the run's decision

    # the figures recomputed here from the CSVs alone equal the summary's
    for name, preds, ref in (("oof", oof, summary["oof"]), ("test", test, summary["test"]["final_at_threshold"])):
        mine = compute_metrics(preds.labels, preds.probs, threshold=decision.cut)
        for key in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "loss"):
            assert mine.get(key) == ref.get(key), (name, key)

    # cv_table.md shows the same values
    cells = _table_cells((run_dir / "cv_table.md").read_text())
    for key in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        assert cells[key][1] == f"{summary['oof'][key]:.3f}"
        assert cells[key][2] == f"{summary['test']['final_at_threshold'][key]:.3f}"
        if key != "auc":
            assert cells[key][0].startswith(f"{summary['cv_at_decision'][key]['mean']:.3f} +- ")
    assert decision.text() in (run_dir / "cv_table.md").read_text()

    # the report
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    page = htmllib.unescape((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert decision.text() in page
    assert f"AUC {summary['oof']['auc']:.3f}" in page and f"AUC {summary['test']['final_at_threshold']['auc']:.3f}" in page
    assert "differs from cv_summary.json" not in page

    # compare (a copy of the run beside it, so its JSON holds this run's figures twice)
    twin = tmp_path / "twin" / run_dir.name
    shutil.copytree(run_dir, twin)
    assert main(["compare", str(run_dir), str(twin), "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for row in cmp["runs"]:
        assert row["oof_auc"] == summary["oof"]["auc"] and row["test_auc"] == summary["test"]["final_at_threshold"]["auc"]
        assert row["oof"]["accuracy"] == summary["oof"]["accuracy"]
    assert f"{summary['oof']['auc']:.3f}" in (tmp_path / "cmp" / "comparison.html").read_text(encoding="utf-8")


def test_every_predicted_follows_from_its_row_and_the_decision(run_dir):
    for path in [run_dir / "oof_predictions.csv", run_dir / "test_predictions.csv",
                 *sorted(run_dir.glob("fold_*/val_predictions.csv"))]:
        rows = _rows(path)
        classes = [c[len("prob_"):] for c in rows[0] if c.startswith("prob_")]
        for r in rows:  # by hand, from the row alone
            decision = Decision.from_cell(r["decision"], classes)
            p = np.array([[float(r[f"prob_{c}"]) for c in classes]])
            assert r["predicted"] == decision.labels(p)[0], (path.name, r["case_id"])
        read_predictions(path)  # and the reader's own check passes


def test_the_oof_file_holds_raw_calibrated_and_final_probabilities(run_dir):
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    oof = Run(run_dir).oof()
    t = np.array([c["temperature"] for c in summary["calibration"]])[oof.folds]
    by_hand = oof.raw ** (1.0 / t[:, None])
    by_hand /= by_hand.sum(1, keepdims=True)
    np.testing.assert_allclose(oof.calibrated, by_hand, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(oof.probs, oof.calibrated)  # not fused: the decision is on the calibrated ones
    for k, fold in enumerate(Run(run_dir).folds):  # the raw ones are the fold models' validation predictions
        val = read_predictions(fold.path / "val_predictions.csv")
        np.testing.assert_allclose(oof.raw[oof.folds == k], val.probs)


def _ece_by_hand(labels, probs, n_bins=15):
    conf, hit = probs.max(1), (probs.argmax(1) == labels).astype(float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
    return total


def test_the_reliability_figures_are_raw_before_and_calibrated_after(run_dir, tmp_path):
    """A run whose temperatures are set by hand (2.0 and 0.5): the report's ECE before is the raw pooled OOF's,
    after is the OOF rescaled once by each fold's temperature (the CSV's calibrated columns)."""
    run = tmp_path / run_dir.name
    shutil.copytree(run_dir, run)
    summary = json.loads((run / "cv_summary.json").read_text())
    temps = [2.0, 0.5]
    for c, t in zip(summary["calibration"], temps, strict=True):
        c["temperature"] = t
    (run / "cv_summary.json").write_text(json.dumps(summary))
    rows = _rows(run / "oof_predictions.csv")
    classes = summary["classes"]
    raw = np.array([[float(r[f"raw_prob_{c}"]) for c in classes] for r in rows])
    labels = np.array([classes.index(r["label"]) for r in rows])
    t = np.array([temps[int(r["fold"])] for r in rows])
    cal = raw ** (1.0 / t[:, None])
    cal /= cal.sum(1, keepdims=True)
    for r, p in zip(rows, cal, strict=True):  # the file as `medvox cv` would have written it at these temperatures
        for c, v in zip(classes, p, strict=True):
            r[f"calibrated_prob_{c}"] = r[f"prob_{c}"] = format(v, ".9g")
        r["predicted"] = Decision.from_cell(r["decision"], classes).labels(np.array([[float(r[f"prob_{c}"]) for c in classes]]))[0]
    with open(run / "oof_predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    m = re.search(r"Pooled out-of-fold ECE \(15 bins, top-label\): raw ([0-9]+\.[0-9]+), "
                  r"each fold at its temperature ([0-9]+\.[0-9]+)",
                  page)
    assert m, "the report states the pooled OOF ECE before and after"
    assert float(m.group(1)) == pytest.approx(_ece_by_hand(labels, raw), abs=5e-5)
    assert float(m.group(2)) == pytest.approx(_ece_by_hand(labels, cal), abs=5e-5)
    assert abs(_ece_by_hand(labels, raw) - _ece_by_hand(labels, cal)) > 1e-3  # the two differ: the test can fail


def test_a_changed_setting_on_an_existing_run_is_refused_naming_the_key(run_dir, tmp_path, capsys):
    run = tmp_path / "out" / run_dir.name
    shutil.copytree(run_dir, run)
    config = json.loads((run / "fold_0" / "config.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    code = main(["cv", "--data", config["data"]["path"], "--cache-dir", config["data"]["cache_dir"],
                 "--epochs", "2", "--folds", "2", "--batch_size", "8", "--model", "resnet10", "--threads", "1",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr()
    assert code == 3
    assert "train.epochs: 1 there, 2 now" in err.err and "--run-name" in err.err
    assert "already finished" not in err.out and "Traceback" not in err.err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing touched
