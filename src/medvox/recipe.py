"""Training recipe chosen from the preprocessing plan (``--recipe auto``), in the manner of nnU-Net.

``--recipe original`` (the default) keeps the original pipeline's settings, which were made for fine-tuning
MedicalNet's ResNet-50: Adam 2e-4, batch 6 x 2, LDAM, dropout 0.4, 60 epochs, patience 7, EMA 0.999.
``--recipe auto`` derives a from-scratch recipe for small 3D datasets from the plan (the fingerprint of
the cross-validation pool), and leaves every setting the user gave (flag, ``--set``, config file) alone:

* model: ResNet-18-3D (MedicalNet layout), dropout 0.2; with ``--pretrained-path`` nothing changes
  (the original settings are the fine-tuning recipe);
* input: the plan's grid on a GPU; on a CPU the CNN's input is resized (whole field of view, same
  proportions) to at most 28^3 voxels (:data:`CPU_INPUT_VOXELS`, :func:`capped_shape`): the recipe's
  ~41,600 training samples per fold take about 20 minutes at 28^3 on 2 cores, and each doubling of the
  side costs ~8x. The descriptor model below keeps the native grid. A ``data.target_shape`` or
  ``data.target_spacing`` the user gives (or a Swin UNETR, whose input must be a multiple of 32) wins;
* batch: an effective batch of 16 for every input size: 16 x 1 up to 40^3 voxels per sample (times the
  channels), 8 x 2 up to 80^3, 4 x 4 above (memory); on a GPU the micro-batch is instead the largest
  power of two up to 16 (at least 2, for BatchNorm) whose measured training-step memory fits in 80 % of the
  free device memory (:func:`fit_batch`, :func:`measure_step_memory`), the rest by accumulation;
* optimizer: AdamW, lr 1e-3, weight decay 0.05 (not on norms and biases), warmup + cosine;
* length: about 2,600 optimizer steps (20 to 100 epochs, from the training part of a fold), early
  stopping after 10 epochs without improvement;
* EMA: bias-corrected, time constant a fifth of the optimizer steps (0.998 for 2,600 steps);
* loss: inverse-frequency weighted cross-entropy when the largest class is >= 1.5x the smallest, else
  cross-entropy;
* augmentation: the original affine ranges, plus left-right flips (axis W of the RAS grid: anatomy is
  close to mirror-symmetric, the other axes are not);
* decision: the threshold that maximises Youden's J on validation / out-of-fold predictions (more than two
  classes: the class weights that maximise balanced accuracy, :func:`~medvox.metrics.classification.best_class_weights`);
* fusion (``medvox cv``): a logistic regression on shape and intensity descriptors, fitted on the same
  folds, mixed into the fold ensemble at the weight with the best pooled out-of-fold AUC (the lowest
  log-loss for more than two classes; :mod:`medvox.descriptors`; weight 0 keeps the CNN alone). The descriptors are computed on the
  plan's native grid (``train.feature_grid = "native"``) even when the CNN's input is made coarser with
  ``data.target_shape`` to save compute: they cost milliseconds per case and see thickness and surface
  better on the finer grid.

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
CPU_INPUT_VOXELS = 28 ** 3  # 5 folds of the recipe in ~100 min on a 2-core CPU (benchmarks/accuracy.md)
FIXED_INPUT_MODELS = ("swin_unetr",)  # inputs must be multiples of 32: the CPU cap leaves them alone
MIN_SIDE = 16  # a capped axis keeps at least this many voxels (or all it has)


def capped_shape(shape: list[int] | tuple[int, ...], max_voxels: int = CPU_INPUT_VOXELS) -> list[int] | None:
    """``shape`` scaled by one factor (same proportions) to at most ``max_voxels``; ``None`` when it fits.

    An axis is not shrunk below :data:`MIN_SIDE` (or its own size when smaller), so a thin stack of slices
    keeps its slices; the other axes then take the rest of the reduction.

    Example:
        >>> capped_shape([64, 64, 64]), capped_shape([28, 28, 28]), capped_shape([160, 160, 20])
        ([28, 28, 28], None, [37, 37, 16])
    """
    shape = [int(v) for v in shape]
    if math.prod(shape) <= max_voxels:
        return None
    floors = [min(v, MIN_SIDE) for v in shape]
    free = list(range(len(shape)))  # axes still scaled by the common factor
    out = list(shape)
    while free:
        fixed = math.prod(out[i] for i in range(len(shape)) if i not in free)
        factor = (max_voxels / fixed / math.prod(shape[i] for i in free)) ** (1 / len(free))
        pinned = [i for i in free if shape[i] * factor < floors[i]]
        if not pinned:
            for i in free:
                out[i] = max(floors[i], math.floor(shape[i] * factor + 1e-6))
            break
        for i in pinned:
            out[i] = floors[i]
            free.remove(i)
    return out


def fit_batch(per_sample_bytes: float, fixed_bytes: float, free_bytes: float, effective: int = EFFECTIVE_BATCH,
              headroom: float = 0.8, smallest: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation) for an effective batch: the largest power of two <= ``effective`` whose
    step memory ``fixed + batch * per_sample`` fits in ``headroom * free``; ``smallest`` when even that does
    not fit (:func:`gpu_batch` passes the smallest probe batch, which has just trained on the card).

    Example:
        >>> fit_batch(per_sample_bytes=2e9, fixed_bytes=1e9, free_bytes=20e9)  # 7 samples fit -> 4 x 4
        (4, 4)
    """
    batch = 1 << (max(1, effective).bit_length() - 1)  # the largest power of two <= effective
    smallest = max(1, min(smallest, batch))
    while batch // 2 >= smallest and fixed_bytes + batch * per_sample_bytes > headroom * free_bytes:
        batch //= 2
    return batch, max(1, math.ceil(effective / batch))


