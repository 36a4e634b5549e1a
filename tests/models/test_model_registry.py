"""Every registered model: forward + backward at tiny size, the common contract, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from medvox.config import ModelConfig
from medvox.models import NormedLinear, create_model, create_model_from_config, describe_models, list_models

EXPECTED_MODELS = {"resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
                   "swin_unetr", "mil", "densenet121"}


def tiny(name: str) -> tuple[dict, int]:
    """Cheap factory arguments and the smallest cube side the model accepts."""
    if name == "swin_unetr":
        return {"feature_size": 12}, 32
    if name in ("densenet121", "resnet101", "resnet152", "resnet200"):
        # DenseNet: four 2x reductions after a stride-4 stem. Deep ResNets: at 16^3 their
        # layer3/4 BatchNorms see 2 numbers per channel (batch 2 x 1 voxel), and 30+ such blocks
        # blow the gradient up to inf; 32^3 is still tiny but not degenerate.
        return {}, 32
    return {}, 16


# the docs/models.md table: name -> (backbone parameters, pooled feature size); the head of a
# K-class model adds (features + 1) * K (MIL: + the attention pooling's 16,577 parameters)
DOCS_TABLE = {
    "resnet10": (14_355_520, 512), "resnet18": (32_986_176, 512), "resnet34": (63_295_808, 512),
    "resnet50": (46_155_072, 2048), "resnet101": (85_201_216, 2048), "resnet152": (117_359_936, 2048),
    "resnet200": (126_559_552, 2048), "densenet121": (11_242_624, 1024), "swin_unetr": (8_062_002, 768),
    "mil": (92_896, 128),
}


def test_registry_holds_the_zoo_by_family_then_depth_each_with_a_line():
    assert set(list_models()) == EXPECTED_MODELS
    resnets = [n for n in list_models() if n.startswith("resnet")]
    assert resnets == ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"]
    names = list_models()
    assert names.index("densenet121") < names.index("mil") < names.index("resnet10") < names.index("swin_unetr")
    described = describe_models()
    assert [n for n, _ in described] == names
    assert all(text and "\n" not in text and len(text) <= 110 for _, text in described)
    assert len({text for _, text in described}) == len(described)  # each says what sets it apart


def test_the_catalog_lists_every_registered_built_in_without_torch():
    """`medvox models` reads the catalog alone: a fresh interpreter lists the zoo with torch never imported."""
    import subprocess
    import sys

    code = ("import sys; from medvox.cli import main; main(['models']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split(None, 1) for line in out.stdout.splitlines()]
    assert [(name, text.strip()) for name, text in rows] == describe_models()


def test_a_model_registered_elsewhere_is_listed_with_its_own_line():
    from medvox.models import register_model
    from medvox.models.registry import _DESCRIPTIONS, _MODELS

    try:
        register_model(lambda **kw: None, name="toy7", description="a toy for this test")
        assert ("toy7", "a toy for this test") in describe_models()
    finally:
        _MODELS.pop("toy7", None)
        _DESCRIPTIONS.pop("toy7", None)


DEEP = {"resnet101", "resnet152", "resnet200"}
# Deep ResNets run only the (2 channels, 4 classes) case: their code path is resnet50's, and each
# forward + backward of 85-127 M parameters costs seconds on a 2-core CPU.
CASES = [(n, c, k) for n in list_models() for c, k in [(1, 2), (2, 4)] if n not in DEEP or c == 2]


@pytest.mark.parametrize(("name", "in_channels", "num_classes"), CASES)
def test_forward_backward(name, in_channels, num_classes):
    torch.manual_seed(0)
    kwargs, side = tiny(name)
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    x = torch.randn(2, in_channels, side, side, side)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [], f"parameters without a gradient: {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []
    # the head gets a non-zero gradient (a dead head would train nothing)
    assert model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [2, 4])
def test_parameter_counts_match_docs_table(name, num_classes):
    # meta tensors: shapes without memory or init cost (MONAI's Swin needs real ones)
    device = "cpu" if name == "swin_unetr" else "meta"
    with torch.device(device):
        model = create_model(name, num_classes=num_classes)
    head_names = model.head_param_names()
    head = sum(p.numel() for n, p in model.named_parameters() if n in head_names)
    backbone = sum(p.numel() for n, p in model.named_parameters() if n not in head_names)
    params, features = DOCS_TABLE[name]
    assert backbone == params
    assert head == (features + 1) * num_classes + (16_577 if name == "mil" else 0)


@pytest.mark.parametrize("name", list_models())
def test_common_contract(name):
    kwargs, _ = tiny(name)
    model = create_model(name, num_classes=3, **kwargs)
    modules = dict(model.named_modules())
    assert model.cam_target_layer in modules and model.cam_target_layer != ""
    params = dict(model.named_parameters())
    head = model.head_param_names()
    assert {"fc.weight", "fc.bias"} <= head <= set(params)
    assert len(head) < len(params)  # the head is not the whole model
    assert model.stem_key in model.state_dict()
    assert model.state_dict()[model.stem_key].shape[1] == 1  # input channels
    assert model.pretrained_report is None


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [("in_channels", 0, "in_channels"), ("num_classes", 1, "num_classes"), ("dropout", 1.0, "dropout"),
     ("dropout", -0.1, "dropout"), ("no_such_option", 3, "no_such_option")],
)
def test_bad_common_arguments(name, arg, value, message):
    kwargs, _ = tiny(name)
    with pytest.raises(ValueError, match=message):
        create_model(name, **{**kwargs, arg: value})


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [("resnet50", {"variant": "wide"}, "variant must be one of"),
     ("resnet18", {"shortcut_type": "C"}, "shortcut_type"),
     ("swin_unetr", {"feature_size": 16}, "multiple of 12"),
     ("swin_unetr", {"depths": (2, 2, 2)}, "4 stages"),
     ("mil", {"instance": "voxel"}, "instance must be one of"),
     ("mil", {"slab_size": 0}, "slab_size"),
     ("mil", {"patch_size": (8, 8)}, "patch_size"),
     ("densenet121", {"dropout_prob": 1.5}, "dropout_prob")],
)
def test_bad_model_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="resnet5O") as info:
        create_model("resnet5O")
    assert "did you mean 'resnet50'" in str(info.value)
    assert all(n in str(info.value) for n in EXPECTED_MODELS)


def test_none_arguments_keep_factory_defaults():
    model = create_model("resnet10", dropout=None, variant=None, shortcut_type=None, cosine_head=None)
    assert model.head_drop.p == 0.4 and model.variant == "fast" and model.shortcut_type == "B"
    assert isinstance(model.fc, torch.nn.Linear)


def test_wrong_input_shape_is_a_clear_error():
    model = create_model("resnet10", in_channels=2)
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        model(torch.randn(1, 1, 16, 16, 16))


def test_cosine_head_is_scaled_cosine():
    torch.manual_seed(0)
    head = NormedLinear(8, 3, scale=30.0)
    x = torch.randn(5, 8)
    expected = torch.stack([
        torch.stack([30.0 * torch.dot(xi, w) / (xi.norm() * w.norm()) for w in head.weight]) for xi in x
    ])
    torch.testing.assert_close(head(x), expected)
    model = create_model("resnet10", num_classes=3, cosine_head=True)
    assert model.head_param_names() == {"fc.weight"}  # no bias
    assert model(torch.randn(2, 1, 16, 16, 16)).abs().max() <= 30.0 + 1e-4


def test_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=2, num_classes=3).eval()
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last_3d)
        channels_last = model_cl(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


@pytest.mark.parametrize("name", ["resnet10", "swin_unetr", "mil", "densenet121"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    kwargs, side = tiny(name)
    torch.manual_seed(0)
    plain = create_model(name, dropout=0.0, **kwargs)
    ckpt = create_model(name, dropout=0.0, grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing
    x = torch.randn(2, 1, side, side, side)
    for model in (plain, ckpt):
        model(x).sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_create_model_from_config():
    cfg = ModelConfig(name="resnet18", dropout=0.2, cosine_head=None, kwargs={"variant": "faithful"})
    model = create_model_from_config(cfg, in_channels=2, num_classes=3, cosine_head=True)
    assert isinstance(model.fc, NormedLinear) and model.variant == "faithful" and model.head_drop.p == 0.2
    assert model.conv1.in_channels == 2 and model.num_classes == 3


def test_head_gets_a_separate_learning_rate():
    model = create_model("resnet10")
    head = model.head_param_names()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in head], "lr": 1e-4},
        {"params": [p for n, p in model.named_parameters() if n in head], "lr": 1e-3},
    ]
    optim = torch.optim.Adam(groups)
    assert sum(len(g["params"]) for g in optim.param_groups) == len(list(model.parameters()))
    assert math.isclose(optim.param_groups[1]["lr"], 1e-3)
