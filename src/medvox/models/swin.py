"""Swin UNETR's encoder (MONAI ``SwinTransformer``, ``swinViT``) as a volume classifier.

The encoder is exactly the ``swinViT`` of ``monai.networks.nets.SwinUNETR`` (patch 2, window 7,
depths (2, 2, 2, 2), heads (3, 6, 12, 24), feature size 48), so its self-supervised pretraining
weights (Tang et al., 2022) load unchanged. The last stage (1/32 of the input, layer-normed) is
averaged over space, then dropout and the head give the logits.

Checkpoint layouts read by ``load_pretrained`` (all mapped onto ``swinViT.*``):

* SSL pretraining (``model_swinvit.pt``): ``{"state_dict": {"module.patch_embed.proj.weight",
  "module.layers1.0.blocks.0.mlp.fc1.weight", ...}}``; ``fc1/fc2`` become MONAI's
  ``linear1/linear2`` (as ``SwinUNETR.load_from`` does); SSL heads (rotation, contrastive,
  reconstruction ``conv``) are dropped.
* Disruptive-autoencoder SSL weights: ``{"model": {"encoder.layers1.0.0.blocks...."}}``, as
  ``monai.networks.nets.swin_unetr.filter_swinunetr`` maps them.
* A MONAI ``SwinUNETR`` state dict (``swinViT.*``; its U-Net decoder is dropped) or a medvox one.

Example:
    >>> model = SwinClassifier(in_channels=1, num_classes=2, feature_size=12)
    >>> model(torch.randn(2, 1, 32, 32, 32)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import torch

from medvox.models.base import ClassifierBase
from medvox.models.registry import register_model

_PATCH = 2
_MULTIPLE = _PATCH**5  # patch embedding then four 2x patch mergings
_WRAPPERS = ("module.", "swin_vit.", "swinViT.", "encoder.")
# SSL heads (rotation, contrastive, reconstruction decoder, mask token, final norm) and the
# U-Net decoder of a full SwinUNETR: not part of the encoder
_DROP = re.compile(r"^(rotation_|contrastive_|conv\.|mask_token|norm\.|(encoder\d+|decoder\d+|out)\.)")


class SwinClassifier(ClassifierBase):
    """Swin UNETR encoder + global average pool + dropout + head.

    Args:
        in_channels: input channels ``C``.
        num_classes: number of logits ``K``.
        dropout: dropout before the head, in ``[0, 1)``.
        feature_size: embedding size of the first stage (48 for the SSL weights; a multiple of 12).
        depths: Swin blocks per stage (four stages).
        num_heads: attention heads per stage.
        window_size: attention window (7 for the SSL weights).
        dropout_path_rate: stochastic depth.
        use_checkpoint: activation checkpointing in every Swin block (MONAI's own flag).
        grad_checkpointing: same as ``use_checkpoint`` (the name every medvox model accepts).
        cosine_head: use ``NormedLinear`` (for LDAM).
        cosine_scale: its scale.

    Shapes:
        ``(B, C, D, H, W) -> (B, K)`` with ``D``, ``H``, ``W`` multiples of 32.

    Example:
        >>> model = SwinClassifier(in_channels=4, num_classes=3, feature_size=24)
        >>> model(torch.randn(1, 4, 64, 32, 32)).shape
        torch.Size([1, 3])
    """

    # the last stage is 1/32 of the input (2^3 voxels for 64^3): too coarse for a useful map
    cam_target_layer = "swinViT.layers3.0"
    stem_key = "swinViT.patch_embed.proj.weight"

    def __init__(self, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.4, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, dropout_path_rate: float = 0.0, use_checkpoint: bool = False,
                 grad_checkpointing: bool = False, cosine_head: bool = False, cosine_scale: float = 30.0) -> None:
        super().__init__(in_channels, num_classes, dropout)
        _check_swin_args(feature_size, depths, num_heads, window_size, dropout_path_rate)
        self.feature_size = int(feature_size)
        from monai.networks.nets.swin_unetr import (
            SwinTransformer,  # imported here: MONAI costs ~1 s at start-up
        )

        self.swinViT = SwinTransformer(
            in_chans=in_channels, embed_dim=self.feature_size, window_size=(window_size,) * 3,
            patch_size=(_PATCH,) * 3, depths=tuple(depths), num_heads=tuple(num_heads), mlp_ratio=4.0,
            qkv_bias=True, drop_path_rate=dropout_path_rate, spatial_dims=3, downsample="merging",
        )
        self._build_head(self.feature_size * 16, dropout, cosine_head, cosine_scale)
        self.set_grad_checkpointing(use_checkpoint or grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every Swin block (MONAI's ``use_checkpoint``)."""
        self.grad_checkpointing = bool(enable)
        for module in self.swinViT.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = self.grad_checkpointing

    def _check_input(self, x: torch.Tensor) -> None:
        super()._check_input(x)
        bad = [n for n in x.shape[2:] if n % _MULTIPLE]
        if bad:
            raise ValueError(
                f"Swin UNETR needs every spatial size to be a multiple of {_MULTIPLE}, got "
                f"{tuple(x.shape[2:])}: resize/pad to a multiple of {_MULTIPLE}, e.g. --target-shape 32 32 32"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # normalize=True layer-norms each stage output, as SwinUNETR feeds its decoder
        last = self.swinViT(x, normalize=True)[-1]
        return last.mean(dim=(2, 3, 4))

    def checkpoint_key(self, key: str, model_keys: set[str]) -> str | None:
        """Map SSL / SwinUNETR / medvox keys onto ``swinViT.*``; ``None`` for heads and decoders."""
        while (prefix := next((p for p in _WRAPPERS if key.startswith(p)), None)) is not None:
            key = key[len(prefix):]
        if key in model_keys:  # e.g. the head of a medvox checkpoint
            return key
        if _DROP.match(key):
            return None
        key = re.sub(r"^(layers\d)\.0\.0\.", r"\1.0.", key)  # disruptive-autoencoder nesting
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        return "swinViT." + key

    def checkpoint_source(self, raw_keys: list[str]) -> str | None:
        if any(".mlp.fc1." in k for k in raw_keys):
            return "Swin UNETR SSL pretraining"
        if any(re.match(r"^encoder\.layers\d\.0\.0\.", k) for k in raw_keys):
            return "Swin UNETR SSL (disruptive autoencoder)"
        if any(re.match(r"^(module\.)?decoder\d+\.", k) for k in raw_keys):
            return "MONAI SwinUNETR"
        return None


def _check_swin_args(feature_size: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                     dropout_path_rate: float) -> None:
    if isinstance(feature_size, bool) or not isinstance(feature_size, numbers.Integral) or feature_size < 12 \
            or feature_size % 12:
        raise ValueError(f"feature_size must be a positive multiple of 12 (48 for the SSL weights), got {feature_size!r}")
    if len(depths) != 4 or len(num_heads) != 4 or min(depths) < 1:
        raise ValueError(f"depths and num_heads need 4 stages each, got depths={depths}, num_heads={num_heads}")
    for stage, heads in enumerate(num_heads):
        if (feature_size * 2**stage) % heads:
            raise ValueError(f"stage {stage + 1}: width {feature_size * 2**stage} is not divisible by {heads} heads")
    if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < 1:
        raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
    if not 0.0 <= dropout_path_rate < 1.0:
        raise ValueError(f"dropout_path_rate must be in [0, 1), got {dropout_path_rate!r}")


register_model(SwinClassifier, name="swin_unetr")
