"""The run folder's own formats: the predictions CSV, the decision, the JSON writer, the lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket

import numpy as np
import pytest

from medvox.metrics.decision import Decision
from medvox.run import RunError, RunLock, read_json, read_predictions, write_json, write_predictions

CLASSES = ["benign", "malignant"]


def test_decision_applies_its_cut_and_round_trips():
    d = Decision(tuple(CLASSES), "youden", threshold=0.22, probabilities="calibrated", fitted_on="OOF")
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.6, 0.4], [0.2, 0.8]])
    assert d.labels(probs) == ["benign", "malignant", "malignant", "malignant"]  # not the argmax
    assert Decision.argmax(CLASSES).labels(probs) == ["benign", "benign", "benign", "malignant"]
    assert Decision.from_json(json.loads(json.dumps(d.to_json()))) == d
    assert Decision.from_cell(d.to_cell(), CLASSES) == d
    assert d.text() == "calibrated p(malignant) >= 0.220"
    w = Decision(("a", "b", "c"), "f1", class_weights=(0.5, 1.0, 1.0))
    assert w.apply([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]]).tolist() == [1, 2]
    assert Decision.from_cell(w.to_cell(), ("a", "b", "c")) == w
    with pytest.raises(ValueError, match="two classes"):
        Decision(("a", "b", "c"), "youden", threshold=0.3)
    with pytest.raises(ValueError, match="not one of"):
        Decision(tuple(CLASSES), "median", threshold=0.3)


def test_a_threshold_moves_through_a_temperature_to_the_same_cut():
    """``p1 >= t`` on raw probabilities picks the same cases as the moved cut on the same probabilities at T."""
    from medvox.metrics.calibration import rescale

    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 1, 200)
    raw = np.stack([1 - p1, p1], 1)
    d = Decision(tuple(CLASSES), "youden", threshold=0.3, probabilities="raw")
    for t in (0.5, 2.0, 7.0):
        moved = d.through_temperature(t)
        assert moved.probabilities == "calibrated"
        assert (moved.apply(rescale(raw, t)) == d.apply(raw)).all()
    w = Decision(("a", "b", "c"), "f1", class_weights=(0.5, 2.0, 1.0), probabilities="raw")
    raw3 = rng.dirichlet([1, 1, 1], 200)
    assert (w.through_temperature(3.0).apply(rescale(raw3, 3.0)) == w.apply(raw3)).all()


def test_predictions_csv_round_trip_and_predicted_follows_from_the_file(tmp_path):
    probs = np.array([[0.9, 0.1], [0.48, 0.52], [0.6, 0.4]])
    raw = np.array([[0.99, 0.01], [0.3, 0.7], [0.7, 0.3]])
    d = Decision(tuple(CLASSES), "youden", threshold=0.45)
    path = write_predictions(tmp_path / "p.csv", ["a", "b", "c"], ["pa", "pb", "pc"], np.array([0, 1, -1]), probs,
                             CLASSES, d, raw=raw, calibrated=probs, extra={"fold": ["0", "1", "1"]})
    got = read_predictions(path)
    assert got.ids == ["a", "b", "c"] and got.labels.tolist() == [0, 1, -1] and got.decision == d
    np.testing.assert_allclose(got.probs, probs)
    np.testing.assert_allclose(got.raw, raw)
    np.testing.assert_allclose(got.calibrated, probs)  # not written twice: prob_ are the calibrated ones
    assert "calibrated_prob_benign" not in path.read_text().splitlines()[0]
    assert got.predicted == ["benign", "malignant", "benign"] and got.folds.tolist() == [0, 1, 1]
    assert got.labelled().ids == ["a", "b"]
    # a row whose label was edited by hand is refused
    text = path.read_text().replace("0.52,malignant", "0.52,benign")
    (tmp_path / "edited.csv").write_text(text)
    with pytest.raises(RunError, match="does not follow"):
        read_predictions(tmp_path / "edited.csv")


def test_a_probability_on_the_threshold_is_decided_as_written(tmp_path):
    """The decision is applied to the probabilities as the file stores them (9 digits), never to values the
    file cannot show: a p1 a hair below the threshold that rounds onto it is decided as the file reads."""
    t = 0.5125170418799624
    probs = np.array([[1 - (t - 1e-12), t - 1e-12]])
    path = write_predictions(tmp_path / "p.csv", ["a"], ["a"], np.array([1]), probs, CLASSES,
                             Decision(tuple(CLASSES), "youden", threshold=t))
    read_predictions(path)  # consistent


def test_write_json_is_atomic_and_json_safe(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": np.float32(0.5), "nan": float("nan"), "arr": np.arange(3)})
    assert read_json(path) == {"x": 0.5, "nan": None, "arr": [0, 1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left
    (tmp_path / "bad.json").write_text("[1, 2")
    assert read_json(tmp_path / "bad.json") is None and read_json(tmp_path / "none.json") is None


def _hold(folder, ready, release):
    with RunLock(folder):
        ready.set()
        release.wait(20)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunError, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            with RunLock(tmp_path):
                pass
    finally:
        release.set()
        holder.join(30)
    with RunLock(tmp_path):  # released: free again
        pass


def test_a_dead_writers_lock_is_taken_over(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=os.getpid)
    dead.start()
    dead.join()
    (tmp_path / ".medvox.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path) as lock:
        assert read_json(lock.path)["pid"] == os.getpid()
    assert not (tmp_path / ".medvox.lock").exists()
