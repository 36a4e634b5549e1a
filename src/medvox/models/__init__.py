"""The model zoo: a timm-style registry of 3D classifiers with one common contract.

Every model maps ``(B, C, D, H, W)`` to logits ``(B, num_classes)`` and exposes
``cam_target_layer`` (module name for Grad-CAM), ``head_param_names()`` (the classifier head, for a
separate learning rate), ``stem_key`` (first conv, inflated for more input channels) and
``pretrained_report`` (the ``LoadReport`` of ``create_model(..., pretrained=path)``).

Example:
    >>> from medvox.models import create_model, list_models
    >>> "resnet50" in list_models()
    True
    >>> model = create_model("resnet10", in_channels=2, num_classes=3, variant="faithful")
"""

from medvox.models import densenet, mil, resnet, swin  # noqa: F401  (registers the factories)
from medvox.models.base import ClassifierBase, NormedLinear
from medvox.models.densenet import DenseNet3D
from medvox.models.mil import MILClassifier
from medvox.models.pretrained import LoadReport, inflate_input_conv, load_pretrained, read_state_dict
from medvox.models.registry import (
    check_model,
    create_model,
    create_model_from_config,
    list_models,
    register_model,
    uses_cosine_head,
)
from medvox.models.resnet import MedResNet3D
from medvox.models.swin import SwinClassifier

__all__ = [
    "ClassifierBase",
    "DenseNet3D",
    "LoadReport",
    "MILClassifier",
    "MedResNet3D",
    "NormedLinear",
    "SwinClassifier",
    "check_model",
    "create_model",
    "create_model_from_config",
    "inflate_input_conv",
    "list_models",
    "load_pretrained",
    "read_state_dict",
    "register_model",
    "uses_cosine_head",
]
