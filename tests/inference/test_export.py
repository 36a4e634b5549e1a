"""Export: TorchScript and ONNX give the PyTorch model's probabilities; safetensors weights load back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medvox.inference.export import ProbabilityModel, export_model, load_exported
from medvox.inference.models import load_model
from medvox.models import create_model
from tests.conftest_runs import MIL_KWARGS, make_checkpoint, tiny_plan

ort = pytest.importorskip("onnxruntime")



def _inputs(shape, n=3, seed=1) -> torch.Tensor:
    return torch.randn(n, 1, *shape, generator=torch.Generator().manual_seed(seed))


def _exported_outputs(out_dir: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    scripted = torch.jit.load(str(out_dir / "model.torchscript.pt")).eval()
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        return {"torchscript": scripted(x).numpy(), "onnx": session.run(None, {"image": x.numpy()})[0]}


@pytest.mark.parametrize("name, kwargs", [
    ("resnet10", {"variant": "fast"}),
    ("mil", {"instance": "slice", "channels": [8], "embed_dim": 16}),
    ("mil", {"instance": "slab", "slab_size": 3, "slab_stride": 2, "channels": [8], "embed_dim": 16}),
    ("mil", {"instance": "patch", "patch_size": 6, "channels": [8], "embed_dim": 16}),  # 16 is padded to 18
], ids=["resnet10", "mil-slice", "mil-slab", "mil-patch"])
def test_exported_files_match_pytorch(tmp_path, name, kwargs):
    ckpt = make_checkpoint(tmp_path / "fold_0" / "best.pt", name, temperature=1.7, **kwargs)
    info = export_model(ckpt, tmp_path / "export")
    x = _inputs((16, 16, 16))  # a batch of 3: the export was traced with 1, the batch axis must be dynamic
    loaded = load_model(ckpt)
    with torch.no_grad():
        expected = torch.softmax(loaded.model(x) / 1.7, dim=1).numpy()
    assert expected[:, 1].std() > 1e-4  # the inputs give different outputs: the comparison means something
    for fmt, out in _exported_outputs(tmp_path / "export", x).items():
        np.testing.assert_allclose(out, expected, atol=1e-4, err_msg=fmt)
    assert info["checks"]["onnx"]["ok"] and info["checks"]["torchscript"]["ok"]

    doc = json.loads((tmp_path / "export" / "export.json").read_text())
    assert doc["input_shape"] == ["batch", 1, 16, 16, 16] and doc["classes"] == ["0", "1"]
    assert doc["temperatures"] == [1.7] and doc["preprocessing"] == tiny_plan()
    assert doc["files"] == {"safetensors": "model.safetensors", "torchscript": "model.torchscript.pt",
                            "onnx": "model.onnx", "standalone": "predict.py", "bundle": "bundle"}


def test_safetensors_weights_rebuild_the_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "best.pt", "resnet10", seed=3)
    export_model(ckpt, tmp_path / "export", formats=())
    doc = json.loads((tmp_path / "export" / "export.json").read_text())
    model = create_model(**doc["create_model"]).eval()
    model.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")))  # strict: every key
    x = _inputs((16, 16, 16), n=2)
    with torch.no_grad():
        assert torch.equal(model(x), load_model(ckpt).model(x))
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_a_run_folder_exports_the_calibrated_fold_ensemble(tmp_path):
    run = tmp_path / "run"
    for k, t in enumerate((0.8, 2.5)):
        make_checkpoint(run / f"fold_{k}" / "best.pt", "mil", seed=k, temperature=t, **MIL_KWARGS)
    info = export_model(run, tmp_path / "export")
    assert info["temperatures"] == [0.8, 2.5] and len(info["members"]) == 2
    x = _inputs((16, 16, 16))
    with torch.no_grad():
        expected = np.mean([torch.softmax(load_model(run / f"fold_{k}" / "best.pt").model(x) / t, 1).numpy()
                            for k, t in enumerate((0.8, 2.5))], axis=0)
        rebuilt = load_exported(tmp_path / "export")(x).numpy()
    for out in (*_exported_outputs(tmp_path / "export", x).values(), rebuilt):
        np.testing.assert_allclose(out, expected, atol=1e-4)
    keys = load_file(str(tmp_path / "export" / "model.safetensors")).keys()
    assert {k.split(".")[1] for k in keys} == {"0", "1"} and all(k.startswith("members.") for k in keys)

    single = export_model(run, tmp_path / "fold1", fold=1, calibrated=False, formats=("onnx",))
    assert single["members"] == [str(run / "fold_1" / "best.pt")] and single["temperatures"] == [1.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(Path("x.pt"), Path("out"), formats=("tflite",))
    with pytest.raises(ValueError, match="one temperature per member"):
        ProbabilityModel([torch.nn.Identity()], [1.0, 2.0])


@pytest.mark.slow
def test_export_of_real_runs(cv_runs, tmp_path):
    """The MIL run's fold ensemble (EMA off: best.pt) and the ResNet-10 run's fold 0 (best_ema.pt)."""
    x = _inputs((28, 28, 28), n=2)
    for run, fold in ((cv_runs["mil"], None), (cv_runs["resnet10"], 0)):
        out = tmp_path / run.name
        info = export_model(run, out, fold=fold, calibrated=False)
        assert info["input_shape"] == ["batch", 1, 28, 28, 28]
        assert info["create_model"]["name"] == run.name
        if run.name == "mil":
            assert {k: info["create_model"][k] for k in MIL_KWARGS} == MIL_KWARGS
        with torch.no_grad():
            expected = load_exported(out)(x).numpy()
            direct = np.mean([torch.softmax(load_model(p).model(x), 1).numpy() for p in info["members"]], axis=0)
        np.testing.assert_allclose(expected, direct, atol=1e-6)
        for out_probs in _exported_outputs(out, x).values():
            np.testing.assert_allclose(out_probs, direct, atol=1e-4)
        if fold is None:  # uncalibrated: the run's threshold was chosen on calibrated probabilities
            assert info["decision"]["threshold"] is None and "--uncalibrated" in info["decision"]["fitted_on"]
        else:  # the fold's own validation threshold, on its raw probabilities
            metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
            assert info["decision"]["threshold"] == metrics["final"]["val"]["decision"]["threshold"]
            assert info["decision"]["probabilities"] == "raw"


@pytest.mark.slow
def test_export_records_the_runs_decision_or_the_fusion_it_leaves_out(cv_runs, tmp_path, caplog, capsys):
    """The whole calibrated run: the threshold chosen on its OOF predictions (what `medvox predict` applies to
    these probabilities). A fused run (cv_summary.json names its fusion, features/ holds the descriptor model): no
    threshold (it was chosen on the mixture), the fusion named, a warning."""
    run = cv_runs["resnet10"]
    info = export_model(run, tmp_path / "plain", formats=())
    decision = json.loads((run / "cv_summary.json").read_text())["decision"]
    assert info["decision"]["threshold"] == decision["threshold"] and info["fusion"] is None
    assert json.loads((tmp_path / "plain" / "export.json").read_text())["decision"]["rule"] == decision["rule"]
    from medvox.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "cli"), "--format", "torchscript"]) == 0
    assert f"decision: calibrated p(1) >= {decision['threshold']:.6f} (youden" in capsys.readouterr().out
    fused = Path(shutil.copytree(run, tmp_path / "fused", ignore=shutil.ignore_patterns("tensorboard")))
    (fused / "features").mkdir(exist_ok=True)
    (fused / "features" / "fusion.json").write_text(json.dumps({"weight": 0.6}))
    (fused / "features" / "fold_0.json").write_text("{}")
    summary = json.loads((fused / "cv_summary.json").read_text())
    (fused / "cv_summary.json").write_text(json.dumps({**summary, "fusion": {"weight": 0.6}}))
    with caplog.at_level("WARNING", logger="medvox"):
        info = export_model(fused, tmp_path / "fused_export", formats=())
    assert info["decision"]["threshold"] is None and "fused" in info["decision"]["fitted_on"]
    assert info["fusion"]["weight"] == 0.6 and "medvox predict --run" in info["fusion"]["note"]
    assert "descriptor model" in caplog.text
