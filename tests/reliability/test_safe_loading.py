"""Safe loading: every ``torch.load`` in the package is ``weights_only=True``; a pickle whose ``__reduce__``
would create a marker file is refused as ``--pretrained-path``, as a checkpoint for ``medvox predict`` and as
``last.pt`` for ``--resume`` (the marker never appears); with ``--safetensors`` the best weights are also
written as safetensors that rebuild the same model with identical outputs."""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medvox.cli import main
from medvox.engine.checkpoint import load_checkpoint
from medvox.inference.models import build_from_checkpoint
from medvox.models import create_model
from tests.reliability.helpers import FAST, MIL, Payload, assert_nothing_written, snapshot

SRC = Path(__file__).resolve().parents[2] / "src" / "medvox"


def write_malicious(path: Path, marker: Path, fmt: str) -> Path:
    """A file that looks like a checkpoint (a state dict with tensors) and carries the payload."""
    obj = {"state_dict": {"conv1.weight": torch.zeros(2, 1, 3, 3, 3), "payload": Payload(marker)},
           "model": {"fc.weight": torch.zeros(2, 4)}, "epoch": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch_zip":
        torch.save(obj, path)
    else:  # a plain pickle stream, as old torch.save wrote
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    return path


FORMATS = ["torch_zip", "raw_pickle"]
# what the refusal names: the first object the safe unpickler would not build (in a raw pickle stream that is
# already the legacy tensor constructor, before the payload is even reached)
REFUSAL = {"torch_zip": "it would build the Python object io.open (unpickling it could run code)",
           "raw_pickle": "it would build the Python object torch.storage._load_from_bytes (unpickling it could run "
                         "code)"}


def test_every_torch_load_in_src_is_weights_only():
    calls, texts = [], 0
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", ok))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("pickle", "dill", "joblib") \
                    and node.func.attr in ("load", "loads"):
                pytest.fail(f"{path.relative_to(SRC)}:{node.lineno} unpickles with {node.func.value.id}")
        code = re.sub(r'("""|\'\'\')[\s\S]*?\1', "", source)  # docstrings may mention torch.load(...)
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        texts += code.count("torch.load(")
        assert "weights_only=False" not in code and "allow_pickle=True" not in code, path
    assert calls, "no torch.load call found: the scan is broken"
    assert len(calls) == texts  # every textual torch.load( is a call the AST check saw (no aliasing tricks)
    assert [c for c, ok in calls if not ok] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_payload_really_runs_when_unpickled_unsafely(fmt, tmp_path):
    """Guards the tests below: loaded without ``weights_only`` the file does create its marker."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, fmt)
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:  # a raw pickle is no torch file, but its payload ran while reading the "magic number"
        assert fmt == "raw_pickle"
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_pretrained_path_is_refused(fmt, small_npz, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "pretrained" / "resnet_10.pth", marker, fmt)
    argv = ["train", "--data", str(small_npz), "--model", "resnet10", "--pretrained-path", str(evil), "--epochs", "1",
            "--folds", "2", *FAST, "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.endswith(
        f"medvox: error: refused to load {evil}: it is not a plain weights file (loading it would build arbitrary "
        "Python objects or run code). Re-save only the tensors from a trusted environment, e.g. "
        f"torch.save(model.state_dict(), ...) or safetensors. Detail: {REFUSAL[fmt]}\n"), err
    assert not marker.exists()
    assert not list((tmp_path / "out").rglob("*.pt")) and not list((tmp_path / "out").rglob("metrics.json"))


def _refused_checkpoint(path: Path, fmt: str) -> str:
    return (f"medvox: error: refused to load checkpoint {path}: {REFUSAL[fmt]}. medvox loads checkpoints with "
            "weights_only=True and never runs code from a file: use a checkpoint medvox wrote, or re-save only the "
            "tensors in a trusted environment (torch.save(model.state_dict(), ...) or safetensors).\n")


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_checkpoint_is_refused_by_predict(fmt, trained_run, tmp_path, capsys):
    """As a ``.pt`` given to ``--run``, and as the ``best_ema.pt`` of a run folder (e.g. one downloaded)."""
    marker = tmp_path / "pwned"
    image = tmp_path / "inputs" / "case.npy"
    image.parent.mkdir()
    np.save(image, np.random.default_rng(0).integers(0, 255, (16, 16, 16)).astype(np.uint8))
    evil = write_malicious(tmp_path / "evil.pt", marker, fmt)
    fold = tmp_path / "downloaded_run" / "fold_0"
    fold.mkdir(parents=True)
    shutil.copy(trained_run / "fold_0" / "metrics.json", fold / "metrics.json")  # names best_ema.pt as final
    shutil.copy(evil, fold / "best_ema.pt")
    for run, shown in ((evil, evil), (fold.parent, fold / "best_ema.pt")):
        out = tmp_path / "predictions.csv"
        assert main(["predict", "--run", str(run), str(image), "--out", str(out)]) == 1
        assert capsys.readouterr().err == _refused_checkpoint(shown, fmt)
        assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_last_pt_is_refused_by_resume(fmt, small_npz, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "out" / "mil" / "fold_0"
    argv = ["train", "--data", str(small_npz), *MIL, *FAST, "--epochs", "1", "--folds", "2",
            "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    write_malicious(run / "last.pt", marker, fmt)
    from medvox.cli import build_parser, config_from_args
    from medvox.config import save

    save(config_from_args(build_parser().parse_args(argv)), run / "config.json")  # the same settings: resume reads last.pt
    before = snapshot(tmp_path / "out")
    assert main(argv) == 1
    assert capsys.readouterr().err == _refused_checkpoint(run / "last.pt", fmt)
    assert not marker.exists()
    assert_nothing_written(before, snapshot(tmp_path / "out"))


def _weights_from_safetensors(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a ``best*.safetensors`` file alone (its metadata + ``create_model``)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    cfg = json.loads(meta["config"])
    cosine = cfg["model"]["cosine_head"] if cfg["model"]["cosine_head"] is not None else cfg["loss"]["name"] == "LDAM"
    model = create_model(meta["model"], in_channels=int(meta["in_channels"]),
                         num_classes=len(json.loads(meta["classes"])), dropout=cfg["model"]["dropout"],
                         cosine_head=cosine, **cfg["model"]["kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta


@pytest.mark.parametrize("which", [pytest.param("resnet10", marks=pytest.mark.slow), "mil"])
def test_best_weights_are_also_safetensors_with_identical_outputs(which, request):
    """ResNet-10 (channels-last weights, BatchNorm buffers) and MIL, each rebuilt from its .safetensors alone."""
    if which == "resnet10":
        fold = request.getfixturevalue("deterministic_runs").a
    else:
        fold = request.getfixturevalue("trained_run") / "fold_0"
    assert not list(fold.glob(".*.tmp"))
    for stem in ("best", "best_ema"):
        ckpt = load_checkpoint(fold / f"{stem}.pt")
        model, meta = _weights_from_safetensors(fold / f"{stem}.safetensors")
        assert (meta["kind"], int(meta["epoch"]), json.loads(meta["classes"])) == (
            ckpt["kind"], ckpt["epoch"], ckpt["classes"])
        assert json.loads(meta["plan"]) == ckpt["plan"] and json.loads(meta["config"]) == ckpt["config"]
        reference = build_from_checkpoint(ckpt)
        x = torch.randn(3, 1, *ckpt["plan"]["target_shape"], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.equal(model(x), reference(x))
