"""Classification losses: CE, weighted CE, focal, and LDAM with deferred re-weighting (DRW).

Every loss takes logits ``(B, K)`` and integer targets ``(B,)`` and has ``set_epoch(epoch)``,
which the engine calls with the **0-based** epoch index before each epoch; it is a no-op except
for LDAM with DRW.

LDAM convention (Cao et al., 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss"): the model's cosine head already returns ``logits = s * cos(theta)`` with
``s = cfg.ldam_scale``. LDAM therefore subtracts ``s * m_y`` from the target-class logit, which
is the paper's ``s * (cos(theta_y) - m_y)``, and applies cross-entropy. The margins are
``m_j = C / n_j ** (1/4)`` with ``C`` such that the largest margin is ``cfg.ldam_max_margin``.
DRW: from epoch ``int(cfg.drw_start * epochs)`` on (0-based), the cross-entropy is weighted with
class-balanced weights ``w_j = (1 - beta) / (1 - beta ** n_j)`` normalised to ``sum_j w_j = K``
(Cui et al., 2019); before that it is unweighted.

``weighted_CE`` uses inverse-frequency weights ``w_j ∝ 1 / n_j`` normalised to mean 1 over the
classes (not the class-balanced "effective number" weights, which are DRW's).

Example:
    >>> from medvox.config import LossConfig
    >>> loss = build_loss(LossConfig(name="LDAM"), class_counts=[900, 100], epochs=10)
    >>> loss.margins.tolist()  # doctest: +ELLIPSIS
    [0.2886..., 0.5]
    >>> loss.set_epoch(8)  # int(0.8 * 10) = 8: DRW weights switch on here
    >>> loss.weight is not None
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvox.config import CHOICES, LossConfig

LOSS_NAMES = CHOICES["loss.name"]


def inverse_frequency_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """``w_j = (1 / n_j) / mean_k(1 / n_k)``: rarer classes weigh more, mean weight 1.

    Example:
        >>> [round(w, 4) for w in inverse_frequency_weights([900, 100]).tolist()]
        [0.2, 1.8]
    """
    inv = 1.0 / _counts(class_counts)
    return (inv / inv.mean()).float()


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. (2019): ``w_j = (1 - beta) / (1 - beta ** n_j)``, normalised to ``sum_j w_j = K``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"drw_beta must be in [0, 1), got {beta}")
    n = _counts(class_counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


def ldam_margins(class_counts: Sequence[int], max_margin: float = 0.5) -> torch.Tensor:
    """``m_j = C / n_j ** (1/4)`` with ``C`` chosen so that ``max_j m_j = max_margin``."""
    if max_margin <= 0:
        raise ValueError(f"ldam_max_margin must be > 0, got {max_margin}")
    m = _counts(class_counts).pow(-0.25)
    return (m * (max_margin / m.max())).float()


class _EpochLoss(nn.Module):
    """Base: validates logits/targets; ``set_epoch`` does nothing unless a subclass needs it."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which (0-based) epoch starts; a no-op here."""

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must be ({logits.shape[0]},) class indices, got {tuple(target.shape)}")


