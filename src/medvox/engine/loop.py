"""One training epoch and one evaluation pass: explicit, readable, on Lightning Fabric.

Gradient accumulation: the loss of each micro-batch is divided by the size of its accumulation group,
so ``accum`` micro-batches of size b give the gradient of one batch of size ``accum * b``; DDP gradient
sync is skipped on the accumulating micro-batches (``fabric.no_backward_sync``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvox.errors import TrainingError
from medvox.transforms.mixup import mixup


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    data_wait: float
    optimizer_steps: int
    skipped_steps: int

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "samples_per_s": self.samples / self.seconds if self.seconds > 0 else None,
            "seconds": self.seconds,
            "data_wait_frac": self.data_wait / self.seconds if self.seconds > 0 else None,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }


def to_device_batch(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Stored dtype (float16/uint8) -> float32 on the device, in the model's memory format."""
    x = x.to(device, non_blocking=True).float()
    if channels_last and x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def train_one_epoch(fabric, model: nn.Module, loader, optimizer, criterion: Callable, schedule, *,
                    accum: int, grad_clip: float, augment: Callable | None, generator: torch.Generator,
                    ema_update: Callable[[], None], channels_last: bool, mixup_alpha: float = 0.0,
                    progress: Callable[[int, float], None] | None = None) -> EpochStats:
    """Train for one pass over ``loader``; returns the mean loss and throughput figures.

    ``mixup_alpha > 0`` mixes each augmented batch with a permutation of itself (:func:`medvox.transforms.
    mixup.mixup`) and the loss with it; the reported loss is then that of the mixed batch."""
    model.train()
    n_batches = len(loader)
    total_loss, n_seen, steps, skipped = 0.0, 0, 0, 0
    wait, start = 0.0, time.perf_counter()
    t_ready = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, _idx) in enumerate(loader):
        wait += time.perf_counter() - t_ready
        group_start = (i // accum) * accum
        group_size = min(accum, n_batches - group_start)
        is_last_in_group = i == group_start + group_size - 1
        x = to_device_batch(x, fabric.device, channels_last)
        y = y.to(fabric.device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        if mixup_alpha > 0:
            x, perm, lam = mixup(x, mixup_alpha, generator)
        with fabric.no_backward_sync(model, enabled=not is_last_in_group):
            logits = model(x).float()
            loss = criterion(logits, y)
            if mixup_alpha > 0:
                loss = lam * loss + (1 - lam) * criterion(logits, y[perm])
            fabric.backward(loss / group_size)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value) and not _scaler_handles_inf(fabric):
            raise TrainingError(
                f"the training loss became {loss_value} at batch {i + 1} of the epoch; stopping before any "
                "checkpoint is overwritten. Lower --lr, keep --grad_clip on, or use --precision fp32."
            )
        if is_last_in_group:
            if grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=grad_clip, error_if_nonfinite=False)
            stepped = _optimizer_step(fabric, optimizer)
            optimizer.zero_grad(set_to_none=True)
            if stepped:
                schedule.step()
                ema_update()
                steps += 1
            else:
                skipped += 1
        if math.isfinite(loss_value):
            total_loss += loss_value * len(y)
        n_seen += len(y)
        if progress is not None:
            progress(len(y), loss_value)
        t_ready = time.perf_counter()
    seconds = time.perf_counter() - start
    return EpochStats(total_loss / max(n_seen, 1), n_seen, seconds, wait, steps, skipped)


def _scaler_handles_inf(fabric) -> bool:
    """Under fp16 the grad scaler skips steps with inf/NaN gradients instead of failing."""
    return getattr(fabric._precision, "scaler", None) is not None


def _optimizer_step(fabric, optimizer) -> bool:
    """Step; returns False when the fp16 scaler skipped the step because of inf/NaN gradients."""
    scaler = getattr(fabric._precision, "scaler", None)
    scale_before = scaler.get_scale() if scaler is not None else None
    optimizer.step()
    return scaler is None or scaler.get_scale() >= scale_before


@torch.inference_mode()
def predict(fabric, model: nn.Module, loader, *, channels_last: bool,
            n_total: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits for every sample of ``loader``, gathered over DDP ranks.

    Returns:
        (indices (N,), labels (N,), logits (N, K)) in ascending index order, each index once.
    """
    model.eval()
    idx_all, y_all, logit_all = [], [], []
    for x, y, idx in loader:
        x = to_device_batch(x, fabric.device, channels_last)
        logits = model(x).float()
        idx_all.append(idx.to(fabric.device))
        y_all.append(y.to(fabric.device))
        logit_all.append(logits)
    idx_t = torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.long, device=fabric.device)
    y_t = torch.cat(y_all) if y_all else torch.zeros(0, dtype=torch.long, device=fabric.device)
    logit_t = torch.cat(logit_all) if logit_all else torch.zeros(0, 0, device=fabric.device)
    if fabric.world_size > 1:  # every rank holds the same number of (padded) samples
        idx_t, y_t, logit_t = (fabric.all_gather(t).flatten(0, 1) for t in (idx_t, y_t, logit_t))
    idx_np = idx_t.cpu().numpy()
    _, first = np.unique(idx_np, return_index=True)  # drop the padding duplicates
    return idx_np[first], y_t.cpu().numpy()[first], logit_t.cpu().numpy()[first]


def softmax_np(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    """Plain (unweighted, margin-free) cross-entropy: comparable across losses and epochs."""
    if len(labels) == 0:
        return float("nan")
    return float(F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels).long()))
