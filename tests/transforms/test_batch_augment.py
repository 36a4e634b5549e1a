"""BatchAugment: no-op when disabled, seeded reproducibility, selection, dtypes, validation."""

from __future__ import annotations

import pytest
import torch

from medvox.config import AugmentConfig
from medvox.transforms import BatchAugment


def _x(b=6, c=1, shape=(12, 14, 16), seed=0) -> torch.Tensor:
    return torch.randn(b, c, *shape, generator=torch.Generator().manual_seed(seed)) - 2.0


def _cfg(**kw) -> AugmentConfig:
    base = dict(flip_axes=[0, 2], intensity_prob=0.5)
    base.update(kw)
    return AugmentConfig(**base)


def test_disabled_is_identity():
    x = _x()
    assert BatchAugment(AugmentConfig(enabled=False))(x, torch.Generator()) is x


def test_same_seed_same_output_different_seed_differs():
    aug, x = BatchAugment(_cfg()), _x()
    a = aug(x, torch.Generator().manual_seed(123))
    b = aug(x, torch.Generator().manual_seed(123))
    c = aug(x, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_unselected_samples_unchanged_and_selected_changed():
    aug = BatchAugment(AugmentConfig(prob=0.5, flip_axes=[], intensity_prob=0.0))
    x = _x(b=16)
    out = aug(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1)
    assert 0 < changed.sum() < 16
    # padded regions take the sample's minimum, never a value below it
    assert (out.flatten(1).amin(dim=1) >= x.flatten(1).amin(dim=1) - 1e-5).all()


def test_bfloat16_and_channels_last_kept():
    x = _x(c=2).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    out = BatchAugment(_cfg(prob=1.0))(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "kw",
    [dict(prob=1.2), dict(zoom=1.0), dict(flip_axes=[3]), dict(contrast=-0.1), dict(flip_prob=-0.1)],
)
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        BatchAugment(AugmentConfig(**kw))


def test_rejects_cuda_generator_and_bad_input():
    aug = BatchAugment(AugmentConfig())
    with pytest.raises(ValueError, match="generator"):
        aug(_x(), generator="not a generator")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float"):
        aug(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64), torch.Generator())
