"""Load pretrained weights from a local file, key by key, and say exactly what happened.

Only tensors are ever read: ``torch.load(..., weights_only=True)`` or safetensors. A pickle
that would build objects or run code on load is refused with a ``CheckpointError``.

Counting convention: a "tensor" is one entry of the model's ``state_dict()``, parameters and
buffers alike (BatchNorm ``running_mean``, ``running_var`` and ``num_batches_tracked``; Swin's
``relative_position_index``). The backbone is every entry outside the classifier head. For
ResNet-50-3D that is 53 convolution weights + 53 BatchNorms x 5 = 318 tensors.

Example:
    >>> model = create_model("resnet50", num_classes=2)
    >>> report = load_pretrained(model, "pretrained/resnet_50_23dataset.pth")
    >>> report.summary()
    'Successfully loaded 318/318 backbone tensors from MedicalNet; new: fc.weight, fc.bias'
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medvox.errors import CheckpointError, damaged_file_message, is_garbage_pickle, unpickling_refusal

logger = logging.getLogger("medvox.models")

_CONTAINER_KEYS = ("state_dict", "model")
_LIST_LIMIT = 8  # names shown in an error message before "... and N more"


@dataclass
class LoadReport:
    """What ``load_pretrained`` did with every tensor (keys are the model's, after mapping).

    Attributes:
        path: the checkpoint file.
        source: the recognised layout (``"MedicalNet"``, ``"Swin UNETR SSL pretraining"``, ...)
            or the file name.
        backbone_total: number of backbone tensors of the model.
        loaded: backbone tensors copied from the file (inflated ones included).
        head_loaded: head tensors copied from the file (same number of classes).
        new: head tensors left at their fresh initialisation.
        missing: backbone tensors the file lacks (an error unless ``allow_partial``).
        defaulted: bookkeeping buffers the file lacks (``num_batches_tracked``, ...): harmless.
        shape_mismatch: ``{"key", "file_shape", "model_shape"}`` for tensors that did not fit.
        unexpected: file keys that name nothing in the model (after mapping).
        dropped: file keys dropped on purpose (a segmentation decoder, an old classifier).
        inflated: ``{"key", "file_shape", "model_shape"}`` for adapted input convolutions.
    """

    path: str
    source: str
    backbone_total: int
    loaded: list[str] = field(default_factory=list)
    head_loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    inflated: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every backbone tensor came from the file."""
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        """One line, e.g. ``Successfully loaded 318/318 backbone tensors from MedicalNet; new: fc.weight, fc.bias``."""
        verb = "Successfully loaded" if self.complete else "Partially loaded"
        parts = [f"{verb} {len(self.loaded)}/{self.backbone_total} backbone tensors from {self.source}"]
        if self.head_loaded:
            parts.append(f"head loaded: {', '.join(self.head_loaded)}")
        if self.new:
            parts.append(f"new: {', '.join(self.new)}")
        if self.inflated:
            parts.append("inflated: " + ", ".join(
                f"{i['key']} ({i['file_shape'][1]}->{i['model_shape'][1]} channels)" for i in self.inflated))
        if self.defaulted:  # e.g. a file from before PyTorch 0.4.1 has no num_batches_tracked
            names = sorted({k.rsplit(".", 1)[-1] for k in self.defaulted})
            parts.append(f"kept at init: {len(self.defaulted)} bookkeeping buffers ({', '.join(names)})")
        if self.missing:
            parts.append(f"missing: {len(self.missing)}")
        if self.shape_mismatch:
            parts.append(f"shape mismatch: {len(self.shape_mismatch)}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe types, with the summary line."""
        return {**asdict(self), "summary": self.summary(), "complete": self.complete}

    def save(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read the tensors of a checkpoint file without running any code from it.

    Accepts ``{"state_dict": {...}}``, ``{"model": {...}}``, a bare ``{name: tensor}`` dict, or
    a ``.safetensors`` file. Non-tensor entries (epoch counters, configs) are ignored.

    Returns:
        The ``{key: tensor}`` dict and the container key it came from (``None`` if bare).

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), None
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if is_garbage_pickle(exc, path):  # not a refusal: bytes that are no pickle at all
            raise CheckpointError(_damaged_message(path, exc)) from exc
        raise CheckpointError(
            f"refused to load {path}: it is not a plain weights file (loading it would build "
            f"arbitrary Python objects or run code). Re-save only the tensors from a trusted "
            f"environment, e.g. torch.save(model.state_dict(), ...) or safetensors. Detail: "
            f"{unpickling_refusal(exc)}"
        ) from exc
    except Exception as exc:  # corrupt or truncated files raise many different types
        raise CheckpointError(_damaged_message(path, exc)) from exc
    return _extract_tensors(obj, path)


def _damaged_message(path: Path, exc: BaseException) -> str:
    return damaged_file_message(path, exc, "pretrained checkpoint", "download or copy it again (MedicalNet's "
                                "ResNet-50 file, resnet_50_23dataset.pth, is about 177 MiB).")


def _extract_tensors(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    container = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
    state = obj[container] if container else obj
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors (top-level keys: {list(obj)[:10]})")
    return tensors, container


def load_pretrained(model: nn.Module, path: str | Path, allow_partial: bool = False,
                    in_channels_strategy: str = "average") -> LoadReport:
    """Copy the backbone tensors of a local checkpoint into ``model``, key by key.

    Checkpoint keys are mapped with ``model.checkpoint_key`` (strips ``module.`` and wrapper
    prefixes, maps foreign layouts such as Swin UNETR's SSL weights). Foreign heads
    (``conv_seg.*``) are dropped; a classifier of another number of classes is dropped and the
    model's own head stays freshly initialised. When the model has a different number of input
    channels than the checkpoint, the first convolution is inflated: the mean over the file's
    input channels, repeated to the model's count and scaled by ``C_file / C_model``, so a
    volume with identical channels gives the same activation as the original convolution.

    Nothing is copied unless the whole checkpoint fits (or ``allow_partial``).

    Args:
        model: a medvox classifier (``ClassifierBase``).
        path: a ``.pth``/``.pt`` (``weights_only``) or ``.safetensors`` file.
        allow_partial: load what fits instead of failing on missing/mis-shaped backbone tensors.
        in_channels_strategy: ``"average"`` (inflate the stem) or ``"error"`` (treat a channel
            difference as a shape mismatch).

    Returns:
        The ``LoadReport``; its ``summary()`` is also logged on logger ``medvox.models``.

    Raises:
        CheckpointError: unreadable/unsafe file, or a missing/mis-shaped backbone tensor
            (the message names each key and both shapes), or a file of another architecture
            (``model.checkpoint_hint``: a ResNet of another depth or shortcut type) without ``allow_partial``.
        ValueError: unknown ``in_channels_strategy``.
    """
    if in_channels_strategy not in ("average", "error"):
        raise ValueError(f"in_channels_strategy must be 'average' or 'error', got {in_channels_strategy!r}")
    file_state, _ = read_state_dict(path)
    report, updates = _match(model, file_state, Path(path), in_channels_strategy)
    # another architecture whose tensors all fit this one (a ResNet-34 file in a ResNet-18) is a mismatch too
    hint = model.checkpoint_hint(list(file_state)) if hasattr(model, "checkpoint_hint") else None
    if (not report.complete or hint) and not allow_partial:
        raise CheckpointError(_mismatch_message(model, report, hint))
    if report.unexpected:
        logger.warning("%s: %d checkpoint tensor(s) match nothing in the model: %s", path,
                       len(report.unexpected), _short_list(report.unexpected))
    with torch.no_grad():
        state = model.state_dict()
        for key, value in updates.items():
            state[key].copy_(value.to(dtype=state[key].dtype))
    (logger.info if report.complete else logger.warning)("%s", report.summary())
    model.pretrained_report = report
    return report


def _match(model: nn.Module, file_state: dict[str, torch.Tensor], path: Path,
           strategy: str) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    model_state = model.state_dict()
    model_keys = set(model_state)
    head_params = model.head_param_names() if hasattr(model, "head_param_names") else set()
    head_keys = {k for k in model_keys if k in head_params or _under(k, getattr(model, "head_prefixes", ()))}
    source = _source(model, list(file_state), path)
    report = LoadReport(str(path), source, backbone_total=len(model_keys - head_keys))
    updates: dict[str, torch.Tensor] = {}
    for file_key, value in file_state.items():
        key = model.checkpoint_key(file_key, model_keys) if hasattr(model, "checkpoint_key") else file_key
        if key is None:
            report.dropped.append(file_key)
        elif key not in model_keys:
            report.unexpected.append(file_key)
        elif key in head_keys:
            if tuple(value.shape) == tuple(model_state[key].shape):
                updates[key] = value
                report.head_loaded.append(key)
            else:  # an old classifier for another number of classes
                report.dropped.append(file_key)
        else:
            _match_backbone(model, key, value, model_state[key], strategy, report, updates)
    optional = getattr(model, "optional_key_pattern", None)
    for key in sorted(model_keys - head_keys - set(updates) - {m["key"] for m in report.shape_mismatch}):
        (report.defaulted if optional is not None and optional.search(key) else report.missing).append(key)
    report.new = [k for k in model_state if k in head_keys and k not in updates]
    report.loaded = [k for k in model_state if k in updates and k not in head_keys]
    return report, updates


def _match_backbone(model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor, strategy: str,
                    report: LoadReport, updates: dict[str, torch.Tensor]) -> None:
    file_shape, model_shape = tuple(value.shape), tuple(target.shape)
    if file_shape == model_shape:
        updates[key] = value
    elif (key == getattr(model, "stem_key", None) and strategy == "average" and len(file_shape) == len(model_shape)
          and file_shape[:1] + file_shape[2:] == model_shape[:1] + model_shape[2:]):
        updates[key] = inflate_input_conv(value, model_shape[1])
        report.inflated.append({"key": key, "file_shape": list(file_shape), "model_shape": list(model_shape)})
    else:
        report.shape_mismatch.append({"key": key, "file_shape": list(file_shape), "model_shape": list(model_shape)})


def inflate_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv weight ``(O, C_file, *k)`` to ``(O, in_channels, *k)``, keeping the activation.

    Each new input channel gets the mean filter scaled by ``C_file / in_channels``: fed the same
    image in every channel, the new conv sums ``in_channels`` copies, i.e. ``C_file`` times the
    mean filter, which is what the original conv computed on that image in all its channels.
    """
    mean = weight.float().mean(dim=1, keepdim=True)
    out = mean.repeat(1, in_channels, *([1] * (weight.ndim - 2))) * (weight.shape[1] / in_channels)
    return out.to(weight.dtype)


def _source(model: nn.Module, raw_keys: list[str], path: Path) -> str:
    hook = getattr(model, "checkpoint_source", None)
    return (hook(raw_keys) if hook else None) or path.name


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _mismatch_message(model: nn.Module, report: LoadReport, hint: str | None) -> str:
    lines = [f"checkpoint {report.path} does not fit {type(model).__name__} ({report.summary()}):"]
    for m in report.shape_mismatch[:_LIST_LIMIT]:
        lines.append(f"  shape mismatch for {m['key']}: checkpoint {tuple(m['file_shape'])} "
                     f"vs model {tuple(m['model_shape'])}")
    if len(report.shape_mismatch) > _LIST_LIMIT:
        lines.append(f"  ... and {len(report.shape_mismatch) - _LIST_LIMIT} more shape mismatches")
    if report.missing:
        lines.append(f"  missing backbone tensors ({len(report.missing)}): {_short_list(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected checkpoint tensors ({len(report.unexpected)}): {_short_list(report.unexpected)}")
    if hint:
        lines.append(hint[0].upper() + hint[1:] + "; or pass allow_partial=True (--allow-partial) to load only what fits.")
    else:
        lines.append("Check the model name/depth and variant options (e.g. shortcut_type), or pass "
                     "allow_partial=True (--allow-partial) to load only what fits.")
    return "\n".join(lines)
