"""Shared fixtures: paths to the real AdrenalMNIST3D files and tiny seeded volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDMNIST_DIR = Path(os.environ.get("MEDVOX_MEDMNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "medmnist"))


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (set MEDVOX_MEDMNIST_DIR to the folder holding it)")
    return path


@pytest.fixture(scope="session")
def medmnist_28() -> Path:
    """AdrenalMNIST3D at 28^3 (official splits 1188/98/298)."""
    return _require(MEDMNIST_DIR / "adrenalmnist3d.npz")


@pytest.fixture(scope="session")
def medmnist_64() -> Path:
    """AdrenalMNIST3D at 64^3."""
    return _require(MEDMNIST_DIR / "adrenalmnist3d_64.npz")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own preprocessing cache, never the user's ~/.cache/medvox."""
    monkeypatch.setenv("MEDVOX_CACHE", str(tmp_path_factory.mktemp("medvox_cache")))


def medmnist_subset(source: Path, counts: dict[str, int], path: Path) -> Path:
    """The first ``counts[split]`` volumes of each split of a MedMNIST ``.npz``, written to ``path``."""
    src = np.load(source)
    out = {}
    for split, n in counts.items():
        out[f"{split}_images"] = src[f"{split}_images"][:n]
        out[f"{split}_labels"] = src[f"{split}_labels"][:n]
    np.savez(path, **out)
    return path


@pytest.fixture(scope="session")
def tiny_medmnist(medmnist_28, tmp_path_factory) -> Path:
    """A small slice of the real AdrenalMNIST3D (28^3): 80 train + 20 val (the CV pool) and 30 test volumes."""
    return medmnist_subset(medmnist_28, {"train": 80, "val": 20, "test": 30},
                           tmp_path_factory.mktemp("tiny_medmnist") / "adrenal_tiny.npz")


@pytest.fixture(scope="session")
def tiny_npz(medmnist_28: Path, tmp_path_factory) -> Path:
    from tests.conftest_runs import make_tiny_npz

    return make_tiny_npz(medmnist_28, tmp_path_factory.getbasetemp() / "tiny_data")


@pytest.fixture(scope="session")
def cv_runs(tiny_npz: Path, tmp_path_factory) -> dict[str, Path]:
    """``{"resnet10": run folder, "mil": run folder}``, made once per session by ``medvox cv``."""
    from tests.conftest_runs import run_cv_pair

    return run_cv_pair(tiny_npz, tmp_path_factory.getbasetemp() / "cv_runs")
