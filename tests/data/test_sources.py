"""Sources -> cases: manifests (CSV/TSV, multi-channel, test split), MedMNIST .npz, folder-per-class."""

from __future__ import annotations

import numpy as np
import pytest

from medvox.config import DataConfig
from medvox.data import cases_from_paths, load_source
from medvox.data.sources import SourceError
from medvox.errors import DataError
from tests.data.conftest import write_dicom_series, write_nifti


def test_tsv_with_bom_whitespace_numeric_labels_channels_and_test_split(tmp_path):
    text = ("\ufeff id \tct\tpet\tlabel\tpatient_id\tsplit\n"
            "a\t ct/a.nii.gz \tpet/a.nii.gz\t10\tP1\t\n"
            "b\tct/b.nii.gz\tpet/b.nii.gz\t2\tP2\ttrain\n"
            "c\tct/c.nii.gz\tpet/c.nii.gz\t1\t\ttest\n")
    (tmp_path / "m.tsv").write_text(text, encoding="utf-8")
    cs = load_source(DataConfig(path=str(tmp_path / "m.tsv"), image_cols=["ct", "pet"]))
    assert cs.kind == "manifest" and cs.classes == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    a, b, c = cs.cases
    assert (a.id, a.group, a.label, a.row, a.subset) == ("a", "P1", 2, 2, "train")
    assert a.images == [tmp_path / "ct/a.nii.gz", tmp_path / "pet/a.nii.gz"]  # relative to the manifest
    assert (c.group, c.label, c.subset, c.row) == ("c", 0, "test", 4)  # no patient id: the case is its own
    assert [x.id for x in cs.pool] == ["a", "b"] and [x.id for x in cs.test] == ["c"]
    assert cs.problems == []


def test_string_labels_sorted_default_ids_and_fold_column(tmp_path):
    (tmp_path / "m.csv").write_text("image,label,fold\nx/one.nii.gz,malignant,1\ny/two.nii.gz,benign,0\n")
    cs = load_source(DataConfig(path=str(tmp_path / "m.csv")))
    assert cs.classes == ["benign", "malignant"]
    assert [(c.id, c.label, c.fold) for c in cs.cases] == [("one", 1, 1), ("two", 0, 0)]


def test_missing_columns_name_what_is_there_and_the_flag(tmp_path):
    (tmp_path / "m.csv").write_text("path,diagnosis\na.nii.gz,1\n")
    with pytest.raises(SourceError) as err:
        load_source(DataConfig(path=str(tmp_path / "m.csv")))
    text = str(err.value)
    assert "no image column 'image'" in text and "'path', 'diagnosis'" in text and "--image-col" in text
    assert "no label column 'label'" in text and "--label-col" in text
    # unlabeled inputs (predict) only need the image column
    cs = load_source(DataConfig(path=str(tmp_path / "m.csv"), image_cols=["path"], label_col="x"),
                     require_labels=False)
    assert cs.cases[0].label is None and cs.classes == []


def test_medmnist_npz_pool_and_held_out_test(medmnist_28):
    cs = load_source(DataConfig(path=str(medmnist_28)))
    assert cs.kind == "npz" and cs.classes == ["0", "1"]
    assert len(cs.pool) == 1188 + 98 and len(cs.test) == 298
    ids = [c.id for c in cs.cases]
    assert ids[1] == "train_0001" and "val_0003" in ids and "test_0100" in ids and len(set(ids)) == len(ids)
    case = cs.cases[ids.index("val_0003")]
    with np.load(medmnist_28) as npz:
        np.testing.assert_array_equal(case.array, npz["val_images"][3])
        assert case.label == int(npz["val_labels"][3, 0])
    assert case.array.dtype == np.uint8 and case.array.shape == (28, 28, 28) and case.images is None
    assert case.subset == "train" and cs.cases[-1].subset == "test"


def test_npz_images_are_read_only_when_used(medmnist_28, tmp_path):
    """Reading the source takes the labels and the arrays' headers; a volume's data is decompressed when a
    case is first used, once per array; a case's signature names the file, the array and the row."""
    cs = load_source(DataConfig(path=str(medmnist_28)))
    holders = {c.array.images.key: c.array.images for c in cs.cases}
    assert sorted(holders) == ["test_images", "train_images", "val_images"]
    assert all(h._array is None for h in holders.values())  # nothing decompressed yet
    assert holders["train_images"].shape == (1188, 28, 28, 28) and cs.cases[5].array.size == 28**3
    with np.load(medmnist_28) as npz:
        np.testing.assert_array_equal(np.asarray(cs.cases[5].array), npz["train_images"][5])
        np.testing.assert_array_equal(np.stack([cs.cases[7].array, cs.cases[8].array]), npz["train_images"][7:9])
    assert holders["train_images"]._array is not None and holders["test_images"]._array is None
    sig = cs.cases[5].meta["_signature"]
    assert sig.startswith("npz|") and sig.endswith("|train_images|5") and str(medmnist_28.absolute()) in sig

    # an npz whose images are rewritten in place is not read as the old one
    src = tmp_path / "mini.npz"
    with np.load(medmnist_28) as npz:
        np.savez(src, train_images=npz["train_images"][:4], train_labels=npz["train_labels"][:4])
    lazy = load_source(DataConfig(path=str(src)))
    np.savez(src, train_images=np.zeros((5, 28, 28, 28), np.uint8), train_labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(DataError, match="train_images changed while it was being read"):
        np.asarray(lazy.cases[0].array)


def test_folder_per_class_with_nifti_and_dicom(tmp_path):
    vol = np.random.default_rng(0).integers(0, 100, (6, 6, 4)).astype(np.int16)
    write_nifti(tmp_path / "root/benign/a.nii.gz", vol)
    write_nifti(tmp_path / "root/malignant/b.nii.gz", vol)
    write_dicom_series(tmp_path / "root/malignant/c_series", vol, np.eye(4))
    (tmp_path / "root/malignant/notes.txt").write_text("not an image")
    cs = load_source(DataConfig(path=str(tmp_path / "root")))
    assert cs.kind == "folder" and cs.classes == ["benign", "malignant"]
    assert [(c.id, c.label) for c in cs.cases] == [("benign/a", 0), ("malignant/b", 1), ("malignant/c_series", 1)]


def test_cases_from_paths_for_prediction(tmp_path):
    vol = np.ones((4, 4, 4), np.int16)
    one = write_nifti(tmp_path / "one.nii.gz", vol)
    write_nifti(tmp_path / "batch/x.nii.gz", vol)
    write_nifti(tmp_path / "batch/y.nii", vol)
    cases = cases_from_paths([one, tmp_path / "batch"])
    assert [c.id for c in cases] == ["one", "x", "y"] and all(c.label is None for c in cases)
    with pytest.raises(Exception, match="no such file"):
        cases_from_paths([tmp_path / "missing.nii.gz"])
