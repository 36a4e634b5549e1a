"""Test-time augmentation views and probability averaging."""

from __future__ import annotations

import pytest
import torch

from medvox.transforms import tta_predict, tta_transforms, tta_views


def test_views_are_deterministic_and_ordered():
    x = torch.randn(2, 1, 8, 9, 10)
    views = tta_views(x, n=6, flip_axes=(2,))
    assert views[0] is x
    assert torch.equal(views[1], x.flip(4))
    again = tta_views(x, n=6, flip_axes=(2,))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    assert all(v.shape == x.shape for v in views)
    flips = tta_views(x, n=4, flip_axes=(0, 2))
    assert torch.equal(flips[2], x.flip(4)) and torch.equal(flips[3], x.flip((2, 4)))


def test_predict_averages_probabilities():
    x = torch.randn(3, 1, 6, 6, 6)
    weight = torch.randn(216, 4)

    def model(v):
        return v.flatten(1) @ weight

    views = tta_views(x, n=2, flip_axes=(1,))
    expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    torch.testing.assert_close(tta_predict(model, x, views), expected)
    torch.testing.assert_close(tta_predict(model, x, tta_transforms(2, flip_axes=(1,))), expected)
    probs = tta_predict(model, x, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_bad_args():
    with pytest.raises(ValueError, match="n must be"):
        tta_transforms(n=50)
    with pytest.raises(ValueError, match="activation"):
        tta_predict(lambda v: v, torch.zeros(1, 1, 2, 2, 2), 1, activation="sigmoid")
