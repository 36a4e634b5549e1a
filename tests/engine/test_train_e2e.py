"""The real CLI trains on real AdrenalMNIST3D: the original command line verbatim, every artifact,
exact resume after SIGKILL, and a 2-process DDP run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medvox.cli import main
from medvox.engine.checkpoint import load_checkpoint
from tests.models.reference_layouts import MEDICALNET_TENSOR_COUNTS, medicalnet_table

pytestmark = pytest.mark.slow


def _trained_like(table) -> dict[str, torch.Tensor]:
    """Tensors with the statistics of a trained network (He-scaled convs, unit BN), not raw N(0, 1)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in table:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif len(shape) == 5:
            fan_out = shape[0] * shape[2] * shape[3] * shape[4]
            out[key] = torch.randn(shape, generator=gen) * (2.0 / fan_out) ** 0.5
        elif key.endswith(("weight", "running_var")):
            out[key] = 1.0 + 0.05 * torch.rand(shape, generator=gen)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=gen)
    return out


def _medicalnet_checkpoint(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """A file in MedicalNet's exact layout: {"state_dict": {"module.<key>": tensor}}, no head."""
    tensors = _trained_like(medicalnet_table(depth))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, path)
    return tensors


def test_original_command_line_writes_every_artifact(tiny_medmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tensors = _medicalnet_checkpoint(tmp_path / "pretrained" / "medicalnet_resnet50_3d.pth", 50)
    # the project folder names its data once; the original command line stays exactly as it was
    (tmp_path / "medvox.json").write_text(json.dumps({"data": {"path": str(tiny_medmnist)}}))
    argv = ("train --fold 0 --pretrained-path pretrained/medicalnet_resnet50_3d.pth --lr 2e-4 "
            "--batch_size 6 --epochs 2 --optimizer adam --loss LDAM --multi_gpu --gpu --amp").split()
    assert main(argv) == 0
    run = tmp_path / "results" / "resnet50" / "fold_0"
    for name in ("best.pt", "best_ema.pt", "last.pt", "metrics.json", "config.json", "loss_curve.png",
                 "learning_curves.png", "confusion_matrix_epoch_001.png", "roc_curve_epoch_002.png",
                 "log.csv", "run_info.json", "splits.json", "pretrained_report.json", "val_predictions.csv",
                 "test_predictions.csv", "train.log"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())

    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optim"]["lr"], cfg["optim"]["optimizer"], cfg["loss"]["name"]) == (2e-4, "adam", "LDAM")
    assert (cfg["train"]["batch_size"], cfg["train"]["grad_accum"], cfg["train"]["grad_clip"]) == (6, 2, 0.5)
    assert (cfg["train"]["ema_decay"], cfg["train"]["early_stopping"], cfg["model"]["dropout"]) == (0.999, 7, 0.4)

    metrics = json.load(open(run / "metrics.json"))
    assert metrics["status"] == "complete" and [h["epoch"] for h in metrics["history"]] == [1, 2]
    for entry in metrics["history"]:
        assert {"accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "precision",
                "confusion_matrix", "loss"} <= set(entry["val"])
        assert "val_ema" in entry
    assert metrics["final"]["weights"] == "best_ema.pt"
    assert metrics["final"]["test"]["n"] == 30

    report = json.loads((run / "pretrained_report.json").read_text())
    log_text = (run / "train.log").read_text()
    assert f"Successfully loaded {MEDICALNET_TENSOR_COUNTS[50]}/{MEDICALNET_TENSOR_COUNTS[50]}" in log_text
    assert "fc.weight" in json.dumps(report)
    # the loaded backbone tensor really is the file's (the first step moved it only slightly)
    best = load_checkpoint(run / "best.pt")
    assert best["config"]["model"]["pretrained_path"].endswith("medicalnet_resnet50_3d.pth")
    assert best["model"]["layer1.0.conv1.weight"].shape == tensors["layer1.0.conv1.weight"].shape


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medvox.cli", "train", "--data", str(data), "--model", "resnet10",
            "--epochs", "4", "--batch_size", "8", "--folds", "3", "--output", str(out), "--deterministic",
            "--threads", "1", "--ema_decay", "0.9", "--early_stopping", "0", *extra]


