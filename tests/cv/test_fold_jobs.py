"""Fold-parallel jobs (a SLURM array: one ``medvox train --fold K`` per task), then ``medvox cv`` collects them:
finished folds are reused, in whatever order they finished, never retrained; a fold trained with other settings
is refused by name, and a fold another job is still training is refused by its lock. ``medvox cv`` with 2 DDP
processes writes one summary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# one ResNet-10 epoch at 16^3 on 48 pool cases: each fold trains in seconds
SETTINGS = ("--model", "resnet10", "--batch_size", "4", "--folds", "2", "--threads", "1", "--target-shape", "16", "16",
            "16")


def _medvox(*args: str) -> list[str]:
    return [sys.executable, "-m", "medvox", *args]


def _checkpoint_times(fold: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(fold.glob("*.pt"))}


@pytest.fixture(scope="module")
def fold_jobs(medmnist_28, tmp_path_factory) -> dict:
    """Three ``medvox train`` jobs started together: folds 1 and 0 of run ``jobs``, and fold 0 of run ``mixed``
    with another learning rate (its fold 1 is a copy of ``jobs``' fold 1)."""
    from tests.conftest import medmnist_subset

    root = tmp_path_factory.mktemp("fold_jobs")
    data = medmnist_subset(medmnist_28, {"train": 40, "val": 8, "test": 8}, root / "adrenal_56.npz")
    where = ("--data", str(data), "--cache-dir", str(root / "cache"), "--output", str(root / "out"))
    common = (*where, *SETTINGS, "--epochs", "1")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    jobs = {name: subprocess.Popen(_medvox("train", *common, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=root)
            for name, extra in (("jobs/fold_1", ("--run-name", "jobs", "--fold", "1")),
                                ("jobs/fold_0", ("--run-name", "jobs", "--fold", "0")),
                                ("mixed/fold_0", ("--run-name", "mixed", "--fold", "0", "--lr", "1e-3")))}
    logs = {name: job.communicate(timeout=600)[0] for name, job in jobs.items()}
    assert {name: job.returncode for name, job in jobs.items()} == dict.fromkeys(jobs, 0), logs
    out = root / "out"
    shutil.copytree(out / "jobs" / "fold_1", out / "mixed" / "fold_1")
    return {"root": root, "out": out, "where": where, "common": common, "env": env, "logs": logs}


def test_cv_collects_the_folds_the_jobs_trained_without_retraining(fold_jobs):
    out, run = fold_jobs["out"], fold_jobs["out"] / "jobs"
    # `medvox train --fold K` wrote where `medvox cv` reads: <output>/<run name>/fold_K
    before = {k: _checkpoint_times(run / f"fold_{k}") for k in (0, 1)}
    assert all({"best.pt", "best_ema.pt", "last.pt"} <= set(times) for times in before.values())
    done = subprocess.run(_medvox("cv", *fold_jobs["common"], "--run-name", "jobs", "--no-tta"), capture_output=True,
                          text=True, env=fold_jobs["env"], cwd=fold_jobs["root"], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("with these settings: reused") == 2
    assert "epoch   1 |" not in done.stdout  # nothing trained
    assert {k: _checkpoint_times(run / f"fold_{k}") for k in (0, 1)} == before
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["members"] == ["fold_0/best_ema.pt", "fold_1/best_ema.pt"]
    pool = json.loads((run / "fold_0" / "splits.json").read_text())["folds"]
    oof = (run / "oof_predictions.csv").read_text().strip().splitlines()
    assert len(oof) - 1 == sum(len(f["val"]) for f in pool) == 48  # every pool case once, from its own fold
    assert not list(out.rglob(".medvox.lock"))


def test_cv_refuses_a_fold_trained_with_another_learning_rate(fold_jobs):
    run = fold_jobs["out"] / "mixed"
    before = {k: _checkpoint_times(run / f"fold_{k}") for k in (0, 1)}
    done = subprocess.run(_medvox("cv", *fold_jobs["common"], "--run-name", "mixed", "--no-tta"), capture_output=True,
                          text=True, env=fold_jobs["env"], cwd=fold_jobs["root"], timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{run / 'fold_0'} was trained with other settings (optim.lr: 0.001 there, 0.0002 now)" in done.stderr
    assert "nothing was changed" in done.stderr
    assert {k: _checkpoint_times(run / f"fold_{k}") for k in (0, 1)} == before
    assert not (run / "cv_summary.json").exists()


def test_cv_refuses_a_fold_another_job_is_still_training(fold_jobs, tmp_path):
    """A job still training fold 0 holds its lock: cv stops there, naming the job, and touches nothing."""
    common = (*fold_jobs["where"], *SETTINGS, "--epochs", "500", "--run-name", "busy")
    fold = fold_jobs["out"] / "busy" / "fold_0"
    job = subprocess.Popen(_medvox("train", *common, "--fold", "0"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=fold_jobs["env"], cwd=fold_jobs["root"])
    try:
        deadline = time.monotonic() + 300
        while not (fold / "config.json").exists():  # written by the job under its lock, before its first epoch
            assert job.poll() is None and time.monotonic() < deadline, "the training job ended or did not start"
            time.sleep(0.5)
        done = subprocess.run(_medvox("cv", *common, "--no-tta"), capture_output=True, text=True,
                              env=fold_jobs["env"], cwd=fold_jobs["root"], timeout=600)
        assert job.poll() is None, "the job finished before cv ran: the test needs it still training"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{fold} is being written by another medvox process (pid {job.pid} on " in done.stderr
    assert not (fold.parent / "cv_summary.json").exists()


def test_cv_on_two_ddp_processes_writes_one_summary(medmnist_28, tmp_path):
    """``medvox cv --devices 2``: both ranks train every fold; rank 0 alone locks the run folder (the other rank,
    started by Fabric, runs the same command) and writes the summary."""
    from tests.conftest import medmnist_subset

    data = medmnist_subset(medmnist_28, {"train": 40, "val": 8, "test": 8}, tmp_path / "adrenal_56.npz")
    done = subprocess.run(_medvox("cv", "--data", str(data), "--output", str(tmp_path / "out"), *SETTINGS,
                                  "--epochs", "1", "--devices", "2", "--no-tta"), capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = tmp_path / "out" / "resnet10"
    assert "2 process(es)" in done.stdout and done.stdout.count("cross-validation of resnet10") == 1
    assert json.loads((run / "cv_summary.json").read_text())["members"] == ["fold_0/best_ema.pt",
                                                                              "fold_1/best_ema.pt"]
    assert len((run / "oof_predictions.csv").read_text().strip().splitlines()) - 1 == 48
    assert not list(run.rglob(".medvox.lock")) and not list(run.rglob(".*.tmp"))
