"""EMA equals the closed-form exponential average, buffers included; 0 disables it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvox.engine.ema import create_ema, update_ema


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    d = 0.9
    ema = create_ema(model, d)
    values = []
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        values.append({k: v.clone() for k, v in model.state_dict().items()})
        update_ema(ema, model)
    n = len(values)
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean"):
        # ema_n = d^(n-1) p_1 + sum_{t=2..n} (1 - d) d^(n-t) p_t  (the first update copies p_1)
        expected = d ** (n - 1) * values[0][key]
        for t in range(2, n + 1):
            expected = expected + (1 - d) * d ** (n - t) * values[t - 1][key]
        got = ema.module.state_dict()[key]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert int(ema.n_averaged) == n


def test_ema_is_a_frozen_copy_and_can_be_disabled():
    model = nn.Linear(2, 2)
    ema = create_ema(model, 0.999)
    assert all(not p.requires_grad for p in ema.parameters())
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()
    assert create_ema(model, 0.0) is None
    update_ema(None, model)  # a no-op when disabled
    with pytest.raises(ValueError, match="ema_decay"):
        create_ema(model, 1.5)


def test_debiased_ema_is_the_normalised_weighted_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    d = 0.99
    ema = create_ema(model, d, debias=True)
    plain = create_ema(model, d)
    values = []
    for _ in range(7):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        values.append(model.weight.detach().clone())
        update_ema(ema, model)
        update_ema(plain, model)
        n = len(values)
        # sum_i (1 - d) d^(n-i) w_i / (1 - d^n): weights of the visited steps, summing to one
        expected = sum((1 - d) * d ** (n - i) * values[i - 1] for i in range(1, n + 1)) / (1 - d**n)
        torch.testing.assert_close(ema.module.weight, expected, rtol=1e-5, atol=1e-6)
    # early on (n << 1/(1-d)) the debiased EMA is near the mean of the visited weights, while the
    # plain EMA still mostly holds the first ones
    mean = torch.stack(values).mean(0)
    err_debiased = (ema.module.weight - mean).abs().max()
    err_plain = (plain.module.weight - mean).abs().max()
    assert err_debiased < 0.1 * err_plain
