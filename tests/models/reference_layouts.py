"""Checkpoint layouts written by hand from the published architectures, NOT from medvox's models.

If these tables were derived from our own ``state_dict()``, a wrong layer in medvox would also be
wrong here and the loading tests could never fail.

MedicalNet (Tencent/MedicalNet, models/resnet.py): conv1 64x1x7x7x7, bn1; stage widths 64, 128,
256, 512; basic blocks conv1/bn1/conv2/bn2 (3x3x3), bottlenecks conv1 (1x1x1) / conv2 (3x3x3) /
conv3 (1x1x1, 4x width) with bn1..bn3; the first block of a stage has a shortcut when the stride
is not 1 or the width changes; type B stores it as downsample.0 (1x1x1 conv) + downsample.1 (BN),
type A stores nothing. Files hold {"state_dict": {"module.<key>": tensor}} without the head.

Swin UNETR SSL pretraining (MONAI SwinUNETR.load_from): module.patch_embed.proj.{weight,bias};
module.layers{1..4}.0.blocks.{0,1}.{norm1, attn.relative_position_bias_table,
attn.relative_position_index, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2};
module.layers{1..4}.0.downsample.{reduction.weight, norm.weight, norm.bias}.
"""

from __future__ import annotations

import torch

MEDICALNET = {  # depth -> (block, blocks per stage, shortcut type)
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
}
# the counts these rules give: 6 (stem) + 12 per basic block / 18 per bottleneck + 6 per B shortcut
MEDICALNET_TENSOR_COUNTS = {10: 72, 18: 102, 34: 198, 50: 318}


def _bn(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
            (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]


def medicalnet_table(depth: int) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of MedicalNet's ResNet-``depth`` backbone, without ``module.``."""
    block, blocks, shortcut = MEDICALNET[depth]
    table = [("conv1.weight", (64, 1, 7, 7, 7)), *_bn("bn1", 64)]
    in_planes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        out_planes = planes if block == "basic" else planes * 4
        for b in range(n):
            p = f"layer{stage}.{b}."
            if block == "basic":
                table += [(p + "conv1.weight", (planes, in_planes, 3, 3, 3)), *_bn(p + "bn1", planes),
                          (p + "conv2.weight", (planes, planes, 3, 3, 3)), *_bn(p + "bn2", planes)]
            else:
                table += [(p + "conv1.weight", (planes, in_planes, 1, 1, 1)), *_bn(p + "bn1", planes),
                          (p + "conv2.weight", (planes, planes, 3, 3, 3)), *_bn(p + "bn2", planes),
                          (p + "conv3.weight", (out_planes, planes, 1, 1, 1)), *_bn(p + "bn3", out_planes)]
            stride = 2 if (stage == 2 and b == 0) else 1  # MedicalNet: only layer2 is strided
            if b == 0 and shortcut == "B" and (stride != 1 or in_planes != out_planes):
                table += [(p + "downsample.0.weight", (out_planes, in_planes, 1, 1, 1)),
                          *_bn(p + "downsample.1", out_planes)]
            in_planes = out_planes
    return table


def swin_ssl_table(feature_size: int, heads=(3, 6, 12, 24), window: int = 7) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of the Swin UNETR SSL encoder (keys without ``module.``)."""
    table = [("patch_embed.proj.weight", (feature_size, 1, 2, 2, 2)), ("patch_embed.proj.bias", (feature_size,))]
    n_rel, n_tok = (2 * window - 1) ** 3, window**3
    for stage, h in enumerate(heads, start=1):
        dim = feature_size * 2 ** (stage - 1)
        for b in range(2):
            p = f"layers{stage}.0.blocks.{b}."
            table += [
                (p + "norm1.weight", (dim,)), (p + "norm1.bias", (dim,)),
                (p + "attn.relative_position_bias_table", (n_rel, h)),
                (p + "attn.relative_position_index", (n_tok, n_tok)),
                (p + "attn.qkv.weight", (3 * dim, dim)), (p + "attn.qkv.bias", (3 * dim,)),
                (p + "attn.proj.weight", (dim, dim)), (p + "attn.proj.bias", (dim,)),
                (p + "norm2.weight", (dim,)), (p + "norm2.bias", (dim,)),
                (p + "mlp.fc1.weight", (4 * dim, dim)), (p + "mlp.fc1.bias", (4 * dim,)),
                (p + "mlp.fc2.weight", (dim, 4 * dim)), (p + "mlp.fc2.bias", (dim,)),
            ]
        p = f"layers{stage}.0.downsample."
        table += [(p + "reduction.weight", (2 * dim, 8 * dim)), (p + "norm.weight", (8 * dim,)),
                  (p + "norm.bias", (8 * dim,))]
    return table


def random_tensors(table: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values that keep a forward pass finite (positive variances, valid indices)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in table:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("relative_position_index"):
            out[key] = torch.randint(0, 13**3, shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out
