"""Per-sample flips and intensity jitter against direct NumPy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medvox.transforms.flips import apply_flips, random_flip_masks
from medvox.transforms.intensity import (
    apply_contrast,
    apply_gamma,
    apply_noise,
    random_intensity_params,
)


def test_flips_are_per_sample_and_per_axis():
    x = torch.randn(4, 2, 5, 6, 7)
    masks = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    out = apply_flips(x, masks, axes=(0, 2)).numpy()
    xn = x.numpy()
    np.testing.assert_array_equal(out[0], xn[0, :, ::-1])
    np.testing.assert_array_equal(out[1], xn[1, :, :, :, ::-1])
    np.testing.assert_array_equal(out[2], xn[2, :, ::-1, :, ::-1])
    np.testing.assert_array_equal(out[3], xn[3])


def test_flip_mask_rate_and_bad_axes():
    masks = random_flip_masks(10000, torch.Generator().manual_seed(0), n_axes=3, prob=0.5)
    assert masks.shape == (10000, 3)
    rates = masks.float().mean(dim=0)
    assert (rates - 0.5).abs().max() < 4 * math.sqrt(0.25 / 10000)
    with pytest.raises(ValueError, match="flip axes"):
        apply_flips(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, dtype=torch.bool), axes=(3,))
    with pytest.raises(ValueError, match="prob"):
        random_flip_masks(2, torch.Generator(), 1, prob=2.0)


def test_gamma_keeps_range_and_matches_numpy():
    x = torch.randn(3, 1, 8, 8, 8) * 2 - 1
    gamma = torch.tensor([0.8, 1.0, 1.25])
    out = apply_gamma(x, gamma)
    for b in range(3):
        xb = x[b].numpy().astype(np.float64)
        lo, hi = xb.min(), xb.max()
        ref = lo + (hi - lo) * ((xb - lo) / (hi - lo)) ** gamma[b].item()
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-5)
        assert out[b].min().item() == pytest.approx(lo, abs=1e-5)
        assert out[b].max().item() == pytest.approx(hi, abs=1e-5)
    assert torch.equal(out[1], x[1])  # gamma 1: untouched
    assert out[0].mean() > x[0].mean() and out[2].mean() < x[2].mean()


def test_contrast_scales_deviations_around_mean():
    x = torch.randn(2, 1, 8, 8, 8) + 3
    out = apply_contrast(x, torch.tensor([1.1, 1.0]))
    torch.testing.assert_close(out[0].mean(), x[0].mean())
    assert out[0].std().item() == pytest.approx(1.1 * x[0].std().item(), rel=1e-5)
    assert torch.equal(out[1], x[1])


def test_noise_std_and_seed():
    x = torch.zeros(3, 1, 32, 32, 32)
    std = torch.tensor([0.02, 0.0, 0.5])
    out = apply_noise(x, std, seed=7)
    assert out[0].std().item() == pytest.approx(0.02, rel=0.03)
    assert out[2].std().item() == pytest.approx(0.5, rel=0.03)
    assert abs(out[2].mean().item()) < 0.01
    assert torch.equal(out[1], x[1])
    assert torch.equal(out, apply_noise(x, std, seed=7))
    assert not torch.equal(out, apply_noise(x, std, seed=8))


def test_intensity_param_distribution():
    p = random_intensity_params(10000, torch.Generator().manual_seed(0), prob=0.3, gamma=0.2, contrast=0.1)
    on = p["gamma"] != 1
    assert abs(on.float().mean().item() - 0.3) < 4 * math.sqrt(0.21 / 10000)
    log_g = p["gamma"][on].log()
    assert log_g.abs().max() <= 0.2 + 1e-6 and abs(log_g.mean().item()) < 0.01
    c = p["contrast"][p["contrast"] != 1]
    assert c.min() >= 0.9 - 1e-6 and c.max() <= 1.1 + 1e-6
    torch.testing.assert_close(p["noise_std"][p["noise_std"] != 0], torch.full((int((p["noise_std"] != 0).sum()),), 0.02))
    with pytest.raises(ValueError):
        random_intensity_params(2, torch.Generator(), contrast=1.5)
