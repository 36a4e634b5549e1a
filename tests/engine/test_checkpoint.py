"""Checkpoints: atomic writes, a full disk keeps the old file, NaN weights are refused, pickles that run
code are refused."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

from medvox.engine import checkpoint as ckpt
from medvox.errors import CheckpointError, TrainingError


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 3)}, "epoch": 4, "history": [{"auc": 0.5}], "rng": torch.get_rng_state()}
    ckpt.atomic_save(state, tmp_path / "last.pt")
    back = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert back["epoch"] == 4 and back["history"] == [{"auc": 0.5}]
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_crash_during_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    def dying_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands in for a kill in the middle of torch.save

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_fails_clearly_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    def full(obj, fh):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(TrainingError, match="no space left.*previous checkpoint is intact"):
        ckpt.atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1


def test_a_checkpoint_and_its_safetensors_twin_are_replaced_together(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path, twin = tmp_path / "best.pt", tmp_path / "best.safetensors"
    w1 = {"w": torch.randn(3, 2)}
    ckpt.atomic_save({"model": w1, "epoch": 1}, path, {"epoch": "1"})
    assert ckpt.safetensors_epoch(twin) == 1 and torch.equal(load_file(twin)["w"], w1["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.safetensors"]

    # the disk fills while the twin is written: neither file is replaced, no temp file stays
    real_mkstemp, calls = ckpt.tempfile.mkstemp, []

    def second_fails(*args, **kwargs):
        calls.append(kwargs.get("prefix"))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", second_fails)
    with pytest.raises(TrainingError, match="no space left.*best.pt and .*best.safetensors"):
        ckpt.atomic_save({"model": {"w": torch.zeros(3, 2)}, "epoch": 2}, path, {"epoch": "2"})
    monkeypatch.undo()
    assert calls == [".best.pt.", ".best.safetensors."]
    assert ckpt.load_checkpoint(path)["epoch"] == 1 and ckpt.safetensors_epoch(twin) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.safetensors"]
    assert ckpt.safetensors_epoch(tmp_path / "missing.safetensors") is None
    path.with_suffix(".safetensors").write_bytes(b"not a safetensors file")
    assert ckpt.safetensors_epoch(twin) is None


def test_nan_weights_are_never_written(tmp_path):
    path = tmp_path / "best.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    with pytest.raises(TrainingError, match="'w' holds NaN/Inf"):
        ckpt.atomic_save({"model": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 2}, path)
    assert ckpt.load_checkpoint(path)["epoch"] == 1


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil(marker)}, fh, protocol=2)  # torch.load's own protocol: no warning
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "cut.pt"
    ckpt.atomic_save({"model": {"w": torch.randn(100)}}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cannot load"):
        ckpt.load_checkpoint(path)


def test_resume_with_another_config_is_refused_and_says_what_differs(tmp_path):
    """--resume refuses a config that differs from the interrupted run's, names the keys, and for a
    `--recipe auto` run whose machine-derived settings changed (CPU input cap, GPU batch) says which flags pin them."""
    from medvox.config import apply_overrides, resolve, to_dict
    from medvox.engine.setup import resume_state

    run = resolve(overrides={"data.path": "x.csv", "train.recipe": "auto", "data.target_shape": [28, 28, 28],
                             "train.batch_size": 16})
    ckpt.atomic_save({"config": to_dict(run), "model": {"w": torch.zeros(2)}}, tmp_path / "last.pt")
    again = apply_overrides(run, {"train.resume": True})
    assert resume_state(again, tmp_path)["config"] == to_dict(run)  # the same settings (resume itself is free)
    on_gpu = apply_overrides(again, {"data.target_shape": None, "train.batch_size": 8, "train.gpu": True})
    with pytest.raises(TrainingError, match="differs from the interrupted run in") as err:
        resume_state(on_gpu, tmp_path)
    assert "data.target_shape" in str(err.value) and "train.batch_size" in str(err.value)
    assert "--recipe auto chose data.target_shape, train.batch_size for the machine" in str(err.value)
    assert "--target-shape" in str(err.value)
    plain = apply_overrides(on_gpu, {"train.recipe": "original"})
    with pytest.raises(TrainingError) as err:
        resume_state(plain, tmp_path)
    assert "train.recipe" in str(err.value) and "--recipe auto chose" not in str(err.value)
