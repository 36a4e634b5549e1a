"""DenseNet-121-3D: MONAI's ``DenseNet121(spatial_dims=3)`` features under the medvox head.

The ``features`` module is MONAI's own (keys ``features.conv0.weight``,
``features.denseblock1.denselayer1.layers.conv1.weight``, ...), so a MONAI DenseNet121 state
dict loads as is; its ``class_layers.out`` classifier is dropped and replaced by ours.

Example:
    >>> model = DenseNet3D(in_channels=1, num_classes=2)
    >>> model(torch.randn(2, 1, 32, 32, 32)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvox.models.base import ClassifierBase
from medvox.models.registry import register_model


class DenseNet3D(ClassifierBase):
    """DenseNet-121-3D features + ReLU + global average pool + dropout + head.

    Args:
        in_channels: input channels ``C``.
        num_classes: number of logits ``K``.
        dropout: dropout before the head, in ``[0, 1)``.
        dropout_prob: MONAI's dropout inside every dense layer (default 0).
        grad_checkpointing: recompute each dense block in the backward pass.
        cosine_head: use ``NormedLinear`` (for LDAM).
        cosine_scale: its scale.

    Shapes:
        ``(B, C, D, H, W) -> (B, K)``; ``features.norm5`` is ``(B, 1024, D/32, H/32, W/32)``.

    Example:
        >>> model = DenseNet3D(in_channels=2, num_classes=4, cosine_head=True).eval()
        >>> model(torch.randn(1, 2, 32, 32, 32)).abs().max() <= 30
        tensor(True)
    """

    cam_target_layer = "features.norm5"  # the last feature map, before the final ReLU and pool
    stem_key = "features.conv0.weight"
    drop_prefixes = ("class_layers.",)  # MONAI's own classifier

    def __init__(self, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.4, dropout_prob: float = 0.0,
                 grad_checkpointing: bool = False, cosine_head: bool = False, cosine_scale: float = 30.0) -> None:
        super().__init__(in_channels, num_classes, dropout)
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob!r}")
        from monai.networks.nets import DenseNet121  # imported here: MONAI costs ~1 s at start-up

        net = DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                          dropout_prob=dropout_prob)
        self.features = net.features  # MONAI's classifier (class_layers) is replaced by ours
        self._build_head(net.class_layers.out.in_features, dropout, cosine_head, cosine_scale)
        self.set_grad_checkpointing(grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.features.named_children():
            x = self._run_stage(module, x) if name.startswith("denseblock") else module(x)
        return torch.flatten(F.adaptive_avg_pool3d(F.relu(x), 1), 1)


register_model(DenseNet3D, name="densenet121")
