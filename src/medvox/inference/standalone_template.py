"""Predict with a medvox export without medvox: NumPy, nibabel and PyTorch only.

``medvox export`` copies this file into the export folder as ``predict.py`` (and into the MONAI Bundle as
``scripts/medvox_predict.py``). Every number it uses (the plan's spacing, shape and normalisation, the
classes, the decision) is read from ``export.json``; the model is ``model.torchscript.pt``, which already
averages the fold models at their temperatures. The preprocessing is medvox's (``medvox.data.io`` and
``medvox.data.preprocess``), written again with NumPy so that it runs without SciPy:

* the NIfTI voxels as float32 with the file's scaling, reoriented to the closest canonical RAS orientation
  (nibabel's ``io_orientation`` / ``apply_orientation``) and held as ``([C,] D, H, W)`` = ``(z, y, x)``,
  the voxel size being the float32 column norms of the reoriented affine;
* resampled to the plan's spacing as ``scipy.ndimage.zoom(order=1, mode="nearest", grid_mode=True)`` does
  (voxel centres and field of view kept), after a Gaussian of sigma ``(1/f - 1) / 2`` along each axis made
  coarser when the plan says ``antialias`` (``scipy.ndimage.gaussian_filter``, truncated at 4 sigma, edges
  repeated);
* normalised per channel (ct | zscore | minmax | none), then centre cropped / padded with the channel's
  minimum (an odd remainder at the end).

Usage::

    python predict.py scan_a.nii.gz scan_b.nii.gz        # one line of JSON per image
    python predict.py t1.nii.gz+t2.nii.gz                # one case from one file per channel

From Python (``sys.path`` holding the export folder)::

    from predict import Exported
    result = Exported("exported/").predict_file("scan_a.nii.gz")
    result["probabilities"], result["label"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


# -- reading -------------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> tuple[np.ndarray, list[float]]:
    """A NIfTI file (or a ``.npy`` array, taken as ``([C,] D, H, W)`` at 1 mm) as ``([C,] D, H, W)`` float32 in
    RAS array order, and its voxel size in that axis order (mm)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.ascontiguousarray(np.load(path, allow_pickle=False), dtype=np.float32), [1.0, 1.0, 1.0]
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ValueError(f"{path}: a {data.ndim}D image of shape {data.shape}; give a 3D volume (or 4D with channels)")
    affine = np.asarray(img.affine, dtype=float)
    ornt = nib.orientations.io_orientation(affine)
    if not np.array_equal(ornt, _RAS):
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3])
        data = nib.orientations.apply_orientation(data, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).astype(np.float32)
    data = data.T if data.ndim == 3 else np.transpose(data, (3, 2, 1, 0))
    return np.ascontiguousarray(data, dtype=np.float32), [float(z) for z in zooms][::-1]


