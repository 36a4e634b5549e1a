"""Loading MedicalNet-layout checkpoints written from an independent key table (reference_layouts)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medvox.errors import CheckpointError
from medvox.models import create_model, load_pretrained
from tests.models.reference_layouts import MEDICALNET_TENSOR_COUNTS, medicalnet_table, random_tensors


@pytest.fixture(scope="module")
def medicalnet_files(tmp_path_factory):
    """depth -> (path of a MedicalNet-layout .pth, its tensors without 'module.')."""
    folder = tmp_path_factory.mktemp("medicalnet")
    cache = {}

    def make(depth):
        if depth not in cache:
            tensors = random_tensors(medicalnet_table(depth), seed=depth)
            path = folder / f"resnet_{depth}.pth"
            torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, path)
            cache[depth] = (path, tensors)
        return cache[depth]

    return make


def test_reference_table_counts():
    # 6 stem + 12 per basic block / 18 per bottleneck + 6 per type-B shortcut
    assert {d: len(medicalnet_table(d)) for d in MEDICALNET_TENSOR_COUNTS} == MEDICALNET_TENSOR_COUNTS


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_medicalnet_checkpoint_loads_completely(medicalnet_files, depth):
    path, tensors = medicalnet_files(depth)
    model = create_model(f"resnet{depth}", num_classes=3, pretrained=path)
    report = model.pretrained_report
    state = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key
    n = MEDICALNET_TENSOR_COUNTS[depth]
    assert report.summary() == f"Successfully loaded {n}/{n} backbone tensors from MedicalNet; new: fc.weight, fc.bias"
    assert len(report.loaded) == report.backbone_total == n
    assert report.new == ["fc.weight", "fc.bias"]
    assert report.missing == report.unexpected == report.dropped == report.shape_mismatch == []


def test_faithful_and_fast_load_the_same_file(medicalnet_files):
    path, tensors = medicalnet_files(50)
    for variant in ("fast", "faithful"):
        model = create_model("resnet50", variant=variant, pretrained=path)
        assert model.pretrained_report.complete
        assert torch.equal(model.state_dict()["layer4.2.conv3.weight"], tensors["layer4.2.conv3.weight"])


def test_wrong_shape_names_the_key_and_both_shapes(medicalnet_files, tmp_path):
    _, tensors = medicalnet_files(10)
    bad = dict(tensors, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1, 1)})
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in bad.items()}}, path)
    model = create_model("resnet10")
    before = model.conv1.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "layer2.0.conv1.weight" in message
    assert "(128, 64, 1, 1, 1)" in message and "(128, 64, 3, 3, 3)" in message
    assert torch.equal(model.conv1.weight, before)  # nothing copied on failure
    report = load_pretrained(model, path, allow_partial=True)
    assert len(report.loaded) == 71 and report.summary().startswith("Partially loaded 71/72")


@pytest.mark.parametrize(("depth", "model", "hint"), [
    (18, "resnet50", "The checkpoint holds a ResNet-18 (basic blocks 2-2-2-2, shortcut A): use --model resnet18;"),
    (10, "resnet50", "The checkpoint holds a ResNet-10 (basic blocks 1-1-1-1, shortcut B): use --model resnet10;"),
    (34, "resnet18", "The checkpoint holds a ResNet-34 (basic blocks 3-4-6-3, shortcut A): use --model resnet34;"),
    (50, "resnet34", "The checkpoint holds a ResNet-50 (bottleneck blocks 3-4-6-3, shortcut B): use --model resnet50;"),
])
def test_a_medicalnet_file_of_another_depth_is_named(medicalnet_files, depth, model, hint):
    """MedicalNet ships ResNet-10 to -200 in look-alike files (resnet_18.pth, resnet_50.pth): given to the wrong
    --model, the error says which depth the file holds, read from its key names."""
    path, _ = medicalnet_files(depth)
    with pytest.raises(CheckpointError) as info:
        create_model(model, pretrained=path)
    assert hint in str(info.value) and "Check the model name/depth" not in str(info.value)


def test_a_file_with_the_other_shortcut_type_is_named(medicalnet_files):
    path, _ = medicalnet_files(18)  # MedicalNet's ResNet-18: type-A shortcuts (no downsample tensors)
    with pytest.raises(CheckpointError) as info:
        create_model("resnet18", shortcut_type="B", pretrained=path)
    assert ("The checkpoint holds a ResNet-18 (basic blocks 2-2-2-2, shortcut A): use --set "
            "model.kwargs='{\"shortcut_type\": \"A\"}';") in str(info.value)
    assert create_model("resnet18", pretrained=path).pretrained_report.complete  # MedicalNet's default: A


def test_missing_backbone_key_fails_unless_partial(medicalnet_files, tmp_path):
    _, tensors = medicalnet_files(10)
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items() if k != "layer3.0.bn2.weight"}}, path)
    with pytest.raises(CheckpointError, match=r"missing backbone tensors \(1\): layer3\.0\.bn2\.weight"):
        create_model("resnet10", pretrained=path)
    model = create_model("resnet10", pretrained=path, allow_partial=True)
    assert model.pretrained_report.missing == ["layer3.0.bn2.weight"]
    assert torch.equal(model.layer3[0].bn1.weight, tensors["layer3.0.bn1.weight"])


def test_segmentation_head_is_dropped(medicalnet_files, tmp_path):
    _, tensors = medicalnet_files(10)
    seg = {"conv_seg.0.weight": torch.randn(512, 32, 2, 2, 2), "conv_seg.1.running_mean": torch.zeros(32),
           "conv_seg.6.weight": torch.randn(2, 32, 1, 1, 1)}
    path = tmp_path / "seg.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in {**tensors, **seg}.items()}}, path)
    report = create_model("resnet10", pretrained=path).pretrained_report
    assert sorted(report.dropped) == sorted(f"module.{k}" for k in seg)
    assert report.summary() == "Successfully loaded 72/72 backbone tensors from MedicalNet; new: fc.weight, fc.bias"


def test_inflated_stem_keeps_the_activation(medicalnet_files):
    path, tensors = medicalnet_files(10)
    one = create_model("resnet10", pretrained=path).eval()
    two = create_model("resnet10", in_channels=2, pretrained=path).eval()
    assert two.pretrained_report.inflated == [
        {"key": "conv1.weight", "file_shape": [64, 1, 7, 7, 7], "model_shape": [64, 2, 7, 7, 7]}]
    x = torch.randn(2, 1, 16, 16, 16)
    reference = F.conv3d(x, tensors["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(two.conv1(x.repeat(1, 2, 1, 1, 1)), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"conv1\.weight: checkpoint \(64, 1, 7, 7, 7\) vs model \(64, 2, 7, 7, 7\)"):
        create_model("resnet10", in_channels=2, pretrained=path, in_channels_strategy="error")
    two.fc.load_state_dict(one.fc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(two(x.repeat(1, 2, 1, 1, 1)), one(x), rtol=1e-4, atol=1e-4)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}, "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pth"):
        create_model("resnet10", pretrained=path)
    assert not marker.exists()


def test_medvox_checkpoint_head_reused_or_replaced(tmp_path):
    source = create_model("resnet10", num_classes=3)
    path = tmp_path / "run.pth"
    torch.save({"model": source.state_dict(), "epoch": 4}, path)
    same = create_model("resnet10", num_classes=3, pretrained=path)
    assert same.pretrained_report.head_loaded == ["fc.weight", "fc.bias"] and same.pretrained_report.new == []
    assert torch.equal(same.fc.weight, source.fc.weight)
    other = create_model("resnet10", num_classes=5, pretrained=path)
    assert other.pretrained_report.dropped == ["fc.weight", "fc.bias"]
    assert other.pretrained_report.summary() == \
        "Successfully loaded 72/72 backbone tensors from run.pth; new: fc.weight, fc.bias"


def test_safetensors_and_wrapper_prefixes(medicalnet_files, tmp_path):
    _, tensors = medicalnet_files(18)
    path = tmp_path / "encoder.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    report = create_model("resnet18", pretrained=path).pretrained_report
    assert report.complete and len(report.loaded) == 102 and report.unexpected == []


def test_report_is_json_and_logged(medicalnet_files, tmp_path, caplog):
    path, _ = medicalnet_files(10)
    with caplog.at_level(logging.INFO, logger="medvox.models"):
        report = create_model("resnet10", in_channels=2, pretrained=path).pretrained_report
    assert report.summary() in caplog.text
    report.save(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"] == report.summary() and data["complete"] is True
    assert data["inflated"][0]["model_shape"] == [64, 2, 7, 7, 7] and len(data["loaded"]) == 72


def test_unreadable_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("resnet10", pretrained=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pth \(16 bytes\): the file is damaged, truncated"):
        create_model("resnet10", pretrained=tmp_path / "junk.pth")
    # a download cut short: the first half of a real weights file
    torch.save(create_model("resnet10").state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth .* truncated .*download or copy it again"):
        create_model("resnet10", pretrained=tmp_path / "cut.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        create_model("resnet10", pretrained=tmp_path / "empty.pth")
