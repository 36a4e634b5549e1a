"""Multiple-instance learning: a volume is a bag of slices, slabs or patches.

Each instance goes through a small CNN encoder to an embedding ``h_i``; gated attention
(Ilse, Tomczak, Welling 2018) weighs them,
``a = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``, and the head classifies the weighted
mean ``z = sum_i a_i h_i``. The attention says which slices or patches drove the decision
(``model.last_attention``), which is the explanation this model offers instead of a 3D CAM.

Instances of a volume ``(B, C, D, H, W)``:

* ``"slice"``: the ``D`` axial slices, each a 2D image ``(C, H, W)``;
* ``"slab"``: 2.5D, ``k`` adjacent slices stacked as channels ``(C*k, H, W)``, every
  ``slab_stride`` slices (``D`` shorter than ``k`` is zero-padded);
* ``"patch"``: non-overlapping 3D patches ``(C, *patch_size)``; the volume is zero-padded at the
  far end to a multiple of the patch size.

The encoder has no positional input, so the bag is a set: permuting the instances permutes
the attention and leaves the logits unchanged.

Example:
    >>> model = MILClassifier(in_channels=1, num_classes=2, instance="slab", slab_size=3)
    >>> logits, attention = model(torch.randn(2, 1, 8, 16, 16), return_attention=True)
    >>> logits.shape, attention.shape
    (torch.Size([2, 2]), torch.Size([2, 6]))
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvox.models.base import ClassifierBase
from medvox.models.registry import register_model

_INSTANCES = ("slice", "slab", "patch")


class GatedAttention(nn.Module):
    """Gated attention pooling over the instances of each bag.

    Shapes:
        ``(B, N, L) -> (pooled (B, L), attention (B, N))``; attention sums to 1 per bag.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        attention = torch.softmax(scores.float(), dim=1).to(h.dtype)
        return torch.einsum("bn,bnl->bl", attention, h), attention


