"""Warmup + cosine values at fixed steps, optimizer settings, no weight decay on norms/biases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medvox.config import OptimConfig
from medvox.engine.optim import Schedule, build_optimizer, param_groups, warmup_steps


def _lrs(cfg: OptimConfig, epochs: int, spe: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = Schedule(opt, cfg, epochs, spe)
    out = []
    for _ in range(epochs * spe):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_ten_percent_but_at_least_three_epochs():
    cfg = OptimConfig()
    assert warmup_steps(cfg, epochs=60, steps_per_epoch=10) == 6 * 10  # 10 % of 60
    assert warmup_steps(cfg, epochs=10, steps_per_epoch=10) == 3 * 10  # at least 3
    assert warmup_steps(cfg, epochs=100, steps_per_epoch=1) == 10
    assert warmup_steps(cfg, epochs=2, steps_per_epoch=5) == 9  # never the whole run


def test_warmup_then_cosine_values_at_fixed_steps():
    cfg = OptimConfig(lr=2e-4)
    epochs, spe = 60, 10
    lrs = _lrs(cfg, epochs, spe)
    W, T = 60, 600
    # linear warmup from ~0: lr(t) = base * (t + 1) / W
    assert lrs[0] == pytest.approx(2e-4 / 60)
    assert lrs[29] == pytest.approx(2e-4 * 30 / 60)
    assert lrs[59] == pytest.approx(2e-4)
    # cosine: lr(t) = base * (1 + cos(pi * (t - W) / (T - W))) / 2
    for t in (60, 150, 330, 480, 599):
        assert lrs[t] == pytest.approx(2e-4 * (1 + math.cos(math.pi * (t - W) / (T - W))) / 2, rel=1e-6)
    assert lrs[330] == pytest.approx(1e-4, rel=1e-6)  # half way through the cosine
    assert max(lrs) == pytest.approx(2e-4)


def test_step_and_none_schedules():
    cfg = OptimConfig(lr=1.0, scheduler="step", step_size=2, gamma=0.5)
    lrs = _lrs(cfg, epochs=10, spe=1)  # warmup 3 epochs, then halve every 2 epochs
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3:7] == pytest.approx([1.0, 1.0, 0.5, 0.5])
    assert _lrs(OptimConfig(lr=0.3, scheduler="none"), 5, 2) == pytest.approx([0.3] * 10)
    with pytest.raises(ValueError, match="unknown scheduler"):
        Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1), OptimConfig(scheduler="poly"), 5, 1)


def test_schedule_state_round_trip():
    cfg = OptimConfig(lr=1.0)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = Schedule(opt, cfg, 10, 4)
    for _ in range(17):
        opt.step()
        sched.step()
    state, lr = sched.state_dict(), opt.param_groups[0]["lr"]
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = Schedule(opt2, cfg, 10, 4)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr)
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.bn = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 2)


def test_no_weight_decay_on_norms_and_biases_and_head_lr():
    net = _Net()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.01)
    groups = param_groups(net, cfg, head_names={"fc.weight", "fc.bias"}, head_lr_mult=10)
    by_name = {g["name"]: g for g in groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert ids["backbone_decay"] == {id(net.conv.weight)}
    assert ids["backbone_no_decay"] == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias)}
    assert ids["head_decay"] == {id(net.fc.weight)}
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert by_name["backbone_decay"]["weight_decay"] == 0.01
    assert by_name["head_decay"]["lr"] == pytest.approx(1e-2)


def test_optimizer_settings():
    groups = param_groups(_Net(), OptimConfig())
    adam = build_optimizer(groups, OptimConfig())
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    sgd = build_optimizer(param_groups(_Net(), OptimConfig()), OptimConfig(optimizer="sgd"))
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(param_groups(_Net(), OptimConfig()), OptimConfig(optimizer="adamw")),
                      torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(groups, OptimConfig(optimizer="lion"))