class CrossEntropyLoss(_EpochLoss):
    """Cross-entropy with optional class weights and label smoothing (``F.cross_entropy``).

    Args:
        num_classes: ``K``.
        weight: ``(K,)`` class weights or ``None``.
        label_smoothing: in ``[0, 1)``, as in :func:`torch.nn.functional.cross_entropy`.

    Example:
        >>> CrossEntropyLoss(2)(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])).item()  # doctest: +ELLIPSIS
        0.6931...
    """

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes)
        _check_smoothing(label_smoothing)
        if weight is not None and weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else weight.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(_EpochLoss):
    """Focal loss ``-alpha_y (1 - p_y) ** gamma * log p_y`` (Lin et al., 2017).

    Reduced like ``F.cross_entropy`` with ``weight``: the sum divided by ``sum_i alpha_{y_i}``
    (by ``B`` without ``alpha``), so ``gamma = 0`` gives exactly (weighted) cross-entropy.

    Args:
        num_classes: ``K``.
        gamma: focusing parameter, ``>= 0``.
        alpha: ``(K,)`` class weights or ``None``.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: torch.Tensor | None = None) -> None:
        super().__init__(num_classes)
        if gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {gamma}")
        if alpha is not None and alpha.shape != (num_classes,):
            raise ValueError(f"alpha must have shape ({num_classes},), got {tuple(alpha.shape)}")
        self.gamma = gamma
        self.register_buffer("alpha", None if alpha is None else alpha.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()).clamp(min=0) ** self.gamma) * log_p
        if self.alpha is None:
            return loss.mean()
        a = self.alpha[target]
        return (a * loss).sum() / a.sum()


class LDAMLoss(_EpochLoss):
    """LDAM with optional deferred re-weighting; inputs are cosine-head logits that include ``s``.

    Args:
        class_counts: training samples per class ``n_j``, all ``> 0``.
        max_margin: the largest margin (that of the rarest class).
        scale: ``s`` of the cosine head; the margin subtracted from the target logit is ``s * m_y``.
        drw_start_epoch: 0-based epoch from which class-balanced weights apply; ``None``: never.
        beta: class-balanced weight parameter.
        label_smoothing: passed to the cross-entropy.

    Example:
        >>> loss = LDAMLoss([900, 100], drw_start_epoch=2)
        >>> loss.set_epoch(1); loss.weight is None
        True
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_start_epoch: int | None = None,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(len(class_counts))
        if scale <= 0:
            raise ValueError(f"ldam_scale must be > 0, got {scale}")
        if drw_start_epoch is not None and drw_start_epoch < 0:
            raise ValueError(f"drw_start_epoch must be >= 0, got {drw_start_epoch}")
        _check_smoothing(label_smoothing)
        self.scale = scale
        self.drw_start_epoch = drw_start_epoch
        self.label_smoothing = label_smoothing
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.register_buffer("drw_weights", class_balanced_weights(class_counts, beta))
        self.register_buffer("weight", None, persistent=False)  # derived from the epoch: set_epoch restores it

    def set_epoch(self, epoch: int) -> None:
        """Switch the class-balanced weights on at ``drw_start_epoch`` (and off before it, e.g. on resume)."""
        on = self.drw_start_epoch is not None and epoch >= self.drw_start_epoch
        self.weight = self.drw_weights.clone() if on else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        logits = logits.float()
        one_hot = F.one_hot(target, self.num_classes).to(logits.dtype)
        shifted = logits - one_hot * (self.scale * self.margins)  # s * (cos - m) on the target only
        return F.cross_entropy(shifted, target, weight=self.weight, label_smoothing=self.label_smoothing)


def build_loss(cfg: LossConfig, class_counts: Sequence[int], epochs: int) -> _EpochLoss:
    """The loss named by ``cfg.name``.

    Args:
        cfg: the :class:`~medvox.config.LossConfig`.
        class_counts: training samples per class (index order), all ``> 0``.
        epochs: total epochs of the run (sets the DRW switch epoch).

    Returns:
        An ``nn.Module`` ``loss(logits (B, K), target (B,)) -> scalar`` with ``set_epoch``.
    """
    counts = _counts(class_counts)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    k = len(counts)
    if cfg.name == "CE":
        return CrossEntropyLoss(k, label_smoothing=cfg.label_smoothing)
    if cfg.name == "weighted_CE":
        return CrossEntropyLoss(k, inverse_frequency_weights(class_counts), cfg.label_smoothing)
    if cfg.name == "focal":
        return FocalLoss(k, gamma=cfg.focal_gamma)
    if cfg.name == "LDAM":
        if not 0.0 <= cfg.drw_start <= 1.0:
            raise ValueError(f"drw_start must be in [0, 1], got {cfg.drw_start}")
        return LDAMLoss(
            class_counts,
            max_margin=cfg.ldam_max_margin,
            scale=cfg.ldam_scale,
            drw_start_epoch=int(cfg.drw_start * epochs),
            beta=cfg.drw_beta,
            label_smoothing=cfg.label_smoothing,
        )
    raise ValueError(f"unknown loss {cfg.name!r}; valid losses: {', '.join(LOSS_NAMES)}")


def _counts(class_counts: Sequence[int]) -> torch.Tensor:
    counts = list(class_counts)
    if len(counts) < 2:
        raise ValueError(f"need counts for at least 2 classes, got {counts}")
    bad = [i for i, n in enumerate(counts) if n <= 0 or int(n) != n]
    if bad:
        raise ValueError(
            f"every class needs a positive whole number of training samples; class(es) {bad} have "
            f"{[counts[i] for i in bad]} (all counts: {counts})"
        )
    return torch.tensor([float(n) for n in counts], dtype=torch.float64)


def _check_smoothing(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
