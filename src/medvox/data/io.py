"""Read one image (NIfTI, DICOM series, NumPy) into a float32 array in one axis convention.

Axis convention (every array medvox holds, from every format):

* spatial axes are ``(D, H, W)`` = ``(z, y, x)`` of the RAS+ voxel grid: the image is first
  reoriented to the closest canonical RAS orientation (``nib.as_closest_canonical``), so voxel
  index ``i`` runs towards patient Right, ``j`` towards Anterior, ``k`` towards Superior; the array
  is then transposed to ``[k, j, i]``. So ``D`` runs inferior -> superior, ``H`` posterior ->
  anterior, ``W`` left -> right (the memory layout of SimpleITK's ``GetArrayFromImage``);
* channels come first: ``(C, D, H, W)`` (a 4D NIfTI's last axis, several manifest columns);
* ``meta["spacing"]`` is in array axis order: ``(sD, sH, sW)`` = ``(sz, sy, sx)`` in mm;
* ``meta["affine"]`` maps an array index ``(d, h, w, 1)`` to RAS+ world millimetres.

DICOM is read with SimpleITK (LPS+ world), converted to a RAS+ affine and sent through the same
reorientation as NIfTI, so both formats of one volume give the same array. Patient tags (name,
id, birth date, dates) are never read into ``meta``: only geometry and the Modality tag.
``.npy`` arrays are taken as already ``(D, H, W)`` / ``(C, D, H, W)`` with spacing 1.

Example:
    >>> array, meta = read_image("ct.nii.gz")  # array: (D, H, W) float32
    >>> meta["spacing"], meta["source_orientation"]
    ([2.5, 0.8, 0.8], 'LPS')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medvox.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + (".npy",)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# only these DICOM tags are ever read into meta: geometry is taken from the image itself
_MODALITY_TAG = "0008|0060"


def _sitk():
    """SimpleITK, imported on first use: only ITK/DICOM inputs need it (~0.2 s of start-up otherwise)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warnings become our own messages
    return sitk


class ImageError(DataError):
    """An image that cannot be used: unreadable, not 3D, a broken DICOM series."""

    def __init__(self, path: str | Path, what: str, fix: str = ""):
        self.path, self.what, self.fix = str(path), what, fix
        super().__init__(f"{path}: {what}" + (f" ({fix})" if fix else ""))


