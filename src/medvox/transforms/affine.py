"""One fused affine resample (rotate, zoom, translate) for a whole batch on its own device.

Conventions (shared by every function here, by the tests, and by :mod:`medvox.transforms.tta`):

* ``theta`` is a ``(B, 3, 4)`` matrix ``[A | t]`` in *voxel space*, axes in array order
  ``(D, H, W)``, origin at the volume centre ``(N - 1) / 2``. It is a pull-back, as in
  ``F.affine_grid`` and ``scipy.ndimage.affine_transform``: the output voxel at centred position
  ``p_out`` takes its value from the input at ``p_in = A @ p_out + t * N``, where ``N`` holds the
  sizes ``(D, H, W)``. The linear part ``A`` is in voxel units (voxels are taken as isotropic,
  which the preprocessing's resampling to a common spacing provides), so a 90-degree rotation of a
  non-cubic volume is a real rotation. The translation ``t`` is a fraction of the extent along
  each axis, which keeps ``theta`` independent of the volume shape.
* ``align_corners=False`` (PyTorch's default): a voxel is a cell, the normalised coordinate
  ``u`` in ``[-1, 1]`` spans the full extent, and ``p = u * N / 2``. Converting ``A`` to
  normalised coordinates is then ``S^-1 A S`` with ``S = diag(N / 2)``, and ``t`` becomes ``2 t``.
* Outside the input the default fill is the per-(sample, channel) minimum (``padding_mode="min"``),
  because z-scored CT has a negative background: padding with 0 would paint a bright frame.

Two resamplers compute the same trilinear pull-back (``resampler=``):

* ``"grid"``: one ``F.grid_sample`` over the 3D grid. On a GPU this is one fast kernel for the batch.
* ``"two_pass"``: the CPU's fast path. ``A`` is factored as ``C @ B``, where ``C`` changes only the
  D coordinate and ``B`` only the H and W coordinates (``B``'s third row is ``(0, 0, 1)``), so the
  volume is resampled along D in planes (D, W), then in planes (H, W): two *2D* ``grid_sample`` calls,
  whose CPU kernel is vectorised where the 3D one is scalar (2.4x faster at 96^3, see
  ``benchmarks/RESULTS.md``). Because ``C`` leaves H and W alone, the second pass reads the
  intermediate exactly where the one-pass source lies in (H, W), so borders behave as in ``"grid"``;
  inside, the two differ by the order of interpolation only (linear along D, then bilinear), which
  is as close to a cubic-spline reference as trilinear is (``tests/transforms/test_affine.py``).
  Samples whose ``A`` is far from a rotation of a few tens of degrees, or the ``nearest`` mode, or the
  ``border``/``reflection`` fills, take the ``"grid"`` path.
* ``"auto"`` (default): ``"two_pass"`` on the CPU for volumes of at least 48^3 voxels, ``"grid"``
  elsewhere (below that, two small calls per volume cost more than the 3D kernel saves).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> theta, applied = random_affine_matrices(4, g)
    >>> x = torch.randn(4, 1, 20, 24, 28)
    >>> apply_affine(x, theta).shape
    torch.Size([4, 1, 20, 24, 28])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MODES = ("bilinear", "nearest")
_PADDINGS = ("min", "zeros", "border", "reflection")
_RESAMPLERS = ("auto", "grid", "two_pass")
_TWO_PASS_MIN_VOXELS = 48**3


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``R0(a0) @ R1(a1) @ R2(a2)`` about the D, H and W axes.

    Same matrices and order as MONAI's ``create_rotate(3, angles)`` (intrinsic "XYZ" with
    x = D, y = H, z = W), so ``rotate_params`` carry over unchanged.

    Args:
        angles: ``(B, 3)`` angles in radians about axes 0 (D), 1 (H), 2 (W).

    Returns:
        ``(B, 3, 3)`` rotation matrices in the dtype of ``angles``.
    """
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def _mat(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    r0 = _mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    r1 = _mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    r2 = _mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return r0 @ r1 @ r2


def build_affine(angles: torch.Tensor, zoom: torch.Tensor, translate: torch.Tensor) -> torch.Tensor:
    """Compose rotation, zoom and translation into one pull-back ``theta`` per sample.

    ``A = R(angles) @ diag(1 / zoom)`` and ``t = -translate``, so ``zoom > 1`` enlarges the
    content and, without rotation or zoom, content moves by ``+translate * N`` voxels.

    Args:
        angles: ``(B, 3)`` radians about D, H, W.
        zoom: ``(B, 3)`` or ``(B, 1)`` forward zoom factors (content size multiplier).
        translate: ``(B, 3)`` forward shift as a fraction of the extent along D, H, W.

    Returns:
        ``(B, 3, 4)`` ``theta`` in the module's convention (float64 if inputs are float64).

    Example:
        >>> eye = build_affine(torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3))
        >>> eye[0, :, :3].diagonal().tolist()
        [1.0, 1.0, 1.0]
    """
    if angles.ndim != 2 or angles.shape[1] != 3 or translate.shape != angles.shape:
        raise ValueError(f"angles and translate must be (B, 3), got {tuple(angles.shape)}, {tuple(translate.shape)}")
    if bool((zoom <= 0).any()):
        raise ValueError("zoom factors must be > 0")
    linear = rotation_matrices(angles) / zoom.expand(-1, 3).unsqueeze(1)  # R @ diag(1/zoom)
    return torch.cat([linear, -translate.unsqueeze(-1)], dim=-1)


def random_affine_matrices(
    batch: int,
    generator: torch.Generator,
    rotate_deg: float = 11.5,
    zoom: float = 0.08,
    translate: float = 0.08,
    prob: float = 0.6,
    isotropic_zoom: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one random affine per sample; identity where the sample is not selected.

    Angles about each axis are uniform in ``+-rotate_deg``, zoom uniform in
    ``[1 - zoom, 1 + zoom]`` (one factor, or one per axis), translation uniform in
    ``+-translate`` of the extent. Every number is drawn on the CPU from ``generator``, always in
    the same order and amount, so the same seed gives the same matrices on CPU and GPU.

    Args:
        batch: number of samples ``B``.
        generator: a CPU ``torch.Generator``.
        rotate_deg: maximum absolute angle per axis, in degrees.
        zoom: maximum relative zoom, in ``[0, 1)``.
        translate: maximum shift as a fraction of the extent.
        prob: per-sample probability that the transform is applied.
        isotropic_zoom: one zoom factor for all axes (``True``) or one per axis.
        device: where to put the outputs.

    Returns:
        ``theta`` ``(B, 3, 4)`` float32 and the ``applied`` mask ``(B,)`` bool.

    Example:
        >>> theta, applied = random_affine_matrices(2, torch.Generator().manual_seed(1))
        >>> theta.shape, applied.shape
        (torch.Size([2, 3, 4]), torch.Size([2]))
    """
    _check_generator(generator)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if rotate_deg < 0 or translate < 0 or not 0 <= zoom < 1:
        raise ValueError(f"need rotate_deg >= 0, translate >= 0, 0 <= zoom < 1; got {rotate_deg}, {translate}, {zoom}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    opts = {"generator": generator, "dtype": torch.float64}
    angles = (torch.rand(batch, 3, **opts) * 2 - 1) * math.radians(rotate_deg)
    zooms = 1 + (torch.rand(batch, 3, **opts) * 2 - 1) * zoom
    shifts = (torch.rand(batch, 3, **opts) * 2 - 1) * translate
    applied = torch.rand(batch, generator=generator) < prob
    if isotropic_zoom:
        zooms = zooms[:, :1]
    theta = build_affine(angles, zooms, shifts)
    theta = torch.where(applied.view(-1, 1, 1), theta, identity_affine(batch, dtype=torch.float64))
    return theta.to(device=device, dtype=torch.float32), applied.to(device)


def identity_affine(batch: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``(B, 3, 4)`` identity ``theta``."""
    return torch.eye(3, 4, dtype=dtype, device=device).expand(batch, 3, 4).clone()


def normalized_theta(theta: torch.Tensor, spatial_shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert voxel-space ``theta`` (D, H, W order) into ``F.affine_grid``'s normalised (x, y, z).

    Args:
        theta: ``(B, 3, 4)`` in the module's convention.
        spatial_shape: ``(D, H, W)``.

    Returns:
        ``(B, 3, 4)`` float32 matrix for ``F.affine_grid(..., align_corners=False)``.
    """
    th = theta.to(torch.float64)
    half = torch.tensor(spatial_shape, dtype=torch.float64, device=theta.device) / 2
    # S^-1 A S with S = diag(N / 2): row i scaled by 1/half_i, column j by half_j
    linear = th[:, :, :3] * half.view(1, 1, 3) / half.view(1, 3, 1)
    shift = 2 * th[:, :, 3:]  # t * N in voxels / (N / 2)
    norm = torch.cat([linear, shift], dim=-1)
    # affine_grid's coordinate order is (x, y, z) = (W, H, D): reverse rows and spatial columns
    rev = [2, 1, 0]
    norm = norm[:, rev][:, :, [2, 1, 0, 3]]
    return norm.to(torch.float32)


def affine_grid_3d(theta: torch.Tensor, spatial_shape: tuple[int, int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, D, H, W), align_corners=False)``, built from three broadcast terms.

    The grid of an affine map is separable, ``grid[b, d, h, w] = A_b[:, 0] x_w + A_b[:, 1] y_h +
    A_b[:, 2] z_d + t_b``, so summing a ``(B, 1, H, W, 3)`` plane and a ``(B, D, 1, 1, 3)`` column writes
    the ``(B, D, H, W, 3)`` grid in one pass. ``F.affine_grid`` multiplies a ``(B, D*H*W, 4)`` base grid
    by ``theta`` instead (a batched matmul with an inner size of 4), which on the CPU took longer than
    the ``grid_sample`` it feeds (3-4x slower than this at 96^3, see ``benchmarks/RESULTS.md``).

    Args:
        theta: ``(B, 3, 4)`` normalised matrices, as :func:`normalized_theta` returns.
        spatial_shape: ``(D, H, W)`` of the output.

    Returns:
        ``(B, D, H, W, 3)`` sampling grid in ``theta``'s dtype and device.
    """
    d, h, w = spatial_shape
    u, v, z = (_centres(n, theta.dtype, theta.device) for n in (w, h, d))
    cols = theta.transpose(1, 2)[:, None, None, None]  # (B, 1, 1, 1, 4, 3): row j = column j of theta
    plane = u.view(1, 1, 1, w, 1) * cols[..., 0, :] + v.view(1, 1, h, 1, 1) * cols[..., 1, :]
    column = z.view(1, d, 1, 1, 1) * cols[..., 2, :] + cols[..., 3, :]
    return plane + column


def apply_affine(
    x: torch.Tensor,
    theta: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "min",
    resampler: str = "auto",
) -> torch.Tensor:
    """Resample a batch with the pull-back ``theta`` (trilinear by default), on ``x``'s device.

    The grid and the sampling run in float32 whatever the dtype of ``x``; the result is cast back.

    Args:
        x: ``(B, C, D, H, W)`` volumes, any float dtype, any device.
        theta: ``(B, 3, 4)`` pull-back matrices in the module's convention.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"min"`` fills outside the input with each (sample, channel)'s minimum;
            ``"zeros"``, ``"border"`` and ``"reflection"`` are ``grid_sample``'s own.
        resampler: ``"auto"``, ``"grid"`` or ``"two_pass"`` (see the module docstring).

    Returns:
        ``(B, C, D, H, W)`` tensor, same dtype and device as ``x``.

    Example:
        >>> x = torch.rand(1, 1, 8, 8, 8)
        >>> torch.allclose(apply_affine(x, identity_affine(1)), x, atol=1e-5)
        True
    """
    if x.ndim != 5:
        raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    if theta.shape != (x.shape[0], 3, 4):
        raise ValueError(f"theta must be ({x.shape[0]}, 3, 4), got {tuple(theta.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"padding_mode must be one of {_PADDINGS}, got {padding_mode!r}")
    if resampler not in _RESAMPLERS:
        raise ValueError(f"resampler must be one of {_RESAMPLERS}, got {resampler!r}")
    xf = x.float()
    grid_theta = normalized_theta(theta.to(x.device), tuple(x.shape[2:]))
    if resampler == "auto":
        on_cpu, voxels = x.device.type == "cpu", math.prod(x.shape[2:])
        resampler = "two_pass" if on_cpu and voxels >= _TWO_PASS_MIN_VOXELS else "grid"
    if resampler == "two_pass" and mode == "bilinear" and padding_mode in ("min", "zeros"):
        return _two_pass(xf, grid_theta, padding_mode).to(x.dtype)
    # On the CPU, resample a few volumes at a time. ``grid_sample``'s 3D CPU kernel runs one volume per
    # thread, so chunks of ``num_threads`` volumes keep every core busy, and the per-chunk grid (10 MB per
    # volume at 96^3) stays small enough for malloc to reuse its memory; a whole-batch grid is a fresh
    # mapping every call and page-faulting it in cost as much as building it. A GPU takes the batch at once.
    step = max(1, torch.get_num_threads()) if x.device.type == "cpu" else x.shape[0]
    if step >= x.shape[0]:
        return _resample(xf, grid_theta, mode, padding_mode).to(x.dtype)
    out = torch.empty_like(xf)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = _resample(xf[i : i + step], grid_theta[i : i + step], mode, padding_mode)
    return out.to(x.dtype)


def _two_pass(xf: torch.Tensor, grid_theta: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Trilinear pull-back as a pass along D, then a pass in (H, W) planes (module docstring).

    ``grid_theta``: the normalised matrices of :func:`normalized_theta`, axes (x, y, z) = (W, H, D).
    """
    b, _, d, h, w = xf.shape
    th = grid_theta.double().cpu()
    a, bb, c = th[:, 0, 0], th[:, 0, 1], th[:, 0, 2]
    dd, e, f = th[:, 1, 0], th[:, 1, 1], th[:, 1, 2]
    det2 = a * e - bb * dd
    # C's z row (g, hh, ii): [a d; b e] @ (g, hh) = A[2, :2], then ii from A[2, 2] = g c + hh f + ii
    g = (e * th[:, 2, 0] - dd * th[:, 2, 1]) / det2
    hh = (a * th[:, 2, 1] - bb * th[:, 2, 0]) / det2
    ii = th[:, 2, 2] - g * c - hh * f
    tx, ty = th[:, 0, 3], th[:, 1, 3]
    tz = th[:, 2, 3] - g * tx - hh * ty  # B moves (x, y) by (tx, ty); C's shift makes up the rest of z
    # a factorisation far from the identity would stretch one pass's sampling: those take the 3D path
    good = (det2 > 0.25) & (ii > 0.25)
    low = xf.amin(dim=(2, 3, 4), keepdim=True) if padding_mode == "min" else None
    src = xf - low if low is not None else xf
    out = torch.empty_like(xf)
    zc, yc = _centres(d), _centres(h)
    for k in range(b):
        if not good[k]:
            out[k : k + 1] = _resample(src[k : k + 1], grid_theta[k : k + 1], "bilinear", "zeros")
            continue
        # pass 1, planes (D, W) for each H row y: source (x, z) = (x, g x + ii z + hh y + tz)
        planes = src[k].permute(2, 0, 1, 3)  # (H, C, D, W), a view
        grid = _plane_grid((1.0, 0.0, g[k], ii[k]), torch.zeros(h, dtype=torch.float64), hh[k] * yc + tz[k], d, w)
        tmp = F.grid_sample(planes, grid.to(xf.device), padding_mode="zeros", align_corners=False)
        # pass 2, planes (H, W) for each D slice z: source (x, y) = (a x + b y + c z + tx, d x + e y + f z + ty)
        planes = tmp.permute(2, 1, 0, 3)  # (D, C, H, W), a view
        grid = _plane_grid((a[k], bb[k], dd[k], e[k]), c[k] * zc + tx[k], f[k] * zc + ty[k], h, w)
        out[k] = F.grid_sample(planes, grid.to(xf.device), padding_mode="zeros", align_corners=False).transpose(0, 1)
    return out.add_(low) if low is not None else out


def _centres(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Normalised voxel centres for ``align_corners=False``: ``(2i + 1) / n - 1``."""
    return (torch.arange(n, dtype=dtype, device=device) * 2 + 1) / n - 1


def _plane_grid(m, off_x: torch.Tensor, off_y: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(P, rows, cols, 2)`` float32 grid ``(m00 u + m01 v + off_x[p], m10 u + m11 v + off_y[p])``.

    ``u`` runs along the columns, ``v`` along the rows, ``m = (m00, m01, m10, m11)``. The per-plane
    offsets are tiled along a row first, so the final add broadcasts over rows of ``2 * cols``
    contiguous floats (an add whose innermost dimension is the pair of coordinates ran 10x slower).
    """
    m00, m01, m10, m11 = (float(v) for v in m)
    u, v = _centres(cols).view(1, cols, 1), _centres(rows).view(rows, 1, 1)
    plane = (u * torch.tensor([m00, m10], dtype=torch.float64) + v * torch.tensor([m01, m11], dtype=torch.float64))
    off = torch.stack([off_x, off_y], dim=-1).view(-1, 1, 1, 2).expand(-1, 1, cols, 2)
    n = off.shape[0]
    return (plane.float().reshape(1, rows, cols * 2) + off.float().reshape(n, 1, cols * 2)).view(n, rows, cols, 2)


def _resample(xf: torch.Tensor, grid_theta: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """One ``grid_sample`` of float32 volumes ``xf`` with normalised matrices ``grid_theta``."""
    grid = affine_grid_3d(grid_theta, tuple(xf.shape[2:]))
    if padding_mode != "min":
        return F.grid_sample(xf, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    # shift so the minimum is 0, pad with zeros, shift back: the fill is the minimum
    low = xf.amin(dim=(2, 3, 4), keepdim=True)
    out = F.grid_sample(xf - low, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.add_(low)  # in place: one volume-sized temporary fewer


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("generator must live on the CPU (parameters are drawn there and moved to x.device)")
