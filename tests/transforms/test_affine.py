"""apply_affine against SciPy and MONAI, geometry checks, and the random parameter distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Affine
from scipy import ndimage

from medvox.transforms.affine import (
    apply_affine,
    build_affine,
    identity_affine,
    random_affine_matrices,
    rotation_matrices,
)

SHAPE = (20, 24, 28)  # deliberately non-cubic


def _smooth(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), 2.0).astype(np.float32) * 10


def _theta(angles=(0.0, 0.0, 0.0), zoom=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return build_affine(t(angles), t(zoom), t(shift))


def _scipy_reference(vol: np.ndarray, theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's resample with the same pull-back, and a mask of voxels whose source is >= 1 voxel inside."""
    a = theta[0, :, :3].numpy()
    n = np.array(vol.shape, dtype=float)
    c = (n - 1) / 2
    t = theta[0, :, 3].numpy() * n
    ref = ndimage.affine_transform(vol, a, offset=c - a @ c + t, order=1, mode="constant", cval=0.0)
    idx = np.indices(vol.shape).reshape(3, -1).T
    src = (idx - c) @ a.T + c + t
    inside = ((src >= 1) & (src <= n - 2)).all(axis=1).reshape(vol.shape)
    return ref, inside


def _run(vol: np.ndarray, theta: torch.Tensor, **kw) -> np.ndarray:
    return apply_affine(torch.from_numpy(vol)[None, None], theta.float(), **kw)[0, 0].numpy()


@pytest.mark.parametrize("shape", [(24, 24, 24), SHAPE])
@pytest.mark.parametrize(
    "params",
    [
        dict(angles=(0.2, 0.0, 0.0)),
        dict(angles=(0.0, -0.15, 0.0), zoom=(1.08, 1.08, 1.08)),
        dict(angles=(0.2, -0.1, 0.15), zoom=(1.05, 0.95, 1.02), shift=(0.05, -0.04, 0.03)),
        dict(angles=(0.0, 0.0, math.pi / 2)),
    ],
)
def test_matches_scipy_affine_transform(shape, params):
    vol = _smooth(shape)
    theta = _theta(**params)
    ref, inside = _scipy_reference(vol, theta)
    out = _run(vol, theta, padding_mode="zeros", resampler="grid")
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)


@pytest.mark.parametrize(
    "params",
    [
        dict(shift=(0.07, -0.05, 0.03)),  # separable: linear along D, then bilinear = trilinear
        dict(angles=(0.2, 0.0, 0.0), zoom=(1.0, 1.07, 0.94), shift=(0.0, 0.04, -0.06)),  # (H, W) only + D shift
    ],
)
def test_two_pass_equals_trilinear_when_the_map_splits(params):
    vol = _smooth((24, 26, 30))
    theta = _theta(**params)
    ref, inside = _scipy_reference(vol, theta)
    out = _run(vol, theta, padding_mode="zeros", resampler="two_pass")
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)
    np.testing.assert_allclose(out, _run(vol, theta, padding_mode="zeros", resampler="grid"), atol=1e-4)


def test_two_pass_is_as_accurate_as_trilinear_for_random_augmentations():
    """Against a cubic-spline resample of the same map, the two passes err as little as one 3D pass."""
    shape = (48, 52, 56)
    vol = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal(shape), 1.0).astype(np.float32) * 10
    theta, _ = random_affine_matrices(4, torch.Generator().manual_seed(0), prob=1.0, isotropic_zoom=False)
    n = np.array(shape, dtype=float)
    c = (n - 1) / 2
    for k in range(4):
        th = theta[k : k + 1].double()
        a, t = th[0, :, :3].numpy(), th[0, :, 3].numpy() * n
        cubic = ndimage.affine_transform(vol, a, offset=c - a @ c + t, order=3, mode="constant", cval=0.0)
        _, inside = _scipy_reference(vol, th)
        grid = _run(vol, th, padding_mode="zeros", resampler="grid")
        two = _run(vol, th, padding_mode="zeros", resampler="two_pass")
        err_grid = np.abs(grid - cubic)[inside].mean()
        err_two = np.abs(two - cubic)[inside].mean()
        assert inside.mean() > 0.5
        assert err_two <= 1.05 * err_grid, (k, err_two, err_grid)
        # and the two resamplers agree far more closely than either matches the cubic reference
        assert np.abs(two - grid)[inside].mean() < 0.2 * err_grid


