"""Fixtures for the data layer: tiny NIfTI / DICOM volumes and manifests written on the fly."""

from __future__ import annotations

import contextlib
import csv
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medvox.config import DataConfig

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UID_ROOT = "1.2.826.0.1.3680043.2.1125.9"
PATIENT_TAGS = {"0010|0010": "Doe^Jane", "0010|0020": "PID-SECRET-42", "0010|0030": "19700101",
                "0008|0020": "20240229"}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """``data`` in voxel order (i, j, k[, ...]) of ``affine`` (default: 1 mm RAS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def write_dicom_series(folder: Path, data: np.ndarray, ras_affine: np.ndarray, series: str = "1",
                       skip: tuple[int, ...] = (), modality: str = "CT", tags: dict[str, str] | None = None,
                       uid_root: str = UID_ROOT) -> Path:
    """Write ``data`` (voxel order i, j, k of the RAS affine) as one DICOM file per k-slice.

    ``tags`` go into every slice; by default the patient tags (name, id, birth date, study date) are
    written on purpose: they must never be read.
    """
    tags = PATIENT_TAGS if tags is None else tags
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.int16).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with _locale_kept():  # GDCM's writer sets the process locale to "C" and leaves it there
        for k in range(data.shape[2]):
            if k in skip:
                continue
            sl = image[:, :, k]
            position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
            slice_tags = {"0008|0060": modality, "0020|000d": f"{uid_root}.1", "0020|000e": f"{uid_root}.2.{series}",
                          "0020|0032": position, "0020|0037": orientation, "0020|0013": str(k + 1),
                          "0008|0018": f"{uid_root}.3.{series}.{k + 1}", "0018|0050": f"{spacing[2]:.4f}", **tags}
            for tag, value in slice_tags.items():
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"s{series}_{k:03d}.dcm"))
            writer.Execute(sl)
    return folder


@contextlib.contextmanager
def _locale_kept():
    """Restore the process locale on exit: open() defaults to its encoding (ASCII under "C") in every later test."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def lesion_volume(rng: np.random.Generator, label: int, shape=(12, 12, 8)) -> np.ndarray:
    """A small int16 CT-like volume: air, a body, and a bright blob whose size depends on the label."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(x / 5.5) ** 2 + (y / 5.5) ** 2 <= 1] = 40.0
    vol[x**2 + y**2 + z**2 <= (1.5 + 1.5 * label) ** 2] = 300.0
    return (vol + rng.normal(0, 10, shape)).astype(np.int16)


def write_manifest(path: Path, rows: list[dict], columns: list[str] | None = None, delimiter: str = ",",
                   encoding: str = "utf-8", lineterminator: str = "\r\n") -> Path:
    """``rows`` as a CSV (``csv``'s own CRLF line ends by default), only ``columns`` when given."""
    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, delimiter=delimiter, extrasaction="ignore",
                                lineterminator=lineterminator)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """12 clean NIfTI cases: 6 benign, 6 malignant, 10 patients (p0 and p1 have two scans each).

    Volumes are 12 x 12 x 8 voxels at 0.8 x 0.8 x 2.5 mm. Returns the manifest path.
    """
    rng = np.random.default_rng(0)
    patients = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p0", "p1", "p8", "p9"]
    rows = []
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for i in range(12):
        label = i % 2
        name = f"images/c{i:02d}.nii.gz"
        write_nifti(tmp_path / name, lesion_volume(rng, label), affine)
        rows.append({"id": f"c{i:02d}", "image": name, "label": ["benign", "malignant"][label],
                     "patient_id": patients[i]})
    return write_manifest(tmp_path / "manifest.csv", rows)


@pytest.fixture
def data_cfg(tmp_path):
    """A DataConfig factory with a private cache folder and one worker (deterministic call counts)."""
    def make(path, **kwargs) -> DataConfig:
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        kwargs.setdefault("workers", 1)
        return DataConfig(path=str(path), **kwargs)

    return make


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """The 200-case synthetic CT demo (seed 0), generated once per test session."""
    from medvox.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), n_cases=200, seed=0)
