"""What every medvox classifier shares: the contract, the head, and the argument checks.

Every model maps a batch ``(B, C, D, H, W)`` to logits ``(B, num_classes)`` and tells the rest
of the pipeline three things about itself:

* ``cam_target_layer``: the module name whose activations Grad-CAM should use;
* ``head_param_names()``: the parameters of the classifier head, so the trainer can give a
  freshly initialised head its own learning rate;
* ``stem_key``: the first convolution's weight, the one tensor that changes shape with the
  number of input channels (the pretrained loader inflates it).

Example:
    >>> head = NormedLinear(512, 3)
    >>> head(torch.randn(4, 512)).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import numbers
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits_j = scale * cos(feature, w_j)``, no bias.

    The LDAM loss (Cao et al., 2019) needs class scores whose scale is fixed, so its margins
    mean the same thing for every class. The output is still treated as logits everywhere
    downstream: ``softmax(logits)`` gives the probabilities.

    Args:
        in_features: feature size ``F``.
        out_features: number of classes ``K``.
        scale: the fixed norm of the logits (30 in the LDAM paper).

    Shapes:
        ``(B, F) -> (B, K)``, every value in ``[-scale, scale]``.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be > 0, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        # same (out, in) layout as nn.Linear, so state dicts swap cleanly between the two heads
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def check_classifier_args(in_channels: int, num_classes: int, dropout: float) -> None:
    """Raise a clear ``ValueError`` for arguments no model can honour."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (binary tasks use 2 logits), got {num_classes!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


class ClassifierBase(nn.Module):
    """Common contract of medvox classifiers (subclass and fill in ``forward_features``).

    Subclasses set ``cam_target_layer``, ``stem_key``, call ``_build_head`` once their feature
    size is known, and may override ``checkpoint_key`` to map foreign checkpoint layouts.

    Attributes:
        cam_target_layer: module name for Grad-CAM (its output is ``(B, C', d, h, w)``).
        cam_fallback_layers: optional, shallower modules Grad-CAM reads instead when the target layer's map is
            too coarse for the input (``medvox.inference.explain.cam_layer``).
        stem_key: state-dict key of the first convolution's weight.
        head_prefixes: module names that make up the classifier head.
        drop_prefixes: checkpoint key prefixes that are dropped on purpose (foreign heads).
        pretrained_report: the ``LoadReport`` of the last ``load_pretrained``, else ``None``.
    """

    cam_target_layer: str = ""
    stem_key: str = ""
    head_prefixes: tuple[str, ...] = ("fc",)
    drop_prefixes: tuple[str, ...] = ()
    # buffers that are derived or bookkeeping only: absent from a file, they keep their init value
    optional_key_pattern = re.compile(r"(^|\.)(num_batches_tracked|relative_position_index)$")
    # wrappers that training scripts put around an encoder (DDP, SSL heads, Lightning modules)
    wrapper_prefixes: tuple[str, ...] = ("module.", "backbone.", "encoder.", "model.", "net.")

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        check_classifier_args(in_channels, num_classes, dropout)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.grad_checkpointing = False
        self.pretrained_report = None

    def _build_head(self, num_features: int, dropout: float, cosine_head: bool, cosine_scale: float) -> None:
        """Dropout + ``fc`` (``nn.Linear`` with Xavier-normal weights and zero bias, or ``NormedLinear``)."""
        self.num_features = num_features
        self.head_drop = nn.Dropout(dropout)
        if cosine_head:
            self.fc: nn.Module = NormedLinear(num_features, self.num_classes, cosine_scale)
        else:
            self.fc = nn.Linear(num_features, self.num_classes)
            nn.init.xavier_normal_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` of a batch ``(B, C, D, H, W)``."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from pooled features ``(B, num_features)``."""
        return self.fc(self.head_drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of a batch ``(B, C, D, H, W)``."""
        self._check_input(x)
        return self.forward_head(self.forward_features(x))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects a batch (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}"
            )

    def head_param_names(self) -> set[str]:
        """Names of the classifier-head parameters (e.g. ``{"fc.weight", "fc.bias"}``)."""
        return {
            name
            for name, _ in self.named_parameters()
            if any(name == p or name.startswith(p + ".") for p in self.head_prefixes)
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute the big stages' activations in the backward pass."""
        self.grad_checkpointing = bool(enable)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Checkpointing only pays off when a backward pass will follow. BatchNorm layers in a
        # checkpointed stage see each batch twice (forward and recompute), which nudges their
        # running statistics twice towards the same batch statistics: harmless, as in timm.
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def checkpoint_key(self, key: str, model_keys: set[str]) -> str | None:
        """Map one checkpoint key to this model's key; ``None`` drops it on purpose.

        Strips wrapper prefixes (``module.`` from DDP, ``backbone.``/``encoder.`` from SSL or
        Lightning wrappers) until the key names one of ``model_keys``.
        """
        while key.startswith("module."):
            key = key[len("module.") :]
        stripped = key
        while stripped not in model_keys:
            prefix = next((p for p in self.wrapper_prefixes if stripped.startswith(p)), None)
            if prefix is None:
                break
            stripped = stripped[len(prefix) :]
        key = stripped if stripped in model_keys else key
        if any(key.startswith(p) for p in self.drop_prefixes):
            return None
        return key

    def checkpoint_source(self, raw_keys: list[str]) -> str | None:
        """A human name for the layout of a checkpoint (e.g. ``"MedicalNet"``), if recognised."""
        return None
