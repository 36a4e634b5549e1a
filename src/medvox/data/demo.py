"""Synthetic CT demo data: a miniature thorax phantom with a lung lesion, benign or malignant.

Each scan is a small int16 HU volume (48 x 48 x 24 voxels, x, y, z) with anisotropic spacing
(about 0.8 x 0.8 x 2.5 mm, varying a little per scan): air outside (-1000 HU), an elliptical body
with a fat layer (-100) around soft tissue (40), two lungs (-850), a vertebral body (700) and
Gaussian noise. The lesion sits in a lung; its morphology carries the class:

* benign: smooth round/ellipsoidal, homogeneous (30-60 HU), sometimes calcified;
* malignant: lobulated and spiculated, heterogeneous enhancement, sometimes a necrotic core.

The classes overlap on purpose (mildly lobulated benign, ~15 % low-grade malignant, overlapping
sizes), so the task is learnable but not trivial: on seed 0 the global mean HU separates the classes
with an AUC of 0.58, a hand-made edge feature with 0.80, and a three-layer 3D CNN trained for 15
epochs on fold 0 (160 scans, CPU) reaches a validation AUC of about 0.88.

About 30 % of scans are malignant; some patients have two or three scans (follow-ups share the
lesion: patient-grouped folds matter). Half the files are stored in LPS orientation, the rest in
RAS, as scanners and converters do. Same seed -> identical files.

Example:
    >>> manifest = make_demo_data(Path("demo"), n_cases=200, seed=0)  # demo/manifest.csv
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

GRID = (48, 48, 24)  # voxels along x (R), y (A), z (S)
CLASSES = ("benign", "malignant")
MALIGNANT_FRACTION = 0.3


def make_demo_data(out: Path, n_cases: int = 200, seed: int = 0, test_every: int = 5) -> Path:
    """Write ``n_cases`` synthetic CT scans and ``out/manifest.csv`` (id, image, label, patient_id, split).

    Args:
        out: output folder (created); images go to ``out/images/``.
        n_cases: number of scans (patients have 1-3 scans each).
        test_every: every ``test_every``-th patient of each class is held out as a test patient
            (``split`` column ``test``, ~20 %); 0 holds out none.
        seed: everything is drawn from it; the same seed writes byte-identical files.

    Returns:
        The manifest path.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patients = _patients(n_cases, rng)
    held_out = _held_out_patients(patients, test_every)
    rows = []
    for p, (n_scans, label) in enumerate(patients):
        lesion = _lesion_params(label, np.random.default_rng([seed, p, 1]))
        for scan in range(n_scans):
            case = len(rows)
            volume, affine = _scan(lesion, scan, np.random.default_rng([seed, p, 2, scan]))
            name = f"images/case_{case:03d}.nii.gz"
            _write_nifti(out / name, volume, affine)
            rows.append({"id": f"case_{case:03d}", "image": name, "label": CLASSES[label],
                         "patient_id": f"patient_{p:03d}", "split": "test" if p in held_out else "train"})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _held_out_patients(patients: list[tuple[int, int]], every: int) -> set[int]:
    """Whole patients, stratified by class: the held-out test set never shares a patient with the pool."""
    if every <= 0:
        return set()
    held, seen = set(), {}
    for p, (_, label) in enumerate(patients):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] % every == 0:
            held.add(p)
    return held


