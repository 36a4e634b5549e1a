"""The Predictor is the one code path of serving: `medvox predict`, an (x, y, z) array with its affine, a
(D, H, W) array with its spacing and the Python API give the same probabilities; a run whose final
checkpoints are not all there is refused by predict, explain and export (or, asked to, predicted by the
argmax with a warning)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvox.cli import main
from medvox.data.io import read_image
from medvox.inference.predictor import Predictor
from medvox.metrics.decision import Decision
from medvox.run import RunError, read_predictions
from tests.conftest_runs import MIL_KWARGS, make_checkpoint, tiny_plan

CLASSES = ["0", "1"]


def write_volume(path: Path, shape=(24, 20, 12), centre=(15, 7, 6), seed: int = 0) -> Path:
    """A NIfTI with a bright blob on noise, LPS-oriented, anisotropic and off-grid, so that reorientation,
    resampling and crop/pad all take part."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    r2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
    data = (30 + 200 * np.exp(-r2 / 8) + 10 * rng.random(shape)).astype(np.float32)
    affine = np.diag([-1.5, -1.2, 2.0, 1.0])
    affine[:3, 3] = [20.0, 10.0, -5.0]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_run(root: Path, folds: int = 2, threshold: float = 0.5, name: str = "mil", plan: dict | None = None,
             **kwargs) -> Path:
    """A finished cv run folder made by hand: each fold's final weights best_ema.pt (with a best.pt beside it),
    a temperature, and a cv_summary.json with the run's decision; ``plan`` default :func:`tiny_plan`."""
    kwargs = kwargs or MIL_KWARGS
    plan = plan or tiny_plan()
    for k in range(folds):
        fold = root / f"fold_{k}"
        make_checkpoint(fold / "best_ema.pt", name, plan=plan, seed=k, temperature=1.5 + k, **kwargs)
        make_checkpoint(fold / "best.pt", name, plan=plan, seed=10 + k, **kwargs)
        (fold / "metrics.json").write_text(json.dumps({"status": "complete", "classes": CLASSES,
                                                       "final": {"weights": "best_ema.pt", "val": {}}}))
    decision = Decision(tuple(CLASSES), "youden", threshold=threshold, fitted_on="a hand-made run")
    summary = {"format_version": 1, "classes": CLASSES, "decision": decision.to_json(),
               "calibration": [{"temperature": 1.5 + k} for k in range(folds)],
               "members": [str(root / f"fold_{k}" / "best_ema.pt") for k in range(folds)]}
    (root / "cv_summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def volumes(tmp_path) -> list[Path]:
    return [write_volume(tmp_path / f"case_{i}.nii.gz", seed=i, centre=(15 - 4 * i, 7, 6)) for i in range(3)]


def test_predict_files_equals_medvox_predict(run, volumes, tmp_path):
    predictor = Predictor.from_run(run)
    results = predictor.predict_files(volumes)
    assert [r.ok for r in results] == [True] * 3 and [r.case.id for r in results] == ["case_0", "case_1", "case_2"]
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), *map(str, volumes), "--out", str(out)]) == 0
    csv = read_predictions(out, CLASSES)  # refuses a `predicted` that does not follow from its row
    assert csv.ids == [r.case.id for r in results]
    api = {name: np.concatenate([getattr(r.prediction, name) for r in results]) for name in ("probs", "raw", "calibrated")}
    np.testing.assert_allclose(csv.probs, api["probs"], atol=1e-6)
    np.testing.assert_allclose(csv.raw, api["raw"], atol=1e-6)
    np.testing.assert_allclose(csv.calibrated, api["calibrated"], atol=1e-6)
    assert not np.allclose(csv.raw, csv.calibrated, atol=1e-4)  # the temperatures do something here
    assert csv.predicted == [r.prediction.label for r in results]
    assert csv.decision == predictor.decision == Decision.from_json(json.loads((run / "cv_summary.json").read_text())
                                                                    ["decision"])
    assert csv.extra["status"] == ["ok"] * 3 and csv.extra["source"] == [str(v) for v in volumes]
    np.testing.assert_allclose([float(s) for s in csv.extra["spread"]],
                               [r.prediction.spread[0] for r in results], atol=1e-6)
    record = json.loads(out.with_suffix(".json").read_text())
    assert Decision.from_json(record["decision"]) == predictor.decision
    assert record["all_members_present"] is True and record["missing_members"] == []
    assert record["members"] == [str(run / f"fold_{k}" / "best_ema.pt") for k in range(2)]
    assert record["temperatures"] == [1.5, 2.5] and (record["predicted"], record["failed"]) == (3, 0)


