"""Explanations: Grad-CAM and MIL attention maps, taken back to the input's grid, affine and orientation."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medvox.data.preprocess import preprocess_volume
from medvox.inference import explain as explain_mod
from medvox.inference.explain import explain, gradcam_map, instance_map, to_input_grid
from medvox.inference.models import load_model
from tests.conftest_runs import make_checkpoint, tiny_plan


def write_blob(path: Path, shape=(24, 20, 12), centre=(15, 7, 6), affine=None) -> Path:
    """A NIfTI with a bright Gaussian blob, LPS-oriented and anisotropic by default."""
    grid = np.indices(shape).astype(float)
    r2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
    data = (30 + 200 * np.exp(-r2 / 8)).astype(np.float32)
    if affine is None:
        affine = np.diag([-1.5, -1.2, 2.0, 1.0])
        affine[:3, 3] = [20.0, 10.0, -5.0]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def assert_png_shows_an_overlay(path: Path) -> None:
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels.std() > 0.05
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2).mean() > 0.005  # the coloured map is drawn


def test_to_input_grid_undoes_resampling_and_crop_pad():
    grid = np.indices((20, 30, 25)).astype(float)
    volume = 1 + np.exp(-((grid[0] - 10) ** 2 / 40 + (grid[1] - 14) ** 2 / 90 + (grid[2] - 12) ** 2 / 60))
    spacing = [2.0, 0.8, 1.2]
    plan = {**tiny_plan(), "target_spacing": [1.5, 1.5, 1.5], "target_shape": [24, 14, 22]}
    # resampled to (27, 16, 20), then cropped in D and H, padded in W
    pre = preprocess_volume(volume, {"spacing": spacing}, plan)[0]
    back = to_input_grid(pre, volume.shape, spacing, plan)
    assert back.shape == volume.shape
    inner = (slice(4, 16), slice(4, 26), slice(2, 23))
    np.testing.assert_allclose(back[inner], volume[inner], rtol=0.02)
    assert np.all(back[:, 0] == 0) and np.all(back[:, -1] == 0)  # rows cropped away: the model never saw them


def test_a_map_equal_to_the_input_lands_on_the_input(tmp_path, monkeypatch):
    """Orientation, resampling and crop/pad inverted end to end: use the preprocessed image itself as the map."""
    blob = write_blob(tmp_path / "blob.nii.gz")
    ckpt = make_checkpoint(tmp_path / "best.pt", "resnet10", plan={**tiny_plan((20, 20, 20))})

    def image_as_map(members, x, target, layer=None):
        return {"map": x[0, 0].numpy(), "method": "gradcam", "attention": None, "cam_layer": None,
                "cam_resolution": None, "note": None, "warning": None}

    monkeypatch.setattr(explain_mod, "_ensemble_map", image_as_map)
    result = explain(ckpt, [blob], tmp_path / "out")[0]
    original, cam = nib.load(str(blob)), nib.load(result["cam_nifti"])
    assert cam.shape == original.shape and np.allclose(cam.affine, original.affine)
    data, saved = original.get_fdata(), cam.get_fdata()
    assert result["peak_voxel"] == [15, 7, 6] == list(np.unravel_index(np.argmax(saved), saved.shape))
    seen = ndimage.binary_erosion(saved > 0)  # inside the field of view, away from its interpolated edge
    assert seen.mean() > 0.2
    # two linear resamplings (1.2-2 mm -> 1 mm -> back) blur the sharp blob a little, nothing more
    error = np.abs(saved - data)[seen]
    assert error.max() < 0.12 * np.ptp(data) and error.mean() < 0.01 * np.ptp(data)
    assert np.corrcoef(saved[seen], data[seen])[0, 1] > 0.99


class _ToyCNN(nn.Module):
    """Feature map = the input; logits = (-mean, +mean): Grad-CAM of class 1 is ReLU(input), of class 0 is 0."""

    cam_target_layer = "features"

    def __init__(self):
        super().__init__()
        self.features = nn.Conv3d(1, 1, 1, bias=False)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def test_gradcam_is_not_flipped_and_is_scaled_by_its_maximum():
    x = torch.randn(1, 1, 8, 10, 12, generator=torch.Generator().manual_seed(0))
    cam, grid = gradcam_map(_ToyCNN(), x, class_idx=1)
    expected = torch.relu(x)[0, 0].numpy()
    np.testing.assert_allclose(cam, expected / expected.max(), atol=1e-6)
    assert grid == [8, 10, 12]
    cam0, _ = gradcam_map(_ToyCNN(), x.abs(), class_idx=0)
    assert np.all(cam0 == 0)


@pytest.mark.parametrize("name, kwargs, size, grid", [("resnet10", {"variant": "faithful"}, 32, [4, 4, 4]),
                                                      ("densenet121", {}, 32, [1, 1, 1])])
def test_gradcam_of_registered_models(name, kwargs, size, grid):
    from medvox.models import create_model

    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=2, **kwargs).eval()
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    cam, found = gradcam_map(model, x, class_idx=1)
    assert cam.shape == (size,) * 3 and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert found == grid
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # the model is left as it was (hooks live on a copy)
    assert not model._forward_hooks and not model.get_submodule(model.cam_target_layer)._forward_hooks


def test_explain_resnet10_on_a_nifti(tmp_path):
    blob = write_blob(tmp_path / "blob.nii.gz")
    run = tmp_path / "run"  # a run folder with one fold, no metrics.json: its best.pt is used
    make_checkpoint(run / "fold_0" / "best.pt", "resnet10", plan=tiny_plan((32, 32, 32)), variant="faithful")
    results = explain(run, [blob], tmp_path / "out", target_class="1")
    result = results[0]
    original, cam = nib.load(str(blob)), nib.load(result["cam_nifti"])
    assert cam.shape == original.shape and np.allclose(cam.affine, original.affine)
    values = cam.get_fdata()
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1 + 1e-6
    assert result["method"] == "gradcam" and result["target_class"] == "1" and result["cam_resolution"] == [4, 4, 4]
    assert sum(result["probabilities"].values()) == pytest.approx(1)
    assert json.loads((tmp_path / "out" / "explain.json").read_text())[0]["case_id"] == "blob"
    assert Path(result["cam_png"]).name == "blob_cam.png"
    pixels = matplotlib.image.imread(result["cam_png"])
    assert pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05


def test_a_small_input_reads_a_finer_layer_and_a_flat_gradcam_is_reported(tmp_path, capsys):
    """ResNet-10 (fast variant) at 28^3, the CPU recipe's input: layer4 is 1^3 and layer3 2^3, so Grad-CAM reads
    layer2 (4^3) and says so; asked for layer4 (--layer), the map is flat and the warning says it."""
    blob = write_blob(tmp_path / "blob.nii.gz")
    ckpt = make_checkpoint(tmp_path / "best.pt", "resnet10", plan=tiny_plan((28, 28, 28)))
    result = explain(ckpt, [blob], tmp_path / "out")[0]
    assert (result["cam_layer"], result["cam_resolution"], result["warning"]) == ("layer2", [4, 4, 4], None)
    assert result["note"] == ("layer4's feature map is 1 x 1 x 1 for a (28, 28, 28) input: Grad-CAM read at layer2 "
                              "(4 x 4 x 4), finer but less class-specific")
    values = nib.load(result["cam_nifti"]).get_fdata()
    assert values.max() > 0 and values.std() > 0.01  # a map that varies over the volume
    forced = explain(ckpt, [blob], tmp_path / "forced", layer="layer4")[0]
    assert forced["cam_resolution"] == [1, 1, 1] and "layer4's feature map is 1 x 1 x 1" in forced["warning"]
    assert forced["note"] is None and "cannot localise" in forced["warning"]
    from medvox.cli import main

    assert main(["explain", "--run", str(ckpt), str(blob), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "Grad-CAM of class 1 at layer2: " in out and "_cam.png  (layer4's feature map is 1 x 1 x 1" in out


def test_cam_layer_keeps_the_last_layer_when_its_map_is_fine_enough():
    from medvox.inference.explain import cam_layer
    from medvox.models import create_model

    model = create_model("resnet10", num_classes=2)  # fast: /32 at layer4
    assert cam_layer(model, torch.zeros(1, 1, 128, 128, 128)) == ("layer4", None)  # 4^3
    layer, note = cam_layer(model, torch.zeros(1, 1, 64, 64, 64))  # layer4 2^3 -> layer3 4^3
    assert layer == "layer3" and note.startswith("layer4's feature map is 2 x 2 x 2")
    assert cam_layer(model, torch.zeros(1, 1, 8, 8, 8))[0] == "layer2"  # nothing reaches 4^3: the finest
    assert not any(m._forward_hooks for m in model.modules())  # the probe's hooks are gone
    dense = create_model("densenet121", num_classes=2)  # no fallbacks: its own layer whatever the size
    assert cam_layer(dense, torch.zeros(1, 1, 32, 32, 32)) == ("features.norm5", None)


def test_mil_slice_attention_is_painted_slice_by_slice(tmp_path):
    """Input already on the plan's grid (RAS, 1 mm, target shape): the NIfTI holds the attention exactly."""
    plan = tiny_plan((12, 16, 16))
    blob = write_blob(tmp_path / "ras.nii.gz", shape=(16, 16, 12), centre=(8, 5, 9), affine=np.eye(4))
    ckpt = make_checkpoint(tmp_path / "best.pt", "mil", plan=plan, instance="slice", channels=[8], embed_dim=16)
    result = explain(ckpt, [blob], tmp_path / "out")[0]
    x = torch.from_numpy(np.asarray(nib.load(str(blob)).dataobj, np.float32).T.copy())[None, None]
    with torch.no_grad():
        _, attention = load_model(ckpt).model(x, return_attention=True)
    attention = attention[0].numpy()
    np.testing.assert_allclose(result["attention"], attention, atol=1e-6)
    saved = nib.load(result["cam_nifti"]).get_fdata()  # (i, j, k): k is the slice axis D
    per_slice = saved.reshape(-1, saved.shape[2])
    np.testing.assert_allclose(per_slice, np.broadcast_to(attention, per_slice.shape), atol=1e-6)
    assert per_slice[0].sum() == pytest.approx(1.0, abs=1e-5)
    assert result["method"] == "attention" and result["target_class"] is None
    assert_png_shows_an_overlay(Path(result["cam_png"]))


