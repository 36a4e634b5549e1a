"""Per-sample intensity jitter: gamma, contrast and additive Gaussian noise, vectorised over a batch.

Each jitter is applied to a sample with its own probability; where it is not applied its
parameter is the neutral value (gamma 1, contrast 1, noise std 0) and the sample is returned
bit-for-bit unchanged. Statistics (min, max, mean) are per (sample, channel), so a CT channel and
a PET channel of one case are treated separately.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> params = random_intensity_params(4, g, prob=1.0)
    >>> x = torch.randn(4, 1, 8, 8, 8)
    >>> apply_intensity(x, params).shape
    torch.Size([4, 1, 8, 8, 8])
"""

from __future__ import annotations

import torch

_EPS = 1e-8
_SPATIAL = (2, 3, 4)


def random_intensity_params(
    batch: int,
    generator: torch.Generator,
    prob: float = 0.5,
    gamma: float = 0.2,
    contrast: float = 0.1,
    noise_std: float = 0.02,
) -> dict[str, torch.Tensor | int]:
    """Draw per-sample jitter parameters on the CPU.

    Args:
        batch: number of samples ``B``.
        generator: a CPU ``torch.Generator``.
        prob: per-sample probability of each jitter (independently).
        gamma: the exponent is ``exp(U(-gamma, gamma))``: symmetric in log space, so brightening
            and darkening are equally likely.
        contrast: scale factor around the mean, uniform in ``[1 - contrast, 1 + contrast]``.
        noise_std: standard deviation of the additive noise (fixed, in the units of ``x``).

    Returns:
        ``{"gamma": (B,), "contrast": (B,), "noise_std": (B,), "noise_seed": int}``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"intensity prob must be in [0, 1], got {prob}")
    if gamma < 0 or noise_std < 0 or not 0 <= contrast < 1:
        raise ValueError(f"need gamma >= 0, 0 <= contrast < 1, noise_std >= 0; got {gamma}, {contrast}, {noise_std}")
    u = torch.rand(batch, 3, generator=generator) * 2 - 1
    on = torch.rand(batch, 3, generator=generator) < prob
    # the noise field itself is drawn on x's device from this seed (too large to ship from the CPU)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return {
        "gamma": torch.where(on[:, 0], torch.exp(u[:, 0] * gamma), torch.ones(batch)),
        "contrast": torch.where(on[:, 1], 1 + u[:, 1] * contrast, torch.ones(batch)),
        "noise_std": torch.where(on[:, 2], torch.full((batch,), float(noise_std)), torch.zeros(batch)),
        "noise_seed": seed,
    }


def apply_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma`` per (sample, channel).

    Rescaling to ``[0, 1]`` first makes the power well defined for negative (z-scored) values and
    keeps the original range ``[lo, hi]``.

    Args:
        x: ``(B, C, D, H, W)`` float tensor.
        gamma: ``(B,)`` exponents; ``1`` leaves the sample unchanged.
    """
    if bool((gamma == 1).all()):
        return x
    g = gamma.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    lo = x.amin(dim=_SPATIAL, keepdim=True)
    span = x.amax(dim=_SPATIAL, keepdim=True) - lo
    unit = ((x - lo) / (span + _EPS)).clamp(0, 1)
    return torch.where(g == 1, x, lo + span * unit.pow(g))


def apply_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale deviations from the per-(sample, channel) mean by ``factor`` ``(B,)``."""
    if bool((factor == 1).all()):
        return x
    f = factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    mean = x.mean(dim=_SPATIAL, keepdim=True)
    return torch.where(f == 1, x, mean + (x - mean) * f)


def apply_noise(x: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """Add ``N(0, std_b^2)`` noise to sample ``b``; the field comes from a device generator seeded with ``seed``.

    The same seed gives the same noise on the same kind of device; CPU and CUDA random streams
    differ, so the noise field (not its parameters) differs between them.
    """
    if not bool((std > 0).any()):
        return x
    s = std.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + noise * s


def apply_intensity(x: torch.Tensor, params: dict[str, torch.Tensor | int]) -> torch.Tensor:
    """Gamma, then contrast, then noise, with parameters from :func:`random_intensity_params`.

    Args:
        x: ``(B, C, D, H, W)`` float tensor (float32 recommended: ``pow`` in half precision is coarse).
        params: the dict drawn for this batch.

    Returns:
        ``(B, C, D, H, W)`` tensor, same dtype and device.
    """
    if x.ndim != 5:
        raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    x = apply_gamma(x, params["gamma"])
    x = apply_contrast(x, params["contrast"])
    return apply_noise(x, params["noise_std"], int(params["noise_seed"]))
