"""Classification metrics as plain Python types, threshold selection, and ``to_jsonable``.

Every value :func:`compute_metrics` returns is a ``float``, ``int``, ``str``, ``list`` or ``None``,
so ``json.dumps`` never fails; an undefined value (AUC with one class present) is ``None``.
Ratios with a zero denominator (precision with no predicted positive, ...) are ``0.0``, which is
scikit-learn's ``zero_division=0``.

Binary problems: class index 1 is the positive class; with a ``threshold`` a sample is predicted
positive when ``p1 >= threshold``, without one the prediction is the argmax. More than two classes: the
decision's counterpart of a threshold is a weight per class (:func:`best_class_weights`); a ``threshold``
argument given as a sequence of ``K`` weights predicts the class with the largest ``weight * probability``.

Example:
    >>> m = compute_metrics([0, 1, 1, 0], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    >>> m["accuracy"], m["confusion_matrix"], m["auc"]
    (0.75, [[2, 0], [1, 1]], 1.0)
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np


def _skm():
    """scikit-learn's metrics, imported on first use: its ~0.6 s import would otherwise delay the first
    training step of every run."""
    from sklearn import metrics

    return metrics


# the rules a decision can be chosen by (config.CHOICES["train.threshold_rule"] reads them from here)
THRESHOLD_RULES = ("youden", "f1", "balanced_accuracy", "accuracy")


def compute_metrics(
    y_true: Any, probs: Any, threshold: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC, F1, sensitivity, specificity, precision, confusion matrix.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)`` (list, NumPy array or tensor).
        probs: ``(N, K)`` class probabilities; for binary problems also ``(N,)`` = ``p1``.
        threshold: binary: predicted positive when ``p1 >= threshold``; ``K`` class weights: the largest
            ``weight * probability`` (:func:`decide`); ``None``: argmax.
        class_names: ``K`` names (default ``"0"``, ``"1"``, ...).

    Returns:
        A dict of plain Python values: ``n``, ``accuracy``, ``balanced_accuracy``, ``auc``
        (binary; one-vs-rest macro for K > 2), ``f1``, ``sensitivity``, ``specificity``,
        ``precision`` (binary: of class 1; K > 2: macro over classes), ``confusion_matrix``
        (rows = true class), ``threshold`` (``None`` = argmax or class weights), ``class_names``,
        ``per_class``, and with class weights ``class_weights``.
    """
    y, p = _validate(y_true, probs)
    k = p.shape[1]
    names = _class_names(class_names, k)
    weights = _class_weights(threshold, k)
    if weights is None and threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    pred = decide(p, threshold)
    labels = list(range(k))
    cm = _skm().confusion_matrix(y, pred, labels=labels)
    per = _per_class(cm)
    avg = "binary" if k == 2 else "macro"
    pick = (lambda v: v[1]) if k == 2 else (lambda v: float(np.mean(v)))  # noqa: E731
    out = {
        "n": len(y),
        "accuracy": _skm().accuracy_score(y, pred),
        "balanced_accuracy": _balanced_accuracy(cm),
        "auc": _auc(y, p),
        "f1": _skm().f1_score(y, pred, labels=labels, average=avg, zero_division=0),
        "sensitivity": _skm().recall_score(y, pred, labels=labels, average=avg, zero_division=0),
        "specificity": pick(per["specificity"]),
        "precision": _skm().precision_score(y, pred, labels=labels, average=avg, zero_division=0),
        "confusion_matrix": cm,
        **decision_fields(weights.tolist() if weights is not None else threshold),
        "class_names": names,
        "per_class": {
            name: {key: per[key][i] for key in ("sensitivity", "specificity", "precision", "f1", "support")}
            for i, name in enumerate(names)
        },
    }
    return to_jsonable(out)


