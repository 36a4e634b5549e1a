"""Preprocessing: a marker lands where physics says after reorientation + resampling; normalisation maths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medvox.data.io import read_image
from medvox.data.preprocess import crop_or_pad, normalize, preprocess_case, preprocess_volume
from medvox.data.sources import Case
from tests.data.conftest import write_nifti

# voxel i -> Posterior 0.9 mm, j -> Right 0.7 mm, k -> Superior 2.5 mm (as in test_io)
AFFINE = np.array([[0.0, 0.7, 0.0, 10.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1]])


def _blob(shape, center, sigma=1.5):
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, center, strict=True))
    return -1000 + 2000 * np.exp(-r2 / (2 * sigma**2))


def _com(x):
    return np.array(ndimage.center_of_mass(x - x.min()))


def test_marker_position_after_reorientation_and_resampling(tmp_path):
    # file voxel grid (i, j, k) = (20, 16, 10); a smooth marker at voxel (12, 6, 4)
    path = write_nifti(tmp_path / "m.nii.gz", _blob((20, 16, 10), (12, 6, 4)).astype(np.float32), AFFINE)
    array, meta = read_image(path)
    # RAS array (D, H, W) = (k, 19 - i, j) with spacing (2.5, 0.9, 0.7)
    assert array.shape == (10, 20, 16)
    assert _com(array) == pytest.approx([4, 7, 6], abs=0.01)
    plan = {"target_spacing": [1.25, 1.8, 0.7], "target_shape": [24, 12, 12], "normalization": [{"scheme": "none"}]}
    out = preprocess_volume(array, meta, plan)
    assert out.shape == (1, 24, 12, 12) and out.dtype == np.float32
    # zoom keeps voxel centres: input index i -> (i + 0.5) * factor - 0.5; factors (2, 0.5, 1)
    resampled = np.array([(4 + 0.5) * 2 - 0.5, (7 + 0.5) * 0.5 - 0.5, 6.0])  # in a (20, 10, 16) grid
    offset = np.array([(24 - 20) // 2, (12 - 10) // 2, -((16 - 12) // 2)])  # pad D and H, crop W
    assert _com(out[0]) == pytest.approx(resampled + offset, abs=0.05)
    # the marker sits at the same physical place: 8.5 output D voxels of 1.25 mm above the grid's start
    assert (_com(out[0])[0] - offset[0] + 0.5) * 1.25 == pytest.approx((4 + 0.5) * 2.5, abs=0.1)


def test_padding_uses_the_background_and_odd_remainders_go_last():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = crop_or_pad(x, [5, 3, 2], value=-7)
    assert out.shape == (5, 3, 2)
    np.testing.assert_array_equal(out[1:3], x[:, :, 1:3])  # 1 slice before, 2 after; W cropped centrally
    assert (out[0] == -7).all() and (out[3:] == -7).all()


def test_normalisation_schemes():
    x = np.array([-2000.0, 0.0, 3000.0], np.float32)
    ct = normalize(x, {"scheme": "ct", "clip": [-1000, 1000], "mean": 0.0, "std": 500.0})
    np.testing.assert_allclose(ct, [-2, 0, 2])
    z = normalize(np.random.default_rng(0).normal(50, 9, (8, 8, 8)).astype(np.float32), {"scheme": "zscore"})
    assert z.mean() == pytest.approx(0, abs=1e-5) and z.std() == pytest.approx(1, abs=1e-4)
    mm = normalize(np.array([0, 51, 255], np.float32), {"scheme": "minmax", "min": 0.0, "max": 255.0})
    np.testing.assert_allclose(mm, [0, 0.2, 1])


def test_preprocess_case_in_memory_uint8():
    array = np.random.default_rng(0).integers(0, 2, (28, 28, 28), dtype=np.uint8) * 255
    plan = {"target_spacing": [1, 1, 1], "target_shape": [28, 28, 28],
            "normalization": [{"scheme": "minmax", "min": 0.0, "max": 255.0}]}
    out = preprocess_case(Case(id="a", group="a", array=array), plan)
    np.testing.assert_array_equal(out[0], array / 255.0)


def test_channel_count_must_match_the_plan():
    with pytest.raises(ValueError, match="plan has 2 channel"):
        preprocess_volume(np.zeros((4, 4, 4)), {}, {"target_spacing": [1, 1, 1], "target_shape": [4, 4, 4],
                                                    "normalization": [{"scheme": "none"}] * 2})


def test_downsampling_is_antialiased_when_the_plan_says_so():
    """A structure a few voxels thick keeps (nearly) its thickness wherever it sits between the coarse grid's
    voxel centres, and a pattern finer than the coarse grid becomes its mean instead of a false pattern."""
    from medvox.data.cache import plan_hash

    base = {"target_spacing": [1.0, 1.0, 64 / 28], "target_shape": [4, 4, 28], "normalization": [{"scheme": "none"}]}
    new = {**base, "antialias": True}
    slab = np.zeros((4, 4, 64), np.float32)
    slab[..., 21:24] = 1  # 3 voxels thick
    thickness = {name: [preprocess_volume(np.roll(slab, k, axis=2), {}, plan)[0, 0, 0].sum() * 64 / 28
                        for k in range(8)] for name, plan in (("plain", base), ("antialias", new))}
    assert max(thickness["plain"]) - min(thickness["plain"]) > 1.5  # 2.3 to 3.9 voxels: aliasing
    assert max(thickness["antialias"]) - min(thickness["antialias"]) < 0.6
    assert np.mean(thickness["antialias"]) == pytest.approx(3.0, abs=0.1)
    stripes = np.zeros((4, 4, 64), np.float32)
    stripes[..., ::2] = 1  # a period of 2 input voxels: finer than the 2.3-voxel output grid
    plain, smooth = (preprocess_volume(stripes, {}, plan)[0, 0, 0, 2:-2] for plan in (base, new))
    assert plain.std() > 0.25 and plain.min() < 0.1 and plain.max() > 0.9  # a false pattern at full contrast
    assert smooth.std() < 0.1 and smooth.mean() == pytest.approx(0.5, abs=0.02)  # mostly the mean
    # an axis made finer (or kept) is not filtered; a smooth marker stays where it was
    up = {"target_spacing": [0.5, 1.0, 1.0], "target_shape": [16, 8, 8], "normalization": [{"scheme": "none"}]}
    blob = _blob((8, 8, 8), (3, 4, 5))
    np.testing.assert_array_equal(preprocess_volume(blob, {}, {**up, "antialias": True}), preprocess_volume(blob, {}, up))
    down = {"target_spacing": [2.0, 2.0, 2.0], "target_shape": [10, 10, 10], "normalization": [{"scheme": "none"}]}
    big = _blob((20, 20, 20), (8, 11, 9), sigma=2.5)
    assert _com(preprocess_volume(big, {}, {**down, "antialias": True})[0]) == pytest.approx(
        _com(preprocess_volume(big, {}, down)[0]), abs=0.05)
    # a plan from before the rule keeps its cache store (and plain interpolation); a new one gets its own
    stored = {**base, "storage_dtype": "float16"}
    assert plan_hash(stored) != plan_hash({**stored, "antialias": True})
    assert plan_hash(stored) == plan_hash({**stored, "antialias": False})
