"""Random per-sample flips along chosen spatial axes, vectorised with ``torch.where``.

Parameters are drawn on the CPU (so a seed gives the same flips on every device) and applied on
``x``'s device. A flip is exact: it only moves voxels, nothing is interpolated.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> masks = random_flip_masks(4, g, n_axes=2, prob=0.5)
    >>> x = torch.rand(4, 1, 6, 7, 8)
    >>> apply_flips(x, masks, axes=(0, 2)).shape
    torch.Size([4, 1, 6, 7, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_flip_masks(batch: int, generator: torch.Generator, n_axes: int, prob: float = 0.5) -> torch.Tensor:
    """Draw which samples flip along which axis, independently per (sample, axis).

    Args:
        batch: number of samples ``B``.
        generator: a CPU ``torch.Generator``.
        n_axes: number of axes that may flip.
        prob: probability of a flip per (sample, axis).

    Returns:
        ``(B, n_axes)`` bool mask on the CPU.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"flip prob must be in [0, 1], got {prob}")
    if n_axes < 0:
        raise ValueError(f"n_axes must be >= 0, got {n_axes}")
    return torch.rand(batch, n_axes, generator=generator) < prob


def apply_flips(x: torch.Tensor, masks: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip each sample along each of ``axes`` where its mask is set.

    Args:
        x: ``(B, C, D, H, W)``.
        masks: ``(B, len(axes))`` bool; column ``k`` says which samples flip along ``axes[k]``.
        axes: spatial axes, ``0`` = D, ``1`` = H, ``2`` = W.

    Returns:
        ``(B, C, D, H, W)`` tensor, same dtype and device.
    """
    _check_axes(axes)
    if x.ndim != 5:
        raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    if masks.shape != (x.shape[0], len(axes)):
        raise ValueError(f"masks must be ({x.shape[0]}, {len(axes)}), got {tuple(masks.shape)}")
    any_flip = masks.cpu().any(dim=0).tolist()  # one host sync, not one per axis
    masks = masks.to(x.device)
    for k, axis in enumerate(axes):
        if any_flip[k]:  # skip the copy when no sample flips along this axis
            x = torch.where(masks[:, k].view(-1, 1, 1, 1, 1), x.flip(axis + 2), x)
    return x


def _check_axes(axes: Sequence[int]) -> None:
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"flip axes must be distinct spatial axes in (0, 1, 2) (0=D, 1=H, 2=W), got {list(axes)}")
