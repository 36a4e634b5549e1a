"""Test-time augmentation: a fixed, deterministic list of views and the average of their probabilities.

The views are, in this order: the identity; a flip along each axis of ``flip_axes``; flips along
every pair, then all of ``flip_axes``; then small fixed affines (rotation ``+-rotate_deg`` about
the D axis, zoom ``1 +- zoom``). ``n`` takes the first ``n``. Use only flips the model was trained
with: a left-right flip is a valid TTA view only if it was a training augmentation.

Example:
    >>> x = torch.randn(2, 1, 8, 8, 8)
    >>> views = tta_views(x, n=3, flip_axes=(2,))
    >>> len(views)
    3
    >>> probs = tta_predict(lambda v: v.mean(dim=(1, 2, 3, 4)).unsqueeze(1).repeat(1, 2), x, views)
    >>> probs.shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from medvox.transforms.affine import apply_affine, build_affine
from medvox.transforms.flips import _check_axes

View = Callable[[torch.Tensor], torch.Tensor]


def tta_transforms(
    n: int = 4, flip_axes: Sequence[int] = (2,), rotate_deg: float = 5.0, zoom: float = 0.05
) -> list[View]:
    """The first ``n`` deterministic view functions ``x -> view`` (see the module docstring).

    Args:
        n: number of views, identity included.
        flip_axes: spatial axes (0=D, 1=H, 2=W) the views may flip.
        rotate_deg: angle of the two fixed rotations about the D axis.
        zoom: relative zoom of the two fixed zooms.

    Returns:
        ``n`` callables mapping ``(B, C, D, H, W)`` to ``(B, C, D, H, W)``.
    """
    _check_axes(flip_axes)
    views: list[View] = [lambda x: x]
    for k in range(1, len(flip_axes) + 1):
        for combo in itertools.combinations(flip_axes, k):
            views.append(lambda x, dims=tuple(a + 2 for a in combo): x.flip(dims))
    rad = math.radians(rotate_deg)
    for angle, factor in ((rad, 1.0), (-rad, 1.0), (0.0, 1 + zoom), (0.0, 1 - zoom)):
        views.append(lambda x, a=angle, z=factor: _fixed_affine(x, a, z))
    if not 1 <= n <= len(views):
        raise ValueError(f"n must be in [1, {len(views)}] for flip_axes={list(flip_axes)}, got {n}")
    return views[:n]


def tta_views(
    x: torch.Tensor, n: int = 4, flip_axes: Sequence[int] = (2,), rotate_deg: float = 5.0, zoom: float = 0.05
) -> list[torch.Tensor]:
    """The first ``n`` deterministic views of ``x`` as tensors.

    Args:
        x: ``(B, C, D, H, W)``.
        n, flip_axes, rotate_deg, zoom: as in :func:`tta_transforms`.

    Returns:
        ``n`` tensors of shape ``(B, C, D, H, W)``; the first is ``x`` itself.
    """
    return [view(x) for view in tta_transforms(n, flip_axes, rotate_deg, zoom)]


@torch.no_grad()
def tta_predict(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    views: int | Sequence[torch.Tensor | View] = 4,
    activation: str = "softmax",
) -> torch.Tensor:
    """Average class probabilities over views.

    Args:
        model_fn: maps ``(B, C, D, H, W)`` to logits ``(B, K)`` (or probabilities, see ``activation``).
        x: ``(B, C, D, H, W)``.
        views: a number ``n`` (views built lazily, one in memory at a time, default flip axis W),
            or a list of view tensors, or a list of view callables.
        activation: ``"softmax"`` for logits, ``"none"`` if ``model_fn`` returns probabilities.

    Returns:
        ``(B, K)`` float32 mean probabilities.
    """
    if activation not in ("softmax", "none"):
        raise ValueError(f"activation must be 'softmax' or 'none', got {activation!r}")
    if isinstance(views, int):
        views = tta_transforms(views)
    if len(views) == 0:
        raise ValueError("views must not be empty")
    total = None
    for view in views:
        inp = view(x) if callable(view) else view
        out = model_fn(inp).float()
        probs = out.softmax(dim=1) if activation == "softmax" else out
        total = probs if total is None else total + probs
    return total / len(views)


def _fixed_affine(x: torch.Tensor, angle: float, factor: float) -> torch.Tensor:
    b = x.shape[0]
    angles = torch.tensor([[angle, 0.0, 0.0]], dtype=torch.float64).expand(b, 3)
    theta = build_affine(angles, torch.full((b, 1), factor, dtype=torch.float64), torch.zeros(b, 3, dtype=torch.float64))
    return apply_affine(x, theta.to(device=x.device, dtype=torch.float32))
