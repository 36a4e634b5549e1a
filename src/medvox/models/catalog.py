"""The built-in models: the module that registers each one, and the line ``medvox models`` prints about it.

This module imports nothing heavy, so ``medvox models`` lists the zoo without loading PyTorch (about 1.5 s of
a 2 s start); the registry (:mod:`medvox.models.registry`) imports a built-in model's module the first time
the registry is asked for a model. A model registered from elsewhere gives its own line to
:func:`~medvox.models.registry.register_model`, and the registry lists it with these.

Example:
    >>> [name for name, _ in describe_models()][:4]
    ['densenet121', 'mil', 'resnet10', 'resnet18']
"""

from __future__ import annotations

import re

_RESNET = "medvox.models.resnet"
_MEDICALNET = "MedicalNet layout: its weights load"

# name -> (the module that registers it, one line on what it is)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "resnet10": (_RESNET, f"ResNet-10-3D, the smallest and fastest ResNet ({_MEDICALNET})"),
    "resnet18": (_RESNET, f"ResNet-18-3D, basic blocks ({_MEDICALNET})"),
    "resnet34": (_RESNET, f"ResNet-34-3D, basic blocks ({_MEDICALNET})"),
    "resnet50": (_RESNET, f"ResNet-50-3D, bottleneck blocks ({_MEDICALNET}); the original pipeline's model"),
    "resnet101": (_RESNET, f"ResNet-101-3D, bottleneck blocks ({_MEDICALNET})"),
    "resnet152": (_RESNET, f"ResNet-152-3D, bottleneck blocks ({_MEDICALNET})"),
    "resnet200": (_RESNET, f"ResNet-200-3D, bottleneck blocks, the largest ({_MEDICALNET})"),
    "densenet121": ("medvox.models.densenet", "DenseNet-121-3D features (MONAI); inputs of at least 32^3"),
    "swin_unetr": ("medvox.models.swin", "Swin UNETR's transformer encoder (MONAI; its self-supervised weights "
                                         "load); sides a multiple of 32"),
    "mil": ("medvox.models.mil", "attention multiple-instance learning over slices, slabs or 3D patches"),
}


def model_order(name: str) -> tuple[str, int, str]:
    """Sort key of the listing: the family, then the depth as a number (resnet10, 18, ..., 101, 152, 200).

    Example:
        >>> sorted(["resnet101", "resnet18", "mil", "resnet10"], key=model_order)
        ['mil', 'resnet10', 'resnet18', 'resnet101']
    """
    found = re.fullmatch(r"(.*?)(\d+)", name)
    return (found.group(1), int(found.group(2)), name) if found else (name, -1, name)


def describe_models() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every built-in model, in :func:`model_order` (the registry's
    :func:`~medvox.models.registry.describe_models` adds those registered in this process)."""
    return [(name, BUILTIN_MODELS[name][1]) for name in sorted(BUILTIN_MODELS, key=model_order)]
