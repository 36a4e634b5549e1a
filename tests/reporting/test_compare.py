"""Model comparison: real runs side by side, paired tests on matched cases, refusals and warnings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvox.metrics.stats import delong_test
from medvox.reporting.compare import write_comparison
from tests.conftest_runs import assert_self_contained, image_sources, write_synthetic_run


def _oof(run):
    """{case: (label, P(class 1))} of a binary run's pooled OOF as its file holds the final probabilities."""
    with open(run / "oof_predictions.csv", newline="") as fh:
        return {r["case_id"]: (int(r["label"]), float(r["prob_1"])) for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_compare_two_real_runs(cv_runs, tmp_path):
    runs = [cv_runs["resnet10"], cv_runs["mil"]]
    page_path = write_comparison(runs, tmp_path / "cmp")
    assert page_path == tmp_path / "cmp" / "comparison.html"
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    page = page_path.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert len(image_sources(page)) == 2  # OOF and test ROC overlays
    assert result["names"] == ["resnet10", "mil"] and result["warnings"] == []
    assert {(p["split"], p["n_common"]) for p in result["pairs"]} == {("oof", 80), ("test", 20)}

    a, b = _oof(runs[0]), _oof(runs[1])
    ids = sorted(a)
    y = np.array([a[i][0] for i in ids])
    expected = delong_test(y, [a[i][1] for i in ids], [b[i][1] for i in ids])
    oof_pair = next(p for p in result["pairs"] if p["split"] == "oof")
    for key in ("auc_a", "auc_b", "z", "p_value"):
        assert oof_pair["delong"][key] == pytest.approx(expected[key], abs=1e-9)
    assert oof_pair["delong"]["auc_a"] == pytest.approx(roc_auc_score(y, [a[i][1] for i in ids]))
    assert oof_pair["bootstrap"]["ci"][0] <= oof_pair["delong"]["diff"] <= oof_pair["bootstrap"]["ci"][1]

    summary = json.loads((runs[0] / "cv_summary.json").read_text())
    row = result["runs"][0]
    assert row["cv"]["auc"]["mean"] == pytest.approx(summary["cv"]["auc"]["mean"])
    assert row["test_auc"] == summary["test"]["final_at_threshold"]["auc"]
    assert row["test_variant"] == "ensemble_tta_calibrated"
    assert result["runs"][1]["test_variant"] == "ensemble_calibrated"  # the MIL run had no TTA
    assert "resnet10" in page and "DeLong" in page


def _binary_run(path, ids, seed, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = [int(i.split("_")[1]) % 2 for i in ids]
    p1 = 1 / (1 + np.exp(-(signal * (np.array(labels) - 0.5) * 2 + rng.normal(size=len(ids)))))
    return write_synthetic_run(path, ids, labels, np.c_[1 - p1, p1])


def test_different_case_sets_are_paired_on_the_intersection(tmp_path):
    ids = [f"case_{i}" for i in range(80)]
    run_a = _binary_run(tmp_path / "a" / "model", ids, seed=1, signal=1.5)
    run_b = _binary_run(tmp_path / "b" / "model", ids[10:] + ["case_100", "case_101"], seed=2)
    page_path = write_comparison([run_a, run_b], tmp_path / "out" / "ab.html")
    result = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert result["names"] == ["a/model", "b/model"]  # same folder names: the parent tells them apart
    pair = result["pairs"][0]
    assert (pair["n_common"], pair["n_only_a"], pair["n_only_b"]) == (70, 10, 2)
    assert len(result["warnings"]) == 1 and "70 common case(s)" in result["warnings"][0]
    assert "70 common case(s)" in page_path.read_text(encoding="utf-8")
    a, b = _oof(run_a), _oof(run_b)
    common = [i for i in ids if i in b]
    expected = delong_test([a[i][0] for i in common], [a[i][1] for i in common], [b[i][1] for i in common])
    assert pair["delong"]["z"] == pytest.approx(expected["z"], abs=1e-9)


def test_runs_are_compared_on_the_probabilities_their_decisions_use(tmp_path):
    """compare tests the runs' final probabilities (the prob_ columns), the ones their summary's pooled OOF AUC
    is computed from."""
    ids = [f"case_{i}" for i in range(80)]
    plain, other = _binary_run(tmp_path / "plain", ids, seed=3), _binary_run(tmp_path / "other", ids, seed=4)
    y, p1 = zip(*_oof(plain).values(), strict=True)
    write_comparison([plain, other], tmp_path / "cmp")
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    pair = next(p for p in result["pairs"] if p["split"] == "oof")
    summary = json.loads((plain / "cv_summary.json").read_text())
    assert pair["delong"]["auc_a"] == pytest.approx(roc_auc_score(y, p1)) == pytest.approx(summary["oof"]["auc"])
    assert result["runs"][0]["oof_auc"] == summary["oof"]["auc"]


def test_runs_with_different_classes_are_refused(tmp_path):
    ids = [f"case_{i}" for i in range(20)]
    labels = [i % 2 for i in range(20)]
    probs = np.full((20, 2), 0.5)
    run_a = write_synthetic_run(tmp_path / "resnet50", ids, labels, probs, classes=("benign", "malignant"))
    run_b = write_synthetic_run(tmp_path / "swin", ids, labels, probs, classes=("0", "1"))
    with pytest.raises(ValueError, match=r"resnet50 .* and swin .* have different classes"):
        write_comparison([run_a, run_b], tmp_path / "out")


def test_a_case_with_two_labels_is_refused(tmp_path):
    ids = [f"case_{i}" for i in range(20)]
    probs = np.full((20, 2), 0.5)
    run_a = write_synthetic_run(tmp_path / "a", ids, [i % 2 for i in range(20)], probs)
    run_b = write_synthetic_run(tmp_path / "b", ids, [(i + 1) % 2 for i in range(20)], probs)
    with pytest.raises(ValueError, match="different labels"):
        write_comparison([run_a, run_b], tmp_path / "out")


def test_one_run_is_not_a_comparison(tmp_path):
    run = _binary_run(tmp_path / "a", [f"case_{i}" for i in range(20)], seed=0)
    with pytest.raises(ValueError, match="at least two runs"):
        write_comparison([run], tmp_path / "out")


def test_three_classes_get_the_bootstrap_only_and_holm_for_three_runs(tmp_path, rng):
    ids = [f"case_{i}" for i in range(90)]
    labels = [i % 3 for i in range(90)]
    runs = []
    for k in range(3):
        probs = rng.dirichlet(np.ones(3), size=90) + (k + 1) * 0.3 * np.eye(3)[labels]
        runs.append(write_synthetic_run(tmp_path / f"run{k}", ids, labels, probs / probs.sum(1, keepdims=True),
                                        classes=("a", "b", "c")))
    write_comparison(runs, tmp_path / "out")
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert len(result["pairs"]) == 3
    assert all("delong" not in p and p["bootstrap"]["metric"] == "macro_ovr_auc" for p in result["pairs"])
    assert any("DeLong's test is for binary" in n for n in result["notes"])


def test_holm_adjustment(tmp_path):
    ids = [f"case_{i}" for i in range(120)]
    runs = [_binary_run(tmp_path / f"r{k}", ids, seed=k, signal=0.5 + k) for k in range(3)]
    write_comparison(runs, tmp_path / "out", n_boot=200)
    pairs = json.loads((tmp_path / "out" / "comparison.json").read_text())["pairs"]
    ps = sorted((p["delong"]["p_value"], p["delong"]["p_holm"]) for p in pairs)
    assert ps[0][1] == pytest.approx(min(1.0, 3 * ps[0][0]))
    assert all(holm >= p for p, holm in ps) and ps[1][1] >= ps[0][1] and ps[2][1] >= ps[1][1]