def _comparable(metrics: dict) -> dict:
    """metrics.json without wall-clock timings."""
    for entry in metrics["history"]:
        entry.pop("time")
    return metrics


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_medmnist, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_train_cmd(tiny_medmnist, tmp_path / "a"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_medmnist, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "resnet10" / "fold_0" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["epoch"]
    assert 2 <= killed_at < 4
    done = subprocess.run(_train_cmd(tiny_medmnist, tmp_path / "b", "--resume"), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a = _comparable(json.load(open(tmp_path / "a" / "resnet10" / "fold_0" / "metrics.json")))
    b = _comparable(json.load(open(tmp_path / "b" / "resnet10" / "fold_0" / "metrics.json")))
    assert a == b


def test_existing_run_is_never_overwritten_without_resume(tiny_medmnist, tmp_path):
    cmd = _train_cmd(tiny_medmnist, tmp_path, "--epochs", "1")
    subprocess.run(cmd, check=True, capture_output=True)
    run = tmp_path / "resnet10" / "fold_0"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    assert before == after


def test_resume_refuses_a_run_started_on_another_preprocessing_plan(tiny_medmnist, tmp_path):
    """Same config, other plan (the data changed, or medvox plans differently): --resume refuses, names what
    changed and leaves the run as it was."""
    # keep_resume_state: the last.pt of a fold killed after its last epoch, before it finished
    cmd = _train_cmd(tiny_medmnist, tmp_path, "--epochs", "2", "--set", "train.keep_resume_state=true")
    subprocess.run(cmd, check=True, capture_output=True)
    run = tmp_path / "resnet10" / "fold_0"
    (run / "metrics.json").unlink()  # as if killed after its last epoch's last.pt
    state = load_checkpoint(run / "last.pt")
    assert state["plan"]["antialias"] is True
    del state["plan"]["antialias"]  # another plan: the same settings planned without anti-aliasing
    torch.save(state, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert again.returncode != 0
    assert "another plan (it differs in antialias" in again.stderr and "nothing was changed" in again.stderr
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    state["plan"]["antialias"] = True  # the same plan: the run resumes (and, at its last epoch, finishes)
    torch.save(state, run / "last.pt")
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-2000:]


def test_two_process_ddp_on_cpu_gathers_the_whole_validation_set(tiny_medmnist, tmp_path):
    cmd = _train_cmd(tiny_medmnist, tmp_path, "--epochs", "2", "--devices", "2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "resnet10" / "fold_0"
    metrics = json.load(open(run / "metrics.json"))
    n_val = len(json.load(open(run / "splits.json"))["folds"][0]["val"])
    assert all(h["val"]["n"] == n_val for h in metrics["history"])  # every case once, over both ranks
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + 2  # header + 2 epochs, written once
    assert done.stdout.count("epoch   1 |") == 1  # only rank 0 reports


def test_training_start_up_imports_neither_monai_nor_torchmetrics(tiny_medmnist, tmp_path):
    """A ResNet run reaches its first optimizer step without importing MONAI (~1 s) or torchmetrics (~1 s
    through Fabric's version check): the warm start-up target of benchmarks/ leaves no room for either."""
    probe = (
        "import os, sys\n"
        "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "def first_step(*_):\n"
        "    print('LOADED', 'monai' in sys.modules, 'torchmetrics' in sys.modules, flush=True)\n"
        "    os._exit(0)\n"
        "register_optimizer_step_post_hook(first_step)\n"
        "from medvox.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["train", "--data", str(tiny_medmnist), "--cache-dir", str(tmp_path / "cache"), "--model", "resnet10",
            "--batch_size", "4", "--epochs", "1", "--folds", "2", "--output", str(tmp_path / "run")]
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    # Fabric imports torchmetrics whenever it is installed (it is not a medvox dependency): only where it
    # is absent can its absence from the process be asserted
    torchmetrics_installed = importlib.util.find_spec("torchmetrics") is not None
    assert f"LOADED False {torchmetrics_installed}" in out.stdout, out.stdout + out.stderr[-2000:]