def suffix_of(path: str | Path) -> str:
    """The lower-case image suffix, ``.nii.gz`` counted as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_image_path(path: Path) -> bool:
    """True for a file with an image suffix or a folder holding DICOM files."""
    if path.is_dir():
        return _looks_like_dicom_dir(path)
    return suffix_of(path) in IMAGE_SUFFIXES


def _looks_like_dicom_dir(path: Path, probe: int = 3) -> bool:
    """A folder with ``.dcm`` files, or files carrying the DICOM magic (``DICM`` at byte 128)."""
    for entry in os.scandir(path):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name.lower().endswith(".dcm"):
            return True
        if probe <= 0:
            break
        probe -= 1
        with open(entry.path, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                return True
    return False


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a NIfTI file, a DICOM series folder, an ITK image or a ``.npy`` array.

    Args:
        path: the image file or DICOM series folder.

    Returns:
        ``(array, meta)``: float32 ``(D, H, W)`` or ``(C, D, H, W)``, and a JSON-safe dict with
        ``spacing`` (array axis order, mm), ``affine`` (array index -> RAS+ mm), ``orientation``
        ("RAS"), ``source_orientation`` (the file's axis codes), ``modality`` (or None) and
        ``format``.

    Raises:
        ImageError: the file is missing, unreadable, or not a 3D volume (2D, 5D).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found", "check the path and the manifest's folder")
    if path.is_dir():
        return _read_dicom_series(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in ITK_SUFFIXES:
        return _read_itk_file(path)
    if suffix == ".npy":
        return _read_npy(path)
    raise ImageError(path, f"unknown image type {suffix!r}", f"use one of {', '.join(IMAGE_SUFFIXES)}")


def _read_nifti(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        img = nib.load(str(path))
        source_orientation = "".join(nib.aff2axcodes(img.affine))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    meta = {"format": "nifti", "source_orientation": source_orientation, "modality": None}
    return _canonical(path, data, img.affine, meta)


def _read_itk_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    sitk = _sitk()
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    modality = reader.GetMetaData(_MODALITY_TAG).strip() if reader.HasMetaDataKey(_MODALITY_TAG) else None
    return _from_sitk(path, image, modality or None, "itk")


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageError(folder, "no DICOM series in this folder", "point the manifest at a folder of .dcm slices")
    if len(series) > 1:
        raise ImageError(folder, f"mixed DICOM series: {len(series)} series UIDs in one folder",
                         "move each series into its own folder, one row per series")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, to check the slice positions
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(folder, _diagnose_unreadable(folder, exc), "re-export the series") from exc
    if len(files) > 1:
        _check_slice_positions(folder, reader, image, len(files))
    modality = reader.GetMetaData(0, _MODALITY_TAG).strip() if reader.HasMetaDataKey(0, _MODALITY_TAG) else None
    return _from_sitk(folder, image, modality or None, "dicom")


def _check_slice_positions(folder: Path, reader: Any, image: Any, n: int) -> None:
    """Slices must be evenly spaced along the slice normal: a gap is a missing slice."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    normal = direction[:, 2]
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            raise ImageError(folder, f"slice {i} has no ImagePositionPatient", "re-export the series")
        xyz = [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
        positions.append(float(np.dot(xyz, normal)))
    steps = np.diff(np.sort(positions))
    step = float(np.median(steps))
    if step <= 1e-6 or np.any(np.abs(steps - step) > 0.1 * step + 1e-3):
        gaps = int(np.sum(steps > 1.5 * step)) if step > 1e-6 else 0
        what = (f"missing slice(s): slice positions are not evenly spaced ({gaps} gap(s) larger than the "
                f"median step {step:.3g} mm)" if gaps else "duplicate or unevenly spaced slice positions")
        raise ImageError(folder, what, "re-export the complete series")


def _from_sitk(path: Path, image: Any, modality: str | None, fmt: str):
    """SimpleITK image (LPS+ world, array [k, j, i]) -> the same path as a NIfTI."""
    if image.GetDimension() != 3:
        raise ImageError(path, f"not a 3D volume ({image.GetDimension()}D image)", "medvox needs 3D volumes")
    data = _sitk().GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:  # (k, j, i, c) -> (i, j, k, c)
        data = np.transpose(data, (2, 1, 0, 3))
    else:
        data = np.transpose(data, (2, 1, 0))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = _LPS_TO_RAS @ lps
    meta = {"format": fmt, "source_orientation": "".join(nib.aff2axcodes(affine)), "modality": modality}
    return _canonical(path, data, affine, meta)


def _canonical(path: Path, data: np.ndarray, affine: np.ndarray, meta: dict[str, Any]):
    """Voxel array ``(i, j, k[, c])`` + affine -> RAS-canonical ``([C,] D, H, W)`` + meta."""
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1) is a plain volume
        data = data[..., 0]
    _require_3d(path, data.shape)
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
    array = np.asarray(img.dataobj, dtype=np.float32)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # (i, j, k[, c]) -> ([c,] k, j, i); the affine gets the same axis permutation
    array = np.ascontiguousarray(array.T if array.ndim == 3 else np.transpose(array, (3, 2, 1, 0)))
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    meta.update(
        spacing=zooms[::-1],
        affine=(img.affine @ perm).tolist(),
        orientation="RAS",
        shape=list(array.shape[-3:]),
        channels=1 if array.ndim == 3 else int(array.shape[0]),
    )
    return array, meta


def _require_3d(path: Path, shape: tuple[int, ...], channels_first: bool = False) -> None:
    """3D, or 4D with channels; a volume with a single slice counts as 2D."""
    spatial = shape if len(shape) < 4 else (shape[1:] if channels_first else shape[:3])
    if len(shape) < 3 or min(spatial) == 1:
        raise ImageError(path, f"a 2D image (shape {tuple(shape)})", "medvox needs 3D volumes; remove the row")
    if len(shape) > 4:
        raise ImageError(path, f"a {len(shape)}D image (shape {tuple(shape)})",
                         "medvox takes 3D volumes or 4D with channels; split or remove it")


def _read_npy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-save it with numpy.save") from exc
    _require_3d(path, data.shape, channels_first=True)
    array = np.ascontiguousarray(data, dtype=np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.fliplr(np.eye(3))  # (d, h, w) -> (k, j, i) with unit spacing
    meta = {"format": "npy", "source_orientation": "RAS", "orientation": "RAS", "modality": None,
            "spacing": [1.0, 1.0, 1.0], "affine": affine.tolist(), "shape": list(array.shape[-3:]),
            "channels": 1 if array.ndim == 3 else int(array.shape[0])}
    return array, meta


def _diagnose_unreadable(path: Path, exc: BaseException) -> str:
    """Say *why* a file does not read: text named as an image, a cut-off download, ..."""
    if path.is_file():
        head = path.read_bytes()[:64]
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            return f"not an image: the file holds text, not {suffix_of(path)} data"
        if suffix_of(path) == ".nii.gz" and head[:2] != b"\x1f\x8b":
            return "not gzip-compressed although named .nii.gz"
        if isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "truncat" in str(exc).lower():
            return "truncated file (the data ends early; an interrupted copy or download?)"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable or truncated ({type(exc).__name__}: {msg[:120]})"
