"""Training recipe chosen from the preprocessing plan (``--recipe auto``), in the manner of nnU-Net.

``--recipe original`` (the default) keeps the original pipeline's settings, which were made for fine-tuning
MedicalNet's ResNet-50: Adam 2e-4, batch 6 x 2, LDAM, dropout 0.4, 60 epochs, patience 7, EMA 0.999.
``--recipe auto`` derives a from-scratch recipe for small 3D datasets from the plan (the fingerprint of
the cross-validation pool), and leaves every setting the user gave (flag, ``--set``, config file) alone:

* model: ResNet-18-3D (MedicalNet layout), dropout 0.2; with ``--pretrained-path`` nothing changes
  (the original settings are the fine-tuning recipe);
* batch: an effective batch of 16 for every input size: 16 x 1 up to 40^3 voxels per sample (times the
  channels), 8 x 2 up to 80^3, 4 x 4 above (memory);
* optimizer: AdamW, lr 1e-3, weight decay 0.05 (not on norms and biases), warmup + cosine;
* length: about 2,600 optimizer steps (20 to 100 epochs, from the training part of a fold), early
  stopping after 10 epochs without improvement;
* EMA: bias-corrected, time constant a fifth of the optimizer steps (0.998 for 2,600 steps);
* loss: inverse-frequency weighted cross-entropy when the largest class is >= 1.5x the smallest, else
  cross-entropy;
* augmentation: the original affine ranges, plus left-right flips (axis W of the RAS grid: anatomy is
  close to mirror-symmetric, the other axes are not);
* decision: the threshold that maximises Youden's J on validation / out-of-fold predictions.

The recipe and the reason for every choice are logged and saved with the config (``config.json``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("medvox")

RECIPES = ("original", "auto")
TARGET_STEPS = 2600
EFFECTIVE_BATCH = 16


def auto_recipe(plan: dict[str, Any], folds: int, pretrained: bool) -> tuple[dict[str, Any], list[str]]:
    """Dotted config overrides for a plan, and one line of reasoning per choice.

    Args:
        plan: the preprocessing plan (``target_shape``, ``in_channels``, ``n_cases`` of the pool,
            ``imbalance_ratio``).
        folds: k of the cross-validation (the training part of a fold is (k - 1) / k of the pool).
        pretrained: a pretrained checkpoint is given (then the original fine-tuning settings stay).

    Example:
        >>> plan = {"target_shape": [28, 28, 28], "in_channels": 1, "n_cases": 1286, "imbalance_ratio": 3.5}
        >>> values, why = auto_recipe(plan, folds=5, pretrained=False)
        >>> values["train.epochs"], values["train.ema_decay"], values["loss.name"]
        (40, 0.998, 'weighted_CE')
    """
    if pretrained:
        return {}, ["a pretrained checkpoint is given: the original fine-tuning settings are kept"]
    voxels = math.prod(int(v) for v in plan["target_shape"]) * int(plan.get("in_channels", 1))
    if voxels <= 40 ** 3:
        batch, accum = 16, 1
    elif voxels <= 80 ** 3:
        batch, accum = 8, 2
    else:
        batch, accum = 4, 4
    n_train = max(1, int(plan["n_cases"]) * max(folds - 1, 1) // max(folds, 1))
    steps_per_epoch = max(1, math.ceil(n_train / (batch * accum)))
    epochs = int(min(100, max(20, round(TARGET_STEPS / steps_per_epoch))))
    total_steps = epochs * steps_per_epoch
    ema = min(0.9999, max(0.99, math.floor((1 - 1 / (0.2 * total_steps)) * 1e4) / 1e4))  # 4 digits, rounded down
    imbalance = float(plan.get("imbalance_ratio", 1.0))
    loss = "weighted_CE" if imbalance >= 1.5 else "CE"
    values = {
        "model.name": "resnet18", "model.dropout": 0.2,
        "train.batch_size": batch, "train.grad_accum": accum, "train.epochs": epochs, "train.early_stopping": 10,
        "train.ema_decay": ema, "optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05,
        "loss.name": loss, "augment.flip_axes": [2], "train.threshold_rule": "youden",
    }
    side = round(voxels ** (1 / 3))
    why = [
        f"input {'x'.join(str(v) for v in plan['target_shape'])} x {plan.get('in_channels', 1)} channel(s) "
        f"(~{side}^3 voxels): batch {batch} x {accum} accumulation (effective {batch * accum})",
        f"{n_train} training cases per fold -> {steps_per_epoch} optimizer steps per epoch -> {epochs} epochs "
        f"(~{TARGET_STEPS} steps), early stopping after 10 epochs",
        f"EMA decay {ema}: time constant a fifth of the {total_steps} optimizer steps",
        f"class imbalance {imbalance:g}:1 -> {loss}",
        "from scratch: ResNet-18-3D, dropout 0.2, AdamW lr 1e-3, weight decay 0.05, left-right flips, "
        "Youden threshold on validation",
    ]
    return values, why


def explicit_keys(file_data: dict[str, Any] | None, overrides: dict[str, Any]) -> set[str]:
    """Dotted keys the user set: in the config file (nested) or as flags / ``--set``."""
    keys = set(overrides)

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    walk(file_data or {}, "")
    return keys
