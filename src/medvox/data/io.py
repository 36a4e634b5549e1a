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

Before a voxel is decoded, the header is checked: voxels must be real numbers (complex, RGB and other
structured types are refused: a cast would drop the imaginary part or fail), a NIfTI voxel size
(pixdim) must be positive (nibabel silently reads 0 as 1 mm and -1 as 1 mm), the affine must be finite
and invertible, and the memory that reading needs (:func:`read_memory_mb`: the voxels as stored plus
their float32 copy) must stay under ``max_mb`` (``data.max_volume_mb``). A sheared affine is read
without its shear (the grid is resampled along its own axes): ``meta["shear_deg"]`` says by how much
the axes are off 90 degrees, and ``check`` warns.

:func:`open_image` reads the voxels in their stored type and reorients them with views only
(:class:`Volume`); ``check`` computes its statistics slab by slab from it, so a 640^3 int16 volume
(524 MB) is inspected in about its own size. :func:`read_image` makes the one float32 copy.

Example:
    >>> array, meta = read_image("ct.nii.gz")  # array: (D, H, W) float32
    >>> meta["spacing"], meta["source_orientation"]
    ([2.5, 0.8, 0.8], 'LPS')
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
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
_RAS = [[0, 1], [1, 1], [2, 1]]
SLAB_VOXELS = 4 << 20  # voxels per float32 slab when a volume is converted or inspected piecewise (16 MB)
SHEAR_TOLERANCE_DEG = 0.1  # axes within this of 90 degrees count as orthogonal (float32 rounding in headers)


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


