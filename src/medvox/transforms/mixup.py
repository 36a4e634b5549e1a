"""Mixup (Zhang et al., ICLR 2018): train on convex combinations of pairs of samples and of their labels.

One mixing weight ``lam ~ Beta(alpha, alpha)`` per batch and one random pairing (a permutation of the
batch), as in the paper's reference code. The loss of the mixed batch is
``lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])``, which for cross-entropy equals the loss
against the mixed one-hot target (weighted CE keeps each term's own weight normalisation), and works
unchanged for LDAM and focal loss. A regulariser for
small datasets; off by default (``augment.mixup=0``).

Like the other transforms, the random numbers are drawn on the CPU from the caller's generator (the
permutation, then ``lam`` by inverting the Beta CDF of a uniform draw), so a seed gives the same mix on
every device and a resumed run repeats it.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.stack([torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)])
    >>> mixed, perm, lam = mixup(x, 0.4, g)
    >>> bool(torch.allclose(mixed, lam * x + (1 - lam) * x[perm]))
    True
"""

from __future__ import annotations

import torch

from medvox.transforms.affine import _check_generator


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a permutation of itself.

    Args:
        x: ``(B, ...)`` float tensor on any device.
        alpha: the Beta(alpha, alpha) parameter (> 0; 0.2-0.4 is usual: most ``lam`` near 0 or 1).
        generator: a CPU ``torch.Generator``.

    Returns:
        ``(mixed, perm, lam)``: ``lam * x + (1 - lam) * x[perm]`` in ``x``'s dtype and memory format, the
        permutation (on ``x``'s device) and the weight of the unpermuted batch.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    _check_generator(generator)
    from scipy.special import betaincinv  # here: scipy costs start-up time that most runs never need

    perm = torch.randperm(x.shape[0], generator=generator)
    lam = float(betaincinv(alpha, alpha, float(torch.rand((), generator=generator, dtype=torch.float64))))
    perm = perm.to(x.device)
    return torch.lerp(x[perm], x, lam), perm, lam  # indexing and lerp both keep x's memory format
