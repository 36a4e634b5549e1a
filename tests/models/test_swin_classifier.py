"""Swin UNETR encoder classifier: SSL-layout checkpoints (hand-written table) and MONAI's own mapping."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medvox.models import create_model
from tests.models.reference_layouts import random_tensors, swin_ssl_table

FEATURE_SIZE = 12  # 48 for the real weights; 12 keeps the test cheap, the layout is the same
N_TENSORS = 2 + 4 * (2 * 14 + 3)  # patch embed + 4 stages x (2 blocks x 14 + downsample 3) = 126


@pytest.fixture(scope="module")
def ssl_file(tmp_path_factory):
    tensors = random_tensors(swin_ssl_table(FEATURE_SIZE), seed=1)
    heads = {"rotation_head.weight": torch.randn(4, 16 * FEATURE_SIZE),
             "contrastive_head.weight": torch.randn(512, 16 * FEATURE_SIZE),
             "conv.0.weight": torch.randn(16 * FEATURE_SIZE, 8 * FEATURE_SIZE, 3, 3, 3)}
    path = tmp_path_factory.mktemp("swin") / "model_swinvit.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in {**tensors, **heads}.items()}, "epoch": 100}, path)
    return path, tensors


def test_ssl_checkpoint_loads_every_encoder_tensor(ssl_file):
    path, tensors = ssl_file
    assert len(tensors) == N_TENSORS
    model = create_model("swin_unetr", feature_size=FEATURE_SIZE, num_classes=3, pretrained=path)
    report = model.pretrained_report
    assert report.summary() == (f"Successfully loaded {N_TENSORS}/{N_TENSORS} backbone tensors from "
                                "Swin UNETR SSL pretraining; new: fc.weight, fc.bias")
    assert sorted(report.dropped) == ["module.contrastive_head.weight", "module.conv.0.weight",
                                      "module.rotation_head.weight"]
    state = model.state_dict()
    for key, value in tensors.items():  # SSL's mlp.fc1/fc2 are MONAI's mlp.linear1/linear2
        ours = "swinViT." + key.replace("mlp.fc1.", "mlp.linear1.").replace("mlp.fc2.", "mlp.linear2.")
        assert torch.equal(state[ours], value), key


def test_same_weights_as_monai_load_from(ssl_file):
    path, _ = ssl_file
    monai_net = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE_SIZE)
    monai_net.load_from(torch.load(path, weights_only=True))
    ours = create_model("swin_unetr", feature_size=FEATURE_SIZE, pretrained=path)
    theirs = monai_net.swinViT.state_dict()
    for key, value in ours.swinViT.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_monai_swinunetr_state_dict_loads(tmp_path):
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=FEATURE_SIZE)
    path = tmp_path / "swinunetr.pth"
    torch.save(net.state_dict(), path)
    model = create_model("swin_unetr", in_channels=2, feature_size=FEATURE_SIZE, pretrained=path)
    report = model.pretrained_report
    assert report.complete and len(report.loaded) == N_TENSORS and report.unexpected == []
    assert all(k.startswith(("encoder", "decoder", "out.")) for k in report.dropped)
    assert torch.equal(model.swinViT.layers4[0].blocks[1].mlp.linear2.weight,
                       net.swinViT.layers4[0].blocks[1].mlp.linear2.weight)


def test_stem_inflation_for_four_channels(ssl_file):
    path, tensors = ssl_file
    model = create_model("swin_unetr", in_channels=4, feature_size=FEATURE_SIZE, pretrained=path)
    torch.testing.assert_close(model.swinViT.patch_embed.proj.weight.sum(dim=1, keepdim=True),
                               tensors["patch_embed.proj.weight"])


@pytest.mark.parametrize("shape", [(32, 32, 48), (30, 32, 32)])
def test_input_size_must_be_a_multiple_of_32(shape):
    model = create_model("swin_unetr", feature_size=FEATURE_SIZE)
    with pytest.raises(ValueError, match=r"multiple of 32.*--target-shape 32 32 32"):
        model(torch.randn(1, 1, *shape))


def test_non_cubic_input():
    model = create_model("swin_unetr", feature_size=FEATURE_SIZE, num_classes=4).eval()
    assert model(torch.randn(1, 1, 64, 32, 32)).shape == (1, 4)
