"""``prepare`` end to end: the real AdrenalMNIST3D file and the synthetic CT demo."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from medvox.cli import main
from medvox.config import DataConfig
from medvox.data import DataError, check_data, prepare
from medvox.data.cache import array_digest
from medvox.data.fingerprint import make_fingerprint, make_plan
from medvox.engine.runinfo import content_hash
from tests.data.conftest import lesion_volume, write_dicom_series, write_manifest, write_nifti


def _plain(obj):
    """Only JSON types all the way down (what json.loads gives back)."""
    return json.loads(json.dumps(obj, allow_nan=False)) == obj


def test_adrenalmnist3d_prepared_split_and_cached(medmnist_28, data_cfg):
    data = prepare(data_cfg(medmnist_28), progress=False)
    assert data.classes == ["0", "1"] and len(data.cases) == 1584
    assert data.images.shape == (1584, 1, 28, 28, 28) and data.images.dtype == np.float16
    with np.load(medmnist_28) as npz:
        labels = np.concatenate([npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
        np.testing.assert_array_equal(data.images[1200, 0], npz["val_images"][12] / 255.0)  # row 1188 + 12
        np.testing.assert_array_equal(data.images[1583, 0], npz["test_images"][297] / 255.0)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.test_idx, np.arange(1286, 1584))
    pool_rate = labels[:1286].mean()
    for k in range(5):
        train, val = data.fold(k)
        assert train.dtype == np.int64 and len(train) + len(val) == 1286
        assert not set(train) & set(val) and max(max(train), max(val)) < 1286  # test rows never in a fold
        assert abs(data.class_counts(val)[1] / len(val) - pool_rate) < 0.05
    assert data.class_counts(data.test_idx) == [int((labels[1286:] == 0).sum()), int(labels[1286:].sum())]
    assert data.plan["target_shape"] == [28, 28, 28] and data.plan["in_channels"] == 1
    assert (data.cache_dir.parent / "splits_k5_seed0.json").is_file()  # beside, not inside, the plan folder
    for name, doc in (("plan", data.plan), ("fingerprint", data.fingerprint)):
        assert json.loads((data.cache_dir / f"{name}.json").read_text()) == doc and _plain(doc)
    assert _plain(data.splits)
    summary = data.summary()
    assert "1584 cases: 1286 cross-validation pool + 298 held-out test" in summary
    assert "(1584, 1, 28, 28, 28) float16" in summary and "normalisation minmax" in summary
    assert "built 1584 case(s)" in summary
    again = prepare(data_cfg(medmnist_28), progress=False)
    assert again.cache_hit and "cache hit: nothing decoded" in again.summary()
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        data.fold(5)

    # the store's digest is written when it is built and is that of its bytes; a run's data hash from it
    # equals the one read from the images themselves
    digest_file = data.cache_dir / "digest.json"
    assert again.images_digest == data.images_digest == json.loads(digest_file.read_text())["blake2b"]
    assert data.images_digest == array_digest(np.asarray(data.images))
    assert content_hash(again) == content_hash(dataclasses.replace(again, images_digest=None))
    # the warm start decompressed no image: the store, the inspections and the splits came from the cache
    assert all(c.array.images._array is None for c in again.cases)
    # a store built before digest.json existed gets one on its next use
    digest_file.unlink()
    assert prepare(data_cfg(medmnist_28), progress=False).images_digest == data.images_digest
    assert digest_file.is_file()


def test_adrenalmnist3d_64_keeps_its_grid(medmnist_64):
    report = check_data(DataConfig(path=str(medmnist_64)), progress=False)
    assert report.ok and report.inspections[0]["shape"] == [64, 64, 64]
    pool = [i for i, c in enumerate(report.cases.cases) if c.subset != "test"]
    fp = make_fingerprint([report.cases.cases[i] for i in pool], [report.inspections[i] for i in pool],
                          report.cases.classes)
    assert make_plan(fp, DataConfig())["target_shape"] == [64, 64, 64]


def test_demo_prepared_end_to_end(demo_manifest, data_cfg, capsys):
    data = prepare(data_cfg(demo_manifest), progress=False)
    plan = data.plan
    assert plan["modality"] == ["CT"] and plan["normalization"][0]["scheme"] == "ct"
    assert plan["target_shape"] == [32, 48, 48]  # 24 slices at ~2.5 mm -> 32; 48 in-plane stays
    assert plan["target_spacing"][0] == pytest.approx(2.5, abs=0.05)
    assert plan["target_spacing"][1] == pytest.approx(0.79, abs=0.03)
    rows = list(csv.DictReader(open(demo_manifest, encoding="utf-8")))
    pool = [r["label"] for r in rows if r["split"] != "test"]  # the held-out patients are not planned on
    counts = [pool.count("benign"), pool.count("malignant")]
    assert len(rows) - len(pool) >= 20 and sum(counts) == len(pool)
    assert plan["class_counts"] == counts and plan["imbalance_ratio"] == pytest.approx(counts[0] / counts[1], abs=1e-3)
    assert len(data.test_idx) == len(rows) - len(pool)
    assert data.images.shape == (200, 1, 32, 48, 48)
    x = np.asarray(data.images[:20], dtype=np.float32)
    assert np.isfinite(x).all() and abs(x.mean()) < 1.5 and 0.3 < x.std() < 2  # z-scored HU
    group = {c.id: c.group for c in data.cases}
    folds_of = {}
    for k in range(5):
        for i in data.fold(k)[1]:
            folds_of.setdefault(group[data.cases[i].id], set()).add(k)
    assert all(len(v) == 1 for v in folds_of.values())  # patients never straddle folds
    assert main(["prepare", str(demo_manifest), "--cache-dir", str(data.cache_dir.parents[1])]) == 0
    assert "cache hit: nothing decoded" in capsys.readouterr().out


def test_prepare_errors_are_clear(tmp_path, data_cfg):
    with pytest.raises(DataError, match="make-demo-data"):
        prepare(DataConfig(path=None), progress=False)
    (tmp_path / "m.csv").write_text("image\na.nii.gz\n")
    with pytest.raises(DataError, match="(?s)no label column 'label'.*--label-col.*the source could not be read"):
        prepare(data_cfg(tmp_path / "m.csv"), progress=False)


def test_dicom_manifest_prepares_like_nifti_and_channels_stack(tmp_path, data_cfg):
    """The same volumes as DICOM series folders and as NIfTI give the same cache; CT + PET make 2 channels."""
    rng = np.random.default_rng(3)
    affine = np.array([[-0.8, 0, 0, 5.0], [0, -0.8, 0, 7.0], [0, 0, 2.5, -9.0], [0, 0, 0, 1]])  # LPS storage
    rows = []
    for i in range(8):
        ct = lesion_volume(rng, i % 2)
        pet = (np.clip(ct + 1000, 0, None) / 100 * rng.uniform(0.8, 1.2)).astype(np.float32)  # SUV-like
        write_nifti(tmp_path / f"nii/ct{i}.nii.gz", ct, affine)
        write_nifti(tmp_path / f"nii/pet{i}.nii.gz", pet, affine)
        write_dicom_series(tmp_path / f"dcm/ct{i}", ct, affine)
        rows.append({"ct": f"nii/ct{i}.nii.gz", "pet": f"nii/pet{i}.nii.gz", "dicom": f"dcm/ct{i}",
                     "label": "ab"[i % 2], "id": f"c{i}"})
    write_manifest(tmp_path / "m.csv", rows)
    nifti = prepare(data_cfg(tmp_path / "m.csv", image_cols=["ct"], folds=2), progress=False)
    dicom = prepare(data_cfg(tmp_path / "m.csv", image_cols=["dicom"], folds=2), progress=False)
    np.testing.assert_array_equal(dicom.images, nifti.images)
    assert dicom.plan["target_spacing"] == pytest.approx(nifti.plan["target_spacing"])
    both = prepare(data_cfg(tmp_path / "m.csv", image_cols=["ct", "pet"], folds=2), progress=False)
    assert both.images.shape == (8, 2, 8, 12, 12) and both.plan["in_channels"] == 2
    assert [n["scheme"] for n in both.plan["normalization"]] == ["ct", "zscore"]
    np.testing.assert_array_equal(both.images[:, :1], nifti.images)


def test_file_inspections_come_from_the_cache_and_only_a_changed_file_is_read_again(small_dataset, data_cfg,
                                                                                   monkeypatch):
    from medvox.data import inspection

    first = prepare(data_cfg(small_dataset), progress=False)
    read = []
    real = inspection.inspect_case
    monkeypatch.setattr(inspection, "inspect_case", lambda case, *a, **k: read.append(case.id) or real(case, *a, **k))
    again = prepare(data_cfg(small_dataset), progress=False)
    assert read == [] and again.cache_hit
    volume = lesion_volume(np.random.default_rng(7), 1) + 5.0  # new content: another signature for c03 only
    write_nifti(small_dataset.parent / "images/c03.nii.gz", volume, np.diag([0.8, 0.8, 2.5, 1.0]))
    changed = prepare(data_cfg(small_dataset), progress=False)
    assert read == ["c03"]  # (the store may be rebuilt: new intensities can change the plan's normalisation)
    assert changed.images_digest != first.images_digest
