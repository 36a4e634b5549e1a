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
