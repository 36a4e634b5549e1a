"""Mixup: the mix is the stated convex combination, lam follows Beta(a, a), a seed repeats it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from medvox.config import AugmentConfig
from medvox.transforms.batch import BatchAugment
from medvox.transforms.mixup import mixup


def test_the_mix_is_lam_times_the_batch_plus_the_rest_times_its_permutation():
    x = torch.arange(6 * 2 * 27, dtype=torch.float32).reshape(6, 2, 3, 3, 3)
    mixed, perm, lam = mixup(x, 0.4, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(6))
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    # each output sample is a mix of exactly its own sample and its partner
    for i, j in enumerate(perm.tolist()):
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[j])


def test_lam_follows_the_beta_distribution():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1, 2, 2, 2)
    for alpha in (0.2, 1.0):
        lams = np.array([mixup(x, alpha, g)[2] for _ in range(2000)])
        assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 0.01
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue < 1e-6  # the test tells the two apart


def test_a_seed_repeats_the_mix_and_memory_format_and_dtype_are_kept():
    x = torch.randn(4, 1, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    a = mixup(x, 0.4, torch.Generator().manual_seed(7))
    b = mixup(x, 0.4, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert a[0].is_contiguous(memory_format=torch.channels_last_3d) and a[0].dtype == x.dtype
    c = mixup(x, 0.4, torch.Generator().manual_seed(8))
    assert not torch.equal(a[0], c[0])


def test_mixed_cross_entropy_equals_cross_entropy_against_the_mixed_one_hot_target():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    perm, lam, w = torch.tensor([3, 0, 4, 1, 2]), 0.3, torch.tensor([1.0, 2.5, 0.7])
    soft = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y[perm], 3).float()
    # the loop's form, with class weights (weighted CE) and without
    for weight in (None, w):
        loop_form = lam * F.cross_entropy(logits, y, weight=weight) + (1 - lam) * F.cross_entropy(logits, y[perm], weight=weight)
        if weight is None:
            torch.testing.assert_close(loop_form, F.cross_entropy(logits, soft))
        else:  # weighted CE's mean divides by the summed weights of each target set
            by_hand = lam * (-(w[y] * F.log_softmax(logits, 1)[range(5), y]).sum() / w[y].sum()) + (1 - lam) * (
                -(w[y[perm]] * F.log_softmax(logits, 1)[range(5), y[perm]]).sum() / w[y[perm]].sum())
            torch.testing.assert_close(loop_form, by_hand)


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_a_non_positive_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup(torch.zeros(2, 1, 2, 2, 2), alpha, torch.Generator())


def test_the_augment_config_refuses_a_negative_mixup():
    with pytest.raises(ValueError, match="augment.mixup"):
        BatchAugment(AugmentConfig(mixup=-0.1))
