"""Calibration: expected calibration error, Brier score, and temperature scaling.

Definitions:

* ECE (Guo et al., 2017): ``n_bins`` equal-width bins on ``[0, 1]`` (bin ``b`` holds
  confidences in ``(b / n, (b + 1) / n]``, the first bin also holds 0), and
  ``ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``.
  ``mode="top"`` (default) uses the top-label confidence ``max_k p_k`` and "accuracy" is
  ``argmax == y``; ``mode="positive"`` (binary) uses ``p1`` and the fraction of positives.
* Brier score: binary: ``mean (p1 - y) ** 2`` (scikit-learn's ``brier_score_loss``);
  multi-class: ``mean_i sum_k (p_ik - onehot_ik) ** 2``.
* Temperature scaling: one ``T > 0`` fitted by LBFGS on the NLL of ``logits / T``
  (optimised as ``log T``, which keeps ``T`` positive).

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> labels = torch.tensor([0, 1, 1, 0])
    >>> fit_temperature(logits, labels) > 1  # over-confident: soften
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvox.metrics.classification import _validate, to_jsonable


def reliability_bins(y_true: Any, probs: Any, n_bins: int = 15, mode: str = "top") -> dict[str, list]:
    """Per-bin mean confidence, accuracy and count (the data behind ECE and a reliability diagram).

    Args:
        y_true: ``(N,)`` labels.
        probs: ``(N, K)`` probabilities (or ``(N,)`` ``p1``).
        n_bins: number of equal-width bins.
        mode: ``"top"`` (max-probability confidence) or ``"positive"`` (binary ``p1``).

    Returns:
        ``{"edges": (n_bins + 1), "confidence", "accuracy", "count": (n_bins)}``; empty bins have
        ``None`` confidence and accuracy.
    """
    conf, hit = _confidence(y_true, probs, mode)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # (b/n, (b+1)/n] -> b
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_hit = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return to_jsonable({"edges": edges, "confidence": mean_conf, "accuracy": mean_hit, "count": count})


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15, mode: str = "top") -> float:
    """ECE with equal-width bins (see the module docstring).

    Example:
        >>> expected_calibration_error([1, 0], [[0.2, 0.8], [0.6, 0.4]], n_bins=10)
        0.3
    """
    bins = reliability_bins(y_true, probs, n_bins, mode)
    n = sum(bins["count"])
    gaps = [
        c / n * abs(a - p)
        for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        if c > 0
    ]
    return float(sum(gaps))


def brier_score(y_true: Any, probs: Any) -> float:
    """Binary: ``mean (p1 - y)^2``; multi-class: ``mean_i sum_k (p_ik - onehot_ik)^2``."""
    y, p = _validate(y_true, probs)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_metrics(y_true: Any, probs: Any, n_bins: int = 15) -> dict[str, Any]:
    """``{"ece", "brier", "n_bins"}`` plus ``"ece_positive"`` for binary problems, as plain types."""
    _, p = _validate(y_true, probs)
    out = {
        "ece": expected_calibration_error(y_true, probs, n_bins),
        "brier": brier_score(y_true, probs),
        "n_bins": n_bins,
    }
    if p.shape[1] == 2:
        out["ece_positive"] = expected_calibration_error(y_true, probs, n_bins, mode="positive")
    return to_jsonable(out)


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """Fit the temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)``.

    Fit on held-out data (validation or out-of-fold), never on the training set.

    Args:
        logits: ``(N, K)`` logits (tensor or array).
        labels: ``(N,)`` integer labels.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` as a Python float; divide logits by it (:func:`apply_temperature`).
    """
    z = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).detach().double().cpu()
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).detach().long().cpu()
    if z.ndim != 2 or y.shape != z.shape[:1] or len(y) == 0:
        raise ValueError(f"need logits (N, K) and labels (N,); got {tuple(z.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(logits: Any, temperature: float) -> Any:
    """``logits / T`` (tensor in, tensor out; array in, array out)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def _confidence(y_true: Any, probs: Any, mode: str) -> tuple[np.ndarray, np.ndarray]:
    y, p = _validate(y_true, probs)
    if mode == "top":
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    if mode == "positive":
        if p.shape[1] != 2:
            raise ValueError(f"mode='positive' is for binary problems; got {p.shape[1]} classes")
        return p[:, 1], y.astype(float)
    raise ValueError(f"mode must be 'top' or 'positive', got {mode!r}")


T_BOUNDS = (0.05, 20.0)


def rescale(probs: Any, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling: ``softmax(log p / T)`` (log-probabilities are valid logits,
    softmax being shift-invariant), so saved probabilities suffice to calibrate.

    Example:
        >>> rescale([[0.8, 0.2]], 1.0).round(6).tolist(), rescale([[0.8, 0.2]], 2.0).round(4).tolist()
        ([[0.8, 0.2]], [[0.6667, 0.3333]])
    """
    z = apply_temperature(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)), temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def rescale_folds(probs: Any, folds: Any, temperatures: list[float]) -> np.ndarray:
    """``probs`` with the rows of fold ``k`` (``folds == k``) rescaled by ``temperatures[k]``: pooled
    out-of-fold predictions on one scale (each fold model's own temperature)."""
    probs, folds = np.asarray(probs, dtype=np.float64), np.asarray(folds)
    out = probs.copy()
    for k, t in enumerate(temperatures):
        if np.any(folds == k):
            out[folds == k] = rescale(probs[folds == k], t)
    return out


def fit_calibration(labels: Any, probs: Any) -> dict[str, Any]:
    """Temperature scaling fitted on held-out ``(labels, probs)``, with ECE and Brier before (on ``probs``)
    and after (on the rescaled ``probs``), measured on the same data.

    A near-useless model drives ``T`` towards infinity: every probability ~1/K and the ranking lost in a
    CSV. ``T`` is clipped to :data:`T_BOUNDS`; ``fitted_temperature`` and ``clipped`` record it.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    fitted = float(fit_temperature(np.log(np.clip(probs, 1e-12, 1.0)), labels))
    t = min(max(fitted, T_BOUNDS[0]), T_BOUNDS[1])
    after = rescale(probs, t)
    return to_jsonable({
        "temperature": t, "fitted_temperature": fitted, "clipped": t != fitted, "bounds": list(T_BOUNDS),
        "n": len(labels),
        "ece_before": expected_calibration_error(labels, probs), "ece_after": expected_calibration_error(labels, after),
        "brier_before": brier_score(labels, probs), "brier_after": brier_score(labels, after)})
