"""Session fixtures of the reliability tests: a small real data set and the trained runs several tests share.

Runs are trained once per session by the real ``medvox`` command, one thread each.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import medmnist_subset
from tests.reliability.helpers import FAST, MIL


@pytest.fixture(autouse=True)
def _restore_process_state():
    """In-process ``medvox train`` sets torch's thread count and attaches log handlers (train.log) to the
    ``medvox`` logger: undo both, so no test writes into another test's run folder or runs slower."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    detach_medvox_logging()


def detach_medvox_logging() -> None:
    logger = logging.getLogger("medvox")
    for handler in list(logger.handlers):
        if getattr(handler, "_medvox", False):
            logger.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="session")
def small_npz(medmnist_28: Path, tmp_path_factory) -> Path:
    """The first 24 train, 8 val and 8 test volumes of AdrenalMNIST3D (28^3): a 32-case pool, 8 held out."""
    return medmnist_subset(medmnist_28, {"train": 24, "val": 8, "test": 8},
                           tmp_path_factory.mktemp("small_npz") / "adrenal_small.npz")


def deterministic_cmd(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """The 2-epoch deterministic ResNet-10 run that the reproducibility and crash tests compare."""
    return ["train", "--data", str(data), "--model", "resnet10", "--epochs", "2", "--batch_size", "4", "--folds", "2",
            "--output", str(out), "--cache-dir", str(cache), "--deterministic", "--threads", "1",
            "--ema_decay", "0.9", "--early_stopping", "0", "--seed", "7", *extra]


@dataclass
class DeterministicRuns:
    a: Path  # fold folder of the first run
    b: Path  # fold folder of the second run
    argv: list[str]  # the CLI arguments of run a
    cwd: Path  # where both ran


@pytest.fixture(scope="session")
def deterministic_runs(small_npz: Path, tmp_path_factory) -> DeterministicRuns:
    """The same deterministic run twice, in two processes started together (one thread each)."""
    root = tmp_path_factory.mktemp("deterministic")
    # --safetensors: the reproducibility and safe-loading tests compare the twins as well
    argv = {name: deterministic_cmd(small_npz, root / name, root / f"cache_{name}", "--safetensors")
            for name in ("a", "b")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "medvox.cli", *args], cwd=root, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
             for name, args in argv.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"run {name} failed:\n{err[-3000:]}"
    return DeterministicRuns(root / "a" / "resnet10" / "fold_0", root / "b" / "resnet10" / "fold_0", argv["a"], root)


@pytest.fixture(scope="session")
def trained_run(small_npz: Path, tmp_path_factory) -> Path:
    """A tiny MIL model trained 1 epoch on 16^3 inputs (``--target-shape 16 16 16``), by the in-process CLI;
    returns the run folder ``<out>/mil`` (``fold_0`` inside) that ``medvox predict --run`` takes."""
    from medvox.cli import main

    root = tmp_path_factory.mktemp("trained16")
    threads = torch.get_num_threads()
    argv = ["train", "--data", str(small_npz), *MIL, *FAST, "--epochs", "1", "--folds", "2",
            "--target-shape", "16", "16", "16", "--output", str(root / "out"), "--cache-dir", str(root / "cache"),
            "--safetensors"]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        detach_medvox_logging()
    return root / "out" / "mil"
