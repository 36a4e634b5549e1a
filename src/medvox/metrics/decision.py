"""The decision: how a run turns probabilities into a predicted class, as one value object.

A :class:`Decision` is a rule (``youden``, ``f1``, ... or ``argmax``), its cut (a threshold on ``p1`` for
two classes, one weight per class for more, nothing for the argmax), the class names, what it was fitted on
(the pooled calibrated out-of-fold predictions, a fold's validation set) and which probabilities it applies
to (``raw``, ``calibrated``, ``fused``). Every predicted label medvox writes or counts comes from
:meth:`Decision.apply`; every file that records one stores :meth:`Decision.to_json` (JSON) or
:meth:`Decision.to_cell` (a CSV cell), and both read back to an equal object.

Example:
    >>> d = Decision.fit([0, 0, 1, 1], [[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]], ["benign", "malignant"])
    >>> d.text()
    'calibrated p(malignant) >= 0.475'
    >>> d.apply([[0.5, 0.5], [0.6, 0.4]]).tolist()
    [1, 0]
    >>> Decision.from_cell(d.to_cell(), d.classes) == d, Decision.from_json(d.to_json()) == d
    (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medvox.metrics.classification import THRESHOLD_RULES, best_cut, decide

PROBABILITIES = ("raw", "calibrated", "fused")


@dataclass(frozen=True)
class Decision:
    """How probabilities become a class.

    Args:
        classes: the ``K`` class names, in the order of the probability columns.
        rule: the rule the cut was chosen by (``THRESHOLD_RULES``), or ``"argmax"``.
        threshold: binary: class 1 when ``p1 >= threshold``.
        class_weights: ``K`` weights: the class with the largest ``weight * probability``.
        probabilities: which probabilities the cut applies to: ``raw``, ``calibrated`` or ``fused``.
        fitted_on: in words, the predictions the cut was chosen on (or why it is the argmax).
    """

    classes: tuple[str, ...]
    rule: str = "argmax"
    threshold: float | None = None
    class_weights: tuple[float, ...] | None = None
    probabilities: str = "calibrated"
    fitted_on: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.rule != "argmax" and self.rule not in THRESHOLD_RULES:
            raise ValueError(f"decision rule {self.rule!r}: not one of argmax, {', '.join(THRESHOLD_RULES)}")
        if self.probabilities not in PROBABILITIES:
            raise ValueError(f"decision probabilities {self.probabilities!r}: not one of {', '.join(PROBABILITIES)}")
        if self.threshold is not None and self.class_weights is not None:
            raise ValueError("a decision has a threshold (two classes) or class weights (more), not both")
        if self.threshold is not None and (len(self.classes) != 2 or not 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold {self.threshold} needs two classes and a value in [0, 1]")
        if self.class_weights is not None and len(self.class_weights) != len(self.classes):
            raise ValueError(f"{len(self.class_weights)} class weights for {len(self.classes)} classes")
        if self.rule == "argmax" and self.cut is not None:
            raise ValueError("an argmax decision has no threshold or class weights")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def argmax(cls, classes: Sequence[str], why: str = "the most probable class",
               probabilities: str = "calibrated") -> Decision:
        """The most probable class; ``why`` says why no fitted cut is used."""
        return cls(tuple(classes), "argmax", probabilities=probabilities, fitted_on=why)

    @classmethod
    def fit(cls, labels: Any, probs: Any, classes: Sequence[str], rule: str = "youden",
            probabilities: str = "calibrated", fitted_on: str = "") -> Decision:
        """The cut that maximises ``rule`` on ``(labels, probs)`` (:func:`~medvox.metrics.classification.best_cut`);
        the argmax when the labels hold one class."""
        if len(np.unique(np.asarray(labels))) < 2:
            return cls.argmax(classes, f"{fitted_on or 'the data'} holds one class: no cut can be chosen",
                              probabilities)
        return cls.from_cut(best_cut(labels, probs, rule=rule), classes, rule, probabilities, fitted_on)

    @classmethod
    def from_cut(cls, cut: float | Sequence[float] | None, classes: Sequence[str], rule: str = "youden",
                 probabilities: str = "calibrated", fitted_on: str = "") -> Decision:
        if cut is None:
            return cls.argmax(classes, fitted_on or "the most probable class", probabilities)
        if np.ndim(cut) == 0:
            return cls(tuple(classes), rule, threshold=float(cut), probabilities=probabilities, fitted_on=fitted_on)
        return cls(tuple(classes), rule, class_weights=tuple(cut), probabilities=probabilities, fitted_on=fitted_on)

    # -- use --------------------------------------------------------------------------------------------
    @property
    def cut(self) -> float | list[float] | None:
        """What :func:`~medvox.metrics.classification.decide` takes: the threshold, the weights or None."""
        if self.class_weights is not None:
            return list(self.class_weights)
        return self.threshold

    @property
    def is_argmax(self) -> bool:
        return self.cut is None

    def apply(self, probs: Any) -> np.ndarray:
        """Predicted class indices ``(N,)`` for probabilities ``(N, K)``."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 2 and p.shape[1] != len(self.classes):
            raise ValueError(f"{p.shape[1]} probability columns for a decision over {len(self.classes)} classes")
        return decide(p, self.cut)

    def labels(self, probs: Any) -> list[str]:
        """Predicted class names for probabilities ``(N, K)``."""
        return [self.classes[int(k)] for k in self.apply(probs)]

    def through_temperature(self, temperature: float) -> Decision:
        """The same cut on the same model, for its probabilities at ``temperature`` (a cut chosen on raw
        probabilities, used on calibrated ones): ``p1 >= t`` moves to ``softmax(log p / T)``; class weights
        ``w`` become ``w ** (1 / T)``, since ``argmax(w * softmax(z)) = argmax(w ** (1 / T) * softmax(z / T))``.

        Example:
            >>> d = Decision(("a", "b"), "youden", threshold=0.3, probabilities="raw")
            >>> round(d.through_temperature(2.0).threshold, 4)
            0.3956
        """
        from medvox.metrics.calibration import rescale

        if temperature == 1.0 or self.is_argmax:
            return replace(self, probabilities="calibrated")
        if self.threshold is not None:
            t = self.threshold
            moved = t if t in (0.0, 1.0) else float(rescale(np.array([[1.0 - t, t]]), temperature)[0, 1])
            return replace(self, threshold=moved, probabilities="calibrated",
                           fitted_on=f"{self.fitted_on}, moved through temperature {temperature:.4g}")
        weights = tuple(float(w) ** (1.0 / temperature) for w in self.class_weights)
        return replace(self, class_weights=weights, probabilities="calibrated",
                       fitted_on=f"{self.fitted_on}, moved through temperature {temperature:.4g}")

    # -- text and files ---------------------------------------------------------------------------------
    def text(self, digits: int = 3) -> str:
        """The rule in words, with the probabilities it applies to."""
        if self.threshold is not None:
            return f"{self.probabilities} p({self.classes[1]}) >= {self.threshold:.{digits}f}"
        if self.class_weights is not None:
            weights = ", ".join(f"{c}: {w:.{digits}g}" for c, w in zip(self.classes, self.class_weights, strict=True))
            return f"the largest weighted {self.probabilities} probability (class weights {weights})"
        return f"the most probable class ({self.probabilities} probabilities)"

    def describe(self, digits: int = 3) -> str:
        """:meth:`text` (with ``digits``) with the rule and what it was fitted on."""
        text = self.text(digits)
        if self.is_argmax:
            return f"{text}: {self.fitted_on}" if self.fitted_on else text
        return f"{text} ({self.rule}, chosen on {self.fitted_on})" if self.fitted_on else text

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "threshold": self.threshold,
                "class_weights": None if self.class_weights is None else list(self.class_weights),
                "classes": list(self.classes), "probabilities": self.probabilities, "fitted_on": self.fitted_on,
                "text": self.text()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Decision:
        """A decision recorded by :meth:`to_json`.

        Raises:
            ValueError: the record lacks a field or holds an invalid value.
        """
        try:
            return cls(tuple(doc["classes"]), doc["rule"], doc.get("threshold"), doc.get("class_weights"),
                       doc.get("probabilities", "calibrated"), doc.get("fitted_on", ""))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a recorded decision ({exc}): {dict(doc)!r}") from None

    def to_cell(self) -> str:
        """A compact, exact form for a CSV cell: ``youden|calibrated|threshold=0.50912``,
        ``f1|calibrated|weights=0.8;1.25;1``, ``argmax|raw``."""
        head = f"{self.rule}|{self.probabilities}"
        if self.threshold is not None:
            return f"{head}|threshold={self.threshold!r}"
        if self.class_weights is not None:
            return f"{head}|weights=" + ";".join(repr(w) for w in self.class_weights)
        return head

    @classmethod
    def from_cell(cls, cell: str, classes: Sequence[str], fitted_on: str = "") -> Decision:
        """The decision a CSV cell written by :meth:`to_cell` records.

        Raises:
            ValueError: the cell is not such a record.
        """
        parts = str(cell).strip().split("|")
        if len(parts) not in (2, 3):
            raise ValueError(f"decision cell {cell!r}: expected 'rule|probabilities[|threshold=t or weights=a;b]'")
        rule, probabilities = parts[0], parts[1]
        threshold = weights = None
        if len(parts) == 3:
            key, _, value = parts[2].partition("=")
            if key == "threshold":
                threshold = float(value)
            elif key == "weights":
                weights = tuple(float(v) for v in value.split(";"))
            else:
                raise ValueError(f"decision cell {cell!r}: unknown part {parts[2]!r}")
        return cls(tuple(classes), rule, threshold, weights, probabilities, fitted_on)