def test_an_array_with_its_affine_or_spacing_gives_the_files_probability(run, volumes):
    predictor = Predictor.from_run(run)
    expected = predictor.predict_files(volumes[:1])[0].prediction
    img = nib.load(str(volumes[0]))
    from_affine = predictor.predict(img.get_fdata(), affine=img.affine)
    np.testing.assert_allclose(from_affine.probs, expected.probs, atol=1e-6)
    np.testing.assert_allclose(from_affine.raw, expected.raw, atol=1e-6)
    assert from_affine.label == expected.label and len(from_affine) == 1
    # the same voxels in medvox's (D, H, W) order with their spacing, or in (x, y, z) order with theirs
    array, meta = read_image(volumes[0])
    zyx = predictor.predict(array, spacing=meta["spacing"], axes="zyx")
    xyz = predictor.predict(array.T, spacing=meta["spacing"][::-1], axes="xyz")
    for got in (zyx, xyz):
        np.testing.assert_allclose(got.probs, expected.probs, atol=1e-6)
    # the raw (x, y, z) array taken for (D, H, W) is another volume: that is why geometry is required
    wrong = predictor.predict(img.get_fdata(), spacing=[1.0, 1.0, 1.0])
    assert np.abs(wrong.probs - expected.probs).max() > 1e-4


def test_an_array_without_geometry_is_refused_with_the_fix(run):
    predictor = Predictor.from_run(run)
    volume = np.zeros((16, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"without geometry.*affine=img\.affine.*spacing=.*axes="):
        predictor.predict(volume)
    with pytest.raises(ValueError, match="not both"):
        predictor.predict(volume, affine=np.eye(4), spacing=[1, 1, 1])
    with pytest.raises(ValueError, match="voxel order"):
        predictor.predict(volume, affine=np.eye(4), axes="zyx")
    with pytest.raises(ValueError, match="permutation"):
        predictor.predict(volume, spacing=[1, 1, 1], axes="zyy")
    with pytest.raises(ValueError, match="positive voxel sizes"):
        predictor.predict(volume, spacing=[1, 0, 1])
    with pytest.raises(ValueError, match="5D array"):
        predictor.predict(volume[None, None], spacing=[1, 1, 1])


@pytest.mark.parametrize("command", ["predict", "explain", "export"])
def test_a_missing_final_checkpoint_is_refused(run, volumes, tmp_path, capsys, command):
    """fold_1's best_ema.pt (its final weights) is gone; its best.pt is there but must not take its place."""
    (run / "fold_1" / "best_ema.pt").unlink()
    args = {"predict": ["predict", "--run", str(run), str(volumes[0]), "--out", str(tmp_path / "p.csv")],
            "explain": ["explain", "--run", str(run), str(volumes[0]), "--out", str(tmp_path / "cams")],
            "export": ["export", str(run), "--out", str(tmp_path / "exp"), "--format", "torchscript"]}[command]
    capsys.readouterr()
    assert main(args) == 5
    err = capsys.readouterr().err
    assert err.startswith("medvox: error: ") and str(run / "fold_1" / "best_ema.pt") in err and "is missing" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "exp").exists()