class Volume:
    """An opened image: its voxels in the stored dtype, reoriented to RAS array order by views only.

    Attributes:
        data: ``(D, H, W)`` or ``(C, D, H, W)`` in the file's dtype (often a view or a memory map).
        meta: as :func:`read_image` describes it, plus ``dtype`` (stored) and ``shear_deg``.
    """

    def __init__(self, data: np.ndarray, meta: dict[str, Any],
                 convert: Callable[[np.ndarray], np.ndarray] | None = None, keep: Any = None,
                 stream: Callable[[], np.ndarray] | None = None) -> None:
        self.data, self.meta = data, meta
        self._convert = convert  # stored values -> float32 (a NIfTI's read scaling); None: a plain cast
        self._keep = keep  # the object the view's memory belongs to (a SimpleITK image)
        self._stream = stream  # builds the float32 array straight from the file (``data`` is then a shape only)

    @property
    def channels(self) -> int:
        return 1 if self.data.ndim == 3 else int(self.data.shape[0])

    def channel(self, c: int) -> np.ndarray:
        """Channel ``c`` as ``(D, H, W)`` in the stored dtype."""
        return self.data if self.data.ndim == 3 else self.data[c]

    def float32(self, x: np.ndarray) -> np.ndarray:
        """Stored values -> C-contiguous float32 (with the file's scaling)."""
        if self._convert is not None:
            return np.ascontiguousarray(self._convert(x), dtype=np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def slabs(self, c: int, voxels: int = SLAB_VOXELS) -> Iterator[np.ndarray]:
        """Channel ``c`` as consecutive float32 slabs along D (each C-contiguous, about ``voxels`` big)."""
        x = self.channel(c)
        step = max(1, voxels // max(1, x.shape[1] * x.shape[2]))
        for start in range(0, x.shape[0], step):
            yield self.float32(x[start:start + step])

    def to_float32(self) -> np.ndarray:
        """The whole volume as one C-contiguous float32 array (the only full-size copy)."""
        if self._stream is not None:
            return self._stream()
        if self._convert is None:
            return np.ascontiguousarray(self.data, dtype=np.float32)
        out = np.empty(self.data.shape, np.float32)
        for c in range(self.channels):
            target = out if self.data.ndim == 3 else out[c]
            start = 0
            for slab in self.slabs(c):
                target[start:start + len(slab)] = slab
                start += len(slab)
        return out


def read_image(path: str | Path, max_mb: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a NIfTI file, a DICOM series folder, an ITK image or a ``.npy`` array.

    Args:
        path: the image file or DICOM series folder.
        max_mb: refuse, before decoding, an image whose reading needs more than this many MB
            (:func:`read_memory_mb`); None: no limit.

    Returns:
        ``(array, meta)``: float32 ``(D, H, W)`` or ``(C, D, H, W)``, and a JSON-safe dict with
        ``spacing`` (array axis order, mm), ``affine`` (array index -> RAS+ mm), ``orientation``
        ("RAS"), ``source_orientation`` (the file's axis codes), ``modality`` (or None), ``format``,
        ``dtype`` (as stored) and ``shear_deg`` (0 for an orthogonal grid).

    Raises:
        ImageError: the file is missing, unreadable, not a 3D volume (2D, 5D), of a voxel type that is not
            a real number, with a non-positive voxel size or a singular / non-finite affine, or too big.
    """
    volume = open_image(path, max_mb, _float32_only=True)
    return volume.to_float32(), volume.meta


def open_image(path: str | Path, max_mb: float | None = None, _float32_only: bool = False) -> Volume:
    """Open an image as :func:`read_image` does, without the float32 copy (see :class:`Volume`).

    ``_float32_only`` (:func:`read_image`): the caller wants ``to_float32()`` and nothing else, so a gzipped
    NIfTI already in RAS order is inflated straight into the float32 array, chunk by chunk, without holding
    its stored voxels too (a 640^3 int16 read peaks at 1.0 GB instead of 1.5 GB).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found", "check the path and the manifest's folder")
    if path.is_dir():
        return _read_dicom_series(path, max_mb)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, max_mb, _float32_only)
    if suffix in ITK_SUFFIXES:
        return _read_itk_file(path, max_mb)
    if suffix == ".npy":
        return _read_npy(path, max_mb)
    raise ImageError(path, f"unknown image type {suffix!r}", f"use one of {', '.join(IMAGE_SUFFIXES)}")


def from_array(data: Any, affine: Any, name: str = "<array>") -> tuple[np.ndarray, dict[str, Any]]:
    """An in-memory volume in nibabel's voxel order, read as :func:`read_image` reads a NIfTI file holding it
    (the same checks, the same reorientation to RAS array order).

    Args:
        data: ``(x, y, z)`` or ``(x, y, z, c)`` voxels, as nibabel's ``img.get_fdata()`` gives them.
        affine: the ``4 x 4`` voxel -> world (RAS+ mm) transform, nibabel's ``img.affine``.
        name: what error messages call the array.

    Returns:
        ``(array, meta)`` as :func:`read_image` returns them: float32 ``(D, H, W)`` / ``(C, D, H, W)``.

    Raises:
        ImageError: voxels that are not real numbers, not a 3D volume, or an affine that is not a finite,
            invertible ``4 x 4`` matrix.

    Example:
        >>> img = nib.load("ct.nii.gz")                                   # doctest: +SKIP
        >>> array, meta = from_array(img.get_fdata(), img.affine)         # doctest: +SKIP
    """
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ImageError(name, f"an affine of shape {affine.shape}",
                         "give the 4 x 4 voxel -> world matrix (nibabel: img.affine)")
    _check_header(Path(name), data.shape, data.dtype, None)
    shear = _check_affine(Path(name), affine)
    meta = {"format": "array", "source_orientation": "".join(nib.aff2axcodes(affine)), "modality": None}
    volume = _canonical(Path(name), data, affine, meta, shear)
    return volume.to_float32(), volume.meta


def read_memory_mb(shape: tuple[int, ...], dtype: np.dtype | str) -> float:
    """MB (2^20 bytes) that reading an image needs at its peak: the voxels as stored (decompressed) plus
    their float32 copy. ``check`` needs only the first part; ``prepare`` and ``predict`` both."""
    return math.prod(int(n) for n in shape) * (np.dtype(dtype).itemsize + 4) / 2**20


def _check_memory(path: Path, shape: tuple[int, ...], dtype: np.dtype, max_mb: float | None) -> None:
    if max_mb is None:
        return
    need = read_memory_mb(shape, dtype)
    if need > max_mb:
        voxels = math.prod(int(n) for n in shape)
        stored, as_float = voxels * np.dtype(dtype).itemsize / 2**20, voxels * 4 / 2**20
        raise ImageError(path, f"too big: {' x '.join(str(int(n)) for n in shape)} voxels of {np.dtype(dtype)} need "
                         f"about {_mb(need)} MB to read ({_mb(stored)} MB as stored + {_mb(as_float)} MB as float32), "
                         f"above the limit of {_mb(max_mb)} MB (data.max_volume_mb)",
                         f"raise the limit with --max-volume-mb {_round_up(need)} (or data.max_volume_mb in the "
                         "config) on a machine with that memory free, or crop / downsample the image")


def _mb(value: float) -> str:
    """1,234 / 56 / 1.5 / 0.25: whole MB from 10 up, two significant digits below."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _round_up(mb: float) -> int:
    """A limit a little above ``mb``: two significant digits, rounded up."""
    scale = 10 ** max(0, len(str(int(mb))) - 2)
    return int(math.ceil(mb * 1.05 / scale) * scale)


def dtype_problem(dtype: np.dtype | str) -> tuple[str, str] | None:
    """``(what, fix)`` when voxels of ``dtype`` are not real numbers medvox can use, else None."""
    dtype = np.dtype(dtype)
    if dtype.names is not None:
        if tuple(n.upper() for n in dtype.names) in (("R", "G", "B"), ("R", "G", "B", "A")):
            return (f"RGB voxels ({dtype.itemsize * 8}-bit colour): medvox needs one intensity per voxel",
                    "convert the image to greyscale, or save the colours as channels (a 4th axis)")
        return (f"structured voxels ({dtype}): medvox needs one number per voxel",
                "save the image with a plain numeric voxel type")
    if dtype.kind == "c":
        return (f"complex voxels ({dtype}): medvox needs real intensities (a cast would drop the imaginary part)",
                "save the magnitude (numpy.abs) or the real part as a float image")
    if dtype.kind == "O":
        return ("an array of Python objects, not numbers", "save a numeric array (numpy.save of a float/int array)")
    if dtype.kind not in "biuf":
        return f"voxels of type {dtype}, not numbers", "save the image with a numeric voxel type"
    return None


def _check_header(path: Path, shape: tuple[int, ...], dtype: np.dtype, max_mb: float | None,
                  channels_first: bool = False) -> None:
    """What the header alone tells: voxel type, dimensionality, memory."""
    problem = dtype_problem(dtype)
    if problem is not None:
        raise ImageError(path, *problem)
    shape = tuple(int(n) for n in shape)
    if not channels_first:
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
    _require_3d(path, shape, channels_first)
    _check_memory(path, shape, dtype, max_mb)


def _check_affine(path: Path, affine: np.ndarray) -> float:
    """Refuse a non-finite or singular affine; return how far the voxel axes are from orthogonal (degrees)."""
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        raise ImageError(path, "the affine (voxel -> world transform) holds NaN or Inf values",
                         "re-export the image with a valid orientation (sform/qform)")
    m = affine[:3, :3]
    norms = np.sqrt((m**2).sum(axis=0))
    if np.any(norms <= 0) or abs(np.linalg.det(m)) <= 1e-9 * float(np.prod(norms)):
        what = ("a voxel axis of length 0" if np.any(norms <= 0) else "two voxel axes point the same way")
        raise ImageError(path, f"singular affine (voxel -> world transform): {what}, so the grid has no volume",
                         "re-export the image with its real voxel size and orientation")
    unit = m / norms
    cosines = np.abs(unit.T @ unit)[np.triu_indices(3, 1)]
    return float(90.0 - np.degrees(np.arccos(np.clip(cosines.max(), 0.0, 1.0))))


def _check_pixdim(path: Path) -> None:
    """A NIfTI's stored voxel size must be positive: nibabel reads pixdim 0 as 1 and -2 as 2 with a log line,
    and the volume would be resampled at a size nobody wrote."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            head = fh.read(540)
    except Exception:  # noqa: BLE001 - the full read that follows reports an unreadable file
        return
    if len(head) < 348:
        return
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)
        if size in (348, 540):
            break
    else:
        return
    klass = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1:1 + min(3, max(ndim, 0))]]
    if any(not v > 0 or not math.isfinite(v) for v in pixdim):
        sizes = " x ".join(f"{v:g}" for v in pixdim)
        raise ImageError(path, f"voxel size (pixdim) {sizes} in the header: a voxel size must be positive",
                         "re-export the image with its real voxel size (nibabel: header.set_zooms)")


