"""Shared by the report, comparison, export and explain tests (fixtures in ``tests/evaluation/conftest.py``
and ``tests/test_export.py`` call these).

:func:`run_cv_pair` runs the real ``medvox cv`` on a tiny AdrenalMNIST3D subset (60 train, 20 val, 20 test
at 28^3; 2 folds, 1 epoch): a ResNet-10 with the original pipeline's defaults (LDAM, EMA, TTA), and a small
slab-MIL with cross-entropy, EMA off and no TTA, so the two runs also cover the optional pieces. Both run at
once, one thread each, sharing one preprocessing cache (its lock makes that safe). The runs live under the
session's base temp folder and are reused when already there, so fixtures in several test folders share them.
:func:`make_checkpoint` writes a random model in the trainer's checkpoint format and
:func:`write_synthetic_run` a hand-made run folder, for fast unit tests; the last helpers check HTML pages.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

MIL_KWARGS = {"instance": "slab", "slab_size": 3, "slab_stride": 2, "channels": [8], "embed_dim": 16,
              "attention_dim": 8}


def make_tiny_npz(source: Path, folder: Path) -> Path:
    """The first 60 train, 20 val and 20 test volumes of AdrenalMNIST3D (28^3) as a MedMNIST-style .npz."""
    path = folder / "adrenal_tiny.npz"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    data = np.load(source)
    subset = {}
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        subset[f"{split}_images"] = data[f"{split}_images"][:n]
        subset[f"{split}_labels"] = data[f"{split}_labels"][:n]
    np.savez(path, **subset)
    return path


def run_cv_pair(npz: Path, root: Path) -> dict[str, Path]:
    """``{"resnet10": run folder, "mil": run folder}`` made by the real CLI (reused when finished)."""
    runs = {"resnet10": root / "out" / "resnet10", "mil": root / "out" / "mil"}
    if all((r / "cv_summary.json").is_file() for r in runs.values()):
        return runs
    root.mkdir(parents=True, exist_ok=True)
    common = ["cv", "--data", str(npz), "--epochs", "1", "--folds", "2", "--batch_size", "8",
              "--output", str(root / "out"), "--cache-dir", str(root / "cache"), "--threads", "1"]
    commands = {
        "resnet10": [*common, "--model", "resnet10"],
        "mil": [*common, "--model", "mil", "--set", f"model.kwargs={json.dumps(MIL_KWARGS)}", "--loss", "CE",
                "--ema_decay", "0", "--no-tta"],
    }
    env = {**os.environ, "MEDVOX_CACHE": str(root / "cache")}
    procs = {}
    for name, args in commands.items():
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = (subprocess.Popen([sys.executable, "-m", "medvox.cli", *args], stdout=log,
                                        stderr=subprocess.STDOUT, env=env), log)
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=600)
        log.close()
        if code != 0:
            tail = (root / f"{name}.log").read_text()[-3000:]
            pytest.fail(f"`medvox cv` for {name} failed with exit code {code}:\n{tail}")
    return runs


def tiny_plan(shape=(16, 16, 16), classes=("0", "1")) -> dict:
    return {"target_spacing": [1.0, 1.0, 1.0], "target_shape": list(shape), "in_channels": 1,
            "normalization": [{"scheme": "none"}], "classes": list(classes), "storage_dtype": "float32"}


def make_checkpoint(path: Path, name: str, plan: dict | None = None, seed: int = 0, temperature: float | None = None,
                    **kwargs) -> Path:
    """A random (seeded) model saved like the trainer's ``best.pt``; ``temperature`` adds calibration.json."""
    from medvox.config import ExperimentConfig, to_dict
    from medvox.models import create_model

    plan = plan or tiny_plan()
    cfg = to_dict(ExperimentConfig())
    cfg["model"].update(name=name, kwargs=kwargs, cosine_head=False, dropout=0.0)
    torch.manual_seed(seed)
    model = create_model(name, in_channels=1, num_classes=len(plan["classes"]), dropout=0.0, cosine_head=False,
                         **kwargs)
    _randomise_batchnorm(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg, "plan": plan, "classes": plan["classes"],
                "in_channels": 1, "epoch": 1, "kind": "raw"}, path)
    if temperature is not None:
        (path.parent / "calibration.json").write_text(json.dumps({"temperature": temperature}))
    return path


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so eval-mode outputs differ between inputs and models."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)


def write_synthetic_run(path: Path, ids: list[str], labels: list[int], probs: np.ndarray, classes=("0", "1"),
                        test: tuple[list[str], list[int], np.ndarray] | None = None, decision=None,
                        temperatures: list[float] | None = None, folds: list[int] | None = None) -> Path:
    """A run folder written by hand (no training) in the format `medvox cv` writes: cv_summary.json, one fold per
    distinct value of ``folds`` (default one), the prediction CSVs through medvox's own writer; ``probs`` are the
    final (calibrated) OOF probabilities, ``decision`` the run's (default: the argmax)."""
    from medvox import run as runfiles
    from medvox.cv.summary import figures_of, fold_table
    from medvox.metrics.classification import compute_metrics
    from medvox.metrics.decision import Decision

    classes = list(classes)
    path.mkdir(parents=True, exist_ok=True)
    decision = decision or Decision.argmax(classes, "a synthetic run")
    folds = list(folds) if folds is not None else [0] * len(ids)
    k = max(folds) + 1
    oof_path = runfiles.write_predictions(path / runfiles.OOF_PREDICTIONS, ids, ids, np.asarray(labels), probs, classes,
                                          decision, extra={"fold": [str(f) for f in folds]})
    oof = compute_metrics(labels, probs, class_names=classes)
    summary = {"format_version": runfiles.FORMAT_VERSION, "model": "synthetic", "folds": k, "classes": classes,
               "monitor": "auc", "members": [f"fold_{f}/best.pt" for f in range(k)], "probabilities": "calibrated",
               "decision": decision.to_json(), "cv": fold_table([oof] * k), "cv_at_decision": fold_table([oof] * k),
               "oof": figures_of(runfiles.read_predictions(oof_path)),
               "calibration": [{"temperature": t} for t in temperatures or []], "test": None}
    if test is not None:
        t_ids, t_labels, t_probs = test
        t_path = runfiles.write_predictions(path / runfiles.TEST_PREDICTIONS, t_ids, t_ids, np.asarray(t_labels),
                                            t_probs, classes, decision, extra={"spread": ["0.0"] * len(t_ids)})
        summary["test"] = {"n": len(t_ids), "tta": False, "members": [], "final": "ensemble_calibrated",
                           "ensemble_calibrated": compute_metrics(t_labels, t_probs, class_names=classes),
                           "final_at_threshold": figures_of(runfiles.read_predictions(t_path))}
    (path / runfiles.CV_SUMMARY).write_text(json.dumps(summary))
    for f in range(k):
        fold = path / f"fold_{f}"
        fold.mkdir(exist_ok=True)
        (fold / runfiles.METRICS).write_text(json.dumps({"status": "complete", "classes": classes, "epochs_run": 1,
                                                         "final": {"weights": "best.pt", "epoch": 1, "val": oof}}))
    return path


# ------------------------------------------------------------------ HTML pages

def image_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def decode_png(src: str) -> np.ndarray:
    """Decode a ``data:image/png;base64`` URI fully (a truncated or bogus PNG raises)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)), format="png")


def assert_self_contained(page: str) -> None:
    """No script, no stylesheet link, no remote or file URL anywhere; images only as data URIs."""
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)
    assert "url(" not in page and "@import" not in page
    for src in image_sources(page):
        image = decode_png(src)
        assert image.shape[0] > 50 and image.shape[1] > 50
