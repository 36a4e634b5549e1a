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

# public name -> module: imported on first use (PEP 562), so `medvox models` lists the zoo (medvox.models.catalog)
# without loading torch; the registry imports the built-in models' modules when first asked for a model
_LAZY = {
    "ClassifierBase": "medvox.models.base",
    "NormedLinear": "medvox.models.base",
    "DenseNet3D": "medvox.models.densenet",
    "MILClassifier": "medvox.models.mil",
    "MedResNet3D": "medvox.models.resnet",
    "SwinClassifier": "medvox.models.swin",
    "LoadReport": "medvox.models.pretrained",
    "inflate_input_conv": "medvox.models.pretrained",
    "load_pretrained": "medvox.models.pretrained",
    "read_state_dict": "medvox.models.pretrained",
    "check_model": "medvox.models.registry",
    "create_model": "medvox.models.registry",
    "create_model_from_config": "medvox.models.registry",
    "describe_models": "medvox.models.registry",
    "list_models": "medvox.models.registry",
    "register_model": "medvox.models.registry",
    "uses_cosine_head": "medvox.models.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'medvox.models' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
