"""``check``: every kind of bad row reported in one run, by row and file; nothing written on failure."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medvox.cli import main
from medvox.data import DataError, check_data, prepare
from tests.data.conftest import lesion_volume, write_dicom_series, write_manifest, write_nifti

SPACING = np.diag([0.8, 0.8, 2.5, 1.0])

# manifest row (header = row 1) -> (file name, what the problem says)
BAD_ROWS = {
    9: ("missing.nii.gz", "file not found"),
    10: ("trunc.nii.gz", "truncated"),
    11: ("text.nii.gz", "holds text"),
    12: ("flat.nii.gz", "2D image"),
    13: ("five.nii.gz", "5D image"),
    14: ("nan.nii.gz", "NaN/Inf voxel"),
    15: ("const.nii.gz", "constant volume"),
    16: ("nolabel.nii.gz", "empty label"),
    17: ("dup.nii.gz", "duplicate id 'b1'"),
    18: ("two_channel.nii.gz", "2 channel(s) but"),
    19: ("b1_followup.nii.gz", "patient 'P_b1' is in folds [0, 1]"),
    20: ("outside.nii.gz", "path escapes the data folder"),
    21: ("gap_series", "missing slice(s)"),
    22: ("mixed_series", "mixed DICOM series: 2 series UIDs"),
}


@pytest.fixture
def bad_manifest(tmp_path):
    """Six clean cases (3 benign, 3 malignant, folds 0-2), one 'rare' case, then one bad row per kind."""
    rng = np.random.default_rng(1)
    root = tmp_path / "data"

    def image(name, data=None, affine=SPACING):
        write_nifti(root / "images" / name, lesion_volume(rng, 0) if data is None else data, affine)
        return f"images/{name}"

    rows = [{"id": f"{c}{i}", "image": image(f"{c}{i}.nii.gz"), "label": label, "patient_id": f"P_{c}{i}",
             "fold": str(i - 1)} for c, label in (("b", "benign"), ("m", "malignant")) for i in (1, 2, 3)]
    rows.append({"id": "r1", "image": image("r1.nii.gz"), "label": "rare", "patient_id": "P_r1", "fold": "0"})
    good = (root / image("trunc_src.nii.gz", rng.normal(size=(24, 24, 16)).astype(np.float32))).read_bytes()
    (root / "images/trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (root / "images/text.nii.gz").write_text("id,comment\n1,this is not an image\n")
    image("flat.nii.gz", np.ones((12, 12), np.int16))
    image("five.nii.gz", rng.normal(size=(12, 12, 8, 1, 2)).astype(np.float32))
    nan = rng.normal(size=(12, 12, 8)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    image("nan.nii.gz", nan)
    image("const.nii.gz", np.full((12, 12, 8), -1000, np.int16))
    image("nolabel.nii.gz")
    image("dup.nii.gz")
    image("two_channel.nii.gz", np.stack([lesion_volume(rng, 0)] * 2, axis=-1))
    image("b1_followup.nii.gz")
    write_nifti(tmp_path / "outside.nii.gz", lesion_volume(rng, 0), SPACING)
    write_dicom_series(root / "images/gap_series", lesion_volume(rng, 0), SPACING, skip=(4,))
    write_dicom_series(root / "images/mixed_series", lesion_volume(rng, 0), SPACING, series="1")
    write_dicom_series(root / "images/mixed_series", lesion_volume(rng, 0), SPACING, series="2")
    bad = {9: "images/missing.nii.gz", 10: "images/trunc.nii.gz", 11: "images/text.nii.gz",
           12: "images/flat.nii.gz", 13: "images/five.nii.gz", 14: "images/nan.nii.gz", 15: "images/const.nii.gz",
           16: "images/nolabel.nii.gz", 17: "images/dup.nii.gz", 18: "images/two_channel.nii.gz",
           19: "images/b1_followup.nii.gz", 20: "../outside.nii.gz",
           21: "images/gap_series", 22: "images/mixed_series"}
    for row, path in bad.items():
        rows.append({"id": "b1" if row == 17 else f"bad{row}", "image": path, "label": "" if row == 16 else "benign",
                     "patient_id": "P_b1" if row == 19 else f"P_bad{row}", "fold": "1" if row == 19 else "0"})
    return write_manifest(root / "manifest.csv", rows)


def test_every_bad_row_is_reported_in_one_run(bad_manifest, data_cfg):
    report = check_data(data_cfg(bad_manifest, folds=3), progress=False)
    assert not report.ok
    by_row = {}
    for p in report.problems:
        by_row.setdefault(p.row, []).append(p)
    for row, (name, what) in BAD_ROWS.items():
        found = [p for p in by_row.get(row, []) if what in p.what]
        assert found, f"row {row} ({name}): expected {what!r}, got {[p.what for p in by_row.get(row, [])]}"
        assert name in found[0].file and found[0].fix  # names the file and says how to fix it
    assert not any(p.row in range(2, 9) for p in report.problems)  # the clean rows are clean
    dataset_wide = [p.what for p in report.problems if p.row is None]
    assert ("too few cases of class 'rare' for 3 folds: 1 patient(s), 1 case(s): row 8 (case r1, file "
            "images/r1.nii.gz)") in dataset_wide  # a class this small names its rows
    assert {"class 'rare' is absent from provided fold 1", "class 'rare' is absent from provided fold 2"} <= set(
        dataset_wide)
    text = report.format()
    for row, (name, _) in BAD_ROWS.items():
        assert f"row {row}," in text and name in text
    assert text.splitlines()[-1].startswith("FAILED: ") and "nothing was written" in text.splitlines()[-1]


def test_clean_manifest_passes(small_dataset, data_cfg):
    report = check_data(data_cfg(small_dataset), progress=False)
    assert report.ok and report.problems == []
    assert [r["shape"] for r in report.inspections] == [[8, 12, 12]] * 12  # (D, H, W)
    assert report.inspections[0]["spacing"] == pytest.approx([2.5, 0.8, 0.8])
    assert report.format().splitlines()[-1] == "OK: 12 cases checked, no errors."


def test_cli_check_exit_codes_and_output(bad_manifest, small_dataset, capsys):
    assert main(["check", str(bad_manifest), "--folds", "3"]) == 1
    out = capsys.readouterr().out
    assert "ERROR   row 9, case bad9, file images/missing.nii.gz" in out and "FAILED: " in out
    assert main(["check", str(small_dataset)]) == 0
    assert "OK: 12 cases checked" in capsys.readouterr().out


def test_prepare_writes_nothing_when_the_check_fails(bad_manifest, data_cfg, tmp_path):
    cfg = data_cfg(bad_manifest, folds=3)
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert "file not found" in str(err.value) and "row 20" in str(err.value)
    written = [p for p in (tmp_path / "cache").rglob("*") if not p.name.endswith(".lock")]
    assert written == []


def test_skip_bad_drops_bad_cases_and_lists_them(small_dataset, data_cfg):
    rows = small_dataset.read_text().splitlines()
    rows += ["bad_missing,images/none.nii.gz,benign,p20", "bad_const,images/const.nii.gz,malignant,p21"]
    write_nifti(small_dataset.parent / "images/const.nii.gz", np.zeros((12, 12, 8), np.int16))
    small_dataset.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="constant volume"):
        prepare(data_cfg(small_dataset), progress=False)
    data = prepare(data_cfg(small_dataset, skip_bad=True), progress=False)
    assert len(data.cases) == 12 and data.images.shape[0] == 12
    skipped = json.loads((data.cache_dir / "skipped_cases.json").read_text())
    assert [(s["row"], s["id"]) for s in skipped] == [(14, "bad_missing"), (15, "bad_const")]
    assert "file not found" in skipped[0]["problems"][0] and "constant" in skipped[1]["problems"][0]


def test_npz_checked_in_memory(medmnist_28, tmp_path, data_cfg):
    report = check_data(data_cfg(medmnist_28), progress=False)
    assert report.ok and len(report.inspections) == 1584
    assert report.inspections[0]["stats"][0]["min"] == 0 and report.inspections[0]["stats"][0]["max"] == 255
    images = np.random.default_rng(0).normal(size=(6, 8, 8, 8)).astype(np.float32)
    images[2] = 5.0
    images[4, 1, 1, 1] = np.inf
    labels = np.array([[0], [1], [0], [1], [0], [1]])
    np.savez(tmp_path / "bad.npz", train_images=images, train_labels=labels,
             test_images=images[:2], test_labels=labels[:2])
    report = check_data(data_cfg(tmp_path / "bad.npz", folds=2), progress=False)
    assert [(p.case_id, p.what.split(" (")[0]) for p in report.problems] == [
        ("train_0002", "constant volume"), ("train_0004", "1 NaN/Inf voxel(s)")]
    assert report.problems[0].file == "train_images[2]"


def test_gzip_of_text_is_not_an_image(tmp_path, data_cfg):
    """A gzip that holds text (e.g. a zipped CSV renamed) is reported as unreadable, not crashed on."""
    (tmp_path / "x.nii.gz").write_bytes(gzip.compress(b"hello\n" * 100))
    write_manifest(tmp_path / "m.csv", [{"image": "x.nii.gz", "label": "a"}])
    report = check_data(data_cfg(tmp_path / "m.csv"), progress=False)
    assert any(p.row == 2 and "unreadable" in p.what for p in report.problems)


def test_labels_spelled_several_ways_are_named_by_row_and_only_then():
    """'grade 1' / 'Grade_1' / 'grade-1 ' are one class typed three ways: the rows of the rarer spellings are the
    problem, each told the usual spelling; the 'classes' they made are not also reported as too small. Distinct
    names ('grade 1' / 'grade 2', 'T1' / 'T-1') are left alone. A folder source is told to rename the folder."""
    from medvox.config import DataConfig
    from medvox.data.check import check_case_set
    from medvox.data.sources import Case

    classes = ["Grade_1", "T-1", "T1", "grade 1", "grade 2", "grade-1"]
    spelled = ["grade 1"] * 6 + ["grade 2"] * 6 + ["Grade_1", "grade-1"] + ["T1"] * 5 + ["T-1"] * 5
    cases = [Case(id=f"c{i}", group=f"P{i}", label=classes.index(s), row=i + 2, images=[Path(f"c{i}.nii.gz")])
             for i, s in enumerate(spelled)]
    problems = check_case_set(cases, classes, DataConfig(folds=3))
    assert [(p.row, p.case_id, p.what, p.fix) for p in problems] == [
        (14, "c12", "label 'Grade_1' differs from 'grade 1' (6 cases) only in case, spaces, '_' or '-': they would "
         "be two classes", "write the class as 'grade 1' in column 'label'"),
        (15, "c13", "label 'grade-1' differs from 'grade 1' (6 cases) only in case, spaces, '_' or '-': they would "
         "be two classes", "write the class as 'grade 1' in column 'label'")]
    assert all(p.case_index is None for p in problems)  # --skip-bad cannot drop them: the label needs the fix
    folder = [Case(id=f"d{i}", group=f"Q{i}", label=lab, images=[Path(f"{classes[lab]}/d{i}.nii.gz")])
              for i, lab in enumerate([3] * 4 + [4] * 4 + [0])]
    (p,) = check_case_set(folder, classes, DataConfig(folds=2))
    assert p.row is None and p.fix == "write the class as 'grade 1' (rename its folder)"
