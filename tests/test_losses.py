"""Losses against hand-computed values: LDAM margins, DRW weights and switch, focal, weighted CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvox.config import LossConfig
from medvox.losses import (
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    build_loss,
    class_balanced_weights,
    inverse_frequency_weights,
    ldam_margins,
)

COUNTS = [900, 100]


def test_ldam_margins_by_hand():
    # 900 ** 0.25 = 5.47723, 100 ** 0.25 = 3.16228; largest margin (class 1) = 0.5,
    # so m0 = 0.5 * 3.16228 / 5.47723 = 0.5 * (100 / 900) ** 0.25 = 0.288675
    assert ldam_margins(COUNTS, 0.5).tolist() == pytest.approx([0.288675, 0.5], abs=1e-6)
    assert ldam_margins([10, 10, 10], 0.3).tolist() == pytest.approx([0.3, 0.3, 0.3])


def test_drw_weights_by_hand():
    # beta = 0.9999: 1 - beta ** 900 = 0.0860729, 1 - beta ** 100 = 0.00995066
    # raw w = 1e-4 / that = [0.00116181, 0.0100496]; sum = 0.0112114; scaled to sum 2:
    assert class_balanced_weights(COUNTS, 0.9999).tolist() == pytest.approx([0.207255, 1.792745], abs=2e-6)
    assert class_balanced_weights(COUNTS, 0.0).tolist() == pytest.approx([1.0, 1.0])


def test_weighted_ce_weights_by_hand():
    # 1/900 = 0.001111, 1/100 = 0.01, mean 0.005556 -> [0.2, 1.8]
    assert inverse_frequency_weights(COUNTS).tolist() == pytest.approx([0.2, 1.8], abs=1e-6)
    loss = build_loss(LossConfig(name="weighted_CE"), COUNTS, epochs=10)
    logits, target = torch.tensor([[2.0, 0.5], [0.3, 0.1], [1.0, 1.5]]), torch.tensor([0, 1, 1])
    ce = F.cross_entropy(logits, target, reduction="none")
    w = torch.tensor([0.2, 1.8, 1.8])
    assert loss(logits, target).item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("epochs, switch", [(10, 8), (60, 48), (7, 5)])
def test_drw_switch_epoch(epochs, switch):
    loss = build_loss(LossConfig(name="LDAM", drw_start=0.8), COUNTS, epochs)
    assert loss.drw_start_epoch == switch == int(0.8 * epochs)
    for epoch in range(epochs):
        loss.set_epoch(epoch)
        assert (loss.weight is not None) == (epoch >= switch), epoch
    loss.set_epoch(0)  # e.g. a resumed run that rewinds: weights go off again
    assert loss.weight is None


def test_ldam_value_by_hand():
    loss = LDAMLoss(COUNTS, max_margin=0.5, scale=30.0)
    logits = torch.tensor([[12.0, 3.0], [6.0, 9.0]])  # s * cos(theta) from the cosine head
    target = torch.tensor([0, 1])
    # subtract s * m_y from the target logit: 30 * 0.288675 = 8.66025 and 30 * 0.5 = 15
    z0 = [12.0 - 8.660254, 3.0]
    z1 = [6.0, 9.0 - 15.0]
    lse = lambda z: math.log(sum(math.exp(v) for v in z))  # noqa: E731
    manual = ((lse(z0) - z0[0]) + (lse(z1) - z1[1])) / 2
    assert loss(logits, target).item() == pytest.approx(manual, rel=1e-5)
    # after the switch: weighted mean with the DRW weights
    loss = LDAMLoss(COUNTS, drw_start_epoch=0)
    loss.set_epoch(0)
    w0, w1 = 0.207255, 1.792745
    manual_w = (w0 * (lse(z0) - z0[0]) + w1 * (lse(z1) - z1[1])) / (w0 + w1)
    assert loss(logits, target).item() == pytest.approx(manual_w, rel=1e-5)


def test_focal_equals_ce_at_gamma_zero_and_smaller_on_easy():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3) * 3, torch.randint(0, 3, (16,))
    ce = F.cross_entropy(logits, target)
    assert FocalLoss(3, gamma=0.0)(logits, target).item() == pytest.approx(ce.item(), rel=1e-6)
    alpha = torch.tensor([0.5, 1.0, 2.0])
    assert FocalLoss(3, 0.0, alpha)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=alpha).item(), rel=1e-6
    )
    easy = torch.tensor([[4.0, -2.0, -2.0]])  # p_y ~ 0.995
    t0 = torch.tensor([0])
    focal, plain = FocalLoss(3, 2.0)(easy, t0).item(), F.cross_entropy(easy, t0).item()
    p = torch.softmax(easy, 1)[0, 0].item()
    assert focal == pytest.approx((1 - p) ** 2 * plain, rel=1e-5)
    assert focal < 1e-3 * plain


def test_label_smoothing_as_torch_documents():
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    eps = 0.1
    loss = build_loss(LossConfig(name="CE", label_smoothing=eps), [5, 5, 5], epochs=1)
    # torch: target distribution (1 - eps) * one_hot + eps / K
    log_p = torch.log_softmax(logits, 1)[0]
    q = torch.tensor([1 - eps + eps / 3, eps / 3, eps / 3])
    assert loss(logits, target).item() == pytest.approx(-(q * log_p).sum().item(), rel=1e-6)
    assert loss(logits, target).item() > CrossEntropyLoss(3)(logits, target).item()


def test_set_epoch_noop_and_buffers_move():
    loss = build_loss(LossConfig(name="CE"), COUNTS, epochs=3)
    loss.set_epoch(2)
    ldam = build_loss(LossConfig(name="LDAM"), COUNTS, epochs=3).double()
    assert ldam.margins.dtype == torch.float64
    assert "weight" not in ldam.state_dict()


@pytest.mark.parametrize(
    "cfg, counts, epochs, match",
    [
        (LossConfig(name="hinge"), COUNTS, 5, "valid losses: CE, weighted_CE, focal, LDAM"),
        (LossConfig(name="LDAM"), [900, 0], 5, "class"),
        (LossConfig(name="focal", focal_gamma=-1.0), COUNTS, 5, "focal_gamma"),
        (LossConfig(name="CE", label_smoothing=1.0), COUNTS, 5, "label_smoothing"),
        (LossConfig(name="LDAM", drw_beta=1.0), COUNTS, 5, "drw_beta"),
        (LossConfig(name="LDAM", ldam_max_margin=0.0), COUNTS, 5, "ldam_max_margin"),
        (LossConfig(name="LDAM", drw_start=1.5), COUNTS, 5, "drw_start"),
        (LossConfig(name="CE"), [10], 5, "at least 2"),
        (LossConfig(name="CE"), COUNTS, 0, "epochs"),
    ],
)
def test_bad_args(cfg, counts, epochs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(cfg, counts, epochs)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="logits"):
        build_loss(LossConfig(name="CE"), COUNTS, 1)(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
