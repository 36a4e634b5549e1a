"""Shared fixtures: paths to the real AdrenalMNIST3D files and tiny seeded volumes."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDMNIST_DIR = Path(os.environ.get("MEDVOX_MEDMNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "medmnist"))


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (set MEDVOX_MEDMNIST_DIR to the folder holding it)")
    return path


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), each worker keeps its own share of this process's
    CPUs, and the processes its tests start inherit it: medvox sizes its threads by the affinity mask, so two
    workers on two cores train side by side with one thread each instead of four threads time-slicing."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if workers < 2 or not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= workers:
        os.sched_setaffinity(0, cpus[int(worker[2:]) % workers::workers])


# Session fixtures that train or cross-validate: the test files that name one run on one xdist worker, so it is
# made once per suite, not once per worker.
SHARED_RUNS = ("cv_runs", "deterministic_runs", "trained_run")


@functools.cache
def _xdist_scope(file: str) -> str:
    """The scheduling unit of a test file: the first shared run its source names, else the file itself (its
    module fixtures are made once)."""
    source = (REPO_ROOT / file).read_text(encoding="utf-8") if (REPO_ROOT / file).is_file() else ""
    return next((name for name in SHARED_RUNS if re.search(rf"\b{name}\b", source)), file)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test``'s workers receive whole test files, and the files that share a training run together."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_scope(nodeid.split("::", 1)[0])

    return SharedRunScheduling(config, log)


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
