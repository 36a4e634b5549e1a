"""Attention MIL: bag construction, attention normalisation, permutation behaviour."""

from __future__ import annotations

import pytest
import torch

from medvox.models import create_model


@pytest.mark.parametrize(
    ("kwargs", "shape", "n_instances"),
    [({"instance": "slice"}, (9, 16, 12), 9),
     ({"instance": "slab"}, (9, 16, 12), 7),  # k=3, stride 1: 9 - 3 + 1
     ({"instance": "slab", "slab_size": 4, "slab_stride": 2}, (9, 16, 12), 3),  # starts 0, 2, 4
     ({"instance": "slab", "slab_size": 5}, (3, 16, 12), 1),  # D < k: zero-padded to one slab
     ({"instance": "patch", "patch_size": 8}, (9, 16, 12), 2 * 2 * 2),  # D, W padded to 16
     ({"instance": "patch", "patch_size": (4, 8, 6)}, (8, 16, 12), 2 * 2 * 2)],
)
def test_attention_is_a_distribution_over_instances(kwargs, shape, n_instances):
    model = create_model("mil", in_channels=2, num_classes=3, **kwargs)
    x = torch.randn(2, 2, *shape)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (2, 3)
    assert attention.shape == (2, n_instances)
    assert torch.all(attention >= 0)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    assert torch.equal(model.last_attention, attention.detach()) and not model.last_attention.requires_grad


def test_slab_instances_stack_adjacent_slices_as_channels():
    model = create_model("mil", in_channels=2, instance="slab", slab_size=3)
    x = torch.randn(1, 2, 5, 4, 4)
    bags = model.instances(x)
    assert bags.shape == (1, 3, 6, 4, 4)
    torch.testing.assert_close(bags[0, 1].reshape(2, 3, 4, 4), x[0, :, 1:4])


def test_patch_instances_tile_the_volume():
    model = create_model("mil", instance="patch", patch_size=(2, 4, 4))
    x = torch.randn(1, 1, 4, 8, 8)
    bags = model.instances(x)
    assert bags.shape == (1, 2 * 2 * 2, 1, 2, 4, 4)
    torch.testing.assert_close(bags[0, 3, 0], x[0, 0, 0:2, 4:8, 4:8])  # index 3 = (0, 1, 1)


def test_patch_instances_equal_unfold_tiles_with_channels_batch_and_padding():
    model = create_model("mil", in_channels=2, instance="patch", patch_size=(2, 4, 3))
    x = torch.randn(3, 2, 5, 8, 7)  # D padded 5 -> 6, W padded 7 -> 9
    padded = torch.nn.functional.pad(x, (0, 2, 0, 0, 0, 1))
    ref = padded.unfold(2, 2, 2).unfold(3, 4, 4).unfold(4, 3, 3)  # (B, C, nd, nh, nw, pd, ph, pw)
    ref = ref.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(3, -1, 2, 2, 4, 3)
    bags = model.instances(x)
    assert bags.shape == (3, 3 * 2 * 3, 2, 2, 4, 3)
    torch.testing.assert_close(bags, ref, rtol=0, atol=0)


def test_slice_permutation_permutes_attention_and_keeps_logits():
    torch.manual_seed(0)
    model = create_model("mil", num_classes=2).eval()
    x = torch.randn(2, 1, 10, 16, 16)
    perm = torch.randperm(10)
    with torch.no_grad():
        logits, attention = model(x, return_attention=True)
        logits_p, attention_p = model(x[:, :, perm], return_attention=True)
    torch.testing.assert_close(attention_p, attention[:, perm])
    torch.testing.assert_close(logits_p, logits, rtol=1e-5, atol=1e-5)


def test_identical_slices_get_identical_attention():
    torch.manual_seed(0)
    model = create_model("mil", dropout=0.0).eval()
    x = torch.zeros(1, 1, 6, 16, 16)
    x[0, 0, 4] = 5.0  # one distinct slice among five identical ones
    with torch.no_grad():
        _, attention = model(x, return_attention=True)
    same = attention[0, [0, 1, 2, 3, 5]]
    torch.testing.assert_close(same, same[:1].expand(5))
    assert not torch.isclose(attention[0, 4], attention[0, 0])
    torch.testing.assert_close(attention[0, 4] + same.sum(), torch.tensor(1.0))