# Two batch sizes whose peak memories give the per-sample and the fixed part. Not 1: a network whose deepest
# feature map is one voxel (ResNet-18 on 28^3) has one value per channel at batch 1, and BatchNorm cannot
# train on that ("Expected more than 1 value per channel"): the probe crashed `--recipe auto --gpu` there.
PROBE_BATCHES = (2, 4)


def probe_step(model, optimizer, batch: int, channels: int, shape: list[int], num_classes: int, device) -> None:
    """One bf16 training step of ``model`` on a random batch (the step :func:`measure_step_memory` measures)."""
    import torch

    device = torch.device(device)
    x = torch.randn(batch, channels, *shape, device=device)
    y = torch.arange(batch, device=device) % max(2, num_classes)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step_memory(model_name: str, shape: list[int], channels: int, num_classes: int, device,
                        model_kwargs: dict | None = None) -> tuple[float, float]:
    """(bytes per sample, fixed bytes) of one bf16 training step on a CUDA ``device``, from the peak
    allocated memory of steps with the :data:`PROBE_BATCHES` (weights, gradients, Adam state and workspace
    are the fixed part; activations grow with the batch)."""
    import torch

    from medvox.models import create_model

    model = create_model(model_name, in_channels=channels, num_classes=num_classes, **(model_kwargs or {})).to(device)
    opt = torch.optim.AdamW(model.parameters())
    peaks = []
    for batch in PROBE_BATCHES:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe_step(model, opt, batch, channels, shape, num_classes, device)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    del model, opt
    torch.cuda.empty_cache()
    small, large = PROBE_BATCHES
    per_sample = max((peaks[1] - peaks[0]) / (large - small), 1.0)
    return float(per_sample), float(max(peaks[0] - small * per_sample, 0))


