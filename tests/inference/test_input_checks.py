"""`medvox predict` checks every input as `medvox check` does and compares it with the training cases' range:
a volume check refuses gets its row with status `error` and check's own message (exit 4, the others still
predicted); a spacing, shape, field of view or intensity far outside the plan's `input_range` is predicted
with a `warnings` cell, the same list in predictions.json and in the Python result; an in-range case gets none."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvox.cli import main
from medvox.data.fingerprint import RANGE_FACTOR, input_range, range_warnings
from medvox.data.inspection import inspect_case
from medvox.data.sources import cases_from_paths
from medvox.inference.predictor import Predictor
from medvox.run import read_predictions, split_warnings
from tests.conftest_runs import tiny_plan
from tests.inference.test_predictor import CLASSES, make_run, write_volume


def _record(spacing, shape, lo=0.0, hi=100.0) -> dict:
    return {"spacing": list(spacing), "shape": list(shape), "channels": 1,
            "stats": [{"p00_5": lo, "p50": (lo + hi) / 2, "p99_5": hi}]}


def test_the_range_is_the_cases_min_and_max_and_a_case_outside_it_by_the_tolerance_is_named():
    trained = input_range([_record((2.0, 1.0, 1.0), (40, 64, 64), -1000, 400),
                           _record((3.0, 0.8, 0.8), (30, 80, 80), -1024, 1200)])
    assert trained["spacing"] == {"min": [2.0, 0.8, 0.8], "max": [3.0, 1.0, 1.0]}
    assert trained["shape"] == {"min": [30, 64, 64], "max": [40, 80, 80]}
    assert trained["fov_mm"] == {"min": [80.0, 64.0, 64.0], "max": [90.0, 64.0, 64.0]}
    assert trained["intensity"] == [{"p00_5_min": -1024.0, "p99_5_max": 1200.0, "band_min": 1400.0,
                                     "band_max": 2224.0}]
    # inside, and just inside the tolerance (a factor 1.5 on spacing, shape, field of view and band width)
    assert range_warnings(_record((2.5, 0.9, 0.9), (36, 70, 70), -1000, 1000), trained) == []
    assert range_warnings(_record((3.0 * RANGE_FACTOR * 0.99, 1.0, 1.0), (28, 64, 64), -1000, 1000), trained) == []
    # 0.1 x 0.1 x 10 mm: every axis is named with its value and the training bound it passes
    found = range_warnings(_record((10.0, 0.1, 0.1), (30, 64, 64), -1000, 1000), trained)
    assert found[:3] == ["spacing_z 10 mm > train max 3 mm", "spacing_y 0.1 mm < train min 0.8 mm",
                         "spacing_x 0.1 mm < train min 0.8 mm"]
    assert "fov_z 300 mm > train max 90 mm" in found and "fov_y 6.4 mm < train min 64 mm" in found
    # an 800-voxel axis, and intensities in [0, 1] instead of HU
    assert range_warnings(_record((2.0, 1.0, 1.0), (800, 64, 64), -1000, 1000), trained) == [
        "shape_z 800 voxels > train max 40 voxels", "fov_z 1600 mm > train max 90 mm"]
    assert range_warnings(_record((2.0, 1.0, 1.0), (36, 64, 64), 0.0, 1.0), trained) == [
        "intensity_band 1 < train min 1400"]
    assert range_warnings(_record((2.0, 1.0, 1.0), (36, 64, 64), 0.0, 5000.0), trained) == [
        "intensity_p99.5 5000 > train highest 1200", "intensity_band 5000 > train max 2224"]


def _nifti(path: Path, data: np.ndarray, spacing) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture
def ranged_run(tmp_path) -> tuple[Path, dict]:
    """A hand-made run whose plan holds the input range of three training volumes (24 x 20 x 12 voxels of
    1.5 x 1.2 x 2 mm, intensities 30-240), computed by the code that fingerprints a pool."""
    train = [write_volume(tmp_path / f"train_{i}.nii.gz", seed=10 + i, centre=(12, 8, 6)) for i in range(3)]
    records = [inspect_case(c)[0] for c in cases_from_paths([str(p) for p in train])]
    plan = {**tiny_plan(), "input_range": input_range(records)}
    return make_run(tmp_path / "run", plan=plan), plan["input_range"]


def test_predict_refuses_what_check_refuses_and_warns_outside_the_training_range(ranged_run, tmp_path, capsys):
    run, trained = ranged_run
    assert trained["spacing"] == {"min": [2.0, 1.2, 1.5], "max": [2.0, 1.2, 1.5]}  # (z, y, x) of the LPS volumes
    inside = write_volume(tmp_path / "inside.nii.gz", seed=5)
    blank = _nifti(tmp_path / "blank.nii.gz", np.full((24, 20, 12), -1000.0), (1.5, 1.2, 2.0))
    voxels = np.asarray(nib.load(str(inside)).dataobj)  # the same intensities on other grids
    thin = _nifti(tmp_path / "thin.nii.gz", voxels, (0.1, 0.1, 10.0))
    wide = _nifti(tmp_path / "wide.nii.gz", np.tile(voxels, (2, 2, 1)), (7.5, 7.5, 2.0))
    inputs = [inside, blank, thin, wide]
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", "--run", str(run), *map(str, inputs), "--out", str(out)]) == 4  # a refused input
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stdout + stderr

    # the blank volume: check's message, from check's own function
    (problem,) = inspect_case(cases_from_paths([str(blank)])[0])[1]
    assert problem.what == "constant volume (every voxel = -1000)"
    rows = {r["case_id"]: r for r in _rows(out)}
    assert rows["blank"]["status"] == "error" and rows["blank"]["error"] == f"{problem.what} ({problem.fix})"
    assert rows["blank"]["prob_1"] == "" and rows["blank"]["predicted"] == ""
    assert f"blank ({blank}): {problem.what}" in stderr

    csv = read_predictions(out, CLASSES)  # the predicted rows
    assert csv.ids == ["inside", "thin", "wide"]
    warned = dict(zip(csv.ids, csv.warnings, strict=True))
    assert warned["inside"] == []
    assert warned["thin"][:6] == ["spacing_z 10 mm > train max 2 mm", "spacing_y 0.1 mm < train min 1.2 mm",
                                  "spacing_x 0.1 mm < train min 1.5 mm", "fov_z 120 mm > train max 24 mm",
                                  "fov_y 2 mm < train min 24 mm", "fov_x 2.4 mm < train min 36 mm"]
    assert len(warned["thin"]) == 7 and warned["thin"][6].startswith(  # check's own warning
        "extreme anisotropy: spacing 10 x 0.1 x 0.1 mm (D x H x W), 100x")
    assert warned["wide"] == ["spacing_y 7.5 mm > train max 1.2 mm", "spacing_x 7.5 mm > train max 1.5 mm",
                              "shape_y 40 voxels > train max 20 voxels", "shape_x 48 voxels > train max 24 voxels",
                              "fov_y 300 mm > train max 24 mm", "fov_x 360 mm > train max 36 mm"]
    for case in ("thin", "wide"):  # a line per warned case on the terminal
        assert f"warning: {case} ({tmp_path / case}.nii.gz): {warned[case][0]}" in stdout

    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["predicted"], record["failed"]) == (3, 1)
    assert {w["case_id"]: w["warnings"] for w in record["warned"]} == {"thin": warned["thin"], "wide": warned["wide"]}
    assert record["input_range"] == trained and "1.5" in record["range_tolerance"]

    results = Predictor.from_run(run).predict_files(inputs)  # the Python result carries the same
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error == rows["blank"]["error"]
    assert [r.warnings for r in results if r.ok] == [warned["inside"], warned["thin"], warned["wide"]]


def test_an_array_check_refuses_is_refused_by_predict(ranged_run):
    run, _ = ranged_run
    predictor = Predictor.from_run(run)
    with pytest.raises(Exception, match=r"^1 NaN/Inf voxel\(s\) \(fix the export"):
        volume = np.ones((12, 20, 24), np.float32)
        volume[3, 4, 5] = np.nan
        predictor.predict(volume, spacing=(2.0, 1.2, 1.5))
    assert split_warnings("a 1 mm > train max 2 mm; b") == ["a 1 mm > train max 2 mm", "b"]


def _rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
