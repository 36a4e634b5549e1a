"""Paired statistics for comparing classifiers on the same cases: DeLong's test and a paired bootstrap.

DeLong, DeLong and Clarke-Pearson (1988) estimate the covariance of correlated ROC AUCs (two models
scored on the same cases) from the *structural components* of the Mann-Whitney statistic. For ``m``
positives ``X_i`` and ``n`` negatives ``Y_j`` of one model, with ``psi(x, y) = 1 [x > y] + 0.5 [x == y]``:

* ``V10(X_i) = 1/n sum_j psi(X_i, Y_j)``, ``V01(Y_j) = 1/m sum_i psi(X_i, Y_j)``, ``AUC = mean_i V10(X_i)``;
* ``S10``, ``S01``: the sample covariance matrices (over models) of ``V10`` and ``V01``;
* ``Cov(AUC) = S10 / m + S01 / n``.

Sun and Xu (2014, "Fast implementation of DeLong's algorithm", IEEE SPL 21:1389) get every ``V10``
and ``V01`` from mid-ranks in ``O(N log N)`` instead of ``O(m n)``:
``V10(X_i) = (R_Z(X_i) - R_X(X_i)) / n`` and ``V01(Y_j) = 1 - (R_Z(Y_j) - R_Y(Y_j)) / m``, where ``R_Z``,
``R_X``, ``R_Y`` are mid-ranks within all scores, the positives' and the negatives' scores.

The test of ``H0: AUC_a = AUC_b`` is ``z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab)``, two-sided.

Example:
    >>> y = [0, 0, 1, 1, 0, 1]
    >>> r = delong_test(y, [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], [0.2, 0.6, 0.5, 0.7, 0.3, 0.4])
    >>> round(r["auc_a"], 3), round(r["auc_b"], 3)
    (0.889, 0.778)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps


def fast_delong(y_true: Any, scores: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several models on the same cases and their DeLong covariance (Sun and Xu's algorithm).

    Args:
        y_true: ``(N,)`` binary labels (1 = positive).
        scores: ``M`` score vectors ``(N,)`` (higher = more positive), one per model.

    Returns:
        ``(aucs (M,), covariance (M, M))``.

    Raises:
        ValueError: labels not binary, one class only, or scores of the wrong length.
    """
    y = _binary_labels(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != len(y):
        raise ValueError(f"every score vector needs {len(y)} values (one per label), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    # mid-ranks: ties count one half, as psi does
    r_pos = sps.rankdata(pos, axis=1)
    r_neg = sps.rankdata(neg, axis=1)
    r_all = sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (r_all[:, :m] - r_pos) / n
    v01 = 1.0 - (r_all[:, m:] - r_neg) / m
    aucs = v10.mean(axis=1)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(s), len(s)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(s), len(s)))
    return aucs, s10 / m + s01 / n


def delong_test(y_true: Any, scores_a: Any, scores_b: Any) -> dict[str, Any]:
    """DeLong's test for two correlated ROC AUCs (two models scored on the same cases).

    Args:
        y_true: ``(N,)`` binary labels.
        scores_a: ``(N,)`` scores of model A.
        scores_b: ``(N,)`` scores of model B.

    Returns:
        ``auc_a``, ``auc_b``, ``diff`` (A - B), ``se_a``, ``se_b``, ``se_diff``, ``ci95_diff`` (normal
        approximation), ``z``, ``p_value`` (two-sided), ``correlation`` and ``n``, ``n_pos``, ``n_neg``.
        When the difference has zero variance (identical scores), ``z = 0`` and ``p_value = 1`` if
        the AUCs are equal.
    """
    y = _binary_labels(y_true)
    aucs, cov = fast_delong(y, [scores_a, scores_b])
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se > 1e-12:
        z = diff / se
        p = float(2 * sps.norm.sf(abs(z)))
    else:  # identical (or perfectly tied) rankings: no evidence of a difference unless the AUCs differ
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    denom = math.sqrt(max(cov[0, 0], 0.0) * max(cov[1, 1], 0.0))
    return {
        "auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff,
        "se_a": math.sqrt(max(cov[0, 0], 0.0)), "se_b": math.sqrt(max(cov[1, 1], 0.0)), "se_diff": se,
        "ci95_diff": [diff - 1.959964 * se, diff + 1.959964 * se],
        "z": float(z), "p_value": p, "correlation": float(cov[0, 1] / denom) if denom > 0 else None,
        "n": int(len(y)), "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()),
    }


def delong_ci(y_true: Any, scores: Any, level: float = 0.95) -> list[float]:
    """Normal-approximation confidence interval of one AUC with DeLong's variance, clipped to [0, 1]."""
    aucs, cov = fast_delong(y_true, [scores])
    half = sps.norm.ppf(0.5 + level / 2) * math.sqrt(max(cov[0, 0], 0.0))
    return [max(0.0, float(aucs[0] - half)), min(1.0, float(aucs[0] + half))]