def gpu_batch(plan: dict[str, Any], model_name: str, model_kwargs: dict | None = None) -> tuple[int, int, str] | None:
    """(micro-batch, accumulation, reason) fitted to the first visible GPU's free memory; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    shape = [int(v) for v in plan["target_shape"]]
    channels = int(plan.get("in_channels", 1))
    try:
        per_sample, fixed = measure_step_memory(model_name, shape, channels, max(2, len(plan.get("classes", [])) or 2),
                                                device, model_kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        from medvox.config import ConfigError

        raise ConfigError(
            f"--recipe auto --gpu: one training step of {model_name} on {min(PROBE_BATCHES)} samples of "
            f"{'x'.join(map(str, shape))} x {channels} channel(s) does not fit this GPU ({free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free): give a coarser --target-shape (or --target-spacing), a smaller "
            f"--model, or free the card ({(total - free) / 2**30:.1f} GiB of it is in use)") from exc
    free, _ = torch.cuda.mem_get_info(device)
    # not below the smallest probe batch: it has just trained on this card, and BatchNorm needs 2 samples
    # where the deepest map is one voxel (a micro-batch of 1 would crash there like the old probe did)
    batch, accum = fit_batch(per_sample, fixed, free, smallest=min(PROBE_BATCHES))
    over = fixed + batch * per_sample > 0.8 * free
    why = (f"GPU: {per_sample / 2**20:.0f} MiB per sample + {fixed / 2**20:.0f} MiB fixed in a bf16 step, "
           f"{free / 2**30:.1f} GiB free -> batch {batch} x {accum} accumulation"
           + (" (above the 80 % headroom: the smallest batch BatchNorm trains with; it trained in the probe)"
              if over else ""))
    return batch, accum, why


def auto_recipe(plan: dict[str, Any], folds: int, pretrained: bool, gpu_model: str | None = None,
                gpu_model_kwargs: dict | None = None,
                cpu_input_voxels: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Dotted config overrides for a plan, and one line of reasoning per choice.

    Args:
        plan: the preprocessing plan (``target_shape``, ``in_channels``, ``n_cases`` of the pool,
            ``imbalance_ratio``).
        folds: k of the cross-validation (the training part of a fold is (k - 1) / k of the pool).
        pretrained: a pretrained checkpoint is given (then the original fine-tuning settings stay).
        gpu_model: training on a GPU: the micro-batch is fitted to its free memory, measured for this model
            (:func:`gpu_batch`); ``None`` or no visible GPU: the voxel rule.
        gpu_model_kwargs: that model's factory arguments.
        cpu_input_voxels: training on a CPU: the CNN's input (``data.target_shape``) is resized to at most
            this many voxels (:func:`capped_shape`); ``None``: the plan's grid.

    Example:
        >>> plan = {"target_shape": [28, 28, 28], "in_channels": 1, "n_cases": 1286, "imbalance_ratio": 3.5}
        >>> values, why = auto_recipe(plan, folds=5, pretrained=False)
        >>> values["train.epochs"], values["train.ema_decay"], values["loss.name"]
        (40, 0.998, 'weighted_CE')
    """
    if pretrained:
        return {}, ["a pretrained checkpoint is given: the original fine-tuning settings are kept"]
    native = [int(v) for v in plan["target_shape"]]
    shape = (capped_shape(native, cpu_input_voxels) if cpu_input_voxels else None) or native
    voxels = math.prod(shape) * int(plan.get("in_channels", 1))
    if voxels <= 40 ** 3:
        batch, accum = 16, 1
    elif voxels <= 80 ** 3:
        batch, accum = 8, 2
    else:
        batch, accum = 4, 4
    batch_why = (f"input {'x'.join(str(v) for v in shape)} x {plan.get('in_channels', 1)} channel(s) "
                 f"(~{round(voxels ** (1 / 3))}^3 voxels): batch {batch} x {accum} accumulation "
                 f"(effective {batch * accum})")
    fitted = gpu_batch(plan, gpu_model, gpu_model_kwargs) if gpu_model else None
    if fitted is not None:
        batch, accum, batch_why = fitted
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
        "train.feature_fusion": True,
    }
    if shape != native:
        values["data.target_shape"] = shape
    why = [
        *([f"CPU: the CNN's input is the whole {'x'.join(map(str, native))} volume resized to "
           f"{'x'.join(map(str, shape))} (at most {round(cpu_input_voxels ** (1 / 3))}^3 voxels; each doubling of "
           f"the side costs ~8x the time); medvox cv's descriptors keep the native grid; --target-shape or --gpu keep "
           f"the plan's input"] if shape != native else []),
        batch_why,
        f"{n_train} training cases per fold -> {steps_per_epoch} optimizer steps per epoch -> {epochs} epochs "
        f"(~{TARGET_STEPS} steps), early stopping after 10 epochs",
        f"EMA decay {ema}: time constant a fifth of the {total_steps} optimizer steps",
        f"class imbalance {imbalance:g}:1 -> {loss}",
        "from scratch: ResNet-18-3D, dropout 0.2, AdamW lr 1e-3, weight decay 0.05, left-right flips, "
        "Youden threshold on validation (class weights maximising balanced accuracy for more than two classes)",
        "medvox cv: a logistic regression on shape and intensity descriptors beside the fold ensemble, mixed in "
        "at the weight with the best out-of-fold AUC (log-loss for more than two classes; 0 keeps the CNN alone)",
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
