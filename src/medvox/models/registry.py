"""A timm-style model registry: ``@register_model``, ``create_model(name, **kwargs)``, ``list_models()``.

The built-in models' modules (:data:`medvox.models.catalog.BUILTIN_MODELS`) are imported, and so register
their factories, the first time the registry is asked for a model.

``create_model`` drops ``None``-valued arguments, so a flag or config field left unset never
overrides a factory's default, and turns every bad argument into one clear ``ValueError``.

Example:
    >>> model = create_model("resnet18", in_channels=1, num_classes=3, dropout=None)
    >>> sorted(model.head_param_names())
    ['fc.bias', 'fc.weight']
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvox.models.catalog import BUILTIN_MODELS, model_order

if TYPE_CHECKING:
    import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   description: str | None = None):
    """Register a model factory (a function or a class) under ``name`` (default: its ``__name__``).

    Usable as ``@register_model`` or ``register_model(MyModel, name="my_model", description="...")``.
    ``description``: the line ``describe_models`` gives (a built-in's is in :mod:`medvox.models.catalog`;
    default: the first line of the factory's docstring).
    """

    def _register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        old = _MODELS.get(key)
        # the same definition registered again (a module reload) is fine; a different one is a clash
        if old is not None and (old.__module__, old.__qualname__) != (f.__module__, f.__qualname__):
            raise ValueError(f"a model named {key!r} is already registered by {old.__module__}")
        _MODELS[key] = f
        builtin = BUILTIN_MODELS.get(key, (None, None))[1]
        _DESCRIPTIONS[key] = description or builtin or ((f.__doc__ or "").strip().splitlines() or [""])[0]
        return f

    return _register(fn) if fn is not None else _register


def _load_builtins() -> None:
    """Import the built-in models' modules (each registers its factories on import; later calls are free)."""
    for module in dict.fromkeys(module for module, _ in BUILTIN_MODELS.values()):
        importlib.import_module(module)


def list_models() -> list[str]:
    """Names of the registered models: by family, then depth as a number (``resnet10``, ``resnet18``, ...,
    ``resnet101``); see :func:`medvox.models.catalog.model_order`."""
    _load_builtins()
    return sorted(_MODELS, key=model_order)


def describe_models() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered model, in :func:`list_models`'s order.

    Example:
        >>> dict(describe_models())["resnet50"]
        "ResNet-50-3D, bottleneck blocks (MedicalNet layout: its weights load); the original pipeline's model"
    """
    return [(name, _DESCRIPTIONS[name]) for name in list_models()]


def create_model(name: str, in_channels: int = 1, num_classes: int = 2, dropout: float | None = 0.4,
                 pretrained: str | Path | None = None, *, allow_partial: bool = False,
                 in_channels_strategy: str = "average", **kwargs: Any) -> nn.Module:
    """Build a registered model, optionally loading a local pretrained checkpoint.

    Args:
        name: a name from ``list_models()``.
        in_channels: input channels ``C`` of ``(B, C, D, H, W)``.
        num_classes: number of logits.
        dropout: dropout before the head; ``None`` keeps the factory's default.
        pretrained: a local ``.pth``/``.pt``/``.safetensors`` file; see ``load_pretrained``.
            The ``LoadReport`` is stored on ``model.pretrained_report``.
        allow_partial: load what fits when backbone tensors are missing or mis-shaped.
        in_channels_strategy: how the first conv adapts to a different channel count
            (``"average"`` or ``"error"``).
        **kwargs: factory arguments (``variant``, ``cosine_head``, ``grad_checkpointing``,
            ``feature_size``, ...); ``None`` values are dropped.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: unknown name, unknown argument, or an argument out of range.
        CheckpointError: the checkpoint is unreadable, unsafe, or does not fit.
    """
    args = {"in_channels": in_channels, "num_classes": num_classes, "dropout": dropout, **kwargs}
    args = {k: v for k, v in args.items() if v is not None}
    check_model(name, args)  # loads the built-ins
    model = _MODELS[name](**args)
    if pretrained is not None:
        from medvox.models.pretrained import load_pretrained

        model.pretrained_report = load_pretrained(
            model, pretrained, allow_partial=allow_partial, in_channels_strategy=in_channels_strategy
        )
    return model


def uses_cosine_head(cfg: Any) -> bool:
    """Whether the model of an :class:`~medvox.config.ExperimentConfig` has a cosine (normalised linear) head:
    ``model.cosine_head`` when set, else on for the LDAM loss, whose margins are set on cosine logits. Training,
    rebuilding a checkpoint and exporting all ask here, so a checkpoint always loads into the model it came from.

    Example:
        >>> from medvox.config import ExperimentConfig
        >>> uses_cosine_head(ExperimentConfig())  # the default loss is LDAM
        True
    """
    chosen = cfg.model.cosine_head
    return bool(chosen) if chosen is not None else cfg.loss.name == "LDAM"


def create_model_from_config(cfg: Any, in_channels: int, num_classes: int, *,
                             cosine_head: bool | None = None) -> nn.Module:
    """``create_model`` from a ``medvox.config.ModelConfig``.

    Args:
        cfg: the ``ModelConfig`` (name, dropout, pretrained_path, allow_partial, cosine_head, kwargs).
        in_channels: input channels of the data.
        num_classes: number of classes of the data.
        cosine_head: the resolved choice when ``cfg.cosine_head`` is ``None`` (e.g. on for LDAM).
    """
    use_cosine = cfg.cosine_head if cfg.cosine_head is not None else cosine_head
    return create_model(
        cfg.name, in_channels=in_channels, num_classes=num_classes, dropout=cfg.dropout,
        pretrained=cfg.pretrained_path or None, allow_partial=cfg.allow_partial,
        **{"cosine_head": use_cosine, **dict(cfg.kwargs)},
    )


def check_model(name: str, args: dict[str, Any]) -> None:
    """Refuse an unknown model name or a factory argument the model does not take, without building it
    (``medvox train`` calls it before reading any data).

    Raises:
        ValueError: unknown name (with the closest known one) or unknown argument(s) (with those accepted).
    """
    _load_builtins()
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(list_models())}")
    params = inspect.signature(_MODELS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
