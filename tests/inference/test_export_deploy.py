"""Export for deployers: predict.py (no medvox) and the MONAI Bundle give `medvox predict`'s probabilities; the
real-case check in export.json; file modes; no half-written folder; refusals before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvox.data.io import read_image as medvox_read_image
from medvox.data.preprocess import preprocess_volume
from medvox.data.sources import load_source
from medvox.inference import export as export_mod
from medvox.inference import standalone_template as standalone
from medvox.inference.export import export_model
from medvox.inference.predictor import Predictor
from medvox.metrics.decision import Decision
from tests.conftest_runs import MIL_KWARGS, make_checkpoint, tiny_plan

AGREE = 1e-5  # the issue's bound between `medvox predict` and the exported paths


def _nifti(path: Path, volume: np.ndarray, zooms=(1.25, 0.9, 1.1), slope: float | None = None) -> Path:
    """``volume`` ``(x, y, z)`` in an L-P-S oriented file (flipped x and y), so reading it reorients."""
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    img = nib.Nifti1Image(volume, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, -3.0)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("norm", [{"scheme": "zscore"}, {"scheme": "ct", "clip": [-50.0, 150.0], "mean": 40.0,
                                                          "std": 55.0}, {"scheme": "minmax", "min": -20, "max": 90}])
@pytest.mark.parametrize("antialias", [True, False])
def test_standalone_preprocessing_equals_medvox(tmp_path, rng, norm, antialias):
    """NumPy's resampling (scipy's zoom and Gaussian written again), reorientation, scaling, normalisation and
    crop / pad give medvox's preprocessed volume; coarser (0.9 -> 1.4 mm) and finer (2.1 -> 1.4 mm) axes."""
    raw = rng.integers(-30, 120, size=(23, 19, 12)).astype(np.int16)
    path = _nifti(tmp_path / "case.nii.gz", raw, zooms=(0.9, 1.1, 2.1), slope=1.5)
    plan = {**tiny_plan((14, 20, 15)), "target_spacing": [1.4, 1.4, 1.4], "normalization": [norm],
            "antialias": antialias}
    array, meta = medvox_read_image(path)
    alone, spacing = standalone.read_image(path)
    assert alone.shape == array.shape == (12, 19, 23) and np.array_equal(alone, array)
    assert spacing == meta["spacing"]
    expected = preprocess_volume(array, meta, plan)
    got = standalone.preprocess(alone, spacing, plan)
    assert got.shape == expected.shape == (1, 14, 20, 15) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    assert expected.std() > 0.1  # a varied volume: the comparison means something


def test_standalone_decision_is_the_runs():
    probs = np.array([[0.7, 0.3], [0.55, 0.45], [0.2, 0.8]])
    for decision in (Decision(("a", "b"), "youden", threshold=0.4), Decision.argmax(["a", "b"], "none")):
        assert standalone.decide(probs, decision.to_json()).tolist() == decision.apply(probs).tolist()
    three = np.array([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5], [0.3, 0.36, 0.34]])
    weighted = Decision(("a", "b", "c"), "balanced_accuracy", class_weights=(0.5, 1.0, 1.2))
    assert standalone.decide(three, weighted.to_json()).tolist() == weighted.apply(three).tolist() == [1, 2, 2]


@pytest.fixture
def mil_checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "fold_0" / "best.pt", "mil", temperature=1.3, **MIL_KWARGS)