def paired_bootstrap_auc(y_true: Any, probs_a: Any, probs_b: Any, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, Any]:
    """Percentile CI of ``AUC_a - AUC_b`` over paired, class-stratified bootstrap resamples of the cases.

    Both models are scored on the *same* resampled cases, so the interval reflects the paired design.
    Resampling positives and negatives separately (as pROC does) keeps both classes in every resample.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        probs_a: ``(N,)`` binary scores or ``(N, K)`` probabilities of model A.
        probs_b: the same for model B.
        n_boot: bootstrap resamples.
        seed: seed of the resampling.
        level: confidence level.

    Returns:
        ``diff`` (on all cases), ``ci`` ``[lo, hi]``, ``level``, ``n_boot``, ``p_boot`` (two-sided share of
        resampled differences on the other side of 0, a rough check next to DeLong) and ``metric``
        (``"auc"``, or ``"macro_ovr_auc"`` for K > 2).
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    a, b = _scores(probs_a, len(y)), _scores(probs_b, len(y))
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("the bootstrap of an AUC needs both classes among the cases")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in classes]
    idx = np.concatenate([g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups], axis=1)
    diffs = _auc_rows(y, a, idx) - _auc_rows(y, b, idx)
    alpha = (1 - level) / 2
    diff = float(_auc_rows(y, a, np.arange(len(y))[None])[0] - _auc_rows(y, b, np.arange(len(y))[None])[0])
    p = 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return {"diff": diff, "ci": [float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))],
            "level": level, "n_boot": int(n_boot), "p_boot": min(1.0, p),
            "metric": "auc" if a.ndim == 1 else "macro_ovr_auc"}


def _auc_rows(y: np.ndarray, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC (binary) or macro one-vs-rest AUC of ``s`` on every row of resample indices ``idx (B, N)``."""
    if s.ndim == 1:
        return _mann_whitney(y[idx] == 1, s[idx])
    return np.mean([_mann_whitney(y[idx] == k, s[idx, k]) for k in range(s.shape[1])], axis=0)


def _mann_whitney(pos: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Row-wise AUC from mid-ranks: ``(sum of positive ranks - m (m + 1) / 2) / (m n)``."""
    ranks = sps.rankdata(s, axis=1)
    m = pos.sum(axis=1)
    n = pos.shape[1] - m
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * pos).sum(axis=1) - m * (m + 1) / 2) / (m * n)


def _scores(probs: Any, n: int) -> np.ndarray:
    """``(N,)`` scores stay; ``(N, 2)`` becomes ``p1``; ``(N, K > 2)`` stays for the macro AUC."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.shape[0] != n:
        raise ValueError(f"expected {n} predictions, got {p.shape[0]}")
    return p


def _binary_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"DeLong's test needs binary labels (0/1), got values {np.unique(y)[:5].tolist()}")
    y = y.astype(np.int64)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("DeLong's test needs both positive and negative cases")
    return y


def wilson_ci(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion ``successes / n`` (None when ``n`` is 0).

    Example:
        >>> [round(v, 4) for v in wilson_ci(8, 10)]
        [0.4902, 0.9433]
    """
    if n <= 0:
        return None
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def metric_intervals(y_true: Any, probs: Any, predicted: Any, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """95 % intervals of a binary test set's figures, with the counts they rest on: AUC by DeLong
    (:func:`delong_ci`), accuracy, sensitivity, specificity and precision by Wilson (:func:`wilson_ci`) at the
    given ``predicted`` classes (the run's decision). For more than two classes: accuracy only.

    Returns:
        ``{metric: {"value", "ci", "k", "n", "method"}}`` (``k`` / ``n``: the proportion's counts).
    """
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(predicted).astype(int)
    p = np.asarray(probs, dtype=float)
    out: dict[str, dict[str, Any]] = {}

    def prop(name: str, k: int, n: int) -> None:
        out[name] = {"value": k / n if n else None, "ci": wilson_ci(k, n, level), "k": int(k), "n": int(n),
                     "method": "Wilson"}

    prop("accuracy", int((pred == y).sum()), len(y))
    if p.ndim == 2 and p.shape[1] == 2:
        pos, neg = y == 1, y == 0
        if pos.any() and neg.any():
            from sklearn.metrics import roc_auc_score

            out["auc"] = {"value": float(roc_auc_score(y, p[:, 1])), "ci": delong_ci(y, p[:, 1], level),
                          "k": int(pos.sum()), "n": len(y), "method": "DeLong"}
        prop("sensitivity", int((pred[pos] == 1).sum()), int(pos.sum()))
        prop("specificity", int((pred[neg] == 0).sum()), int(neg.sum()))
        prop("precision", int((y[pred == 1] == 1).sum()), int((pred == 1).sum()))
    return out
