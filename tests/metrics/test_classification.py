"""compute_metrics / best_threshold / to_jsonable against hand-computed values and scikit-learn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medvox.metrics.classification import best_threshold, compute_metrics, to_jsonable


def _assert_plain(obj, where="out"):
    """Only JSON's own types, all the way down."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str, where
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (bool, int, float, str), f"{where}: {type(obj)}"
        assert not (type(obj) is float and not math.isfinite(obj)), where


def _binary_fixture():
    # true:   1 1 1 1 0 0 0 0 0 0
    # pred:   1 1 1 0 1 1 0 0 0 0   -> TP 3, FN 1, FP 2, TN 4
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p1 = [0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.4, 0.3, 0.1, 0.05]
    return y, np.stack([1 - np.array(p1), np.array(p1)], axis=1)


def test_binary_by_hand():
    y, probs = _binary_fixture()
    m = compute_metrics(y, probs, class_names=["benign", "malignant"])
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]  # rows = true: [[TN, FP], [FN, TP]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # AUC by pair counting over 4 x 6 (pos, neg) pairs: positives 0.9, 0.8, 0.7 beat all six negatives
    # (the largest is 0.6); the positive 0.2 beats only 0.1 and 0.05
    assert m["auc"] == pytest.approx((6 + 6 + 6 + 2) / 24)
    assert m["threshold"] is None
    assert m["per_class"]["malignant"]["support"] == 4
    assert m["class_names"] == ["benign", "malignant"]


def test_binary_threshold():
    y, probs = _binary_fixture()
    m = compute_metrics(y, probs, threshold=0.15)  # now 0.2 is positive too: TP 4, FP 4
    assert m["confusion_matrix"] == [[2, 4], [0, 4]]
    assert m["threshold"] == 0.15
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="binary"):
        compute_metrics([0, 1, 2], np.eye(3), threshold=0.5)


def test_multiclass_against_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[np.arange(300), y] += 0.3  # better than chance
    probs /= probs.sum(1, keepdims=True)
    m = compute_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    cm = skm.confusion_matrix(y, pred)
    assert m["confusion_matrix"] == cm.tolist()
    spec = [(cm.sum() - cm[k].sum() - cm[:, k].sum() + cm[k, k]) / (cm.sum() - cm[k].sum()) for k in range(4)]
    assert m["specificity"] == pytest.approx(float(np.mean(spec)))


@pytest.mark.parametrize("k", [2, 4])
def test_json_round_trip_with_numpy_and_torch_inputs(k):
    rng = np.random.default_rng(1)
    y = rng.integers(0, k, 50).astype(np.int64)
    probs = rng.dirichlet(np.ones(k), 50).astype(np.float32)
    for yy, pp in ((y, probs), (torch.from_numpy(y), torch.from_numpy(probs))):
        m = compute_metrics(yy, pp, class_names=[f"c{i}" for i in range(k)])
        _assert_plain(m)
        assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_single_class_gives_none_auc():
    m = compute_metrics([0, 0, 0], [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    assert m["auc"] is None
    json.dumps(m, allow_nan=False)
    m4 = compute_metrics([2, 2], np.full((2, 4), 0.25))
    assert m4["auc"] is None
    # a class absent from y_true: the one-vs-rest mean is over the classes that can be scored
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.6, 0.2, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1],
                  [0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1], [0.2, 0.2, 0.5, 0.1]])
    expected = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert compute_metrics(y, p)["auc"] == pytest.approx(expected)


def test_best_threshold_by_hand_and_brute_force():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    # at p1 >= 0.3: TPR 1, FPR 1/3 -> J = 2/3 (best); the value is midway to the next score, 0.2
    assert best_threshold(y, p, "youden") == pytest.approx(0.25)
    assert best_threshold(y, p, "balanced_accuracy") == pytest.approx(0.25)
    assert best_threshold(y, p, "f1") == pytest.approx(0.25)  # F1 at 0.3 = 6/7
    rng = np.random.default_rng(2)
    yy = rng.integers(0, 2, 120)
    pp = np.clip(0.3 * yy + rng.random(120) * 0.7, 0, 1)
    for rule, key in (("f1", "f1"), ("youden", "balanced_accuracy"), ("accuracy", "accuracy")):
        t = best_threshold(yy, pp, rule)
        scores = [compute_metrics(yy, pp, threshold=float(c))[key] for c in np.unique(pp)]
        assert compute_metrics(yy, pp, threshold=t)[key] == pytest.approx(max(scores))
    # imbalanced: Youden takes p1 >= 0.6 (TPR 1, FPR 1/6); accuracy ties 0.6 and 0.9 (one error each) and
    # takes the higher, midway to the next score 0.7 -> 0.8
    yi, pi = [0, 0, 0, 0, 0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9]
    assert best_threshold(yi, pi, "youden") == pytest.approx(0.55)
    assert best_threshold(yi, pi, "accuracy") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="valid rules"):
        best_threshold(y, p, "kappa")
    with pytest.raises(ValueError, match="both classes"):
        best_threshold([1, 1], [0.2, 0.3])