def _read_nifti(path: Path, max_mb: float | None, float32_only: bool = False) -> Volume:
    _check_pixdim(path)
    try:
        img = nib.load(str(path))
        shape, dtype = tuple(img.shape), img.get_data_dtype()
    except Exception as exc:  # nibabel raises many types for broken files
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    _check_header(path, shape, dtype, max_mb)
    shear = _check_affine(path, img.affine)
    proxy = img.dataobj
    if (float32_only and str(path).lower().endswith(".gz") and proxy.order == "F"
            and np.array_equal(nib.orientations.io_orientation(img.affine), _RAS)):
        # RAS already: the canonical ([C,] D, H, W) array in C order is the file's voxel bytes in order, so
        # they are inflated and converted chunk by chunk; the geometry comes from a zero-size stand-in
        meta = {"format": "nifti", "source_orientation": "".join(nib.aff2axcodes(img.affine)), "modality": None}
        stand_in = np.broadcast_to(np.zeros((), dtype=proxy.dtype), proxy.shape)
        volume = _canonical(path, stand_in, img.affine, meta, shear)
        convert = _read_scaling(proxy)
        volume._stream = lambda: _inflate_float32(path, proxy, volume.data.shape, convert)
        return volume
    try:
        source_orientation = "".join(nib.aff2axcodes(img.affine))
        raw = _read_voxels(path, proxy)
    except Exception as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    meta = {"format": "nifti", "source_orientation": source_orientation, "modality": None}
    return _canonical(path, raw, img.affine, meta, shear, _read_scaling(img.dataobj))


