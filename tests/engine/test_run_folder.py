"""A lean run folder: a finished fold keeps best.pt, best_ema.pt and a last.pt of the last epoch's weights only
(about 3x the model's weights in all), no safetensors twins unless asked for; an unfinished fold keeps the full
resume state and resumes exactly; a finished fold is never resumed (``medvox cv`` again skips it)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from medvox.cli import main
from medvox.engine.checkpoint import RESUME_STATE_KEYS, load_checkpoint, safetensors_epoch
from tests.reliability.helpers import FAST, MIL, comparable, snapshot

pytestmark = pytest.mark.usefixtures("clean_process")


def _args(data, out, *extra) -> list[str]:
    return ["--data", str(data), *FAST, "--epochs", "2", "--folds", "2", "--target-shape", "16", "16", "16",
            "--deterministic", "--ema_decay", "0.9", "--early_stopping", "0", "--plots", "final", "--output", str(out),
            *extra]


def _stamps(paths) -> dict:
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_fold_is_three_weight_files_and_last_pt_has_no_resume_state(tiny_medmnist, tmp_path):
    lean, full = tmp_path / "lean", tmp_path / "full"
    assert main(["train", *_args(tiny_medmnist, lean, "--model", "resnet10")]) == 0
    assert main(["train", *_args(tiny_medmnist, full, "--model", "resnet10", "--set",
                                 "train.keep_resume_state=true")]) == 0
    fold, kept = lean / "resnet10" / "fold_0", full / "resnet10" / "fold_0"
    assert not list(fold.glob("*.safetensors"))  # one format per role: safetensors only with --safetensors

    last, reference = load_checkpoint(fold / "last.pt"), load_checkpoint(kept / "last.pt")
    assert not set(RESUME_STATE_KEYS) & set(last), sorted(last)
    assert set(RESUME_STATE_KEYS) <= set(reference)  # train.keep_resume_state=true: all of it stays
    assert (last["kind"], last["epoch"], last["status"]) == ("last", 2, "complete")
    assert last["classes"] == reference["classes"] and last["plan"] == reference["plan"]
    assert last["config"]["model"]["name"] == "resnet10" and [h["epoch"] for h in last["history"]] == [1, 2]
    assert _weights_equal(last["model"], reference["model"])  # the last epoch's weights, not the best ones

    weights = sum(v.numel() * v.element_size() for v in last["model"].values())
    total = sum(p.stat().st_size for p in fold.rglob("*") if p.is_file())
    small = sum(p.stat().st_size for p in fold.rglob("*") if p.is_file() and p.suffix != ".pt")
    print(f"fold folder {total / 2**20:.1f} MiB, weights {weights / 2**20:.1f} MiB, other files {small / 2**20:.2f} MiB")
    assert small < 4 * 2**20  # plots, logs, predictions, JSON
    assert total <= 3 * weights * 1.01 + small  # best.pt + best_ema.pt + last.pt, each the weights + a header
    assert json.loads((fold / "metrics.json").read_text())["status"] == "complete"


def test_an_interrupted_fold_keeps_its_resume_state_and_resumes_exactly(tiny_medmnist, tmp_path, monkeypatch):
    from medvox.engine.trainer import FoldTrainer

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *MIL, *_args(tiny_medmnist, a)]) == 0

    real_epoch = FoldTrainer._run_epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as a Ctrl-C (or a preemption) in the middle of the fold
        return real_epoch(self, epoch)

    monkeypatch.setattr(FoldTrainer, "_run_epoch", killed_in_epoch_2)
    assert main(["train", *MIL, *_args(tiny_medmnist, b)]) == 130
    run = b / "mil" / "fold_0"
    interrupted = load_checkpoint(run / "last.pt")
    assert interrupted["epoch"] == 1 and set(RESUME_STATE_KEYS) <= set(interrupted) and "status" not in interrupted
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"

    monkeypatch.setattr(FoldTrainer, "_run_epoch", real_epoch)
    assert main(["train", *MIL, *_args(tiny_medmnist, b, "--resume")]) == 0
    reference = a / "mil" / "fold_0"
    assert comparable(json.loads((run / "metrics.json").read_text())) == comparable(
        json.loads((reference / "metrics.json").read_text()))
    for name in ("best.pt", "best_ema.pt", "last.pt"):
        got, want = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert got["epoch"] == want["epoch"] and _weights_equal(got["model"], want["model"]), name
    assert not set(RESUME_STATE_KEYS) & set(load_checkpoint(run / "last.pt"))  # finished now: slimmed


def test_a_finished_fold_is_never_resumed(tiny_medmnist, tmp_path, capsys):
    """`medvox cv` again on a finished run skips every fold without touching it; a slim last.pt whose
    metrics.json lost its final record is refused with the reason, nothing written."""
    argv = ["cv", *MIL, *_args(tiny_medmnist, tmp_path)]
    assert main(argv) == 0
    folds = [tmp_path / "mil" / f"fold_{k}" for k in range(2)]
    trained = [f / name for f in folds for name in ("best.pt", "best_ema.pt", "last.pt", "metrics.json", "train.log")]
    before = _stamps(trained)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"{fold} is already finished (complete) with these settings: reused" in out for fold in folds)
    assert _stamps(trained) == before  # the summary is written again; the folds' training files are not

    fold = folds[0]
    doc = json.loads((fold / "metrics.json").read_text())
    del doc["final"]
    (fold / "metrics.json").write_text(json.dumps(doc))
    before = snapshot(fold)
    assert main(["train", *MIL, *_args(tiny_medmnist, tmp_path, "--resume")]) == 3
    err = capsys.readouterr().err
    assert f"{fold / 'last.pt'} holds only the last weights of a finished fold (complete" in err
    assert "nothing was changed" in err
    assert snapshot(fold) == before


def test_safetensors_on_request(tiny_medmnist, tmp_path):
    assert main(["train", *MIL, *_args(tiny_medmnist, tmp_path, "--safetensors")]) == 0
    fold = tmp_path / "mil" / "fold_0"
    for stem in ("best", "best_ema"):
        assert safetensors_epoch(fold / f"{stem}.safetensors") == load_checkpoint(fold / f"{stem}.pt")["epoch"]