def test_to_jsonable():
    obj = {
        "a": np.int64(3), "b": np.float32(0.25), "c": np.array([[1, 2]], dtype=np.int32),
        "d": torch.tensor([0.5, float("nan")]), "e": torch.tensor(2), "f": Path("/tmp/x"),
        "g": (float("inf"), np.nan, np.bool_(True)), 1: {"h": None},
    }
    out = to_jsonable(obj)
    assert out == {"a": 3, "b": 0.25, "c": [[1, 2]], "d": [0.5, None], "e": 2, "f": "/tmp/x",
                   "g": [None, None, True], "1": {"h": None}}
    _assert_plain(out)
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())


@pytest.mark.parametrize(
    "y, probs, match",
    [
        ([0, 1], [[0.5, 0.5]], "same N"),
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], "labels"),
        ([0, 1], [[0.5, 0.5], [np.nan, 0.5]], "NaN"),
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], "softmax"),
    ],
)
def test_bad_inputs(y, probs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, probs)


def test_decide_applies_a_binary_threshold_and_otherwise_the_argmax():
    from medvox.metrics.classification import decide

    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.45, 0.55], [0.2, 0.8]])
    assert decide(probs).tolist() == [0, 0, 1, 1]
    assert decide(probs, threshold=0.25).tolist() == [0, 1, 1, 1]  # p1 >= t, the boundary included
    assert decide(probs, threshold=0.3).tolist() == [0, 1, 1, 1]
    assert decide(probs[:, 1], threshold=0.6).tolist() == [0, 0, 0, 1]  # (N,) = p1
    assert decide(np.eye(3)[[2, 0, 1]]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="binary"):
        decide(np.eye(3), threshold=0.5)
    # compute_metrics counts the same decisions
    y = np.array([0, 1, 1, 1])
    assert compute_metrics(y, probs, threshold=0.25)["accuracy"] == 1.0


def test_a_threshold_moved_through_the_temperature_makes_the_same_decisions():
    """`medvox predict` on a fold folder: the fold's threshold was chosen on raw probabilities; on the
    same model's calibrated ones (temperature T) the moved threshold cuts between the same cases."""
    from medvox.metrics.calibration import rescale
    from medvox.metrics.classification import decide
    from medvox.metrics.decision import Decision

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (400, 2))
    raw = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for t_raw in (0.12, 0.3, 0.5, 0.81):
        for temperature in (0.4, 1.0, 2.5):
            moved = Decision(("0", "1"), "youden", threshold=t_raw, probabilities="raw").through_temperature(
                temperature).threshold
            assert decide(rescale(raw, temperature), moved).tolist() == decide(raw, t_raw).tolist()
            if temperature != 1.0:  # T > 1 flattens the probabilities towards 1/2, T < 1 sharpens them
                assert (abs(moved - 0.5) < abs(t_raw - 0.5)) == (temperature > 1.0) or t_raw == 0.5