def decide(probs: Any, threshold: float | Sequence[float] | None = None) -> np.ndarray:
    """Predicted class indices ``(N,)``: ``p1 >= threshold`` (binary), the largest ``weight * probability``
    when ``threshold`` is a sequence of ``K`` class weights (:func:`best_class_weights`), else the argmax.

    The one rule by which every predicted label medvox writes or counts is made (metrics, prediction
    CSVs, ``medvox predict``, the report), so a run's decision threshold is applied the same way
    everywhere.

    Example:
        >>> decide([[0.8, 0.2], [0.6, 0.4]]).tolist(), decide([[0.8, 0.2], [0.6, 0.4]], threshold=0.3).tolist()
        ([0, 0], [0, 1])
        >>> decide([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]], threshold=[0.5, 1.0, 1.0]).tolist()
        [1, 2]
    """
    p = np.asarray(_as_numpy(probs), dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    weights = _class_weights(threshold, p.shape[1])
    if weights is not None:
        return (p * weights).argmax(axis=1)
    if threshold is None:
        return p.argmax(axis=1)
    if p.shape[1] != 2:
        raise ValueError(f"threshold applies to binary problems only; got {p.shape[1]} classes")
    return (p[:, 1] >= threshold).astype(np.int64)


def best_threshold(y_true: Any, probs: Any, rule: str = "youden") -> float:
    """Decision threshold on ``p1`` that maximises ``rule`` on (validation / out-of-fold) data.

    Candidates are the distinct scores; the returned value is the midpoint between the best
    score and the next lower one, so it gives the same predictions here with a margin on both
    sides. ``"youden"`` (TPR - FPR) and ``"balanced_accuracy"`` ((TPR + TNR) / 2) pick the same
    threshold, since balanced accuracy = (1 + J) / 2. Ties go to the highest threshold.

    Args:
        y_true: ``(N,)`` binary labels with both classes present.
        probs: ``(N, 2)`` probabilities or ``(N,)`` ``p1``.
        rule: ``"youden"``, ``"f1"``, ``"balanced_accuracy"`` or ``"accuracy"``.

    Returns:
        The threshold (predict positive when ``p1 >= threshold``).

    Example:
        >>> best_threshold([0, 0, 1, 1], [0.1, 0.25, 0.75, 0.8])
        0.5
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(THRESHOLD_RULES)}")
    y, p = _validate(y_true, probs)
    if p.shape[1] != 2:
        raise ValueError(f"best_threshold is for binary problems; got {p.shape[1]} classes")
    if len(np.unique(y)) < 2:
        raise ValueError("best_threshold needs both classes in y_true")
    fpr, tpr, thr = _skm().roc_curve(y, p[:, 1], drop_intermediate=False)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop sklearn's leading +inf ("predict nothing")
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if rule == "f1":
        tp, fp = tpr * pos, fpr * neg
        score = 2 * tp / (2 * tp + fp + (pos - tp))
    elif rule == "accuracy":
        score = (tpr * pos + (1 - fpr) * neg) / (pos + neg)
    else:
        score = tpr - fpr
    best = int(np.argmax(score))  # thresholds descend: the first maximum is the highest threshold
    value = thr[best] if best + 1 == len(thr) else (thr[best] + thr[best + 1]) / 2
    return float(min(value, 1.0))


def _class_weights(threshold: Any, k: int) -> np.ndarray | None:
    """``threshold`` as ``K`` positive class weights when it is a sequence, else None."""
    if threshold is None or np.ndim(threshold) == 0:
        return None
    w = np.asarray(threshold, dtype=np.float64)
    if w.shape != (k,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"class weights must be {k} positive finite numbers (one per class), got {list(threshold)}")
    return w


def _rule_score(rule: str, y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """``rule`` for each row of ``pred`` ``(M, N)``: balanced accuracy (``youden``, ``balanced_accuracy``:
    Youden's J is 2 x balanced accuracy - 1 for two classes), macro F1 (``f1``) or accuracy."""
    hit = pred == y[None, :]
    if rule == "accuracy":
        return hit.mean(axis=1)
    present = [c for c in range(k) if (y == c).any()]
    recalls = np.stack([hit[:, y == c].mean(axis=1) for c in present], axis=1)
    if rule != "f1":
        return recalls.mean(axis=1)
    f1 = []
    for c in present:
        tp = (hit & (y[None, :] == c)).sum(axis=1)
        predicted = (pred == c).sum(axis=1)
        f1.append(2 * tp / np.maximum(predicted + (y == c).sum(), 1))
    return np.stack(f1, axis=1).mean(axis=1)


def best_class_weights(y_true: Any, probs: Any, rule: str = "youden", max_candidates: int = 512,
                       rounds: int = 10) -> list[float]:
    """Class weights ``w`` (more than two classes) such that predicting the largest ``w * p`` maximises
    ``rule`` on (out-of-fold) data: the multi-class counterpart of :func:`best_threshold`.

    ``youden`` and ``balanced_accuracy`` maximise balanced accuracy (mean recall over the classes, the
    quantity the binary Youden threshold maximises), ``f1`` the macro F1, ``accuracy`` the accuracy. A model
    trained with class weights and mixed with an unweighted model (the descriptor fusion) leans towards the
    common classes at the argmax; the weights undo that lean. Coordinate ascent on the log-weights: each class's
    weight in turn is set to the best of the values where a case's decision changes (midpoints, at most
    ``max_candidates`` quantiles of them), ties to the value nearest the current one (no change when nothing
    gains), until a round changes nothing; the weights are scaled to a geometric mean of 1. All ones is the
    argmax.

    Example:
        >>> y = [0] * 6 + [1, 1, 2, 2]
        >>> p = [[0.7, 0.2, 0.1]] * 6 + [[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.55, 0.0, 0.45], [0.55, 0.0, 0.45]]
        >>> w = best_class_weights(y, p); decide(p, w).tolist()
        [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(THRESHOLD_RULES)}")
    y, p = _validate(y_true, probs)
    k = p.shape[1]
    if len(np.unique(y)) < 2:
        raise ValueError("best_class_weights needs at least two classes in y_true")
    s = np.log(np.clip(p, 1e-300, None))
    offsets = np.zeros(k)
    best = float(_rule_score(rule, y, (s + offsets).argmax(1)[None, :], k)[0])
    for _ in range(rounds):
        changed = False
        for c in range(k):
            others = s + offsets
            others[:, c] = -np.inf
            alt = others.argmax(1)
            gap = others[np.arange(len(y)), alt] - s[:, c]  # class c is chosen when its offset reaches the gap
            cuts = np.unique(gap[np.isfinite(gap)])
            if len(cuts) == 0:
                continue
            candidates = np.concatenate([[cuts[0] - 1.0], (cuts[1:] + cuts[:-1]) / 2, [cuts[-1] + 1.0]])
            if len(candidates) > max_candidates:
                candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, max_candidates)))
            pred = np.where(candidates[:, None] >= gap[None, :], np.int16(c), alt.astype(np.int16)[None, :])
            scores = _rule_score(rule, y, pred, k)
            top = scores.max()
            if top <= best + 1e-12:
                continue
            near = np.flatnonzero(scores >= top - 1e-12)
            offsets[c] = candidates[near[np.argmin(np.abs(candidates[near] - offsets[c]))]]
            best, changed = float(top), True
        if not changed:
            break
    return [float(v) for v in np.exp(offsets - offsets.mean())]


def best_cut(y_true: Any, probs: Any, rule: str = "youden") -> float | list[float]:
    """The decision chosen by ``rule`` on (validation / out-of-fold) data: the threshold on ``p1`` for two
    classes (:func:`best_threshold`), class weights for more (:func:`best_class_weights`)."""
    if np.shape(probs)[-1] == 2 or np.ndim(probs) == 1:
        return float(best_threshold(y_true, probs, rule=rule))
    return best_class_weights(y_true, probs, rule=rule)


def decision_text(threshold: float | Sequence[float] | None, classes: Sequence[str]) -> str:
    """The decision rule in words.

    Example:
        >>> decision_text(0.42, ["benign", "malignant"]), decision_text([0.8, 1.25], ["a", "b"])
        ('p(malignant) >= 0.420', 'the largest weighted probability (class weights a: 0.80, b: 1.25)')
    """
    if threshold is None:
        return "the most probable class"
    if np.ndim(threshold) == 0:
        return f"p({classes[1]}) >= {float(threshold):.3f}"
    return ("the largest weighted probability (class weights "
            + ", ".join(f"{c}: {w:.2f}" for c, w in zip(classes, threshold, strict=True)) + ")")


def decision_cut(decision: Mapping[str, Any] | None) -> float | list[float] | None:
    """What :func:`decide` takes from a recorded decision (``cv_summary.json``'s ``decision``, a fold's
    ``at_val_threshold``, ``predictions.json``): the binary ``threshold`` or the ``class_weights``."""
    if not decision:
        return None
    return decision.get("class_weights") or decision.get("threshold")


def decision_fields(cut: float | Sequence[float] | None) -> dict[str, Any]:
    """How a decision is recorded, the inverse of :func:`decision_cut`: ``{"threshold": t}`` (binary or None,
    the argmax), or ``{"threshold": None, "class_weights": [...]}``.

    Example:
        >>> decision_fields(0.3), decision_fields([0.5, 2.0, 1.0])
        ({'threshold': 0.3}, {'threshold': None, 'class_weights': [0.5, 2.0, 1.0]})
    """
    if cut is None or np.ndim(cut) == 0:
        return {"threshold": None if cut is None else float(cut)}
    return {"threshold": None, "class_weights": [float(w) for w in cut]}


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to plain JSON types: NumPy/torch scalars and arrays, Paths, NaN/inf -> None.

    Example:
        >>> to_jsonable({"a": np.float32(0.5), "b": np.array([1, 2]), "c": float("nan")})
        {'a': 0.5, 'b': [1, 2], 'c': None}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if _is_tensor(obj):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Mapping):
        return {str(to_jsonable(k)) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (datetime.date, datetime.datetime)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"to_jsonable: cannot convert {type(obj).__name__} to a JSON type")


def _validate(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_numpy(y_true)
    p = _as_numpy(probs).astype(np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"need y_true (N,) and probs (N, K) with the same N; got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no samples")
    if p.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 columns, got {p.shape[1]}")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or inf")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise ValueError(
            f"probs must be probabilities in [0, 1] (got values in [{p.min():.3g}, {p.max():.3g}]); "
            "apply softmax to logits first"
        )
    if not np.array_equal(y, np.round(y)) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold integer labels in [0, {p.shape[1]}); got values {np.unique(y)[:10]}")
    return y.astype(np.int64), p


def _as_numpy(x: Any) -> np.ndarray:
    if _is_tensor(x):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _class_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"got {len(names)} class names for {k} classes")
    return [str(n) for n in names]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def _per_class(cm: np.ndarray) -> dict[str, list]:
    """One-vs-rest counts per class from the confusion matrix (rows = true)."""
    tp = np.diag(cm).astype(float)
    fn, fp = cm.sum(axis=1) - tp, cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    return {
        "sensitivity": _ratio(tp, tp + fn).tolist(),
        "specificity": _ratio(tn, tn + fp).tolist(),
        "precision": _ratio(tp, tp + fp).tolist(),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn).tolist(),
        "support": cm.sum(axis=1).tolist(),
    }


def _balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (scikit-learn's definition)."""
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Binary ROC AUC, or the macro mean of one-vs-rest AUCs over classes that can be scored.

    scikit-learn refuses multi-class AUC when a class is absent from ``y_true``; here such a class
    is left out of the mean (its AUC is undefined) and ``None`` means no class could be scored.
    """
    if p.shape[1] == 2:
        return float(_skm().roc_auc_score(y, p[:, 1])) if len(np.unique(y)) == 2 else None
    aucs = [_skm().roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None