def read_case(paths: str | Path | list) -> tuple[np.ndarray, list[float]]:
    """One case from one file, or from one file per channel (the first file's voxel size): ``(C, D, H, W)``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    arrays, spacing = [], None
    for p in paths:
        array, sp = read_image(p)
        arrays.append(array[None] if array.ndim == 3 else array)
        spacing = spacing or sp
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0], spacing


# -- preprocessing -------------------------------------------------------------------------------------------
def preprocess(array: np.ndarray, spacing: list[float], plan: dict) -> np.ndarray:
    """``(D, H, W)`` / ``(C, D, H, W)`` RAS float32 with its voxel size -> ``(C, *plan["target_shape"])``."""
    x = np.asarray(array, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    norms = plan["normalization"]
    if len(norms) != x.shape[0]:
        raise ValueError(f"the model takes {len(norms)} channel(s), the image has {x.shape[0]}: give one file per "
                         "channel joined by '+', or a 4D file")
    factors = np.asarray(spacing, float) / np.asarray(plan["target_spacing"], float)
    out = []
    for channel, norm in zip(x, norms, strict=True):
        channel = resample(channel, factors, antialias=bool(plan.get("antialias", False)))
        channel = normalize(channel, norm)
        out.append(crop_or_pad(channel, plan["target_shape"], float(channel.min())))
    return np.stack(out).astype(np.float32, copy=False)


def resample(x: np.ndarray, factors: np.ndarray, antialias: bool = True) -> np.ndarray:
    """One channel ``(D, H, W)`` zoomed by ``factors`` (output / input voxels per axis), linear, voxel centres
    kept; ``antialias``: axes with a factor below 1 are Gaussian-filtered first."""
    factors = np.asarray(factors, dtype=float)
    if np.allclose(factors, 1.0, rtol=1e-3):
        return x
    if antialias:
        sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
        for axis, s in enumerate(sigma):
            if s > 1e-15:
                x = _gaussian_along(x, float(s), axis)
    x = x.astype(np.float64)  # scipy interpolates all axes at once in double precision, then rounds once
    for axis, f in enumerate(factors):
        x = _zoom_along(x, f, axis)
    return x.astype(np.float32)


def _gaussian_along(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(x, sigma, axis, mode="nearest")``, float32 out."""
    radius = int(_TRUNCATE * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * t.astype(float) ** 2)
    w /= w.sum()
    widths = [(0, 0)] * x.ndim
    widths[axis] = (radius, radius)
    padded = np.pad(x.astype(np.float64), widths, mode="edge")
    n = x.shape[axis]
    acc = np.zeros(x.shape, np.float64)
    for k, wk in enumerate(w):
        acc += wk * np.take(padded, range(k, k + n), axis=axis)
    return acc.astype(np.float32)


def _zoom_along(x: np.ndarray, factor: float, axis: int) -> np.ndarray:
    """Linear resampling (float64) of one axis as ``scipy.ndimage.zoom(order=1, mode="nearest", grid_mode=True)``: the
    output has ``round(n * factor)`` voxels, output centre ``o`` samples input position ``(o + 0.5) n / m - 0.5``."""
    n = x.shape[axis]
    m = int(round(n * np.float64(factor)))
    if m == n:
        return x
    step = n / m if m else 1.0
    pos = (np.arange(m) + 0.5) * step - 0.5
    lo = np.floor(pos)
    frac = pos - lo
    i0 = np.clip(lo.astype(np.int64), 0, n - 1)
    i1 = np.clip(lo.astype(np.int64) + 1, 0, n - 1)
    shape = [1] * x.ndim
    shape[axis] = m
    frac = frac.reshape(shape)
    return np.take(x, i0, axis=axis) * (1.0 - frac) + np.take(x, i1, axis=axis) * frac


def normalize(x: np.ndarray, norm: dict) -> np.ndarray:
    """One channel ``(D, H, W)`` by the plan's scheme: ct | zscore | minmax | none."""
    scheme = norm["scheme"]
    if scheme == "ct":
        lo, hi = norm["clip"]
        return ((np.clip(x, lo, hi) - norm["mean"]) / norm["std"]).astype(np.float32)
    if scheme == "zscore":
        lo, hi = np.percentile(x, norm.get("clip_percentiles", [0.5, 99.5]))
        x = np.clip(x, lo, hi)
        return ((x - x.mean()) / max(float(x.std()), 1e-8)).astype(np.float32)
    if scheme == "minmax":
        return ((x - norm["min"]) / (norm["max"] - norm["min"])).astype(np.float32)
    if scheme == "none":
        return x.astype(np.float32, copy=False)
    raise ValueError(f"unknown normalization scheme {scheme!r}")


def crop_or_pad(x: np.ndarray, shape: list, value: float) -> np.ndarray:
    """Centre crop / pad ``(D, H, W)`` to ``shape`` (an odd remainder goes to the end)."""
    for axis, size in enumerate(shape):
        have = x.shape[axis]
        if have > size:
            start = (have - size) // 2
            x = np.take(x, range(start, start + size), axis=axis)
        elif have < size:
            before = (size - have) // 2
            widths = [(0, 0)] * x.ndim
            widths[axis] = (before, size - have - before)
            x = np.pad(x, widths, constant_values=value)
    return x


