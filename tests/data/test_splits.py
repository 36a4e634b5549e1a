"""Splits: patient-grouped, stratified, written once and reused; a fold column wins; test stays out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvox.config import DataConfig
from medvox.data import load_source
from medvox.data.sources import Case
from medvox.data.splits import load_or_make_splits, make_splits


def _cases(n_patients=60, seed=0):
    """Patients with 1-3 scans, ~30 % positive, plus 10 held-out test cases."""
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for s in range(int(rng.integers(1, 4))):
            cases.append(Case(id=f"p{p}_s{s}", group=f"p{p}", label=label))
    cases += [Case(id=f"t{i}", group=f"t{i}", label=i % 2, subset="test") for i in range(10)]
    return cases


def _check_partition(splits, cases):
    pool = {c.id for c in cases if c.subset != "test"}
    vals = [set(f["val"]) for f in splits["folds"]]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # every pool case validated once
    for fold in splits["folds"]:
        assert set(fold["train"]) | set(fold["val"]) == pool and not set(fold["train"]) & set(fold["val"])
    tests = set(splits["test"])
    assert tests == {c.id for c in cases if c.subset == "test"}
    assert not tests & set().union(*vals)  # held-out test cases never enter a fold


def test_no_patient_in_two_folds(tmp_path):
    cases = _cases()
    splits = make_splits(cases, ["neg", "pos"], k=5, seed=0)
    _check_partition(splits, cases)
    group = {c.id: c.group for c in cases}
    fold_of_patient = {}
    for k, fold in enumerate(splits["folds"]):
        for case_id in fold["val"]:
            assert fold_of_patient.setdefault(group[case_id], k) == k


def test_adrenalmnist_pool_folds_are_stratified_within_5_points(medmnist_28):
    cs = load_source(DataConfig(path=str(medmnist_28)))
    splits = make_splits(cs.cases, cs.classes, k=5, seed=0)
    _check_partition(splits, cs.cases)
    label = {c.id: c.label for c in cs.cases}
    overall = np.mean([c.label for c in cs.pool])  # ~22 % positive in the 1286-case pool
    for fold in splits["folds"]:
        assert len(fold["val"]) in (257, 258)
        assert abs(np.mean([label[i] for i in fold["val"]]) - overall) < 0.05  # tolerance: 5 percentage points


def test_written_once_and_reused(tmp_path, monkeypatch):
    cases = _cases()
    first = load_or_make_splits(tmp_path, cases, ["neg", "pos"], k=5, seed=3)
    path = tmp_path / "splits_k5_seed3.json"
    assert json.loads(path.read_text()) == first and first["k"] == 5 and first["seed"] == 3
    mtime = path.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the split was redrawn")

    monkeypatch.setattr("sklearn.model_selection.StratifiedGroupKFold", refuse)
    assert load_or_make_splits(tmp_path, cases, ["neg", "pos"], k=5, seed=3) == first
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    cases.append(Case(id="new", group="new", label=1))  # the pool changed: a stale split is never used
    with pytest.warns(UserWarning, match="cases changed"):
        redrawn = load_or_make_splits(tmp_path, cases, ["neg", "pos"], k=5, seed=3)
    assert "new" in set().union(*(f["val"] for f in redrawn["folds"]))


def test_provided_fold_column_wins(tmp_path):
    cases = [Case(id=f"c{i}", group=f"g{i // 2}", label=i % 2, fold=[7, 3, 5][(i // 2) % 3]) for i in range(12)]
    cases.append(Case(id="test0", group="t", label=0, subset="test"))
    splits = load_or_make_splits(tmp_path, cases, ["a", "b"], k=5, seed=0)  # k=5 is ignored: 3 folds given
    assert (tmp_path / "splits_provided_k3.json").is_file() and splits["method"] == "fold column"
    assert splits["k"] == 3 and splits["fold_values"] == [3, 5, 7]
    assert splits["folds"][0]["val"] == [c.id for c in cases if c.fold == 3]
    _check_partition(splits, cases)


def test_too_few_patients_for_k():
    cases = [Case(id=f"c{i}", group="same", label=i % 2) for i in range(6)]
    with pytest.raises(ValueError, match="1 patients cannot be split into 5 folds"):
        make_splits(cases, ["a", "b"], k=5, seed=0)
