"""Batched on-device augmentation and test-time augmentation.

Example:
    >>> import torch
    >>> from medvox.config import AugmentConfig
    >>> aug = BatchAugment(AugmentConfig())
    >>> aug(torch.randn(2, 1, 8, 8, 8), torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 8, 8, 8])
"""

from medvox.transforms.affine import (
    apply_affine,
    build_affine,
    identity_affine,
    normalized_theta,
    random_affine_matrices,
    rotation_matrices,
)
from medvox.transforms.batch import BatchAugment
from medvox.transforms.flips import apply_flips, random_flip_masks
from medvox.transforms.intensity import (
    apply_contrast,
    apply_gamma,
    apply_intensity,
    apply_noise,
    random_intensity_params,
)
from medvox.transforms.tta import tta_predict, tta_transforms, tta_views

__all__ = [
    "BatchAugment",
    "apply_affine",
    "apply_contrast",
    "apply_flips",
    "apply_gamma",
    "apply_intensity",
    "apply_noise",
    "build_affine",
    "identity_affine",
    "normalized_theta",
    "random_affine_matrices",
    "random_flip_masks",
    "random_intensity_params",
    "rotation_matrices",
    "tta_predict",
    "tta_transforms",
    "tta_views",
]
