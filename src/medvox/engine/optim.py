"""Optimizers and learning-rate schedules, all driven by the config.

Weight decay is not applied to normalisation weights and biases (it only shrinks them towards values
that mean nothing for them). The schedule is stepped once per optimizer step: linear warmup over 10 %
of the epochs (at least 3), then cosine annealing to ``min_lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import lr_scheduler

from medvox.config import CHOICES, OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig, head_names: set[str] | None = None,
                 head_lr_mult: float = 1.0) -> list[dict]:
    """Split parameters into (decay / no-decay) x (backbone / head) groups.

    Args:
        model: the (unwrapped) model.
        cfg: optimizer settings (``lr``, ``weight_decay``).
        head_names: parameter names of newly initialised layers, trained at ``lr * head_lr_mult``.
        head_lr_mult: learning-rate multiplier for ``head_names``.
    """
    head_names = head_names or set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1  # biases and norm weights/biases
        is_head = name in head_names
        groups.setdefault((no_decay, is_head), []).append(p)
    out = []
    for (no_decay, is_head), params in sorted(groups.items()):
        mult = head_lr_mult if is_head else 1.0
        out.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": cfg.lr * mult,
            "name": f"{'head' if is_head else 'backbone'}_{'no_decay' if no_decay else 'decay'}",
        })
    return out


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam (betas, eps from the config), AdamW, or SGD with Nesterov momentum."""
    name = cfg.optimizer.lower()
    # The fused kernel updates each tensor in one pass; on the CPU PyTorch's default is a per-tensor loop
    # of several element-wise ops (ResNet-18-3D: 2x slower, ~10 % of a training step; benchmarks/RESULTS.md).
    fused = _fused_ok(groups)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adam, adamw or sgd")


def _fused_ok(groups: list[dict]) -> bool | None:
    """True when every parameter is a floating tensor on the CPU or a CUDA device (the fused Adam's
    devices); None (PyTorch's default choice) otherwise."""
    params = [p for g in groups for p in g["params"]]
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def warmup_steps(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: ``max(ceil(warmup_frac * epochs), warmup_min_epochs)`` epochs,
    kept shorter than the whole run."""
    total = epochs * steps_per_epoch
    w_epochs = max(math.ceil(cfg.warmup_frac * epochs), cfg.warmup_min_epochs)
    return max(1, min(w_epochs * steps_per_epoch, total - 1))


class Schedule:
    """Per-step warmup + main schedule, with an optional per-epoch plateau stage.

    ``lr(t)`` for optimizer step ``t`` (0-based, the lr used by step t) with warmup W and total T:
    ``base * (t + 1) / W`` for ``t < W``; cosine: ``min + (base - min) * (1 + cos(pi * (t - W) / (T - W))) / 2``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int):
        self.kind = cfg.scheduler.lower()
        if self.kind not in CHOICES["optim.scheduler"]:
            raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose cosine, step, plateau or none")
        total = max(1, epochs * steps_per_epoch)
        self.warmup = 0 if self.kind == "none" else warmup_steps(cfg, epochs, steps_per_epoch)
        self.plateau = None
        if self.kind == "none":
            self.per_step = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
            return
        warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / self.warmup, end_factor=1.0,
                                     total_iters=max(1, self.warmup - 1))
        if self.kind == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - self.warmup), eta_min=cfg.min_lr)
        elif self.kind == "step":
            main = lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.step_size * steps_per_epoch), gamma=cfg.gamma)
        else:
            main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
            self.plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma,
                                                          patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        self.per_step = lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[self.warmup])
        self._steps = 0

    def step(self) -> None:
        """After every optimizer step. The plateau stage leaves the lr to ``epoch_end`` after warmup."""
        if self.plateau is not None and getattr(self, "_steps", 0) >= self.warmup:
            return
        self._steps = getattr(self, "_steps", 0) + 1
        self.per_step.step()

    def epoch_end(self, metric: float | None) -> None:
        if self.plateau is not None and self._steps >= self.warmup and metric is not None:
            self.plateau.step(metric)

    def state_dict(self) -> dict:
        return {"per_step": self.per_step.state_dict(), "steps": getattr(self, "_steps", 0),
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        self._steps = state["steps"]
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
