"""Crash safety: SIGKILL at random moments and in the middle of checkpoint writes, a full disk, a
non-finite loss or diverged weights: every checkpoint on disk stays loadable, nothing good is
overwritten, the error says what happened, and ``--resume`` finishes the run with the same result as
an uninterrupted one."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medvox.cli import main
from medvox.engine.checkpoint import load_checkpoint, safetensors_epoch
from medvox.run import Fold, RunError
from tests.reliability.conftest import deterministic_cmd
from tests.reliability.helpers import FAST, MIL, comparable, medvox, popen_medvox, read_json

CHECKPOINTS = ("*.pt", "*.safetensors")


def _temp_files(run: Path) -> list[Path]:
    return list(run.glob(".*.tmp")) if run.is_dir() else []


def _checkpoint_bytes(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for pattern in CHECKPOINTS for p in run.glob(pattern)}


def _assert_every_checkpoint_loads(run: Path) -> dict[str, int]:
    """Each ``*.pt`` loads with ``load_checkpoint`` (finite weights), each ``*.safetensors`` with safetensors;
    no temp file could be taken for one. Returns ``{name: epoch}``."""
    epochs = {}
    for path in run.glob("*.pt"):
        ckpt = load_checkpoint(path)
        assert ckpt["model"] and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        epochs[path.name] = int(ckpt["epoch"])
    for path in run.glob("*.safetensors"):
        assert load_file(str(path))
    assert not [p for p in _temp_files(run) if p.suffix in (".pt", ".safetensors")]
    try:  # the checkpoint predict would use: the one the fold's metrics.json names, never another
        chosen = Fold(0, run).final_checkpoint() if run.is_dir() else None
    except RunError:  # unfinished, or its final weights are not written yet
        chosen = None
    assert chosen is None or chosen.name in ("best_ema.pt", "best.pt")
    return epochs


# The kills, in order (each on a fresh start with --resume): in the middle of the first best.pt/best_ema.pt
# write; at a seeded random moment just after last.pt of epoch 1 is complete; in the middle of overwriting
# last.pt (epoch 2), which must leave epoch 1's last.pt intact; at a seeded random moment after the start.
KILLS = ("write:best", "random_after:last.pt", "write:last.pt", "random")
_TEMP_PREFIXES = {"write:last.pt": (".last.pt.",),
                  "write:best": (".best.pt.", ".best_ema.pt.", ".best.safetensors.", ".best_ema.safetensors.")}


def _kill_at(proc, event: str, run: Path, rng: random.Random, stale: set[str]) -> list[str] | None:
    """SIGKILL ``proc`` at ``event``. Returns the temp files the kill left behind; None when the run ended
    by itself first."""
    give_up = time.monotonic() + 300

    def wait_until(ready) -> None:
        while proc.poll() is None and not ready():
            assert time.monotonic() < give_up, f"{event}: nothing happened for 5 minutes"
            time.sleep(0.002)

    if event.startswith("write:"):  # the moment a new temp file of that checkpoint appears: mid-write
        prefixes = _TEMP_PREFIXES[event]
        wait_until(lambda: any(p.name.startswith(prefixes) and p.name not in stale for p in _temp_files(run)))
    else:
        if event == "random_after:last.pt":
            wait_until((run / "last.pt").exists)
        deadline = time.monotonic() + (rng.uniform(0.0, 1.0) if event != "random" else rng.uniform(1.0, 6.0))
        wait_until(lambda: time.monotonic() > deadline)
    if proc.poll() is not None:
        return None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return [p.name for p in _temp_files(run) if p.name not in stale]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_write_then_resume(small_npz, deterministic_runs, tmp_path):
    rng = random.Random(20261125)
    out, run = tmp_path / "out", tmp_path / "out" / "resnet10" / "fold_0"
    # --resume from the first start on; --safetensors: the twins must survive the kills too
    argv = deterministic_cmd(small_npz, out, tmp_path / "cache", "--resume", "--safetensors")
    kills, left_behind = [], []
    for event in KILLS:
        stale = {p.name for p in _temp_files(run)}
        last_before = _assert_every_checkpoint_loads(run).get("last.pt")
        last_bytes = (run / "last.pt").read_bytes() if last_before is not None else None
        proc = popen_medvox(*argv, log=tmp_path / "train.log")
        try:
            left = _kill_at(proc, event, run, rng, stale)
        finally:  # never leave a training process behind, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if left is None:
            break  # the run finished before this kill
        kills.append(event)
        left_behind += left
        epochs = _assert_every_checkpoint_loads(run)  # after every kill: all checkpoints load
        if event.startswith("write:"):
            assert left, f"{event}: the kill did not land inside the write"
        if event == "write:last.pt":  # killed while overwriting: the previous last.pt, byte for byte
            assert last_before == 1 and epochs["last.pt"] == 1 and (run / "last.pt").read_bytes() == last_bytes
    assert kills[:3] == list(KILLS[:3]), kills
    assert any(name.startswith(".last.pt.") for name in left_behind)  # a half-written last.pt was really left

    last_epoch = _assert_every_checkpoint_loads(run).get("last.pt")
    # a safetensors twin that lags its .pt (a kill between the two renames) is rewritten on resume
    stale_twin = {k: torch.zeros_like(v) for k, v in load_file(run / "best.safetensors").items()}
    save_file(stale_twin, run / "best.safetensors", metadata={"epoch": "-1"})
    done = medvox(*argv, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / 'last.pt'} at epoch {last_epoch}" in done.stdout
    assert "best.safetensors did not hold the weights of best.pt" in done.stdout + done.stderr
    for name in ("best.pt", "best_ema.pt"):
        pt, twin = load_checkpoint(run / name), run / name.replace(".pt", ".safetensors")
        assert safetensors_epoch(twin) == pt["epoch"]
        assert all(torch.equal(load_file(twin)[k], v) for k, v in pt["model"].items())
    assert _temp_files(run) == []  # the half-written files of the killed runs were deleted, never loaded
    assert _assert_every_checkpoint_loads(run)["last.pt"] == 2

    # the same result as the uninterrupted deterministic run
    reference = deterministic_runs.a
    assert comparable(read_json(run / "metrics.json")) == comparable(read_json(reference / "metrics.json"))
    for name in ("best.pt", "best_ema.pt"):
        got, want = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert got["epoch"] == want["epoch"]
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def _mil_train(out: Path, cache: Path, small_npz: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(small_npz), "--folds", "2", "--epochs", "2", *MIL, *FAST, "--output", str(out),
            "--cache-dir", str(cache), *extra]


def test_full_disk_during_a_checkpoint_write(small_npz, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing an epoch-2 checkpoint: a clear error, exit 3, every epoch-1 checkpoint
    byte-identical and loadable, no temp file left; after space is freed ``--resume`` finishes the run."""
    run = tmp_path / "out" / "mil" / "fold_0"
    real_save, seen = torch.save, {}

    def disk_fills_up(obj, fh, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            seen.setdefault("before", _checkpoint_bytes(run))  # every epoch-1 checkpoint, before any epoch-2 write
            seen.setdefault("file", Path(os.readlink(f"/proc/self/fd/{fh.fileno()}")))  # the temp file
            fh.write(b"\0" * 4096)  # a part of the file reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    assert main(_mil_train(tmp_path / "out", tmp_path / "cache", small_npz)) == 3
    err = capsys.readouterr().err
    target = re.match(r"\.(.+)\.[^.]+\.tmp$", seen["file"].name).group(1)  # .best.pt.abc123.tmp -> best.pt
    assert err == (f"medvox: error: no space left on the device while writing {run / target}; the previous checkpoint "
                   "is intact. Free some space (or choose another --output) and continue with --resume.\n")
    assert set(seen["before"]) == {"best.pt", "best_ema.pt", "last.pt"}  # no safetensors twins without --safetensors
    assert _checkpoint_bytes(run) == seen["before"]
    assert _temp_files(run) == []
    assert _assert_every_checkpoint_loads(run) == {"best.pt": 1, "best_ema.pt": 1, "last.pt": 1}

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(_mil_train(tmp_path / "out", tmp_path / "cache", small_npz, "--resume")) == 0
    assert f"resumed from {run / 'last.pt'} at epoch 1" in capsys.readouterr().out
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "complete" and [h["epoch"] for h in metrics["history"]] == [1, 2]


class _NaNFromEpoch2(torch.nn.Module):
    """Wraps the real loss; from the second epoch on it returns NaN (as an fp16 overflow would)."""

    def __init__(self, inner, on_epoch_2):
        super().__init__()
        self.inner, self.epoch, self.on_epoch_2 = inner, 0, on_epoch_2

    def set_epoch(self, epoch: int) -> None:  # 0-based
        self.epoch = epoch
        self.inner.set_epoch(epoch)
        if epoch == 1:
            self.on_epoch_2()

    def forward(self, logits, target):
        loss = self.inner(logits, target)
        return loss * float("nan") if self.epoch >= 1 else loss


@pytest.mark.parametrize("failure", ["nan_loss", "diverged_weights"])
def test_non_finite_training_stops_with_exit_3_and_keeps_epoch_1(failure, small_npz, tmp_path, monkeypatch, capsys):
    """A NaN loss, or weights that turn Inf in the epoch's last step (the loss was still finite): the run stops
    with a clear message and exit code 3; best.pt / best_ema.pt / last.pt of epoch 1
    are byte-identical afterwards: never overwritten with NaN weights."""
    from medvox import losses
    from medvox.engine.trainer import FoldTrainer

    run = tmp_path / "out" / "mil" / "fold_0"
    seen = {}
    if failure == "nan_loss":
        real_build = losses.build_loss
        monkeypatch.setattr(losses, "build_loss", lambda *a, **k: _NaNFromEpoch2(
            real_build(*a, **k), lambda: seen.setdefault("before", _checkpoint_bytes(run))))
        message = ("the training loss became nan at batch 1 of the epoch; stopping before any checkpoint is "
                   "overwritten. Lower --lr, keep --grad_clip on, or use --precision fp32.")
    else:
        real_epoch = FoldTrainer._train_epoch

        def diverging_epoch(self, epoch):
            if epoch == 2:
                seen.setdefault("before", _checkpoint_bytes(run))
            stats = real_epoch(self, epoch)
            if epoch == 2:  # the last optimizer step of the epoch blew the weights up
                with torch.no_grad():
                    for p in self.raw_model.parameters():
                        p.fill_(float("inf"))
            return stats

        monkeypatch.setattr(FoldTrainer, "_train_epoch", diverging_epoch)
        message = ("the model's outputs on the val set are NaN/Inf: its weights diverged; stopping before any "
                   "checkpoint is overwritten. Lower --lr, keep --grad_clip on, or use --precision fp32.")

    assert main(_mil_train(tmp_path / "out", tmp_path / "cache", small_npz)) == 3
    assert capsys.readouterr().err == f"medvox: error: epoch 2: {message}\n"
    assert set(seen["before"]) == {"best.pt", "best_ema.pt", "last.pt"}  # no safetensors twins without --safetensors
    assert _checkpoint_bytes(run) == seen["before"]
    assert _assert_every_checkpoint_loads(run) == {"best.pt": 1, "best_ema.pt": 1, "last.pt": 1}
    assert _temp_files(run) == []