def _patients(n_cases: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``(n_scans, label)`` per patient: 1-3 scans, ~30 % malignant scans (assigned per patient)."""
    sizes = []
    while sum(sizes) < n_cases:
        sizes.append(min(int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07])), n_cases - sum(sizes)))
    target = round(MALIGNANT_FRACTION * n_cases)
    labels = [0] * len(sizes)
    malignant = 0
    for p in rng.permutation(len(sizes)):
        if malignant + sizes[p] <= target:
            labels[p], malignant = 1, malignant + sizes[p]
    return list(zip(sizes, labels, strict=True))


def _lesion_params(label: int, rng: np.random.Generator) -> dict:
    """The patient's lesion; follow-up scans redraw only position, noise and (malignant) growth."""
    # most malignant lesions are clearly irregular; ~15 % are low-grade and look almost benign
    severity = (rng.uniform(0.1, 0.3) if rng.random() < 0.15 else rng.uniform(0.45, 1.0)) if label else 0.0
    return {
        "label": label,
        "radius": rng.uniform(3.5, 6.0) if label else rng.uniform(2.5, 5.0),  # mm; sizes overlap
        "lobulation": severity * rng.uniform(0.25, 0.45) if label else rng.uniform(0.0, 0.06),
        "lobes": int(rng.integers(3, 7)),
        "phases": rng.uniform(0, 2 * np.pi, 3),
        "spicules": [rng.normal(size=3) * [1, 1, 0.2] for _ in range(int(round(severity * rng.uniform(5, 12))))],
        "spicule_len": rng.uniform(4.0, 9.0, 12),
        "hu": rng.uniform(30, 60),
        "heterogeneity": severity * rng.uniform(15, 35) if label else rng.uniform(0, 5),
        "necrosis": bool(label and rng.random() < 0.4),
        "calcified": bool(not label and rng.random() < 0.35),
        "side": int(rng.integers(2)),
    }


def _scan(lesion: dict, scan: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan: int16 HU volume (x, y, z) and its affine (RAS or LPS storage)."""
    spacing = np.array([*[rng.uniform(0.74, 0.84)] * 2, rng.uniform(2.4, 2.6)])
    X, Y, Z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in GRID), indexing="ij")
    cx, cy = 23.5 + rng.normal(0, 0.8, 2)
    ax, ay = 21 + rng.uniform(-1, 0.5), 17 + rng.uniform(-1, 0.5)
    body = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
    hu = np.full(GRID, -1000.0, np.float32)
    hu[body <= 1] = -100.0  # subcutaneous fat
    hu[((X - cx) / (ax - 2.2)) ** 2 + ((Y - cy) / (ay - 2.2)) ** 2 <= 1] = 40.0
    lungs = []
    for side in (-1, 1):
        lx, ly, lz = cx + side * 10, cy + 1.5, 12 + rng.normal(0, 0.5)
        lung = ((X - lx) / 8.3) ** 2 + ((Y - ly) / 10.5) ** 2 + ((Z - lz) / 11) ** 2 <= 1
        hu[lung] = -850.0 + rng.normal(0, 15)
        lungs.append((lx, ly, lz))
    hu[((X - cx) ** 2 + (Y - (cy - 12)) ** 2 <= 2.6**2)] = 700.0  # vertebral body, posterior
    lx, ly, lz = lungs[lesion["side"]]
    center = np.array([lx + rng.uniform(-2.5, 2.5), ly + rng.uniform(-3, 3), lz + rng.uniform(-3, 3)])
    growth = rng.uniform(1.05, 1.3) ** scan if lesion["label"] else rng.uniform(0.97, 1.03)
    _add_lesion(hu, (X, Y, Z), center, spacing, lesion, growth, rng)
    hu += rng.normal(0, rng.uniform(12, 25), GRID).astype(np.float32)
    volume = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(GRID) * spacing / 2
    if rng.random() < 0.5:  # store as LPS: flip x and y voxel order, same world geometry
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [GRID[0] - 1, GRID[1] - 1]
        volume, affine = np.ascontiguousarray(volume[::-1, ::-1]), affine @ flip
    return volume, affine


def _add_lesion(hu, grid, center, spacing, lesion, growth, rng) -> None:
    """Blend the lesion into ``hu`` in place: smooth edge, lobulation, spicules, texture."""
    d = [(g - c) * s for g, c, s in zip(grid, center, spacing, strict=True)]  # mm from the centre
    dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    theta, phi = np.arctan2(d[1], d[0]), np.arccos(np.clip(d[2] / dist, -1, 1))
    p = lesion["phases"]
    shape = (np.cos(lesion["lobes"] * theta + p[0]) * np.sin(phi)
             + 0.6 * np.cos((lesion["lobes"] - 1) * phi + p[1]) + 0.4 * np.cos(2 * theta + p[2]))
    r = lesion["radius"] * growth * (1 + lesion["lobulation"] * shape / 2.0)
    weight = 1 / (1 + np.exp(-(r - dist) / 0.35))  # partial-volume edge
    for direction, length in zip(lesion["spicules"], lesion["spicule_len"], strict=False):
        u = direction / np.linalg.norm(direction)
        along = d[0] * u[0] + d[1] * u[1] + d[2] * u[2]
        off = np.sqrt(np.maximum(dist**2 - along**2, 0))
        reach = lesion["radius"] * growth + length
        taper = np.clip(1 - along / reach, 0, 1)
        spike = (along > 0) & (off < 1.0 * taper + 0.5) & (taper > 0)
        weight = np.maximum(weight, 0.85 * spike * taper**0.3)
    texture = ndimage.gaussian_filter(rng.normal(size=hu.shape), 1.2).astype(np.float32)
    texture /= texture.std() + 1e-6
    value = lesion["hu"] + lesion["heterogeneity"] * texture
    if lesion["necrosis"]:
        value = np.where(dist < 0.45 * lesion["radius"] * growth, 10.0 + 5 * texture, value + 15)
    if lesion["calcified"]:
        value = np.where(dist < 1.3, 450.0, value)
    hu[:] = (1 - weight) * hu + weight * value


def _write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """gzip with mtime 0: the same volume always gives the same bytes."""
    img = nib.Nifti1Image(volume, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