def test_export_folder_modes_and_layout(mil_checkpoint, tmp_path):
    out = tmp_path / "exported"
    info = export_model(mil_checkpoint, out, formats=("torchscript",))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["bundle/configs/export.json", "bundle/configs/inference.json", "bundle/configs/metadata.json",
                     "bundle/models/model.ts", "bundle/scripts/__init__.py", "bundle/scripts/medvox_predict.py",
                     "export.json", "model.safetensors", "model.torchscript.pt", "predict.py"]
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {"0o644"}
    assert {oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")] if p.is_dir()} == {"0o755"}
    assert (out / "bundle/models/model.ts").read_bytes() == (out / "model.torchscript.pt").read_bytes()
    assert (out / "predict.py").read_text() == Path(standalone.__file__).read_text()
    assert json.loads((out / "bundle/configs/export.json").read_text()) == json.loads((out / "export.json").read_text())
    meta = json.loads((out / "bundle/configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "0", "1": "1"}
    # a checkpoint whose config names no data: the real-case check says why it did not run
    assert "no data given" in info["checks"]["case"]["skipped"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failed_export_leaves_no_half_written_folder(mil_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    export_model(mil_checkpoint, out, formats=("torchscript",), verify=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(export_mod, "_export_onnx", broken)
    for target in (out, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk is full"):
            export_model(mil_checkpoint, target, formats=("torchscript", "onnx"))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "fold_0"]


def test_refused_before_any_work(mil_checkpoint, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(export_mod.MedvoxError, match="not a medvox export"):
        export_model(mil_checkpoint, taken, formats=("torchscript",))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(export_mod.MedvoxError, match="is a file"):
        export_model(mil_checkpoint, tmp_path / "file", formats=("torchscript",))

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    # the extra is checked first: a missing checkpoint is not even looked at
    with pytest.raises(export_mod.MedvoxError, match=r'pip install "medvox\[export\]"'):
        export_model(tmp_path / "missing.pt", tmp_path / "out")
    from medvox.cli import main

    assert main(["export", str(mil_checkpoint), "--out", str(tmp_path / "out")]) == 2  # a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format torchscript" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["export", str(mil_checkpoint), "--out", str(tmp_path / "out"), "--format", "torchscript"]) == 0


# ------------------------------------------------------------------ end to end on the real run (slow)

@pytest.fixture(scope="module")
def exported_run(cv_runs, tmp_path_factory) -> tuple[Path, Path]:
    """(the MIL run's fold ensemble exported once, calibrated; the run)."""
    run = cv_runs["mil"]
    out = tmp_path_factory.mktemp("deploy") / "exported"
    export_model(run, out, formats=("torchscript",))
    return out, run


@pytest.fixture(scope="module")
def real_nifti(tiny_npz, tmp_path_factory) -> Path:
    """A real AdrenalMNIST3D test volume as a NIfTI of 1.25 x 0.9 x 1.1 mm voxels in L-P-S order: reading it
    reorients, and resampling to the run's 1 mm grid both refines and coarsens (with the anti-aliasing filter)."""
    volume = np.load(tiny_npz)["test_images"][3].astype(np.float32)
    return _nifti(tmp_path_factory.mktemp("nifti") / "adrenal_test3.nii.gz", volume)


@pytest.mark.slow
def test_export_json_checks_a_real_case(exported_run):
    out, run = exported_run
    doc = json.loads((out / "export.json").read_text())
    case = doc["checks"]["case"]
    predictor = Predictor.from_run(run)
    first = load_source(predictor.models[0].config.data).test[0]
    assert (case["id"], case["subset"]) == (first.id, "test")
    expected = predictor.predict_cases([first])[0].prediction.probs[0]
    np.testing.assert_allclose(case["probabilities"], expected, atol=1e-6)
    for name in ("torchscript", "standalone"):
        assert case[name]["ok"] and case[name]["max_abs_diff"] <= AGREE, (name, case[name])
    assert case["standalone_preprocessing_max_abs_diff"] <= 1e-5


def _python_without_medvox(folder: Path) -> Path:
    """A venv (no pip) that sees this venv's packages through a .pth line, so torch, NumPy and nibabel import,
    but not medvox: the editable install's own .pth file there is not processed for a .pth-added folder."""
    venv.create(folder, with_pip=False, symlinks=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (np, torch, nib)})
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    return python


@pytest.mark.slow
def test_standalone_predict_without_medvox_agrees_with_medvox_predict(exported_run, real_nifti, tmp_path):
    out, run = exported_run
    python = _python_without_medvox(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    probe = subprocess.run([str(python), "-c", "import numpy, nibabel, torch; import medvox"], capture_output=True,
                           text=True, cwd=tmp_path, env=env)
    assert probe.returncode != 0 and "No module named 'medvox'" in probe.stderr, probe.stderr[-500:]

    done = subprocess.run([str(python), str(out / "predict.py"), str(real_nifti)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    expected = Predictor.from_run(run).predict_files([real_nifti])[0].prediction
    got = np.array([record["probabilities"][c] for c in expected.classes])
    assert np.abs(got - expected.probs[0]).max() <= AGREE, (got, expected.probs[0])
    assert record["label"] == expected.label


@pytest.mark.slow
def test_monai_bundle_agrees_with_medvox_predict(exported_run, real_nifti, tmp_path, monkeypatch):
    from monai.bundle import run as run_bundle

    out, run = exported_run
    bundle = out / "bundle"
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bundle API puts the bundle root on sys.path
    try:
        run_bundle(config_file=str(bundle / "configs" / "inference.json"),
                   meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                   input_files=[str(real_nifti)], output_dir=str(tmp_path / "eval"), device="$torch.device('cpu')")
    finally:  # the bundle's `scripts` package must not shadow another bundle's in this process
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            monkeypatch.delitem(sys.modules, name)
    records = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    expected = Predictor.from_run(run).predict_files([real_nifti])[0].prediction
    assert len(records) == 1 and records[0]["file"] == str(real_nifti)
    got = np.array([records[0]["probabilities"][c] for c in expected.classes])
    assert np.abs(got - expected.probs[0]).max() <= AGREE, (got, expected.probs[0])
    assert records[0]["label"] == expected.label


def test_the_export_summary_names_each_check_and_the_decision():
    from medvox.inference.export import summary_lines
    from medvox.metrics.decision import Decision

    decision = Decision.from_cut(0.42, ["benign", "malignant"], rule="youden")
    info = {"files": {"torchscript": "out/model.torchscript.pt"},
            "checks": {"inputs": "2 random N(0, 1) volumes", "torchscript": {"max_abs_diff": 3e-8, "ok": True},
                       "onnx": {"skipped": "onnxruntime not installed"},
                       "case": {"id": "case_7", "subset": "test", "tolerance": 1e-5,
                                "torchscript": {"max_abs_diff": 2e-5, "ok": False}}},
            "decision": decision.to_json()}
    lines = summary_lines(info)
    assert lines[0] == "torchscript: out/model.torchscript.pt"
    assert "check on 2 random N(0, 1) volumes, torchscript: max |p - p_medvox| = 3e-08 (ok 1e-04)" in lines
    assert "check on 2 random N(0, 1) volumes, onnx: skipped (onnxruntime not installed)" in lines
    assert ("check on case case_7 (test) against medvox predict: torchscript max |p - p_medvox| = 2e-05 "
            "(OVER 1e-05)") in lines
    assert lines[-1] == f"decision: {decision.describe(digits=6)}" == "decision: calibrated p(malignant) >= 0.420000"
