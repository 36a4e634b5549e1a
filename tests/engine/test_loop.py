"""Gradient accumulation equals one big batch; clipping caps the global norm; a NaN loss stops the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning_fabric import Fabric
from torch import nn

from medvox.config import OptimConfig
from medvox.data.loader import ArrayLoader
from medvox.engine.loop import train_one_epoch
from medvox.engine.optim import Schedule
from medvox.errors import TrainingError


def _setup(batch_size: int, n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 1, 2, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))  # no dropout, no BatchNorm
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = fabric.setup(model, opt)
    sched = Schedule(opt, OptimConfig(scheduler="none"), 1, 1)
    loader = ArrayLoader(images, labels, np.arange(n), batch_size, shuffle=False, prefetch=0)
    return fabric, model, opt, sched, loader


def _run(batch_size: int, accum: int, clip: float = 0.0, criterion=None):
    fabric, model, opt, sched, loader = _setup(batch_size)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(fabric, model, loader, opt, criterion or nn.CrossEntropyLoss(), sched,
                            accum=accum, grad_clip=clip, augment=None, generator=torch.Generator(),
                            ema_update=lambda: None, channels_last=False)
    return before, [p.detach().clone() for p in model.parameters()], stats


def test_accumulating_two_half_batches_equals_one_batch():
    _, acc, stats_acc = _run(batch_size=4, accum=2)  # 2 micro-batches of 4 -> 1 step
    _, big, stats_big = _run(batch_size=8, accum=1)  # 1 batch of 8 -> 1 step
    assert stats_acc.optimizer_steps == 1 and stats_big.optimizer_steps == 1
    for a, b in zip(acc, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_trailing_partial_group_is_averaged_over_its_own_size():
    # 8 samples, batch 2, accum 3 -> groups of 3, 1 micro-batches: 2 optimizer steps
    _, _, stats = _run(batch_size=2, accum=3)
    assert stats.optimizer_steps == 2


def test_clipping_caps_the_global_norm():
    before, after, _ = _run(batch_size=8, accum=1, clip=0.01)
    update = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True)))
    assert float(update) == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the step is the clipped gradient
    before, after, _ = _run(batch_size=8, accum=1, clip=0.0)
    assert float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True)))) > 0.05


def test_non_finite_loss_stops_with_a_clear_message():
    def bad(logits, y):
        return nn.functional.cross_entropy(logits, y) * float("nan")

    with pytest.raises(TrainingError, match="loss became nan"):
        _run(batch_size=4, accum=1, criterion=bad)


def test_mixup_trains_on_the_mixed_batch_and_the_mixed_loss():
    """One SGD step with mixup moves the weights exactly as the hand-mixed batch and loss do."""
    from medvox.transforms.mixup import mixup

    fabric, model, opt, sched, loader = _setup(batch_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(fabric, model, loader, opt, nn.CrossEntropyLoss(), sched, accum=1, grad_clip=0.0,
                            augment=None, generator=torch.Generator().manual_seed(5), ema_update=lambda: None,
                            channels_last=False, mixup_alpha=0.4)
    after = [p.detach().clone() for p in model.parameters()]
    # by hand: the same draw from the same seed, the same starting weights
    x, y, _ = next(iter(loader))
    mixed, perm, lam = mixup(x.float(), 0.4, torch.Generator().manual_seed(5))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        for p, b in zip(ref.parameters(), before, strict=True):
            p.copy_(b)
    logits = ref(mixed)
    loss = lam * nn.functional.cross_entropy(logits, y) + (1 - lam) * nn.functional.cross_entropy(logits, y[perm])
    loss.backward()
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    for p, b, a in zip(ref.parameters(), before, after, strict=True):
        torch.testing.assert_close(a, b - p.grad, rtol=1e-5, atol=1e-6)  # SGD lr 1
    assert 0.0 < lam < 1.0 and not torch.equal(perm, torch.arange(8))  # a real mix, not the identity