class InstanceEncoder(nn.Module):
    """Conv-BN-ReLU blocks (stride 2 after the first) + global average pool -> ``(N, embed_dim)``."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution  # imported here: MONAI costs ~1 s at start-up
        from monai.networks.layers import Pool

        widths = [in_channels, *channels, embed_dim]
        self.blocks = nn.Sequential(*[
            Convolution(spatial_dims, c_in, c_out, strides=1 if i == 0 else 2, kernel_size=3, adn_ordering="NA",
                        act="RELU", norm="BATCH", bias=False)
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True))
        ])
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)


class MILClassifier(ClassifierBase):
    """Attention-MIL classifier over slices, 2.5D slabs or 3D patches of a volume.

    Args:
        in_channels: input channels ``C``.
        num_classes: number of logits ``K``.
        dropout: dropout on the pooled bag embedding, in ``[0, 1)``.
        instance: ``"slice"``, ``"slab"`` or ``"patch"``.
        slab_size: slices per slab ``k`` (``"slab"``).
        slab_stride: step between slab starts (``"slab"``; 1 = overlapping slabs).
        patch_size: ``(pd, ph, pw)`` or one int (``"patch"``).
        embed_dim: instance embedding size ``L``.
        channels: widths of the encoder blocks before the last (which is ``embed_dim``).
        attention_dim: hidden size of the gated attention.
        grad_checkpointing: recompute the instance encoder in the backward pass.
        cosine_head: use ``NormedLinear`` (for LDAM).
        cosine_scale: its scale.

    Shapes:
        ``(B, C, D, H, W) -> (B, K)``; with ``return_attention=True`` also ``(B, N)`` where
        ``N = D`` (slice), ``floor((max(D, k) - k) / stride) + 1`` (slab) or the patch count.

    Example:
        >>> model = MILClassifier(instance="patch", patch_size=8)
        >>> _ = model(torch.randn(1, 1, 16, 16, 20))
        >>> model.last_attention.shape  # 2 * 2 * 3 patches (W padded to 24)
        torch.Size([1, 12])
    """

    stem_key = "encoder.blocks.0.conv.weight"
    head_prefixes = ("attention", "fc")

    def __init__(self, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.4, instance: str = "slice",
                 slab_size: int = 3, slab_stride: int = 1, patch_size: int | Sequence[int] = 16,
                 embed_dim: int = 128, channels: Sequence[int] = (32, 64), attention_dim: int = 64,
                 grad_checkpointing: bool = False, cosine_head: bool = False, cosine_scale: float = 30.0) -> None:
        super().__init__(in_channels, num_classes, dropout)
        if instance not in _INSTANCES:
            raise ValueError(f"instance must be one of {_INSTANCES}, got {instance!r}")
        for label, value in (("slab_size", slab_size), ("slab_stride", slab_stride), ("embed_dim", embed_dim),
                             ("attention_dim", attention_dim), *(("channels", c) for c in channels)):
            _check_positive_int(label, value)
        patch = (patch_size,) * 3 if isinstance(patch_size, numbers.Integral) else tuple(patch_size)
        if len(patch) != 3:
            raise ValueError(f"patch_size must be one int or three (pd, ph, pw), got {patch_size!r}")
        for p in patch:
            _check_positive_int("patch_size", p)
        self.instance, self.slab_size, self.slab_stride, self.patch_size = instance, slab_size, slab_stride, patch
        spatial_dims = 3 if instance == "patch" else 2
        enc_in = in_channels * (slab_size if instance == "slab" else 1)
        self.encoder = InstanceEncoder(spatial_dims, enc_in, channels, embed_dim)
        self.attention = GatedAttention(embed_dim, attention_dim)
        self.cam_target_layer = f"encoder.blocks.{len(channels)}"  # per instance: (B*N, L, h, w[, d])
        self.last_attention: torch.Tensor | None = None
        self._build_head(embed_dim, dropout, cosine_head, cosine_scale)
        for m in self.encoder.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.set_grad_checkpointing(grad_checkpointing)

    def to(self, *args, **kwargs):
        """``nn.Module.to``; ``channels_last_3d`` becomes ``channels_last`` for the 2D encoders.

        A trainer converts every model with ``.to(memory_format=torch.channels_last_3d)``, which
        PyTorch refuses for 4D (2D-conv) weights.
        """
        if kwargs.get("memory_format") is torch.channels_last_3d and self.instance != "patch":
            kwargs["memory_format"] = torch.channels_last
        return super().to(*args, **kwargs)

    def instances(self, x: torch.Tensor) -> torch.Tensor:
        """Split ``(B, C, D, H, W)`` into instances ``(B, N, C', ...)`` (see the module docstring)."""
        b, c = x.shape[:2]
        if self.instance == "slice":
            return x.permute(0, 2, 1, 3, 4)  # (B, D, C, H, W)
        if self.instance == "slab":
            k, s = self.slab_size, self.slab_stride
            if x.shape[2] < k:
                x = F.pad(x, (0, 0, 0, 0, 0, k - x.shape[2]))
            slabs = x.unfold(2, k, s)  # (B, C, N, H, W, k)
            n = slabs.shape[2]
            return slabs.permute(0, 2, 1, 5, 3, 4).reshape(b, n, c * k, *x.shape[3:])
        # non-overlapping tiles by reshape/permute rather than ``unfold`` (same order): the ONNX exporter
        # cannot size ``unfold`` after ``pad``; the sizes are Python ints, constants in an export
        spatial = [int(n) for n in x.shape[2:]]
        pads = [(-n) % p for n, p in zip(spatial, self.patch_size, strict=True)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        pd, ph, pw = self.patch_size
        nd, nh, nw = ((n + p) // s for n, p, s in zip(spatial, pads, self.patch_size, strict=True))
        x = x.reshape(-1, int(c), nd, pd, nh, ph, nw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, nd, nh, nw, C, ...)
        return x.reshape(-1, nd * nh * nw, int(c), pd, ph, pw)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Instance embeddings ``(B, N, L)`` of a batch ``(B, C, D, H, W)``."""
        bags = self.instances(x)
        b, n = bags.shape[:2]
        flat = bags.reshape(b * n, *bags.shape[2:]).contiguous()
        return self._run_stage(self.encoder, flat).reshape(b, n, -1)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.attention(self.embed(x))
        self.last_attention = attention.detach()  # kept for explanation after any forward
        return pooled, attention

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x)[0]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Logits ``(B, K)``, or ``(logits, attention (B, N))`` with ``return_attention=True``."""
        self._check_input(x)
        pooled, attention = self._pool(x)
        logits = self.forward_head(pooled)
        return (logits, attention) if return_attention else logits


def _check_positive_int(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


register_model(MILClassifier, name="mil")
