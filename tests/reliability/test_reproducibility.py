"""Reproducibility: ``--deterministic`` with one seed gives bit-identical results in two processes, and the run
folder records what is needed to audit it: versions, git commit, hardware, the command, the full config, the
splits and a hash of the data that changes when an input file's content changes."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import medvox
from medvox.cli import build_parser, config_from_args
from medvox.config import DataConfig, to_dict
from medvox.data import prepare
from medvox.engine.checkpoint import load_checkpoint
from medvox.engine.runinfo import content_hash
from tests.reliability.corpus import good_rows, volume, write_manifest, write_nifti
from tests.reliability.helpers import comparable, read_json

pytestmark = pytest.mark.slow


def test_deterministic_runs_are_bit_identical(deterministic_runs):
    a, b = deterministic_runs.a, deterministic_runs.b
    metrics_a = read_json(a / "metrics.json")
    assert metrics_a["status"] == "complete" and [h["epoch"] for h in metrics_a["history"]] == [1, 2]
    assert comparable(metrics_a) == comparable(read_json(b / "metrics.json"))
    for name in ("best.pt", "best_ema.pt", "last.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["epoch"] == cb["epoch"] and ca["model"].keys() == cb["model"].keys()
        for key, tensor in ca["model"].items():
            assert torch.equal(tensor, cb["model"][key]), f"{name}: {key} differs"
    for name in ("best.safetensors", "best_ema.safetensors"):  # the same tensors; metadata differ in paths only
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
            ma, mb = fa.metadata(), fb.metadata()
        assert {k: v for k, v in ma.items() if k != "config"} == {k: v for k, v in mb.items() if k != "config"}
    for name in ("val_predictions.csv", "test_predictions.csv", "splits.json", "plan.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(medvox.__file__).parent, capture_output=True, text=True,
                              timeout=10)
    except OSError:
        return None


def test_run_folder_records_versions_hardware_config_splits_and_data(deterministic_runs, monkeypatch):
    run, argv = deterministic_runs.a, deterministic_runs.argv
    info = read_json(run / "run_info.json")
    from importlib.metadata import version

    assert info["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                                "monai": monai.__version__, "lightning_fabric": version("lightning-fabric"),
                                "numpy": np.__version__, "medvox": medvox.__version__}
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        assert info["git_commit"] is None
    else:  # the commit the run was made from (HEAD then; a later commit may have landed since)
        commit = info["git_commit"].removesuffix("-dirty")
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        assert _git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0
    from medvox import machine

    assert info["hardware"] == {"platform": platform.platform(), "cpu": info["hardware"]["cpu"],
                                "cpu_count": os.cpu_count(), "torch_threads": 1, "gpus": [],
                                "cuda": torch.version.cuda, "cpus_available": machine.available_cpus(),
                                "cpu_capability": machine.cpu_capability(),
                                "cpu_bf16_native": machine.cpu_bf16_native(),
                                "cpu_bf16_basis": machine.cpu_bf16_basis()}
    assert info["hardware"]["cpu"]
    assert info["command"][0].endswith(os.path.join("medvox", "cli.py")) and info["command"][1:] == argv
    started = dt.datetime.fromisoformat(info["started"])
    assert started.tzinfo is not None and abs(dt.datetime.now(dt.timezone.utc) - started) < dt.timedelta(hours=1)

    # the full resolved config: what the same command line resolves to, field by field
    monkeypatch.chdir(deterministic_runs.cwd)
    monkeypatch.delenv("MEDVOX_DATA", raising=False)
    expected = to_dict(config_from_args(build_parser().parse_args(argv)))
    assert read_json(run / "config.json") == expected
    assert load_checkpoint(run / "best.pt")["config"] == expected

    # the splits and the data: those of the preprocessing cache, hashed by content
    cfg = DataConfig(**{**expected["data"], "path": expected["data"]["path"]})
    data = prepare(cfg, progress=False)
    assert read_json(run / "splits.json") == data.splits
    assert read_json(run / "plan.json") == data.plan
    assert info["cache_dataset"] == data.data_hash and (Path(cfg.cache_dir) / data.data_hash).is_dir()
    assert info["data_hash"] == content_hash(data) and len(info["data_hash"]) == 32
    folds = data.splits["folds"]
    val_ids = [line.split(",")[0] for line in (run / "val_predictions.csv").read_text().splitlines()[1:]]
    assert sorted(val_ids) == sorted(folds[0]["val"]) and not set(folds[0]["train"]) & set(folds[0]["val"])


def test_data_hash_follows_file_content_and_labels(tmp_path):
    """The recorded data hash changes when one input file's content or one label changes; copying the data
    set elsewhere or touching a file (same bytes) keeps it."""
    rows = good_rows(tmp_path / "data")
    manifest = write_manifest(tmp_path / "data" / "manifest.csv", rows)

    def data_hash(path: Path) -> str:
        return content_hash(prepare(DataConfig(path=str(path), folds=2, cache_dir=str(tmp_path / "cache")),
                                    progress=False))

    original = data_hash(manifest)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    assert data_hash(tmp_path / "copy" / "manifest.csv") == original
    image = tmp_path / "data" / rows[3]["image"]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: same bytes
    assert data_hash(manifest) == original

    changed = volume(np.random.default_rng(99), 1)  # one file's content changes
    write_nifti(image, changed)
    after_edit = data_hash(manifest)
    assert after_edit != original

    rows[5]["label"] = "benign" if rows[5]["label"] == "malignant" else "malignant"  # one label changes
    write_manifest(manifest, rows)
    with pytest.warns(UserWarning, match="the cases changed since this split was made"):  # a relabel: new folds
        assert data_hash(manifest) not in (original, after_edit)
