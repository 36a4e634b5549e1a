"""``medvox explain``: where a model looked, as a map in the input image's own space.

* CNNs and Swin (anything with a spatial ``cam_target_layer``): 3D Grad-CAM (Selvaraju et al. 2017) with
  ``monai.visualize.GradCAM`` on that layer, for the predicted (or a chosen) class, upsampled to the
  preprocessed volume and scaled to ``[0, 1]`` by its maximum.
* Attention MIL: the model's attention weights, each instance's weight painted on the voxels it covers
  (a slice, a 2.5D slab, a 3D patch; a slice covered by overlapping slabs gets their mean weight). The
  attention does not depend on a class.

With a run folder, the fold models' maps are averaged (the ensemble that ``medvox predict`` uses), and the
predicted class is :class:`~medvox.inference.predictor.Predictor`'s, as ``medvox predict`` gives it.

Each map is computed on the preprocessed volume (the plan's spacing and shape) and taken back to the input
grid by undoing the two geometric steps of preprocessing: the centre crop/pad (voxels the model never saw,
cropped away, get 0) and the resampling (linear interpolation on the same voxel-centre-preserving grid as
``scipy.ndimage.zoom(grid_mode=True)``). The RAS reorientation is undone exactly, so
``<case>_cam.nii.gz`` has the shape and affine of the input NIfTI and overlays it in any viewer. The map is
smooth at the resolution of the target layer (e.g. 1/32 of the input for a strided ResNet): sub-voxel
agreement is not meaningful, and intensity normalisation plays no part in the geometry.

Example:
    >>> results = explain(Path("results/resnet50"), [Path("ct_001.nii.gz")], Path("cams"))
    >>> results[0]["cam_nifti"], results[0]["cam_png"]
    ('cams/ct_001_cam.nii.gz', 'cams/ct_001_cam.png')
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from medvox.data import io as image_io
from medvox.data.preprocess import read_case
from medvox.data.sources import cases_from_paths
from medvox.inference.predictor import Predictor
from medvox.run import require_output_folder, write_json

APPROXIMATION = ("map computed on the preprocessed volume; crop/pad undone (cropped-away voxels = 0), "
                 "resampling undone by linear interpolation, orientation restored exactly")


def explain(checkpoint_or_run: Path, inputs: list[Path | str], out_dir: Path, *, fold: int | None = None,
            target_class: int | str | None = None, tta: bool = False, layer: str | None = None,
            allow_missing: bool = False) -> list[dict[str, Any]]:
    """Write ``<case>_cam.nii.gz`` and ``<case>_cam.png`` for every input; also ``explain.json``.

    Args:
        checkpoint_or_run: a checkpoint ``.pt`` (decided by the argmax), a fold folder, or a run folder (fold
            ensemble); read by :meth:`~medvox.inference.predictor.Predictor.from_run`.
        inputs: NIfTI / DICOM series folders / ``.npy`` files, or folders of them.
        out_dir: output folder (created; checked before any model is loaded: not a file, writable).
        fold: with a run folder, use only ``fold_<fold>``.
        target_class: class index or name for Grad-CAM (default: the predicted class, decided as `medvox
            predict` decides: the run's threshold or class weights, with its descriptor model when fused).
        tta: the probabilities (and so the predicted class) with test-time augmentation, as `medvox predict
            --tta` gives them; the map itself is always computed on the volume as it is.
        layer: the module Grad-CAM reads (default: :func:`cam_layer` picks the model's last one whose feature
            map is at least ``MIN_CAM_GRID`` voxels along every axis at this input size).
        allow_missing: explain with the fold models that are there when a fold's final checkpoint is missing
            (deciding by the argmax, with a warning); otherwise such a run is refused.

    Returns:
        One dict per input: ``case_id``, ``source``, ``method`` (``"gradcam"``/``"attention"``),
        ``target_class``, ``predicted``, ``decision`` (:meth:`~medvox.metrics.decision.Decision.to_json`),
        ``probabilities`` (the run's final ones), ``tta``, ``cam_nifti``, ``cam_png``, ``peak_voxel`` (index into the
        NIfTI's data array), ``peak_world_mm`` (RAS), ``attention`` (MIL: the instance weights, mean over
        members), ``cam_layer`` and ``cam_resolution`` (Grad-CAM: the layer read and its spatial size), ``note`` (why another
        layer than the model's last was read), ``warning`` (e.g. a
        1 x 1 x 1 feature map that cannot localise), ``approximation``, and for ``.npy`` inputs ``cam_npy``
        (the map in the input array's own ``(D, H, W)`` order; the NIfTI holds it as ``(W, H, D)``).

    Raises:
        DataError: ``out_dir`` is a file or cannot be written.
        RunError: the run is not a finished run / fold, or a fold's final checkpoint is missing (unless
            ``allow_missing``).
    """
    out_dir = require_output_folder(out_dir, "--out")  # before any model is loaded
    predictor = Predictor.from_run(Path(checkpoint_or_run), fold=fold, tta=tta, allow_missing=allow_missing)
    cases = cases_from_paths([str(p) for p in inputs])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [_explain_case(predictor, case, out_dir, target_class, layer) for case in cases]
    write_json(out_dir / "explain.json", results)
    return results


def _explain_case(predictor: Predictor, case, out_dir: Path, target_class: int | str | None,
                  layer: str | None = None) -> dict[str, Any]:
    members, plan, classes = predictor.models, predictor.plan, predictor.classes
    array, meta = read_case(case)
    spacing = meta.get("spacing", [1.0, 1.0, 1.0])
    x, features = predictor.preprocess(array, meta)
    explained = explain_preprocessed(predictor, x, target_class, layer, features)
    probs = explained["prediction"].probs[0]  # the run's final probabilities, as `medvox predict` gives them
    prediction, predicted, target = explained["prediction"], explained["predicted"], explained["target"]
    method = explained["method"]
    original = to_input_grid(explained["map"], array.shape[-3:], spacing, plan)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case.id).strip("._") or "case"
    nifti, peak, world = _save_nifti(original, case, meta, out_dir / f"{name}_cam.nii.gz")
    extra = {}
    if case.images and image_io.suffix_of(case.images[0]) == ".npy":  # also in the input's own array order
        extra["cam_npy"] = str(out_dir / f"{name}_cam.npy")
        np.save(extra["cam_npy"], original)
    title = (f"{case.id}: {method}" + (f" for class {classes[target]}" if method == "gradcam" else "") +
             f" (p = {probs[target]:.3f})")
    png = save_overlay(array[0] if array.ndim == 4 else array, original, spacing, title, out_dir / f"{name}_cam.png",
                       value_range=explained["value_range"])
    return {"case_id": case.id, "source": case.file, "method": method,
            "target_class": classes[target] if method == "gradcam" else None,
            "predicted": classes[predicted], "decision": prediction.decision.to_json(),
            "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)}, "tta": predictor.tta,
            "cam_nifti": str(nifti), "cam_png": str(png), "peak_voxel": peak, "peak_world_mm": world,
            "attention": explained["attention"], "cam_layer": explained["cam_layer"],
            "cam_resolution": explained["cam_resolution"],
            "note": explained["note"], "warning": explained["warning"], "members": [str(m.path) for m in members],
            "all_members_present": predictor.complete, "approximation": APPROXIMATION, **extra}


def explain_preprocessed(predictor: Predictor, x: np.ndarray, target_class: int | str | None = None,
                         layer: str | None = None, features: np.ndarray | None = None) -> dict[str, Any]:
    """The map of one volume already on the predictor's grid (:meth:`Predictor.preprocess`), the code path of
    :func:`explain` and of the report's gallery.

    Args:
        predictor: the fold ensemble, or one fold (``Predictor.from_run(run, fold=k)``).
        x: ``(C, D, H, W)`` float32 on ``predictor.plan``'s grid.
        target_class: class index or name for Grad-CAM (default: the predicted class, at the predictor's
            decision).
        layer: the module Grad-CAM reads (default: :func:`cam_layer`).
        features: ``x`` on the descriptor model's grid where the run's fusion has its own.

    Returns:
        ``map`` (``(D, H, W)`` on the preprocessed grid, the members' mean, each scaled to max 1), ``method``
        (``"gradcam"`` / ``"attention"``), ``attention``, ``value_range`` (the colours' span for an overlay: the
        attention weights' own, else None), ``cam_layer``, ``cam_resolution``, ``note``, ``warning``,
        ``prediction`` (the predictor's :class:`~medvox.inference.predictor.Prediction` of the case),
        ``predicted`` and ``target`` (class indices).
    """
    prediction = predictor.predict_preprocessed(x[None], None if features is None else features[None])
    predicted = predictor.classes.index(prediction.label)
    target = _class_index(target_class, predictor.classes, predicted)
    explained = _ensemble_map(predictor.models, torch.from_numpy(np.ascontiguousarray(x, np.float32))[None], target,
                              layer)
    return {**explained, "value_range": _attention_range(explained["attention"]), "prediction": prediction,
            "predicted": predicted, "target": target}


def _attention_range(attention: list[float] | None) -> tuple[float, float] | None:
    return (float(min(attention)), float(max(attention))) if attention else None


def _class_index(target: int | str | None, classes: list[str], predicted: int) -> int:
    if target is None:
        return predicted
    if isinstance(target, str) and target in classes:
        return classes.index(target)
    if isinstance(target, str) and target.isdigit():  # an index given on the command line
        target = int(target)
    if isinstance(target, int) and 0 <= target < len(classes):
        return target
    raise ValueError(f"unknown target class {target!r}; the model's classes are {classes}")


def _ensemble_map(members, x: torch.Tensor, target: int, layer: str | None = None) -> dict[str, Any]:
    """Mean over members of Grad-CAM (each scaled to max 1, at :func:`cam_layer` unless ``layer``) or of the
    MIL attention maps."""
    maps, attentions, grids = [], [], []
    chosen, note = None, None
    for m in members:
        if hasattr(m.model, "last_attention"):
            cam, att = attention_map(m.model, x)
            attentions.append(att)
        else:
            if chosen is None:
                chosen, note = (layer, None) if layer else cam_layer(m.model, x)
            cam, grid = gradcam_map(m.model, x, target, chosen)
            grids.append(grid)
        maps.append(cam)
    out = {"map": np.mean(maps, axis=0), "method": "attention" if attentions else "gradcam",
           "attention": np.mean(attentions, axis=0).tolist() if attentions else None,
           "cam_layer": chosen, "cam_resolution": grids[0] if grids else None, "note": note, "warning": None}
    if grids and int(np.prod(grids[0])) == 1:
        out["warning"] = (f"{chosen}'s feature map is 1 x 1 x 1 for a {tuple(x.shape[2:])} input: the Grad-CAM is "
                          "flat and cannot localise (use a larger target shape, variant='faithful', or --layer)")
    return out


MIN_CAM_GRID = 4  # voxels along every axis for a Grad-CAM that can point somewhere


def cam_layer(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, str | None]:
    """The layer Grad-CAM reads for input ``x``: the model's ``cam_target_layer`` (its last feature map) when
    that map has at least ``MIN_CAM_GRID`` voxels along every axis, else the first of ``cam_fallback_layers``
    (shallower, finer, e.g. a ResNet's layer3 then layer2) that has, else the finest of them. A small input
    (the CPU recipe's 28^3, the demo's 32^3) leaves a ResNet's layer4 at 1 x 1 x 1: a map that cannot localise.

    Returns:
        ``(layer name, note saying why another layer was read, or None)``.
    """
    candidates = [model.cam_target_layer, *getattr(model, "cam_fallback_layers", ())]
    if len(candidates) == 1:
        return candidates[0], None
    shapes: dict[str, list[int]] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, [int(n) for n in out.shape[2:]]))
        for name in candidates]
    try:
        with torch.no_grad():
            model.eval()(x.float())
    finally:
        for h in hooks:
            h.remove()
    chosen = next((n for n in candidates if min(shapes[n]) >= MIN_CAM_GRID), candidates[-1])
    if chosen == candidates[0]:
        return chosen, None
    grid = " x ".join(map(str, shapes[candidates[0]]))
    return chosen, (f"{candidates[0]}'s feature map is {grid} for a {tuple(x.shape[2:])} input: Grad-CAM read at "
                    f"{chosen} ({' x '.join(map(str, shapes[chosen]))}), finer but less class-specific")


def gradcam_map(model: torch.nn.Module, x: torch.Tensor, class_idx: int,
                layer: str | None = None) -> tuple[np.ndarray, list[int]]:
    """3D Grad-CAM of one preprocessed volume ``x (1, C, D, H, W)`` at ``layer`` (default: the model's
    ``cam_target_layer``).

    Returns:
        ``(map (D, H, W) in [0, 1], spatial shape of the target layer's feature map)``.
    """
    from monai.visualize import GradCAM

    layer = layer or model.cam_target_layer
    # a copy: MONAI leaves hooks on the module and turns in-place ops of the target layer off
    model = copy.deepcopy(model).eval()
    # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map: scale by the max instead
    cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=lambda t: t)
    with torch.enable_grad():
        # an input that requires grad lets the full backward hook fire the usual way (no warning)
        out = cam(x.detach().float().requires_grad_(True), class_idx=class_idx)
    grid = [int(n) for n in cam.nn_module.activations[layer].shape[2:]]
    out = out[0, 0].detach().cpu().numpy().astype(np.float32)
    peak = float(out.max())
    return (out / peak if peak > 0 else out), grid


def attention_map(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """MIL attention of ``x (1, C, D, H, W)`` painted on the voxels: ``(map (D, H, W), weights (N,))``."""
    with torch.no_grad():
        _, attention = model(x.float(), return_attention=True)
    att = attention[0].double().cpu().numpy()
    return instance_map(model, att, tuple(x.shape[2:])), att.tolist()


def instance_map(model, attention: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Each instance's weight on the voxels it covers (see the module docstring)."""
    d, h, w = shape
    if model.instance == "slice":
        return np.broadcast_to(attention[:, None, None], shape).astype(np.float32)
    if model.instance == "slab":
        k, s = model.slab_size, model.slab_stride
        total, count = np.zeros(max(d, k)), np.zeros(max(d, k))
        for i, a in enumerate(attention):
            total[i * s:i * s + k] += a
            count[i * s:i * s + k] += 1
        per_slice = np.divide(total, count, out=np.zeros_like(total), where=count > 0)[:d]
        return np.broadcast_to(per_slice[:, None, None], shape).astype(np.float32)
    grid = [-(-n // p) for n, p in zip(shape, model.patch_size, strict=True)]  # ceil: the far end is padded
    blocks = attention.reshape(grid)
    for axis, p in enumerate(model.patch_size):
        blocks = np.repeat(blocks, p, axis=axis)
    return np.ascontiguousarray(blocks[:d, :h, :w]).astype(np.float32)


def to_input_grid(volume: np.ndarray, in_shape, spacing, plan: dict[str, Any]) -> np.ndarray:
    """Take a ``(D, H, W)`` map on the preprocessed grid back to the input's (RAS array) grid.

    Undoes ``preprocess_volume``'s crop/pad, then its resampling (same grid convention).
    """
    in_shape = tuple(int(n) for n in in_shape)
    factors = np.asarray(spacing, float) / np.asarray(plan["target_spacing"], float)
    resampled = np.allclose(factors, 1.0, rtol=1e-3)
    # the shape scipy.ndimage.zoom produced (its own rounding rule)
    zoomed = in_shape if resampled else tuple(int(round(n * f)) for n, f in zip(in_shape, factors, strict=True))
    out = _uncrop(np.asarray(volume, np.float32), zoomed)
    if zoomed == in_shape:
        return out
    ratio = np.asarray(zoomed, float) / np.asarray(in_shape, float)
    # grid_mode: voxel j of the input grid is centred at (j + 0.5) * ratio - 0.5 on the zoomed grid
    return ndimage.affine_transform(out, ratio, offset=0.5 * ratio - 0.5, output_shape=in_shape, order=1,
                                    mode="nearest").astype(np.float32)


def _uncrop(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``crop_or_pad`` (centre, odd remainder at the end): re-pad what was cropped (with 0)."""
    for axis, size in enumerate(shape):
        have = x.shape[axis]
        if size > have:  # the forward pass cropped
            widths = [(0, 0)] * x.ndim
            start = (size - have) // 2
            widths[axis] = (start, size - have - start)
            x = np.pad(x, widths)
        elif size < have:  # the forward pass padded
            before = (have - size) // 2
            x = np.take(x, range(before, before + size), axis=axis)
    return x


_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # (d,h,w) <-> (i,j,k)


def _save_nifti(cam: np.ndarray, case, meta: dict[str, Any], path: Path) -> tuple[Path, list[int], list[float]]:
    """Save the RAS-array map in the input file's own voxel order and affine (NIfTI), else in RAS."""
    canon_affine = np.asarray(meta["affine"], float) @ _SWAP
    data, affine = np.ascontiguousarray(cam.T), canon_affine  # (D, H, W) -> (i, j, k)
    first = Path(case.images[0]) if case.images else None
    if first is not None and image_io.suffix_of(first) in image_io.NIFTI_SUFFIXES:
        original = nib.load(str(first))
        transform = nib.orientations.ornt_transform(nib.io_orientation(canon_affine), nib.io_orientation(original.affine))
        data = nib.orientations.apply_orientation(data, transform)
        affine = original.affine
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    peak = peak_index(data)
    world = (affine @ np.array([*peak, 1.0]))[:3].round(3).tolist()
    return path, peak, world


def peak_index(volume: np.ndarray) -> list[int]:
    """The voxel of the maximum; with ties (a flat map), the centre of the tied voxels, if it is one of them."""
    top = volume >= volume.max() - 1e-6 * max(abs(float(volume.max())), 1e-12)
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(top))
    if top[centre]:
        return list(centre)
    return [int(v) for v in np.unravel_index(int(np.argmax(volume)), volume.shape)]


def save_overlay(image: np.ndarray, cam: np.ndarray, spacing, title: str, path: Path,
                 value_range: tuple[float, float] | None = None) -> Path:
    """Three orthogonal slices through the map's maximum: the image in grey, the map overlaid.

    Args:
        image: ``(D, H, W)`` RAS array (D inferior->superior, H posterior->anterior, W left->right).
        cam: the map on the same grid.
        spacing: ``(sD, sH, sW)`` mm, for the aspect ratios.
        title: figure title.
        path: PNG to write.
        value_range: the map values the colours span (default ``(0, max)``); attention weights, all
            positive and close together, use their own ``(min, max)``.
    """
    from matplotlib.figure import Figure

    from medvox.plots import draw_slice, intensity_window, orthogonal_slices

    peak = peak_index(cam)
    window = intensity_window(image)
    vmin, vmax = value_range if value_range is not None else (0.0, float(cam.max()))
    if vmax - vmin <= 1e-6 * max(vmax, 1e-12):
        title += " [uniform map]"
        vmin = 0.0
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    views = zip(orthogonal_slices(image, peak, spacing), orthogonal_slices(cam, peak, spacing), strict=True)
    for ax, ((name, img, aspect, letters), (_, heat, _, _)) in zip(fig.subplots(1, 3), views, strict=True):
        draw_slice(ax, img, aspect, letters, window)
        shown = ax.imshow(np.ma.masked_less_equal(heat, vmin + 0.05 * (vmax - vmin)), cmap="jet", alpha=0.4,
                          vmin=vmin, vmax=vmax, origin="lower", aspect=aspect)
        ax.set_title(name, fontsize=10)
    fig.colorbar(shown, ax=fig.axes, fraction=0.02, pad=0.01)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=90, facecolor="white")
    fig.clear()
    return path