def test_allow_missing_predicts_with_the_rest_by_the_argmax(run, volumes, tmp_path, caplog, capsys):
    (run / "fold_1" / "best_ema.pt").unlink()
    out = tmp_path / "p.csv"
    with caplog.at_level("WARNING", logger="medvox"):
        assert main(["predict", "--run", str(run), *map(str, volumes), "--out", str(out), "--allow-missing"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(run / "fold_1" / "best_ema.pt") in warnings[0]
    assert "by the most probable class" in warnings[0]
    csv = read_predictions(out, CLASSES)
    assert csv.decision.is_argmax and csv.predicted == [CLASSES[int(np.argmax(p))] for p in csv.probs]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["all_members_present"] is False and record["members"] == [str(run / "fold_0" / "best_ema.pt")]
    assert "fold_1" in record["missing_members"][0] and record["decision"]["rule"] == "argmax"
    # fold 0 alone: its own probabilities
    alone = Predictor.from_run(run / "fold_0").predict_files(volumes)
    np.testing.assert_allclose(csv.calibrated, np.concatenate([r.prediction.calibrated for r in alone]), atol=1e-6)
    capsys.readouterr()
    assert main(["explain", "--run", str(run), str(volumes[0]), "--out", str(tmp_path / "cams"), "--allow-missing"]) == 0
    explained = json.loads((tmp_path / "cams" / "explain.json").read_text())[0]
    assert explained["all_members_present"] is False and explained["decision"]["rule"] == "argmax"
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--format", "torchscript", "--allow-missing"]) == 0
    doc = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert doc["all_members_present"] is False and len(doc["members"]) == 1 and doc["decision"]["rule"] == "argmax"


def test_a_fold_folder_never_falls_back_to_best_pt(run, volumes):
    fold = run / "fold_0"
    single = Predictor.from_run(fold)
    assert single.members == [fold / "best_ema.pt"] and single.complete
    (fold / "best_ema.pt").unlink()
    with pytest.raises(RunError, match=r"fold_0/best_ema\.pt is missing"):
        Predictor.from_run(fold)
    with pytest.raises(RunError, match=r"fold_0/best_ema\.pt is missing"):
        Predictor.from_run(run, fold=0)


def test_failed_inputs_keep_their_row_and_every_predicted_follows_from_its_row(run, volumes, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((1, 16, 16), np.float32))  # a single slice: not a 3D volume
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run), str(volumes[0]), str(broken), str(flat), str(volumes[1]),
                 "--out", str(out), "--batch-size", "2"]) == 4
    err = capsys.readouterr().err
    assert "2 input(s) could not be read" in err and "broken" in err
    text = out.read_text().splitlines()
    assert len(text) == 5 and [line.split(",")[0] for line in text[1:]] == ["case_0", "broken", "flat", "case_1"]
    csv = read_predictions(out, CLASSES)
    assert csv.ids == ["case_0", "case_1"] and csv.extra["status"] == ["ok", "ok"]
    import csv as csv_module

    with open(out, newline="") as fh:
        rows = list(csv_module.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok"]
    assert rows[1]["prob_1"] == rows[1]["predicted"] == "" and rows[1]["error"]
    assert "2D" in rows[2]["error"]
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["predicted"], record["failed"]) == (2, 2)
    assert [f["case_id"] for f in record["failures"]] == ["broken", "flat"]
    expected = Predictor.from_run(run).predict_files([volumes[0], volumes[1]])
    np.testing.assert_allclose(csv.probs, np.concatenate([r.prediction.probs for r in expected]), atol=1e-6)


def test_out_is_checked_before_any_model_is_loaded(run, volumes, tmp_path, capsys, monkeypatch):
    import medvox.inference.predictor as predictor_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(predictor_mod, "load_model", no_loading)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("")
    for out, words in ((tmp_path / "folder", "is a folder"), (tmp_path / "a_file" / "p.csv", "cannot create"),
                       (tmp_path / "p.json", "same file")):
        assert main(["predict", "--run", str(run), str(volumes[0]), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"medvox: error: --out {out}") and words in err


def test_a_checkpoint_file_is_decided_by_the_argmax_and_says_so(run, volumes, tmp_path):
    ckpt = run / "fold_0" / "best_ema.pt"
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(ckpt), str(volumes[0]), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["decision"]["rule"] == "argmax" and "checkpoint file" in record["decision"]["fitted_on"]
    fold = Predictor.from_run(run / "fold_0").predict_files(volumes[:1])[0].prediction
    np.testing.assert_allclose(read_predictions(out).calibrated, fold.calibrated, atol=1e-6)
    # best.pt is not the fold's final weights: the fold's temperature is not applied to it
    other = Predictor.from_run(run / "fold_0" / "best.pt")
    assert other.temperatures == [1.0] and "belongs to its final weights" in other.decision.fitted_on


def test_one_run_per_predict(run, volumes, tmp_path, capsys):
    assert main(["predict", "--run", str(run), "--run", str(run / "fold_0"), str(volumes[0]),
                 "--out", str(tmp_path / "p.csv")]) == 2
    assert "--run was given 2 times" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_run_predicts_alike_through_the_cli_the_files_and_the_arrays(cv_runs, tmp_path):
    volumes = [write_volume(tmp_path / f"case_{i}.nii.gz", seed=i, centre=(15 - 4 * i, 7, 6)) for i in range(2)]
    for name, run in cv_runs.items():
        predictor = Predictor.from_run(run)
        results = predictor.predict_files(volumes)
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--run", str(run), *map(str, volumes), "--out", str(out)]) == 0
        csv = read_predictions(out, predictor.classes)
        np.testing.assert_allclose(csv.probs, np.concatenate([r.prediction.probs for r in results]), atol=1e-6)
        assert csv.predicted == [r.prediction.label for r in results]
        assert csv.decision == predictor.decision == run_decision(run)
        img = nib.load(str(volumes[0]))
        np.testing.assert_allclose(predictor.predict(img.get_fdata(), affine=img.affine).probs,
                                   results[0].prediction.probs, atol=1e-6)


def run_decision(run: Path) -> Decision:
    return Decision.from_json(json.loads((run / "cv_summary.json").read_text())["decision"])
