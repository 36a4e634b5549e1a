"""DenseNet-121-3D wrapper: MONAI state dicts load, MONAI's classifier is replaced."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121

from medvox.models import create_model


def test_monai_densenet_checkpoint_loads_and_drops_its_classifier(tmp_path):
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=5)
    path = tmp_path / "densenet.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    model = create_model("densenet121", num_classes=2, pretrained=path)
    report = model.pretrained_report
    assert report.complete and report.backbone_total == len(net.features.state_dict()) == 725
    assert report.dropped == ["class_layers.out.weight", "class_layers.out.bias"]
    assert report.new == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().features(x), net.eval().features(x))


def test_head_parameter_count():
    model = create_model("densenet121", num_classes=3)
    assert sum(p.numel() for n, p in model.named_parameters() if n in model.head_param_names()) == 1025 * 3
