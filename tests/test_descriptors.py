"""The descriptor model beside the CNN: each descriptor against a hand-computed value, the JSON model
against scikit-learn's own predictions, and the fusion weight chosen on out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvox.descriptors import (
    WEIGHT_GRID,
    choose_weight,
    feature_matrix,
    make_feature_model,
    model_to_json,
    otsu_threshold,
    predict_json,
    volume_features,
)


def _features(volume) -> dict[str, float]:
    names, values = volume_features(volume)
    return dict(zip(names, values, strict=True))


def test_otsu_splits_two_modes_between_them():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, 5000), rng.normal(3, 0.1, 500)])
    t = otsu_threshold(x)
    assert 1.0 < t < 2.0  # midway across the empty gap, not at the lower mode's edge
    assert (x > t).sum() == 500
    assert otsu_threshold(np.full(10, 2.0)) == 2.0  # constant: nothing above the threshold


def test_cube_descriptors_by_hand():
    v = np.zeros((1, 12, 12, 12), np.float32)
    v[0, 2:8, 2:8, 2:8] = 1.0  # a 6^3 cube, 216 voxels
    f = _features(v)
    assert np.exp(f["c0_fg_log_voxels"]) == pytest.approx(216)
    assert f["c0_fg_fraction"] == pytest.approx(216 / 12 ** 3)
    assert f["c0_fg_surface_ratio"] == pytest.approx(6 * 36 / 216 ** (2 / 3))  # 6 faces of 36 voxel faces
    assert f["c0_fg_components"] == 1 and f["c0_fg_largest_share"] == 1
    # sample variance (ddof=1) of the coordinates 2..7, each taken by 36 of the 216 voxels, on each axis
    var = np.var(np.arange(2, 8)) * 216 / 215
    for a in ("axis0", "axis1", "axis2"):
        assert f[f"c0_fg_{a}"] == pytest.approx(var)
    assert f["c0_fg_axis_ratio_10"] == pytest.approx(1.0)
    assert f["c0_fg_solidity"] == pytest.approx(1.0, abs=1e-9)  # the hull of voxel centres: a 5^3 box < 216
    assert f["c0_fg_extent"] == 1.0 and f["c0_fg_box0"] == 6
    assert f["c0_fg_eroded1"] == pytest.approx(4 ** 3 / 216)
    assert f["c0_fg_eroded2"] == pytest.approx(2 ** 3 / 216)
    assert f["c0_fg_eroded3"] == 0
    assert f["c0_fg_dist_max"] == 3  # the centre voxels are 3 voxels from the background
    # layers 1, 2, 3 deep: the 6^3 shell (216 - 64), the 4^3 shell (64 - 8), the 2^3 core
    assert [f[f"c0_fg_dist_share{k}"] for k in ("1", "2", "3", "4plus")] == pytest.approx([152 / 216, 56 / 216, 8 / 216, 0])
    assert [f[f"c0_fg_chord{a}"] for a in "012"] == [6, 6, 6]  # 36 runs of 6 voxels along each axis
    assert f["c0_fg_centroid0"] == pytest.approx(4.5 / 12)
    assert f["c0_mean"] == pytest.approx(216 / 12 ** 3) and f["c0_p50"] == 0


def test_components_thickness_and_empty_volume():
    v = np.zeros((20, 20, 20), np.float32)
    v[1:9, 1:9, 1:9] = 1.0  # 512 voxels
    v[12:14, 12:14, 12:14] = 1.0  # 8 voxels, apart
    f = _features(v)
    assert f["c0_fg_components"] == 2
    assert f["c0_fg_largest_share"] == pytest.approx(512 / 520)
    thin = np.zeros((20, 20, 20), np.float32)
    thin[2:18, 2:18, 9:11] = 1.0  # a 2-voxel plate: thickness 1 everywhere
    g = _features(thin)
    assert g["c0_fg_dist_max"] == 1 and g["c0_fg_eroded1"] == 0
    assert (g["c0_fg_chord0"], g["c0_fg_chord1"], g["c0_fg_chord2"]) == (16, 16, 2)  # (z, y, x): 2 thick in x
    assert (g["c0_fg_chord_min"], g["c0_fg_chord_mid"], g["c0_fg_chord_max"]) == (2, 16, 16)
    assert g["c0_fg_dist_share1"] == 1.0
    assert f["c0_fg_dist_mean"] > g["c0_fg_dist_mean"]
    empty = _features(np.zeros((8, 8, 8), np.float32))
    assert all(val == 0 for k, val in empty.items() if k.startswith("c0_fg_"))


def test_channels_are_described_apart_and_shapes_are_checked():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, 10, 10, 10)).astype(np.float32)
    names, values = volume_features(v)
    one, _ = volume_features(v[:1])
    assert len(names) == 2 * len(one) and names[: len(one)] == one
    assert names[len(one)].startswith("c1_") and np.isfinite(values).all()
    with pytest.raises(ValueError, match="volume"):
        volume_features(np.zeros((4, 4)))


@pytest.mark.parametrize("k", [2, 3])
def test_json_model_predicts_like_sklearn(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(120, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (k == 3) * (x[:, 2] > 1).astype(int)
    model = make_feature_model().fit(x, y)
    doc = model_to_json(model, [f"f{i}" for i in range(5)], [str(c) for c in range(k)])
    x_new = rng.normal(size=(30, 5))
    np.testing.assert_allclose(predict_json(doc, x_new), model.predict_proba(x_new), atol=1e-10)


def test_fusion_weight_picks_the_better_mixture():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    cnn1 = y + rng.normal(0, 1.0, len(y))
    feat1 = y + rng.normal(0, 1.0, len(y))  # independent errors of equal size: the mean is better than either

    def as_probs(s):
        p = 1 / (1 + np.exp(-s))
        return np.stack([1 - p, p], 1)

    w, curve = choose_weight(y, as_probs(cnn1), as_probs(feat1))
    assert 0.3 <= w <= 0.7
    assert [c["weight"] for c in curve] == list(WEIGHT_GRID)
    fused = max(c["auc"] for c in curve)
    assert fused > roc_auc_score(y, cnn1) + 0.02 and fused > roc_auc_score(y, feat1) + 0.02
    # a useless feature model gets weight 0 (the CNN alone); the same model twice: the smaller weight
    assert choose_weight(y, as_probs(cnn1), as_probs(rng.normal(size=len(y))))[0] == 0
    assert choose_weight(y, as_probs(cnn1), as_probs(cnn1))[0] == 0


def test_feature_grid_is_the_cnns_input_unless_the_user_made_the_input_coarser(tmp_path, capsys):
    """`feature_data` prepares nothing when the descriptors' grid is the CNN's (grid "input", or no
    target_shape/target_spacing given), and refuses an unknown grid before any training (as `medvox train`)."""
    from medvox.cli import main
    from medvox.config import DataConfig
    from medvox.descriptors import feature_data

    prepared = object()  # never read: no preparation happens on these routes
    assert feature_data(DataConfig(path="x.npz"), prepared, "native") is prepared
    assert feature_data(DataConfig(path="x.npz", target_shape=[16, 16, 16]), prepared, "input") is prepared
    with pytest.raises(ValueError, match="unknown train.feature_grid 'coarse'"):
        feature_data(DataConfig(path="x.npz"), prepared, "coarse")
    out = tmp_path / "runs"
    code = main(["train", "--data", str(tmp_path / "nothing.npz"), "--output", str(out), "--set",
                 "train.feature_grid=coarse"])
    assert code != 0 and not out.exists()
    assert "train.feature_grid = 'coarse': not one of native, input" in capsys.readouterr().err


def test_fusion_weight_criterion_is_auc_for_two_classes_and_log_loss_for_more():
    """A CNN that has learnt nothing (constant output) beside a good descriptor model: any w > 0 already has
    the descriptors' ranking, so AUC takes the smallest such w; with three classes no threshold repairs that
    mixture's argmax (the CNN's share, the class prior, dominates it: the majority class everywhere), so there
    the log-loss chooses, and takes the descriptors."""
    from medvox.descriptors import weight_criterion
    from medvox.metrics.classification import compute_metrics

    rng = np.random.default_rng(1)
    for k in (2, 3):
        y = rng.choice(k, 600, p=[0.6, 0.4] if k == 2 else [0.6, 0.25, 0.15])  # imbalanced, as in grading
        logits = 2.5 * np.eye(k)[y] + rng.normal(0, 1, (600, k))
        feats = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        flat = np.tile(np.bincount(y, minlength=k) / len(y), (len(y), 1))
        w, curve = choose_weight(y, flat, feats)
        assert weight_criterion(k) == ("auc" if k == 2 else "log_loss")
        if k == 2:
            assert w == 0.05  # the first weight with the descriptors' AUC
        else:
            assert w == 1.0 and curve[-1]["log_loss"] == min(c["log_loss"] for c in curve)
            acc_auc_choice = compute_metrics(y, 0.95 * flat + 0.05 * feats)["accuracy"]
            assert compute_metrics(y, feats)["accuracy"] > acc_auc_choice + 0.2


def test_feature_matrix_is_the_same_with_any_number_of_threads(medmnist_64):
    """The descriptors of a store are computed by threads side by side (a cv summary spent ~100 s on one
    core for 1,584 volumes at 64^3); the rows stay in order and equal to one volume at a time."""
    volumes = np.load(medmnist_64)["train_images"][:24].astype(np.float32) / 255
    names, one = feature_matrix(volumes, progress=False, workers=1)
    for workers in (2, 5):
        names_w, many = feature_matrix(volumes, progress=False, workers=workers)
        assert names_w == names and np.array_equal(many, one)
    assert one.shape == (24, len(names)) and np.array_equal(one[7], volume_features(volumes[7])[1])
    empty_names, empty = feature_matrix(volumes[:0], progress=False)
    assert empty_names == [] and empty.shape == (0, 0)
