"""``benchmarks/multiclass_decision.py``: the three-class task it makes from AdrenalMNIST3D, and its analysis of a
finished run (the training itself is `medvox cv`, covered by tests/engine/test_multiclass.py)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from benchmarks import multiclass_decision as mc
from medvox.cv.summary import load_predictions


def test_the_three_classes_split_the_abnormal_cases_by_size(medmnist_28, tmp_path):
    counts = mc.make_graded(medmnist_28, tmp_path / "graded.npz")
    src, out = np.load(medmnist_28), np.load(tmp_path / "graded.npz")
    for split in ("train", "val", "test"):
        label, graded = src[f"{split}_labels"].reshape(-1), out[f"{split}_labels"].reshape(-1)
        assert np.array_equal(out[f"{split}_images"], src[f"{split}_images"])
        assert np.array_equal(graded == 0, label == 0)  # normal stays normal; abnormal is 1 or 2
        assert counts[split] == np.bincount(graded, minlength=3).tolist()
        size = (src[f"{split}_images"] > 0).reshape(len(label), -1).sum(1)
        if (graded == 1).any() and (graded == 2).any():  # small below large, by the training split's median
            assert size[graded == 1].max() <= size[graded == 2].min()
    assert abs(counts["train"][1] - counts["train"][2]) <= 0.05 * sum(counts["train"][1:])  # a median split
    assert counts["train"][0] > 3 * counts["train"][1]  # imbalanced: the case the class weights are for


def test_predictions_are_read_with_their_labels(tmp_path):
    path = tmp_path / "test_predictions.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "patient_id", "label", "prob_0", "prob_1", "prob_2", "predicted", "spread"])
        writer.writerow(["a", "a", "2", "0.1", "0.2", "0.7", "2", "0.01"])
        writer.writerow(["b", "b", "0", "0.6", "0.3", "0.1", "0", "0.02"])
    y, probs, _, _ = load_predictions(path)  # the project's reader, which the benchmark uses
    assert y.tolist() == [2, 0] and probs.tolist() == [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]
    scores = mc.scores(y, probs, [1.0, 1.0, 1.0])
    assert scores["accuracy"] == 1.0 and scores["recall"] == [1.0, 0.0, 1.0]
    assert mc.scores(y, probs, [0.1, 1.0, 1.0])["accuracy"] == pytest.approx(0.5)  # b becomes class 1


def test_the_cv_command_is_shortened_or_the_recipes_own(tmp_path):
    from medvox.cli import build_parser

    short = mc.cv_command(tmp_path / "g.npz", tmp_path / "runs", 12, 3, 1, 2)
    own = mc.cv_command(tmp_path / "g.npz", tmp_path / "runs", 0, 3, 1, 2)
    assert own == [a for a in short if a not in ("--epochs", "12")]  # only the length differs
    parsed_short, parsed_own = build_parser().parse_args(short), build_parser().parse_args(own)
    assert parsed_short.epochs == 12 and parsed_own.epochs is None  # None: the recipe chooses it
    assert parsed_own.folds == 3 and parsed_own.seed == 1 and parsed_own.recipe == "auto"
