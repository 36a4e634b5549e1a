"""``benchmarks/seed_ensemble.py``: one kept run alone reproduces its own summary; several are averaged per case
(OOF and test) before the recipe's decision; runs on other data are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import seed_ensemble as se

RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_runs"
KEPT = [RUNS / "cpu_2026-11-26-auto64aa" / "kept" / "auto64aa_s0",
        RUNS / "cpu_2026-11-27-auto64aa1" / "kept" / "auto64aa_s1"]


@pytest.mark.parametrize("kept", KEPT, ids=lambda p: p.name)
def test_one_run_alone_reproduces_its_own_decision_and_test_figures(kept):
    summary = json.loads((kept / "cv_summary.json").read_text())
    r = se.evaluate([se.fused_run(kept)])
    final = summary["test"]["final_at_threshold"]
    assert r["threshold"] == pytest.approx(summary["decision"]["threshold"], abs=1e-6)  # CSVs keep 8 digits
    assert r["oof_auc"] == pytest.approx(summary["decision"]["oof"]["auc"], abs=1e-6)
    for k in ("auc", "accuracy", "balanced_accuracy", "f1"):
        assert r["test"][k] == pytest.approx(final[k], abs=1e-9), k


def _run(ids, labels, p1):
    return {c: (int(y), np.array([1 - p, p])) for c, y, p in zip(ids, labels, p1, strict=True)}


def test_runs_are_averaged_per_case_whatever_their_row_order(rng):
    n = 600
    ids = [f"c{i:04d}" for i in range(n)]
    y = (rng.random(n) < 0.25).astype(int)
    signal = y + 0.0

    def noisy():  # the same weak signal with independent noise: a mean of two ranks better than either
        return 1 / (1 + np.exp(-(2 * signal - 1 + rng.normal(0, 2.0, n))))

    a, b = noisy(), noisy()
    order = rng.permutation(n)  # run b lists its cases in another order
    run_a = (_run(ids, y, a), _run(ids, y, a))
    in_order_b = _run(ids, y, b)
    run_b = ({ids[i]: in_order_b[ids[i]] for i in order},) * 2
    got_ids, got_y, mean = se.average([run_a[0], run_b[0]], "OOF")
    assert got_ids == sorted(ids) and np.array_equal(got_y, y)
    assert np.allclose(mean[:, 1], (a + b) / 2) and np.allclose(mean.sum(1), 1)
    both = se.evaluate([run_a, run_b])
    assert both["runs"] == 2
    assert both["oof_auc"] == pytest.approx(roc_auc_score(y, (a + b) / 2))
    assert both["oof_auc"] > max(roc_auc_score(y, a), roc_auc_score(y, b)) + 0.01


def test_runs_on_other_cases_or_labels_are_refused():
    ids = ["a", "b", "c", "d"]
    one = _run(ids, [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9])
    with pytest.raises(ValueError, match="other OOF cases"):
        se.average([one, _run(["a", "b", "c", "e"], [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9])], "OOF")
    with pytest.raises(ValueError, match="labels some test cases differently"):
        se.average([one, _run(ids, [0, 1, 1, 1], [0.2, 0.7, 0.4, 0.9])], "test")


def test_the_command_line_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "seed_ensemble.json"
    assert se.main([*map(str, KEPT), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["auto64aa_s0", "auto64aa_s1", "mean of the 2 runs"]
    table = capsys.readouterr().out
    assert "| mean of the 2 runs | " in table and table.count("\n") == 5
