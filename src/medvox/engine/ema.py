"""Exponential moving average of the weights, via ``torch.optim.swa_utils.AveragedModel``.

Created after the model is on its device and before any DDP wrap (as timm's ModelEmaV3); updated once
per optimizer step. Buffers (BatchNorm running statistics) are averaged too, so the EMA model can be
evaluated as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def create_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA copy of ``model`` with ``ema = decay * ema + (1 - decay) * weights``; None when decay is 0.

    The first update copies the weights (``AveragedModel`` starts from ``n_averaged = 0``).
    """
    if decay <= 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: AveragedModel | None, model: nn.Module) -> None:
    if ema is not None:
        ema.update_parameters(model)
