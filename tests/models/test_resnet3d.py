"""ResNet-3D: MedicalNet size, shortcut types, initialisation rules, fast vs faithful geometry."""

from __future__ import annotations

import math

import pytest
import torch

from medvox.models import create_model


def test_resnet50_matches_medicalnet_size():
    model = create_model("resnet50", num_classes=2)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))
    assert abs(backbone / 1e6 - 46.2) < 0.1  # MedicalNet's ResNet-50 backbone: ~46.2 M


def test_shortcut_a_has_no_parameters_and_b_has_them():
    a = create_model("resnet18")
    b = create_model("resnet18", shortcut_type="B")
    assert not any("downsample" in k for k in a.state_dict())
    assert {k.split(".")[0] for k in b.state_dict() if "downsample" in k} == {"layer2", "layer3", "layer4"}


def test_shortcut_a_passes_the_gradient():
    # MedicalNet's original zero-pad shortcut concatenates .data and cuts the gradient
    model = create_model("resnet18")
    x = torch.randn(2, 64, 8, 8, 8, requires_grad=True)
    model.layer2[0].downsample(x).sum().backward()
    assert torch.all(x.grad[:, :, ::2, ::2, ::2] == 1)


def test_initialisation_rules():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=64)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv3d) and m.weight.numel() > 50_000:
            fan_out = m.out_channels * math.prod(m.kernel_size)
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05), name
            assert abs(m.weight.mean().item()) < 0.05 * math.sqrt(2 / fan_out), name
        elif isinstance(m, torch.nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    fc = model.fc
    assert fc.weight.std().item() == pytest.approx(math.sqrt(2 / (512 + 64)), rel=0.05)
    assert torch.all(fc.bias == 0)


def _layer4_shape(model, side):
    shapes = []
    model.layer4.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:])) and None)
    model.eval()(torch.randn(1, 1, side, side, side))
    return shapes[0]


@pytest.mark.parametrize(("variant", "factor"), [("fast", 32), ("faithful", 8)])
def test_variant_output_size(variant, factor):
    model = create_model("resnet10", variant=variant)
    assert _layer4_shape(model, 64) == (64 // factor,) * 3
    conv = model.layer4[0].conv2
    assert conv.dilation == ((4, 4, 4) if variant == "faithful" else (1, 1, 1))


def test_variants_share_every_weight_and_differ_in_features():
    fast = create_model("resnet10", variant="fast").eval()
    faithful = create_model("resnet10", variant="faithful").eval()
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in faithful.state_dict().items()}
    faithful.load_state_dict(fast.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    assert not torch.allclose(fast.forward_features(x), faithful.forward_features(x))


def test_stem_stride_one_doubles_every_stage_and_keeps_the_weights():
    """stride-1 stem: layer4 of the fast variant is 2x larger per axis (28^3 -> 2^3 instead of 1^3),
    with the very same parameters (MedicalNet weights load unchanged)."""
    strided = create_model("resnet10")
    stem1 = create_model("resnet10", stem_stride=1)
    assert _layer4_shape(strided, 64) == (2, 2, 2) and _layer4_shape(stem1, 64) == (4, 4, 4)
    assert _layer4_shape(stem1, 28) == (2, 2, 2)
    assert {k: v.shape for k, v in strided.state_dict().items()} == {k: v.shape for k, v in stem1.state_dict().items()}
    stem1.load_state_dict(strided.state_dict())
    assert stem1.conv1.stride == (1, 1, 1) and strided.conv1.stride == (2, 2, 2)
    with pytest.raises(ValueError, match="stem_stride"):
        create_model("resnet10", stem_stride=3)
