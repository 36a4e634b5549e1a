"""``BatchAugment``: the training-time augmentation, run on the batch where it already lives.

Why batched and on the device: per-sample CPU transforms (MONAI/TorchIO in the loader workers)
resample each 3D volume separately and are the bottleneck on a few CPU cores; one
``grid_sample`` over the whole batch on the GPU costs well under a millisecond per volume.

Example:
    >>> from medvox.config import AugmentConfig
    >>> aug = BatchAugment(AugmentConfig(flip_axes=[2]))
    >>> x = torch.randn(2, 1, 16, 16, 16)
    >>> y = aug(x, torch.Generator().manual_seed(0))
    >>> y.shape == x.shape
    True
"""

from __future__ import annotations

import torch

from medvox.config import AugmentConfig
from medvox.transforms.affine import _check_generator, apply_affine, random_affine_matrices
from medvox.transforms.flips import _check_axes, apply_flips, random_flip_masks
from medvox.transforms.intensity import apply_intensity, random_intensity_params


class BatchAugment:
    """Random affine (rotate, zoom, translate) -> flips -> intensity jitter, per sample.

    Every random number is drawn on the CPU from the caller's generator in a fixed order, so the
    same seed gives the same parameters on any device and the same output on the same device.
    The affine resample runs in float32 even for bf16/fp16 input; the output keeps ``x``'s dtype,
    device and (channels-last) memory format. Outside the volume the fill is each
    (sample, channel)'s minimum.

    Args:
        cfg: the :class:`~medvox.config.AugmentConfig`; ``enabled=False`` makes this a no-op.
        padding_mode: fill for the affine resample (see :func:`apply_affine`).

    Example:
        >>> aug = BatchAugment(AugmentConfig(enabled=False))
        >>> x = torch.zeros(1, 1, 4, 4, 4)
        >>> aug(x, torch.Generator()) is x
        True
    """

    def __init__(self, cfg: AugmentConfig, padding_mode: str = "min") -> None:
        if not 0.0 <= cfg.prob <= 1.0 or not 0.0 <= cfg.flip_prob <= 1.0 or not 0.0 <= cfg.intensity_prob <= 1.0:
            raise ValueError(
                f"augment probabilities must be in [0, 1]: prob={cfg.prob}, "
                f"flip_prob={cfg.flip_prob}, intensity_prob={cfg.intensity_prob}"
            )
        if cfg.rotate_deg < 0 or cfg.translate < 0 or not 0.0 <= cfg.zoom < 1.0:
            raise ValueError(
                f"need rotate_deg >= 0, translate >= 0 and 0 <= zoom < 1; "
                f"got {cfg.rotate_deg}, {cfg.translate}, {cfg.zoom}"
            )
        if cfg.gamma < 0 or cfg.noise_std < 0 or not 0.0 <= cfg.contrast < 1.0:
            raise ValueError(
                f"need gamma >= 0, noise_std >= 0 and 0 <= contrast < 1; "
                f"got {cfg.gamma}, {cfg.noise_std}, {cfg.contrast}"
            )
        if cfg.mixup < 0:
            raise ValueError(f"augment.mixup (the Beta parameter) must be >= 0 (0 disables it), got {cfg.mixup}")
        _check_axes(cfg.flip_axes)
        if padding_mode not in ("min", "zeros", "border", "reflection"):
            raise ValueError(f"padding_mode must be min, zeros, border or reflection, got {padding_mode!r}")
        self.cfg = cfg
        self.padding_mode = padding_mode

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch.

        Args:
            x: ``(B, C, D, H, W)`` float tensor on any device.
            generator: a CPU ``torch.Generator`` (the engine seeds it per epoch/step).

        Returns:
            ``(B, C, D, H, W)`` tensor like ``x``; ``x`` itself when augmentation is disabled.
        """
        if not self.cfg.enabled:
            return x
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        _check_generator(generator)
        cfg, batch = self.cfg, x.shape[0]
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        out = self._affine(x.float(), generator)
        if cfg.flip_axes:
            masks = random_flip_masks(batch, generator, len(cfg.flip_axes), cfg.flip_prob)
            out = apply_flips(out, masks, cfg.flip_axes)
        if cfg.intensity_prob > 0:
            params = random_intensity_params(
                batch, generator, cfg.intensity_prob, cfg.gamma, cfg.contrast, cfg.noise_std
            )
            out = apply_intensity(out, params)
        out = out.to(x.dtype)
        return out.contiguous(memory_format=torch.channels_last_3d) if channels_last else out

    def _affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.prob == 0:
            return x
        theta, applied = random_affine_matrices(
            x.shape[0], generator, cfg.rotate_deg, cfg.zoom, cfg.translate, cfg.prob
        )
        idx = applied.nonzero().flatten()  # CPU: no device sync
        if idx.numel() == 0:
            return x
        if idx.numel() == x.shape[0]:
            return apply_affine(x, theta.to(x.device), padding_mode=self.padding_mode)
        # resample only the selected samples: the others stay bit-for-bit unchanged and cost nothing
        dev_idx = idx.to(x.device)
        out = x.clone()
        out[dev_idx] = apply_affine(x[dev_idx], theta[idx].to(x.device), padding_mode=self.padding_mode)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"
