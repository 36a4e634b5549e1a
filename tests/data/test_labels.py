"""Labels as a user writes them: MedMNIST-style ``.npz`` label arrays (one-hot, multi-label, fractional, of the
wrong count, objects), numbers compared as numbers, labels that look like probabilities, declared classes,
classes only in the test split or too small for the folds, fold values out of range, manifests that are not
UTF-8, and many rows naming one file. Checked through ``check_data`` and the ``medvox check`` CLI."""

from __future__ import annotations

import numpy as np
import pytest

from medvox.cli import main
from medvox.config import DataConfig
from medvox.data import check_data, load_source
from medvox.data.sources import SourceError
from tests.data.conftest import lesion_volume, write_manifest, write_nifti

SPACING = np.diag([0.8, 0.8, 2.5, 1.0])


def _npz(path, n=12, labels=None, **arrays):
    rng = np.random.default_rng(0)
    images = arrays.pop("train_images", (rng.random((n, 8, 8, 8)) * 255).astype(np.uint8))
    np.savez(path, train_images=images, train_labels=np.arange(n) % 2 if labels is None else labels, **arrays)
    return path


def _errors(report):
    return [p for p in report.problems if p.level == "error"]


def _cli_check(capsys, *argv):
    code = main(["check", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.out


# --- .npz labels --------------------------------------------------------------------------------


def test_one_hot_labels_are_converted_with_a_notice(tmp_path, capsys):
    labels = np.eye(2, dtype=np.uint8)[np.arange(12) % 2 ^ 1]  # column 1 holds the 1 for even rows
    path = _npz(tmp_path / "onehot.npz", labels=labels)
    cases = load_source(DataConfig(path=str(path)))
    assert [c.label for c in cases.cases] == [(i % 2) ^ 1 for i in range(12)]  # not column 0 (inverted classes)
    code, out = _cli_check(capsys, path, "--folds", "2")
    assert code == 0
    assert "WARNING file " + str(path) in out
    assert "train_labels is one-hot (12 x 2): read as class = the column holding the 1" in out
    assert out.strip().splitlines()[-1] == "OK: 12 cases checked, no errors, 1 warning(s)."


@pytest.mark.parametrize(("labels", "what"), [
    (np.array([[1, 1]] + [[1, 0], [0, 1]] * 5 + [[1, 0]]), "train_labels: multi-label: 1 image(s) have several "
     "classes (case train_0000: columns 0, 1); medvox trains one class per image, which is not supported here"),
    (np.array([0, 1] * 5 + [0.5, 1.5]), "train_labels: fractional labels (0.5, 1.5, ...) on 2 image(s): a label "
     "must be a whole class number (cases train_0010, train_0011)"),
    (np.arange(10) % 2, "train_labels: shape (10,): 10 label row(s) for 12 images in train_images"),
    (np.arange(24) % 2, "train_labels: shape (24,): 24 label row(s) for 12 images in train_images"),
    (np.array([[0.2, 0.8]] * 12), "train_labels: shape (12, 2) with values other than 0 and 1"),
])
def test_npz_labels_that_are_not_one_class_per_image_are_refused(tmp_path, capsys, labels, what):
    path = _npz(tmp_path / "bad.npz", labels=labels)
    with pytest.raises(SourceError) as err:
        load_source(DataConfig(path=str(path)))
    assert what in str(err.value)
    code, out = _cli_check(capsys, path)
    assert code == 1 and what in out and "FAILED: the source could not be read" in out


def test_an_object_label_array_and_a_text_file_named_npz_are_clear_errors(tmp_path, capsys):
    objects = tmp_path / "objects.npz"
    np.savez(objects, train_images=np.zeros((4, 8, 8, 8), np.uint8),
             train_labels=np.array(["a", None, 1, 2.0], dtype=object))
    code, out = _cli_check(capsys, objects)
    assert code == 1 and "train_labels: an array of Python objects (loading it would mean unpickling)" in out
    text = tmp_path / "notes.npz"
    text.write_text("case,label\n1,benign\n")
    code, out = _cli_check(capsys, text)
    assert code == 1 and "not an .npz: the file holds text, not a zip archive of arrays" in out
    assert "pickled" not in out


def test_channels_last_images_name_the_layout_and_the_fix(tmp_path, capsys):
    path = _npz(tmp_path / "rgb.npz", train_images=np.zeros((12, 16, 16, 16, 3), np.uint8))
    code, out = _cli_check(capsys, path)
    assert code == 1
    assert ("train_images has shape (12, 16, 16, 16, 3): channels last (N, D, H, W, C) with C = 3; medvox reads "
            "(N, D, H, W) or channels first (N, C, D, H, W)") in out
    assert "fix: move the channel axis before saving: np.moveaxis(train_images, -1, 1)" in out


def test_negative_npz_labels_are_classes_of_their_own(tmp_path):
    path = _npz(tmp_path / "neg.npz", n=16, labels=np.array([-2, -1, 0, 1] * 4))
    report = check_data(DataConfig(path=str(path), folds=2), progress=False)
    assert report.cases.classes == ["-2", "-1", "0", "1"]
    assert report.ok, report.format()


def test_a_class_only_in_the_npz_test_split_is_a_check_error(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path / "t.npz", test_images=(rng.random((3, 8, 8, 8)) * 255).astype(np.uint8),
                test_labels=np.array([0, 1, 2]))
    report = check_data(DataConfig(path=str(path), folds=2), progress=False)
    (problem,) = _errors(report)
    assert problem.what.startswith("class '2' is only in the test split (1 case(s): case test_0002 "
                                   "(test_images[2])): no cross-validation case teaches it")


# --- manifest labels ----------------------------------------------------------------------------


def _manifest(root, labels, extra=None, n_per=None, **columns):
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(labels):
        name = f"images/c{i:02d}.nii.gz"
        write_nifti(root / name, lesion_volume(rng, i % 2), SPACING)
        row = {"id": f"c{i:02d}", "image": name, "label": label, "patient_id": f"p{i:02d}"}
        row.update({k: v[i] for k, v in columns.items()})
        rows.append(row)
    return write_manifest(root / "manifest.csv", rows + (extra or []))


def test_numeric_labels_compare_as_numbers(tmp_path):
    manifest = _manifest(tmp_path, ["-1", "1", "1.0", "-1", "01", "-1"])
    report = check_data(DataConfig(path=str(manifest), folds=2), progress=False)
    assert report.cases.classes == ["-1", "1"]  # '1', '1.0' and '01' are one class; -1 is another
    assert report.ok, report.format()  # not "two spellings of one class"


def test_labels_that_look_like_probabilities_get_a_hint(tmp_path):
    manifest = _manifest(tmp_path, ["0", "0.5", "1"] * 4)
    report = check_data(DataConfig(path=str(manifest), folds=2), progress=False)
    assert report.cases.classes == ["0", "0.5", "1"]
    (warning,) = [p for p in report.problems if p.level == "warning"]
    assert warning.what == ("labels 0, 0.5, 1 in column 'label' include fractions between 0 and 1: probabilities or "
                            "soft labels? each distinct value is a class of its own (3 classes)")


def test_declared_classes_set_the_order_and_name_every_other_label_by_row(tmp_path, capsys):
    manifest = _manifest(tmp_path, ["benign", "malignant"] * 4 + ["maybe", "Malignant"])
    code, out = _cli_check(capsys, manifest, "--folds", "2", "--classes", "malignant,benign")
    assert code == 1
    assert ("  ERROR   row 10, case c08, file images/c08.nii.gz\n"
            "          label 'maybe' is not one of the declared classes 'malignant', 'benign'\n"
            "          fix: correct the label in column 'label', or add 'maybe' to the declared classes "
            "(--classes / data.classes)") in out
    assert "label 'Malignant' is not one of the declared classes 'malignant', 'benign' (did you mean 'malignant'?)" in out
    assert out.count("  ERROR   ") == 2  # the stray labels, not "too few cases of class 'maybe'"
    clean = _manifest(tmp_path / "clean", ["benign", "malignant"] * 4)
    cases = load_source(DataConfig(path=str(clean), classes=["malignant", "benign"]))
    assert cases.classes == ["malignant", "benign"] and [c.label for c in cases.cases[:2]] == [1, 0]


def test_a_declared_class_without_cases_is_an_error(tmp_path):
    manifest = _manifest(tmp_path, ["benign", "malignant"] * 4)
    report = check_data(DataConfig(path=str(manifest), folds=2, classes=["benign", "malignant", "unsure"]),
                        progress=False)
    assert [p.what for p in _errors(report)] == ["declared class 'unsure' has no case"]


def test_a_stray_class_too_small_for_the_folds_names_its_rows(tmp_path):
    manifest = _manifest(tmp_path, ["benign", "malignant"] * 5 + ["maybe"])
    report = check_data(DataConfig(path=str(manifest), folds=5), progress=False)
    (problem,) = _errors(report)
    assert problem.what == ("too few cases of class 'maybe' for 5 folds: 1 patient(s), 1 case(s): row 12 (case c10, "
                            "file images/c10.nii.gz)")
    assert "declare the classes (--classes)" in problem.fix


def test_a_class_only_in_the_test_split_of_a_manifest_is_a_check_error(tmp_path):
    labels = ["benign", "malignant"] * 4 + ["rare"]
    manifest = _manifest(tmp_path, labels, split=[""] * 8 + ["test"])
    report = check_data(DataConfig(path=str(manifest), folds=2), progress=False)
    (problem,) = _errors(report)
    assert problem.what == ("class 'rare' is only in the test split (1 case(s): row 10 (case c08, file "
                            "images/c08.nii.gz)): no cross-validation case teaches it")


def test_a_latin1_manifest_is_read_with_a_notice(tmp_path, capsys):
    rows = _manifest(tmp_path, ["bénin", "malin"] * 4).read_text(encoding="utf-8")
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes(rows.encode("latin-1"))
    code, out = _cli_check(capsys, manifest, "--folds", "2")
    assert code == 0, out
    assert "the manifest is not UTF-8 (line 2 holds byte 0xe9): read as Windows-1252, where that byte is 'é'" in out
    assert load_source(DataConfig(path=str(manifest))).classes == ["bénin", "malin"]


# --- folds and repeated rows --------------------------------------------------------------------


def test_fold_values_out_of_range_or_fractional_are_named_by_row(tmp_path):
    folds = ["0", "0", "1", "1", "-1", "7", "1.7", "1", "0", "1"]
    manifest = _manifest(tmp_path, ["benign", "malignant"] * 5, fold=folds)
    report = check_data(DataConfig(path=str(manifest), folds=2), progress=False)
    by_row = {p.row: p.what for p in _errors(report)}
    assert len(_errors(report)) == 3, report.format()
    assert by_row[6] == "fold -1 is out of range: folds are 0..1 (data.folds = 2)"
    assert by_row[7] == "fold 7 is out of range: folds are 0..1 (data.folds = 2)"
    assert by_row[8] == "fold '1.7' is not a whole number"  # not truncated to fold 1
    one_based = _manifest(tmp_path / "b", ["benign", "malignant"] * 4, fold=["1", "2"] * 2 + ["2", "1"] * 2)
    assert check_data(DataConfig(path=str(one_based), folds=2), progress=False).ok


def test_ten_thousand_rows_naming_one_file_are_one_grouped_error(tmp_path, capsys):
    rows = [{"image": "images/one.nii.gz", "label": ["benign", "malignant"][i % 2], "patient_id": f"p{i}"}
            for i in range(10_000)]
    write_nifti(tmp_path / "images/one.nii.gz", lesion_volume(np.random.default_rng(0), 0), SPACING)
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    code, out = _cli_check(capsys, manifest, "--folds", "2")
    assert code == 1
    assert out.count("  ERROR   ") == 2, out[:3000]  # one for the repeated id, one for the repeated image
    assert ("          the same image(s) as row 2, repeated on 9,999 rows: 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and "
            "9,989 more\n          fix: list every image once") in out
    assert "9999 of 10000 cases affected" in out.strip().splitlines()[-1]


def test_the_same_image_column_twice_is_refused(tmp_path, capsys):
    manifest = _manifest(tmp_path, ["benign", "malignant"] * 4)
    code, out = _cli_check(capsys, manifest, "--image-col", "image", "--image-col", "image")
    assert code == 1
    assert "image column 'image' given 2 times (--image-col): every case would get identical channels" in out


def test_declared_classes_are_validated_with_the_config(tmp_path):
    from medvox.cli import _DATA_FLAGS, build_parser, config_from_args
    from medvox.config import ConfigError, ExperimentConfig, apply_overrides, config_problems

    bad = ExperimentConfig()
    bad.data.classes = ["benign", "benign", " "]
    bad.data.max_volume_mb = 0
    assert config_problems(bad) == ["data.max_volume_mb = 0: must be > 0",
                                    "data.classes = ['benign', 'benign', ' ']: give distinct, non-empty class names"]
    with pytest.raises(ConfigError, match="at least two classes"):
        apply_overrides(ExperimentConfig(), {"data.classes": ["only"]})
    args = build_parser().parse_args(["check", "x.csv", "--classes", "grade 1, grade 2,grade 3", "--max-volume-mb", "512"])
    cfg = config_from_args(args, _DATA_FLAGS)
    assert cfg.data.classes == ["grade 1", "grade 2", "grade 3"] and cfg.data.max_volume_mb == 512.0