def _read_voxels(path: Path, proxy: Any, chunk: int = 16 << 20) -> np.ndarray:
    """A NIfTI's voxels as stored. An uncompressed file is memory-mapped (nibabel); a gzipped one is inflated
    into the array chunk by chunk: nibabel's own read inflates it all into a temporary ``bytes`` first, which
    doubles the peak (1.06 GB for a 524 MB volume instead of 0.55 GB)."""
    if not str(path).lower().endswith(".gz"):
        return proxy.get_unscaled()
    raw = np.empty(proxy.shape, dtype=proxy.dtype, order="F" if proxy.order == "F" else "C")
    buf = memoryview(raw.reshape(-1, order="A").view(np.uint8))
    with nib.openers.ImageOpener(str(path)) as fh:
        fh.seek(proxy.offset)
        pos = 0
        while pos < len(buf):
            got = fh.readinto(buf[pos:pos + chunk])
            if not got:
                raise EOFError(f"the data ends after {pos:,} of {len(buf):,} bytes (truncated)")
            pos += got
    return raw


def _inflate_float32(path: Path, proxy: Any, shape: tuple[int, ...], convert: Callable | None,
                     chunk: int = 16 << 20) -> np.ndarray:
    """A gzipped NIfTI's voxels, in file order, straight into a C-order float32 array of ``shape``."""
    dtype = np.dtype(proxy.dtype)
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    step = max(1, chunk // dtype.itemsize) * dtype.itemsize
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            fh.seek(proxy.offset)
            pos = 0
            while pos < flat.size:
                raw = fh.read(min(step, (flat.size - pos) * dtype.itemsize))
                if len(raw) < dtype.itemsize:
                    raise EOFError(f"the data ends after {pos:,} of {flat.size:,} voxels (truncated)")
                values = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
                flat[pos:pos + values.size] = convert(values) if convert is not None else values
                pos += values.size
    except Exception as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    return out


def _read_scaling(proxy: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The NIfTI read scaling (``raw * slope + inter``) as nibabel applies it for a float32 read, or None."""
    from nibabel.volumeutils import apply_read_scaling

    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if (float(slope), float(inter)) == (1.0, 0.0):
        return None
    # the same casts as nibabel's ArrayProxy._get_scaled(dtype=float32): identical values, slab by slab
    slope = slope.astype(np.float32) if np.can_cast(slope, np.float32) else slope
    inter = inter.astype(np.float32) if np.can_cast(inter, np.float32) else inter
    return lambda raw: apply_read_scaling(raw, slope, inter)


def _read_itk_file(path: Path, max_mb: float | None) -> Volume:
    sitk = _sitk()
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_itk_header(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID(), max_mb)
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-export or remove the file") from exc
    modality = reader.GetMetaData(_MODALITY_TAG).strip() if reader.HasMetaDataKey(_MODALITY_TAG) else None
    return _from_sitk(path, image, modality or None, "itk")


def _check_itk_header(path: Path, size: tuple[int, ...], components: int, pixel_id: int,
                      max_mb: float | None) -> None:
    """Voxel type and memory of an ITK image from its header (``ReadImageInformation``)."""
    sitk = _sitk()
    name = sitk.GetPixelIDValueAsString(pixel_id)
    if "complex" in name.lower():
        raise ImageError(path, f"complex voxels ({name}): medvox needs real intensities",
                         "save the magnitude or the real part as a float image")
    bits = {"8": 1, "16": 2, "32": 4, "64": 8}
    itemsize = next((v for k, v in bits.items() if f"{k}-bit" in name or f"{k} bit" in name), 4)
    shape = (*[int(n) for n in size], *([components] if components > 1 else []))
    if len(size) == 3:
        _check_memory(path, shape, np.dtype(f"u{itemsize}"), max_mb)


def _read_dicom_series(folder: Path, max_mb: float | None) -> Volume:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageError(folder, "no DICOM series in this folder", "point the manifest at a folder of .dcm slices")
    if len(series) > 1:
        raise ImageError(folder, f"mixed DICOM series: {len(series)} series UIDs in one folder",
                         "move each series into its own folder, one row per series")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    try:  # the first slice's header: voxel type and the volume's size before any slice is decoded
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()
        width, height = first.GetSize()[:2]
        _check_itk_header(folder, (width, height, len(files)), first.GetNumberOfComponents(), first.GetPixelID(),
                          max_mb)
    except RuntimeError:
        pass  # reading the series below says what is wrong with it
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


def _from_sitk(path: Path, image: Any, modality: str | None, fmt: str) -> Volume:
    """SimpleITK image (LPS+ world, array [k, j, i]) -> the same path as a NIfTI."""
    if image.GetDimension() != 3:
        raise ImageError(path, f"not a 3D volume ({image.GetDimension()}D image)", "medvox needs 3D volumes")
    data = _sitk().GetArrayViewFromImage(image)  # a view: the image keeps the memory (Volume holds it)
    problem = dtype_problem(data.dtype)
    if problem is not None:
        raise ImageError(path, *problem)
    if image.GetNumberOfComponentsPerPixel() > 1:  # (k, j, i, c) -> (i, j, k, c)
        data = np.transpose(data, (2, 1, 0, 3))
    else:
        data = np.transpose(data, (2, 1, 0))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = _LPS_TO_RAS @ lps
    shear = _check_affine(path, affine)
    meta = {"format": fmt, "source_orientation": "".join(nib.aff2axcodes(affine)), "modality": modality}
    return _canonical(path, data, affine, meta, shear, keep=image)


def _canonical(path: Path, data: np.ndarray, affine: np.ndarray, meta: dict[str, Any], shear: float = 0.0,
               convert: Callable | None = None, keep: Any = None) -> Volume:
    """Voxel array ``(i, j, k[, c])`` + affine -> RAS-canonical ``([C,] D, H, W)`` + meta, by views only.

    The reorientation is nibabel's ``as_closest_canonical`` (the same flips, transposes and affine), done on
    the array directly: building a ``Nifti1Image`` from the data would refuse int64 voxels and copy.
    """
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1) is a plain volume
        data = data[..., 0]
    _require_3d(path, data.shape)
    affine = np.asarray(affine, dtype=float)
    ornt = nib.orientations.io_orientation(affine)
    if not np.array_equal(ornt, _RAS):
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3])
        data = nib.orientations.apply_orientation(data, ornt)
    # the zooms a NIfTI header would store for this affine: float32 column norms
    zooms = [float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).astype(np.float32)]
    # (i, j, k[, c]) -> ([c,] k, j, i); the affine gets the same axis permutation
    view = data.T if data.ndim == 3 else np.transpose(data, (3, 2, 1, 0))
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    meta.update(
        spacing=zooms[::-1],
        affine=(affine @ perm).tolist(),
        orientation="RAS",
        shape=list(view.shape[-3:]),
        channels=1 if view.ndim == 3 else int(view.shape[0]),
        dtype=str(view.dtype),
        shear_deg=round(shear, 3) if shear > SHEAR_TOLERANCE_DEG else 0.0,
    )
    return Volume(view, meta, convert, keep)


def _require_3d(path: Path, shape: tuple[int, ...], channels_first: bool = False) -> None:
    """3D, or 4D with channels; a volume with a single slice counts as 2D."""
    spatial = shape if len(shape) < 4 else (shape[1:] if channels_first else shape[:3])
    if len(shape) < 3 or min(spatial) == 1:
        raise ImageError(path, f"a 2D image (shape {tuple(shape)})", "medvox needs 3D volumes; remove the row")
    if len(shape) > 4:
        raise ImageError(path, f"a {len(shape)}D image (shape {tuple(shape)})",
                         "medvox takes 3D volumes or 4D with channels; split or remove it")


def _read_npy(path: Path, max_mb: float | None) -> Volume:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except Exception as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-save it with numpy.save") from exc
    _check_header(path, shape, dtype, max_mb, channels_first=True)
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)  # a memory map: no copy until float32
    except Exception as exc:
        raise ImageError(path, _diagnose_unreadable(path, exc), "re-save it with numpy.save") from exc
    affine = np.eye(4)
    affine[:3, :3] = np.fliplr(np.eye(3))  # (d, h, w) -> (k, j, i) with unit spacing
    meta = {"format": "npy", "source_orientation": "RAS", "orientation": "RAS", "modality": None,
            "spacing": [1.0, 1.0, 1.0], "affine": affine.tolist(), "shape": list(data.shape[-3:]),
            "channels": 1 if data.ndim == 3 else int(data.shape[0]), "dtype": str(data.dtype), "shear_deg": 0.0}
    return Volume(data, meta)


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
        if (isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "truncat" in str(exc).lower()
                or "mmap length is greater than file size" in str(exc)):
            return "truncated file (the data ends early; an interrupted copy or download?)"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable or truncated ({type(exc).__name__}: {msg[:120]})"
