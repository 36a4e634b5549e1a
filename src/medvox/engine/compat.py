"""Work-arounds for upstream bugs, each applied only where the bug bites.

oneDNN's bf16 Conv3d weight gradient on the CPU (PyTorch 2.13) returns NaN/Inf at random when the
input is smaller than the kernel along a spatial axis (e.g. a 3x3x3 conv over a 2-voxel-deep map, as
in the last stages of a ResNet at 28^3). Those few tiny convolutions run in fp32 instead: the cost is
negligible and every other layer keeps bf16. See ``tests/engine/test_compat.py``.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _guarded_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and any(s < k for s, k in zip(x.shape[2:], self.kernel_size, strict=True))):
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.float(), self.weight, self.bias)
    return self._conv_forward(x, self.weight, self.bias)


def guard_cpu_bf16_conv3d(model: nn.Module) -> int:
    """Route every Conv3d of ``model`` through the fp32 fallback for kernel-overhanging inputs.

    Returns:
        The number of convolutions guarded.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.forward = types.MethodType(_guarded_forward, module)
            n += 1
    return n