def test_npy_input_gets_its_map_in_its_own_array_order(tmp_path, rng):
    ckpt = make_checkpoint(tmp_path / "best.pt", "mil", plan=tiny_plan(), instance="patch", patch_size=8,
                           channels=[8], embed_dim=16)
    np.save(tmp_path / "vol.npy", rng.random((20, 18, 14)).astype(np.float32))
    result = explain(ckpt, [tmp_path / "vol.npy"], tmp_path / "out")[0]
    cam = np.load(result["cam_npy"])
    assert cam.shape == (20, 18, 14)
    np.testing.assert_allclose(nib.load(result["cam_nifti"]).get_fdata(), cam.T, atol=1e-6)


class _Mil:
    def __init__(self, instance, **kw):
        self.instance = instance
        self.__dict__.update(kw)


def test_instance_map_of_patches_and_overlapping_slabs():
    att = np.arange(1, 13, dtype=float)
    att /= att.sum()
    patches = instance_map(_Mil("patch", patch_size=(4, 8, 8)), att, (12, 16, 14))  # grid 3 x 2 x 2, W padded
    assert patches.shape == (12, 16, 14)
    blocks = patches[::4, ::8, ::8].ravel()
    np.testing.assert_allclose(blocks, att, atol=1e-7)
    assert blocks.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(patches[4:8, 8:16, 8:14], att[1 * 4 + 1 * 2 + 1], rtol=1e-6)

    slabs = np.array([0.2, 0.3, 0.5])  # k = 3, stride 2 over D = 7: slabs start at 0, 2, 4
    per_slice = instance_map(_Mil("slab", slab_size=3, slab_stride=2), slabs, (7, 2, 2))[:, 0, 0]
    np.testing.assert_allclose(per_slice, [0.2, 0.2, 0.25, 0.3, 0.4, 0.5, 0.5])