def test_auto_resampler_picks_two_pass_on_cpu_for_large_volumes_only():
    theta, _ = random_affine_matrices(2, torch.Generator().manual_seed(5), prob=1.0)
    big, small = torch.randn(2, 1, 48, 48, 48), torch.randn(2, 1, 24, 24, 24)
    assert torch.equal(apply_affine(big, theta), apply_affine(big, theta, resampler="two_pass"))
    assert not torch.equal(apply_affine(big, theta), apply_affine(big, theta, resampler="grid"))
    assert torch.equal(apply_affine(small, theta), apply_affine(small, theta, resampler="grid"))


def test_two_pass_falls_back_to_grid_for_maps_it_cannot_split():
    vol = _smooth()
    # 90 degrees about W swaps D and H: the (H, W) block of the map is singular, no two-pass factoring
    theta = _theta(angles=(0.0, 0.0, math.pi / 2))
    two = _run(vol, theta, padding_mode="zeros", resampler="two_pass")
    np.testing.assert_allclose(two, _run(vol, theta, padding_mode="zeros", resampler="grid"), atol=1e-6)


def test_matches_monai_affine_params():
    vol = _smooth()
    angles, zoom, shift = (0.2, -0.1, 0.15), (1.05, 0.95, 1.02), (0.05, -0.04, 0.03)
    theta = _theta(angles, zoom, shift)
    _, inside = _scipy_reference(vol, theta)
    # MONAI composes R @ T @ S (translation before rotation) in voxels: rotate our shift back
    rot = rotation_matrices(torch.tensor([angles], dtype=torch.float64))[0].numpy()
    monai_shift = rot.T @ (theta[0, :, 3].numpy() * np.array(SHAPE))
    monai = Affine(
        rotate_params=angles,
        scale_params=[1 / z for z in zoom],
        translate_params=monai_shift.tolist(),
        padding_mode="zeros",
        image_only=True,
    )(torch.from_numpy(vol)[None])[0].numpy()
    np.testing.assert_allclose(_run(vol, theta, padding_mode="zeros")[inside], monai[inside], atol=1e-4)


def test_identity_returns_input():
    x = torch.randn(3, 2, *SHAPE)
    # float32 grid coordinates hit voxel centres up to ~1e-6 voxel: error ~1e-6 of the value range
    tol = 2e-6 * float(x.max() - x.min())
    for padding in ("zeros", "min", "border"):
        np.testing.assert_allclose(apply_affine(x, identity_affine(3), padding_mode=padding), x, atol=tol)
    for padding in ("zeros", "min"):
        out = apply_affine(x, identity_affine(3), padding_mode=padding, resampler="two_pass")
        np.testing.assert_allclose(out, x, atol=2 * tol)


def test_rotation_90_degrees_moves_marker_on_non_cubic_grid():
    vol = np.zeros(SHAPE, dtype=np.float32)
    d, h, w = 10, 14, 17  # centred: (0.5, 2.5, 3.5) with centre (9.5, 11.5, 13.5)
    vol[d, h, w] = 1.0
    # R0(90 deg) = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]; pull-back p_in = R p_out, so p_out = R^T p_in
    out = _run(vol, _theta(angles=(math.pi / 2, 0.0, 0.0)), padding_mode="zeros")
    c = (np.array(SHAPE) - 1) / 2
    p_in = np.array([d, h, w]) - c
    p_out = np.array([p_in[0], p_in[2], -p_in[1]])  # (0.5, 3.5, -2.5): H and W extents differ
    expected = tuple(np.rint(p_out + c).astype(int))
    assert np.unravel_index(out.argmax(), SHAPE) == expected
    assert out.max() == pytest.approx(1.0, abs=1e-5)  # lands exactly on a voxel centre: no blur


def test_zoom_enlarges_extent():
    vol = np.zeros((40, 40, 40), dtype=np.float32)
    vol[10:30, 10:30, 10:30] = 1.0  # 20 voxels wide
    out = _run(vol, _theta(zoom=(1.08, 1.08, 1.08)), padding_mode="zeros")
    extent = out.sum(axis=(1, 2)).max() ** 0.5  # cross-section area -> side length
    assert extent == pytest.approx(20 * 1.08, rel=0.02)
    assert out.sum() == pytest.approx(vol.sum() * 1.08**3, rel=0.01)


