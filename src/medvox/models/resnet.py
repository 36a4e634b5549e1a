"""3D ResNets 10-200 whose state dicts match MedicalNet's checkpoints key for key.

MedicalNet (Chen, Ma, Zheng 2019, "Med3D") pretrained these ResNets on 23 segmentation data
sets. Its layout: ``conv1`` 7x7x7 stride 2, ``maxpool`` 3/2, four stages of basic (10/18/34) or
bottleneck (50-200) blocks; shortcut type B (1x1x1 conv + BN, keys ``downsample.0/1``) for
depths 10, 50, 101, 152, 200 and type A (parameter-free zero-padded identity) for 18 and 34.

Two variants share every weight and differ only in how ``layer3`` and ``layer4`` reduce size:

* ``"fast"`` (default): stride 2, dilation 1, the usual classification ResNet. The deepest
  stage ends at 1/32 of the input (e.g. 4^3 voxels for a 128^3 volume).
* ``"faithful"``: stride 1 with dilation 2 and 4, as MedicalNet trained them. The features keep
  1/8 of the input size, so the pretrained filters see the scale they were trained on, but
  ``layer3`` runs on 8x and ``layer4`` on 64x more voxels: the whole network costs 4-5x the
  FLOPs (ResNet-50 at 128^3: 208 vs 41 GMAC per volume; see ``docs/models.md``).

``"fast"`` is the default because classification pools everything to one vector anyway, and
the dilated stages make every epoch several times slower and far hungrier for activation
memory at realistic volume sizes (128^3 and up). Pick ``"faithful"`` to use MedicalNet's
features as they were learnt (frozen or lightly fine-tuned backbones, very small data sets).

Example:
    >>> model = MedResNet3D(50, in_channels=1, num_classes=2)
    >>> model(torch.randn(2, 1, 32, 32, 32)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvox.models.base import ClassifierBase
from medvox.models.registry import register_model

# depth -> (block, blocks per stage, MedicalNet's shortcut type)
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int], str]] = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
    101: ("bottleneck", (3, 4, 23, 3), "B"),
    152: ("bottleneck", (3, 8, 36, 3), "B"),
    200: ("bottleneck", (3, 24, 36, 3), "B"),
}
# a residual block's key in any checkpoint layout: layer<stage>.<block>.<conv1|conv3|downsample|...>
_BLOCK_KEY = re.compile(r"(?:^|\.)layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<part>[a-z]+\d*)")
# variant -> (stride, dilation) of layer3 and layer4
RESNET_VARIANTS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "fast": ((2, 1), (2, 1)),
    "faithful": ((1, 2), (1, 4)),
}

# the classes MONAI's layer factories return (Conv[Conv.CONV, 3], Norm[Norm.BATCH, 3]); used directly,
# importing MONAI would cost ~1 s of every start-up
_Conv3d = nn.Conv3d
_BatchNorm3d = nn.BatchNorm3d


def _conv3(in_planes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    # padding = dilation keeps the size (before the stride) for a 3x3x3 kernel
    return _Conv3d(in_planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ZeroPadShortcut(nn.Module):
    """Shortcut type A: subsample by ``stride`` and zero-pad the new channels; no parameters.

    Unlike MedicalNet's original (which concatenates ``out.data``), the identity part keeps its
    gradient: a residual connection that cuts the gradient is not a residual connection.
    """

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        out = x[:, :, ::s, ::s, ::s] if s > 1 else x
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.out_channels - out.shape[1]))


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (ResNet-10/18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3(in_planes, planes, stride, dilation)
        self.bn1 = _BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = _BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    """1x1x1 -> 3x3x3 (strided, dilated) -> 1x1x1 x4 with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = _BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = _BatchNorm3d(planes)
        self.conv3 = _Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = _BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class MedResNet3D(ClassifierBase):
    """MedicalNet-layout 3D ResNet classifier: stem, four stages, global average pool, head.

    Args:
        depth: one of 10, 18, 34, 50, 101, 152, 200.
        in_channels: input channels ``C`` (MedicalNet weights are 1-channel; more are inflated).
        num_classes: number of logits ``K`` (>= 2).
        dropout: dropout before the head, in ``[0, 1)``.
        variant: ``"fast"`` (strided layer3/4) or ``"faithful"`` (dilated, MedicalNet's own).
        shortcut_type: ``"A"`` or ``"B"``; ``None`` takes MedicalNet's choice for the depth.
        cosine_head: use ``NormedLinear`` (for LDAM) instead of ``nn.Linear``.
        cosine_scale: the scale of the cosine head.
        grad_checkpointing: recompute layer1..layer4 in the backward pass to save memory.
        stem_stride: stride of ``conv1``: 2 (MedicalNet's) or 1 (small inputs: every stage sees twice the
            resolution, the same weights load, 8x the compute).

    Shapes:
        ``(B, C, D, H, W) -> (B, K)``; ``layer4`` gives ``(B, 512*e, D/32, H/32, W/32)`` for
        ``"fast"`` and ``(B, 512*e, D/8, H/8, W/8)`` for ``"faithful"`` (``e`` = 1 or 4), twice as large
        with ``stem_stride=1``.

    Example:
        >>> model = MedResNet3D(18, in_channels=2, num_classes=3, variant="faithful")
        >>> model(torch.randn(1, 2, 16, 16, 16)).shape
        torch.Size([1, 3])
    """

    cam_target_layer = "layer4"
    cam_fallback_layers = ("layer3", "layer2")  # finer maps for small inputs (28^3: layer4 is 1 x 1 x 1)
    stem_key = "conv1.weight"
    drop_prefixes = ("conv_seg.",)  # MedicalNet's segmentation decoder

    def __init__(self, depth: int, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.4,
                 variant: str = "fast", shortcut_type: str | None = None, cosine_head: bool = False,
                 cosine_scale: float = 30.0, grad_checkpointing: bool = False, stem_stride: int = 2) -> None:
        super().__init__(in_channels, num_classes, dropout)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
        if variant not in RESNET_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(RESNET_VARIANTS)}, got {variant!r}")
        block_name, blocks, default_shortcut = RESNET_DEPTHS[depth]
        shortcut_type = default_shortcut if shortcut_type is None else str(shortcut_type).upper()
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' or 'B' (or None for MedicalNet's), got {shortcut_type!r}")
        self.depth, self.variant, self.shortcut_type, self.stem_stride = depth, variant, shortcut_type, stem_stride
        block = BasicBlock3d if block_name == "basic" else Bottleneck3d

        # stem_stride 1 keeps twice the resolution through every stage (same weights, 8x the compute):
        # for small inputs (MedMNIST's 28^3) the fast variant's layer4 would otherwise see one voxel
        self.conv1 = _Conv3d(in_channels, 64, 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = _BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        (s3, d3), (s4, d4) = RESNET_VARIANTS[variant]
        self._in_planes = 64
        self.layer1 = self._make_layer(block, 64, blocks[0])
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, blocks[2], stride=s3, dilation=d3)
        self.layer4 = self._make_layer(block, 512, blocks[3], stride=s4, dilation=d4)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self._build_head(512 * block.expansion, dropout, cosine_head, cosine_scale)
        self._init_backbone()
        self.set_grad_checkpointing(grad_checkpointing)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_planes != out_planes:
            if self.shortcut_type == "A":
                downsample = _ZeroPadShortcut(out_planes, stride)
            else:
                downsample = nn.Sequential(
                    _Conv3d(self._in_planes, out_planes, 1, stride=stride, bias=False), _BatchNorm3d(out_planes)
                )
        layers = [block(self._in_planes, planes, stride, dilation, downsample)]
        self._in_planes = out_planes
        layers += [block(out_planes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_backbone(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        return torch.flatten(self.avgpool(x), 1)

    def checkpoint_hint(self, raw_keys: list[str]) -> str | None:
        """Which registered ResNet a checkpoint that does not fit this one holds, from its key names alone
        (block type, blocks per stage, shortcut type), e.g. MedicalNet's resnet_18 given to ``--model resnet50``."""
        blocks: dict[int, set[int]] = {}
        bottleneck = downsample = False
        for key in raw_keys:
            if m := _BLOCK_KEY.search(key):
                blocks.setdefault(int(m["stage"]), set()).add(int(m["block"]))
                bottleneck |= m["part"] == "conv3"
                downsample |= m["part"] == "downsample"
        counts = tuple(len(blocks.get(stage, ())) for stage in (1, 2, 3, 4))
        block = "bottleneck" if bottleneck else "basic"
        found = next((d for d, (b, n, _) in RESNET_DEPTHS.items() if (b, n) == (block, counts)), None)
        if found is None:
            return None
        shortcut = "B" if downsample else "A"
        what = f"the checkpoint holds a ResNet-{found} ({block} blocks {'-'.join(map(str, counts))}, shortcut {shortcut})"
        set_shortcut = f"--set model.kwargs='{{\"shortcut_type\": \"{shortcut}\"}}'"
        if found != self.depth:
            extra = "" if shortcut == RESNET_DEPTHS[found][2] else f" {set_shortcut}"
            return f"{what}: use --model resnet{found}{extra}"
        return f"{what}: use {set_shortcut}" if shortcut != self.shortcut_type else None

    def checkpoint_source(self, raw_keys: list[str]) -> str | None:
        # MedicalNet's files: DataParallel "module." keys, and no classifier
        if raw_keys and all(k.startswith("module.") for k in raw_keys) and not any(".fc." in k for k in raw_keys):
            return "MedicalNet"
        return None


def _resnet_factory(depth: int):
    def factory(**kwargs) -> MedResNet3D:
        return MedResNet3D(depth, **kwargs)

    block, blocks, shortcut = RESNET_DEPTHS[depth]
    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (
        f"ResNet-{depth}-3D ({block} blocks {list(blocks)}, MedicalNet shortcut {shortcut}); "
        "keyword arguments as ``MedResNet3D`` minus ``depth``."
    )
    params = list(inspect.signature(MedResNet3D.__init__).parameters.values())[2:]  # drop self, depth
    factory.__signature__ = inspect.Signature(params, return_annotation=MedResNet3D)
    return factory


for _depth in RESNET_DEPTHS:
    register_model(_resnet_factory(_depth))
