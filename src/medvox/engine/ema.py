"""Exponential moving average of the weights, via ``torch.optim.swa_utils.AveragedModel``.

Created after the model is on its device and before any DDP wrap (as timm's ModelEmaV3); updated once
per optimizer step. Buffers (BatchNorm running statistics) are averaged too, so the EMA model can be
evaluated as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def get_debiased_ema_multi_avg_fn(decay: float):
    """EMA with Adam-style bias correction: after n updates the average is
    ``sum_i (1 - d) d^(n-i) w_i / (1 - d^n)``, a proper weighted mean of the weights seen so far.

    Plain EMA (``get_ema_multi_avg_fn``) starts from the first weights and needs ~1/(1-d) updates to
    forget them: with d = 0.999 and ~90 steps per epoch, 70 % of the average after 4 epochs is still
    the initial network. The corrected form has the same decay once n >> 1/(1-d), and is a faithful
    average from the start. Recursively: ``ema_n = lerp(ema_{n-1}, w_n, (1 - d) / (1 - d^n))``.
    """

    @torch.no_grad()
    def ema_update(ema_params, current_params, num_averaged):
        n = int(num_averaged) + 1  # this update's index; AveragedModel copies on the first one
        weight = (1.0 - decay) / (1.0 - decay**n)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, weight)
        else:
            for p_ema, p_model in zip(ema_params, current_params, strict=True):
                p_ema.copy_(p_ema * (1.0 - weight) + p_model * weight)

    return ema_update


def create_ema(model: nn.Module, decay: float, debias: bool = False) -> AveragedModel | None:
    """An EMA copy of ``model`` with ``ema = decay * ema + (1 - decay) * weights``; None when decay is 0.

    The first update copies the weights (``AveragedModel`` starts from ``n_averaged = 0``). With
    ``debias`` the early updates are bias-corrected (see ``get_debiased_ema_multi_avg_fn``).
    """
    if decay <= 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    avg_fn = get_debiased_ema_multi_avg_fn(decay) if debias else get_ema_multi_avg_fn(decay)
    ema = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=True)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: AveragedModel | None, model: nn.Module) -> None:
    if ema is not None:
        ema.update_parameters(model)
