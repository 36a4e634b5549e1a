"""Fingerprint -> plan: spacing/shape rules, modality guess, normalisation, overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvox.config import DataConfig
from medvox.data import check_data
from medvox.data.fingerprint import make_fingerprint, make_plan


def _fingerprint(spacings, shapes, lo=0.0, hi=1000.0, counts=(30, 10)):
    """A hand-made fingerprint (MRI-like intensities unless ``lo``/``hi`` say otherwise)."""
    fg = np.linspace(lo, hi, 1001)
    intensity = {"min": lo, "max": hi, "median_case_min": lo, "median_case_max": hi, "fg_mean": float(fg.mean()),
                 "fg_std": float(fg.std()), "fg_p00_5": float(np.percentile(fg, 0.5)),
                 "fg_p50": float(np.median(fg)), "fg_p99_5": float(np.percentile(fg, 99.5)), "integer": False,
                 "modality_tag": None, "fg_sample": fg.tolist()}
    modality = "CT" if lo <= -500 and hi >= 300 else "MRI"
    return {"n_cases": len(spacings), "classes": ["a", "b"], "class_counts": list(counts), "channels": 1,
            "spacings": spacings, "shapes": shapes, "intensity": [intensity], "modality": [modality]}


def test_medmnist_plan_keeps_the_native_grid(medmnist_28):
    report = check_data(DataConfig(path=str(medmnist_28)), progress=False)
    cases = report.cases.cases
    pool = [i for i, c in enumerate(cases) if c.subset != "test"]
    fp = make_fingerprint([cases[i] for i in pool], [report.inspections[i] for i in pool], report.cases.classes)
    plan = make_plan(fp, DataConfig())
    assert fp["modality"] == ["other"] and fp["n_cases"] == 1286
    assert plan["target_shape"] == [28, 28, 28] and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["normalization"] == [{"scheme": "minmax", "min": 0.0, "max": 255.0}]
    assert plan["storage_dtype"] == "float16" and plan["in_channels"] == 1 and plan["antialias"] is True
    with np.load(medmnist_28) as npz:
        positives = int(npz["train_labels"].sum() + npz["val_labels"].sum())
    assert plan["class_counts"] == [1286 - positives, positives]
    assert plan["imbalance_ratio"] == pytest.approx((1286 - positives) / positives, abs=1e-3)
    json.dumps(fp, allow_nan=False), json.dumps(plan, allow_nan=False)  # plain JSON types only


def test_median_spacing_and_shape_rounded_up_to_16():
    spacings = [[2.5, 0.8, 0.8], [2.4, 0.78, 0.78], [2.6, 0.82, 0.82]]
    plan = make_plan(_fingerprint(spacings, [[24, 48, 48]] * 3), DataConfig())
    assert plan["target_spacing"] == pytest.approx([2.5, 0.8, 0.8])
    assert plan["target_shape"] == [32, 48, 48]  # 24 slices -> 32, 48 stays 48


def test_anisotropic_data_take_the_10th_percentile_on_the_coarse_axis():
    z = [3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0]
    spacings = [[s, 0.7, 0.7] for s in z]
    plan = make_plan(_fingerprint(spacings, [[20, 100, 100]] * len(z)), DataConfig())
    assert plan["target_spacing"][0] == pytest.approx(np.percentile(z, 10))  # 3.9, not the median 5
    assert plan["target_spacing"][1:] == pytest.approx([0.7, 0.7])


def test_large_volumes_keep_their_field_of_view_at_a_coarser_spacing():
    plan = make_plan(_fingerprint([[1.0, 0.7, 0.7]] * 3, [[300, 512, 512]] * 3), DataConfig())
    assert plan["target_shape"] == [128, 128, 128]
    assert plan["target_spacing"] == pytest.approx([300 / 128, 0.7 * 512 / 128, 0.7 * 512 / 128])


def test_a_target_shape_alone_resizes_the_field_of_view_instead_of_cropping_it():
    """`data.target_shape` without `target_spacing` keeps the median extent: the 64^3 release at 28^3 is the
    whole volume at 64/28 mm (a 28^3 crop of its centre would cut most of an organ off); an anisotropic
    set keeps each axis's extent."""
    from medvox.data.preprocess import preprocess_volume

    plan = make_plan(_fingerprint([[1.0, 1.0, 1.0]] * 3, [[64, 64, 64]] * 3), DataConfig(target_shape=[28, 28, 28]))
    assert plan["target_shape"] == [28, 28, 28] and plan["target_spacing"] == pytest.approx([64 / 28] * 3, abs=1e-4)
    aniso = make_plan(_fingerprint([[2.5, 0.8, 0.8], [2.5, 0.8, 0.8], [3.0, 0.8, 0.8]], [[24, 48, 48]] * 3),
                      DataConfig(target_shape=[16, 32, 32]))
    assert aniso["target_spacing"] == pytest.approx([24 * 2.5 / 16, 48 * 0.8 / 32, 48 * 0.8 / 32])
    zz, yy, xx = np.mgrid[:64, :64, :64]
    ball = (((zz - 31.5) ** 2 + (yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 28 ** 2).astype(np.float32)
    out = preprocess_volume(ball, {"spacing": [1.0, 1.0, 1.0]}, {**plan, "normalization": [{"scheme": "none"}]})
    assert out.shape == (1, 28, 28, 28)
    assert (out[0] > 0.5).mean() == pytest.approx(ball.mean(), abs=0.02)  # ~0.35 of the grid; a crop: ~1.0
    assert out[0, 0].max() < 0.5 and out[0, 14, 14, 14] > 0.5  # the ball's edge stays inside, its centre too


def test_ct_normalisation_and_overrides():
    fp = _fingerprint([[2.5, 0.8, 0.8]] * 3, [[24, 48, 48]] * 3, lo=-1000, hi=1000)
    ct = make_plan(fp, DataConfig())["normalization"][0]
    assert ct["scheme"] == "ct" and ct["clip"] == pytest.approx([-990, 990]) and ct["mean"] == pytest.approx(0)
    plan = make_plan(fp, DataConfig(ct_window=[-100, 300], target_shape=[16, 32, 32], target_spacing=[3, 1, 1]))
    assert plan["normalization"][0]["clip"] == [-100.0, 300.0]
    clipped = np.clip(np.linspace(-1000, 1000, 1001), -100, 300)  # the foreground sample, clipped to the window
    assert plan["normalization"][0]["mean"] == pytest.approx(clipped.mean(), rel=1e-3)
    assert plan["normalization"][0]["std"] == pytest.approx(clipped.std(), rel=1e-3)
    assert plan["target_shape"] == [16, 32, 32] and plan["target_spacing"] == [3.0, 1.0, 1.0]
    raw = make_plan(fp, DataConfig(normalization="none"))
    assert raw["normalization"] == [{"scheme": "none"}] and raw["storage_dtype"] == "float32"
    with pytest.raises(ValueError, match="unknown normalization"):
        make_plan(fp, DataConfig(normalization="histogram"))


def test_demo_like_ct_is_detected(small_dataset):
    report = check_data(DataConfig(path=str(small_dataset)), progress=False)
    fp = make_fingerprint(report.cases.cases, report.inspections, report.cases.classes)
    assert fp["modality"] == ["CT"] and fp["orientations"] == {"RAS": 12}
    plan = make_plan(fp, DataConfig())
    assert plan["normalization"][0]["scheme"] == "ct"
    # every case has the same grid already: kept as it is (no resampling, no padding to 16)
    assert plan["target_spacing"] == pytest.approx([2.5, 0.8, 0.8]) and plan["target_shape"] == [8, 12, 12]