def _leaning(n: int, prior: list[float], seed: int, signal: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a model that knows each class's prior: at the argmax it leans towards the common classes
    (as a descriptor model fitted without class weights, mixed into the fused probabilities, does)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(prior), size=n, p=prior)
    z = rng.normal(size=(n, len(prior))) + signal * np.eye(len(prior))[y] + np.log(prior)[None, :]
    return y, np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_class_weights_lift_balanced_accuracy_out_of_sample():
    """The multi-class decision: weights fitted on one sample (the pooled OOF predictions) raise balanced
    accuracy on another from the same model (the test set), as the binary Youden threshold does."""
    from medvox.metrics.classification import best_class_weights

    prior = [0.6, 0.25, 0.1, 0.05]
    y_fit, p_fit = _leaning(4000, prior, seed=0)
    y_new, p_new = _leaning(4000, prior, seed=1)
    weights = best_class_weights(y_fit, p_fit)

    def ba(y, p, cut=None):
        return compute_metrics(y, p, threshold=cut)["balanced_accuracy"]

    assert ba(y_new, p_new) < 0.49 and ba(y_new, p_new, weights) > 0.60  # +12 points on unseen cases
    assert ba(y_fit, p_fit, weights) > ba(y_fit, p_fit) + 0.1
    # the rarer the class, the larger its weight (the lean is towards the common ones); geometric mean 1
    assert np.all(np.diff(weights) > 0) and np.prod(weights) == pytest.approx(1.0)
    # as good as the reciprocal of the priors, which undoes this model's lean exactly (in expectation)
    assert ba(y_new, p_new, weights) >= ba(y_new, p_new, list(1 / np.array(prior))) - 0.01


def test_class_weights_match_a_brute_force_search_and_the_binary_threshold():
    from medvox.metrics.classification import best_class_weights, decide

    y, p = _leaning(600, [0.7, 0.2, 0.1], seed=2)
    weights = best_class_weights(y, p)
    grid = np.exp(np.linspace(-4, 4, 61))
    pred = np.stack([decide(p, [1.0, a, b]) for a in grid for b in grid])  # 3,721 weightings
    brute = max(np.mean([(row[y == c] == c).mean() for c in range(3)]) for row in pred)
    assert compute_metrics(y, p, threshold=weights)["balanced_accuracy"] >= brute - 1e-9
    # two classes: the weights reach the balanced accuracy of the Youden threshold (J = 2 BA - 1)
    yb, pb = _leaning(500, [0.8, 0.2], seed=3)
    wb = best_class_weights(yb, pb)
    assert compute_metrics(yb, pb, threshold=wb)["balanced_accuracy"] == pytest.approx(
        compute_metrics(yb, pb, threshold=best_threshold(yb, pb))["balanced_accuracy"])
    # each rule maximises its own score, and none does worse than the argmax (weights all 1) it starts from
    for rule, key in (("accuracy", "accuracy"), ("f1", "f1"), ("balanced_accuracy", "balanced_accuracy")):
        w = best_class_weights(y, p, rule=rule)
        assert compute_metrics(y, p, threshold=w)[key] >= compute_metrics(y, p)[key]
    assert decide(p, best_class_weights(y, p, rule="accuracy")).tolist() != decide(p, weights).tolist()


def test_class_weights_keep_the_argmax_when_nothing_gains():
    from medvox.metrics.classification import best_class_weights, decide

    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.5, 0.2], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]])
    assert best_class_weights(y, p) == [1.0, 1.0, 1.0]  # every case right already: nothing moves
    assert decide(p, [1.0, 1.0, 1.0]).tolist() == decide(p).tolist() == [0, 0, 1, 1, 2, 2]
    metrics = compute_metrics(y, p, threshold=[1.0, 1.0, 1.0])
    assert metrics["class_weights"] == [1.0, 1.0, 1.0] and metrics["threshold"] is None
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="class weights must be 3 positive"):
            decide(p, bad)
    with pytest.raises(ValueError, match="two classes"):
        best_class_weights(np.zeros(6, dtype=int), p)


def test_class_weights_moved_through_the_temperature_make_the_same_decisions():
    """`medvox predict` on a fold folder of more than two classes: weights chosen on raw probabilities, applied
    to the calibrated ones (temperature T) as w ** (1 / T), decide every case as before."""
    from medvox.metrics.calibration import rescale
    from medvox.metrics.classification import decide
    from medvox.metrics.decision import Decision

    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (500, 4))
    raw = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    weights = [0.5, 1.0, 2.5, 0.8]
    assert decide(raw, weights).tolist() != decide(raw).tolist()
    for temperature in (0.4, 1.0, 2.5):
        moved = list(Decision(("a", "b", "c", "d"), "youden", class_weights=weights, probabilities="raw")
                     .through_temperature(temperature).class_weights)
        assert decide(rescale(raw, temperature), moved).tolist() == decide(raw, weights).tolist()
