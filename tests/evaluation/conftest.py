"""Session fixtures: two real cross-validation runs (see ``tests/conftest_runs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest_runs import make_tiny_npz, run_cv_pair


@pytest.fixture(scope="session")
def tiny_npz(medmnist_28: Path, tmp_path_factory) -> Path:
    return make_tiny_npz(medmnist_28, tmp_path_factory.getbasetemp() / "tiny_data")


@pytest.fixture(scope="session")
def cv_runs(tiny_npz: Path, tmp_path_factory) -> dict[str, Path]:
    """``{"resnet10": run folder, "mil": run folder}``, made once per session by ``medvox cv``."""
    return run_cv_pair(tiny_npz, tmp_path_factory.getbasetemp() / "cv_runs")
