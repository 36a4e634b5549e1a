"""Two writers on one run folder: the second is refused at once, naming the first; the folder stays intact."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _train(data, out, *extra):
    return [sys.executable, "-m", "medvox", "train", "--data", str(data), "--output", str(out), "--model", "resnet10",
            "--epochs", "2", "--batch_size", "8", "--folds", "2", "--threads", "1", "--target-shape", "16", "16", "16",
            *extra]


def test_two_trainers_on_one_folder_one_is_refused_and_the_folder_intact(tiny_medmnist, tmp_path):
    out = tmp_path / "results"
    first = subprocess.Popen(_train(tiny_medmnist, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fold = out / "resnet10" / "fold_0"
    deadline = time.time() + 120
    while not (fold / ".medvox.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert (fold / ".medvox.lock").exists(), "the first trainer holds its fold's lock while it writes"
    second = subprocess.run(_train(tiny_medmnist, out, "--lr", "1e-3"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 5
    assert f"pid {first.pid}" in second.stderr and "is being written by another medvox process" in second.stderr
    assert "Traceback" not in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    config = json.loads((fold / "config.json").read_text())
    assert config["optim"]["lr"] == 2e-4  # the first run's, not the refused one's
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_run"] == 2
    assert not (fold / ".medvox.lock").exists()  # released at the end
    assert len(list((fold / "tensorboard").glob("events.*"))) <= 1
    log = (fold / "train.log").read_text()
    assert log.count("epoch   1 |") == 1  # one writer's lines only