@pytest.mark.slow
def test_explain_real_runs(cv_runs, tmp_path):
    blob = write_blob(tmp_path / "blob.nii.gz")
    original = nib.load(str(blob))
    for name in ("resnet10", "mil"):
        result = explain(cv_runs[name], [blob], tmp_path / name)[0]
        cam = nib.load(result["cam_nifti"])
        assert cam.shape == original.shape and np.allclose(cam.affine, original.affine)
        assert len(result["members"]) == 2  # the fold ensemble
        assert Path(result["cam_png"]).stat().st_size > 10_000
    assert len(result["attention"]) == 13 and sum(result["attention"]) == pytest.approx(1.0, abs=1e-5)
    assert_png_shows_an_overlay(Path(result["cam_png"]))


@pytest.mark.slow
def test_explain_decides_as_predict_does(cv_runs, tmp_path, capsys):
    """The predicted class (and so the default Grad-CAM target) is the run's decision: the same probabilities
    and label as `medvox predict` on the run folder, and with a threshold on either side of the case's
    probability, either class."""
    import csv
    import json
    import shutil

    from medvox.cli import main

    blob = write_blob(tmp_path / "blob.nii.gz")
    run = cv_runs["resnet10"]
    result = explain(run, [blob], tmp_path / "out")[0]
    assert main(["predict", "--run", str(run), str(blob), "--out", str(tmp_path / "pred.csv")]) == 0
    with open(tmp_path / "pred.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert result["predicted"] == row["predicted"] and result["decision"]["threshold"] is not None
    assert result["probabilities"]["1"] == pytest.approx(float(row["prob_1"]), abs=1e-6)
    capsys.readouterr()
    assert main(["explain", "--run", str(run), str(blob), "--out", str(tmp_path / "cli")]) == 0
    assert f"predicted {row['predicted']}, Grad-CAM of class {row['predicted']} at {result['cam_layer']}: " \
        in capsys.readouterr().out
    # with --tta on both sides: the augmented probabilities, which differ from the plain ones
    assert main(["predict", "--run", str(run), str(blob), "--out", str(tmp_path / "tta.csv"), "--tta"]) == 0
    with open(tmp_path / "tta.csv", newline="") as fh:
        tta_row = next(csv.DictReader(fh))
    assert main(["explain", "--run", str(run), str(blob), "--out", str(tmp_path / "cli_tta"), "--tta"]) == 0
    tta_result = json.loads((tmp_path / "cli_tta" / "explain.json").read_text())[0]
    assert tta_result["tta"] is True and result["tta"] is False
    assert tta_result["probabilities"]["1"] == pytest.approx(float(tta_row["prob_1"]), abs=1e-6)
    assert abs(float(tta_row["prob_1"]) - float(row["prob_1"])) > 1e-4
    assert tta_result["predicted"] == tta_row["predicted"]
    p1 = result["probabilities"]["1"]
    moved = Path(shutil.copytree(run, tmp_path / "moved", ignore=shutil.ignore_patterns("tensorboard")))
    summary = json.loads((moved / "cv_summary.json").read_text())
    for threshold, expected in ((p1 * 0.9, "1"), (min(1.0, p1 * 1.1 + 1e-6), "0")):
        summary["decision"]["threshold"] = threshold
        (moved / "cv_summary.json").write_text(json.dumps(summary))
        got = explain(moved, [blob], tmp_path / f"out_{expected}")[0]
        assert got["predicted"] == got["target_class"] == expected