# -- the decision --------------------------------------------------------------------------------------------
def decide(probs: np.ndarray, decision: dict) -> np.ndarray:
    """Class indices ``(N,)`` for probabilities ``(N, K)`` by ``export.json``'s decision: ``p1 >= threshold``,
    the largest ``weight * probability``, or the argmax."""
    p = np.asarray(probs, dtype=np.float64)
    if decision.get("class_weights"):
        return (p * np.asarray(decision["class_weights"], dtype=np.float64)).argmax(axis=1)
    if decision.get("threshold") is not None:
        return (p[:, 1] >= float(decision["threshold"])).astype(np.int64)
    return p.argmax(axis=1)


# -- prediction ----------------------------------------------------------------------------------------------
def load_export(folder: str | Path = HERE) -> dict:
    return json.loads((Path(folder) / "export.json").read_text(encoding="utf-8"))


def results_of(probs: np.ndarray, export: dict, names: list) -> list[dict]:
    """One record per case: ``file``, ``probabilities`` (by class), ``label`` (the decision's)."""
    picked = decide(probs, export["decision"])
    classes = export["classes"]
    return [{"file": str(name), "probabilities": {c: float(v) for c, v in zip(classes, row, strict=True)},
             "label": classes[int(k)]} for name, row, k in zip(names, probs, picked, strict=True)]


class Exported:
    """The export in ``folder``: ``export.json`` and ``model.torchscript.pt``."""

    def __init__(self, folder: str | Path = HERE, device: str = "cpu"):
        import torch

        self.folder = Path(folder)
        self.export = load_export(self.folder)
        self.device = torch.device(device)
        model = self.folder / self.export["files"]["torchscript"]
        self.model = torch.jit.load(str(model), map_location=self.device).eval()

    def probabilities(self, volumes: np.ndarray) -> np.ndarray:
        """``(N, C, D, H, W)`` preprocessed -> ``(N, K)``."""
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(volumes)).to(self.device)).cpu().numpy()

    def predict_file(self, paths: str | Path | list) -> dict:
        """One case (a file, or one file per channel): its record (see :func:`results_of`)."""
        array, spacing = read_case(paths)
        x = preprocess(array, spacing, self.export["preprocessing"])
        name = paths if isinstance(paths, (str, Path)) else "+".join(map(str, paths))
        return results_of(self.probabilities(x[None]), self.export, [name])[0]


# -- the MONAI Bundle's pieces (configs/inference.json names them) -------------------------------------------
class LoadAndPreprocessd:
    """A dictionary transform for a MONAI ``Dataset``: ``{"image": path or [paths]}`` -> the preprocessed
    ``(C, D, H, W)`` float32 array under ``"image"``, the input's name under ``"file"``."""

    def __init__(self, plan: dict, keys: str = "image"):
        self.plan, self.key = plan, keys

    def __call__(self, item: dict) -> dict:
        paths = item[self.key]
        array, spacing = read_case(str(paths).split("+") if isinstance(paths, str) else paths)
        name = paths if isinstance(paths, str) else "+".join(map(str, paths))
        return {**item, self.key: preprocess(array, spacing, self.plan), "file": name}


def run_bundle(network, dataloader, export: dict, output_dir: str | Path, device=None) -> list[dict]:
    """Predict every batch of ``dataloader`` with ``network`` and write ``predictions.json`` to ``output_dir``
    (one record per case, as :func:`results_of`); returns the records."""
    import torch

    records = []
    with torch.no_grad():
        for batch in dataloader:
            image = torch.as_tensor(batch["image"], dtype=torch.float32)
            probs = network(image.to(device) if device is not None else image).cpu().numpy()
            records += results_of(probs, export, list(batch["file"]))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    return records


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict with a medvox export (NumPy, nibabel, PyTorch only).")
    parser.add_argument("images", nargs="+", help="NIfTI files (.nii / .nii.gz) or .npy arrays; one file per "
                        "channel joined by '+' for a multi-channel model")
    parser.add_argument("--export", default=str(HERE), help="the export folder (default: this file's folder)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    exported = Exported(args.export, args.device)
    for image in args.images:
        print(json.dumps(exported.predict_file(image.split("+"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