def test_translation_shifts_centroid():
    vol = np.zeros(SHAPE, dtype=np.float32)
    vol[8:12, 10:14, 12:16] = 1.0
    shift = (0.1, -0.125, 0.0)  # 2, -3, 0 voxels
    out = _run(vol, _theta(shift=shift), padding_mode="zeros")
    centroid = lambda v: np.array(ndimage.center_of_mass(v))  # noqa: E731
    np.testing.assert_allclose(centroid(out) - centroid(vol), np.array(shift) * SHAPE, atol=1e-4)


@pytest.mark.parametrize("resampler", ["grid", "two_pass"])
def test_min_padding_fills_with_sample_minimum(resampler):
    x = torch.randn(2, 2, 16, 16, 16) - 5
    x[1] += 10
    out = apply_affine(x, _theta(shift=(0.5, 0.0, 0.0)).float().expand(2, 3, 4), resampler=resampler)
    lows = x.amin(dim=(2, 3, 4))
    # the first half along D comes from outside the volume: exactly each (sample, channel)'s minimum
    torch.testing.assert_close(out[:, :, :7].amax(dim=(2, 3, 4)), lows)
    torch.testing.assert_close(out[:, :, :7].amin(dim=(2, 3, 4)), lows)


def test_keeps_dtype_and_bfloat16_close_to_float32():
    x = torch.from_numpy(_smooth())[None, None]
    theta = _theta(angles=(0.1, 0.05, 0.0)).float()
    out = apply_affine(x.to(torch.bfloat16), theta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_affine(x, theta), atol=0.1, rtol=0.02)


def test_parameter_distributions():
    n, deg, zoom, shift, prob = 10000, 11.5, 0.08, 0.08, 0.6
    g = torch.Generator().manual_seed(0)
    theta, applied = random_affine_matrices(n, g, deg, zoom, shift, prob, isotropic_zoom=True)
    th = theta[applied].double()
    # zoom: det(A) = 1 / z^3 for a rotation times an isotropic zoom
    z = torch.linalg.det(th[:, :, :3]).pow(-1 / 3)
    assert z.min() >= 1 - zoom - 1e-5 and z.max() <= 1 + zoom + 1e-5
    assert z.min() < 1 - 0.95 * zoom and z.max() > 1 + 0.95 * zoom  # the whole range is used
    rot = th[:, :, :3] * z.view(-1, 1, 1)
    # the angle about W (last in R0 @ R1 @ R2) from R[0, 1] / R[0, 0] = -tan(a2)
    a2 = torch.rad2deg(torch.atan2(-rot[:, 0, 1], rot[:, 0, 0]))
    a1 = torch.rad2deg(torch.asin(rot[:, 0, 2].clamp(-1, 1)))
    for a in (a1, a2):
        assert a.abs().max() <= deg + 1e-3 and a.abs().max() > 0.95 * deg
    t = -th[:, :, 3]
    assert t.abs().max() <= shift + 1e-6 and t.abs().max() > 0.95 * shift
    tol = 4 * math.sqrt(prob * (1 - prob) / n)  # 4 binomial standard deviations
    assert abs(applied.float().mean().item() - prob) < tol
    torch.testing.assert_close(theta[~applied], identity_affine(int((~applied).sum())))


def test_per_axis_zoom_and_reproducibility():
    a = random_affine_matrices(8, torch.Generator().manual_seed(3), isotropic_zoom=False, prob=1.0)
    b = random_affine_matrices(8, torch.Generator().manual_seed(3), isotropic_zoom=False, prob=1.0)
    c = random_affine_matrices(8, torch.Generator().manual_seed(4), isotropic_zoom=False, prob=1.0)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    norms = torch.linalg.norm(a[0][:, :, :3], dim=1)  # column norms = 1 / per-axis zoom
    assert (norms.std(dim=1) > 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(prob=1.5), dict(zoom=1.0), dict(rotate_deg=-1.0), dict(translate=-0.1)],
)
def test_random_affine_bad_args(kwargs):
    with pytest.raises(ValueError):
        random_affine_matrices(2, torch.Generator(), **kwargs)


def test_apply_affine_bad_args():
    x = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="theta"):
        apply_affine(x, identity_affine(3))
    with pytest.raises(ValueError, match="padding_mode"):
        apply_affine(x, identity_affine(2), padding_mode="edge")
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        apply_affine(x[0], identity_affine(2))
    with pytest.raises(ValueError, match="resampler"):
        apply_affine(x, identity_affine(2), resampler="spline")
