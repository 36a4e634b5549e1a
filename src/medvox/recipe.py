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
* EMA: bias-corrected, time constant a fifth of the optimizer steps that will run (0.998 for 2,600 steps;
  :func:`ema_decay_for_steps`): counted with the user's epochs, batch, accumulation and processes where
  given, so ``--epochs 12`` gets the decay of its own, shorter run;
* final weights: whichever of the raw and the EMA weights scored better on validation by the monitored
  metric (``train.final_weights = "best"``; the original recipe keeps the EMA weights);
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

The recipe and the reason for every choice are logged on the ``medvox`` logger; the settings it chose are in
the resolved config (``config.json``), which records ``train.recipe_applied``. :func:`apply_recipe` applies it:
``medvox.engine.train`` and ``medvox.cv.crossval.cross_validate`` call it themselves, so a config built in
Python trains what the command line trains.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from medvox.config import flat_keys

log = logging.getLogger("medvox")

RECIPES = ("original", "auto")
TARGET_STEPS = 2600
EFFECTIVE_BATCH = 16
CPU_INPUT_VOXELS = 28 ** 3  # 5 folds of the recipe in ~100 min on a 2-core CPU (benchmarks/accuracy.md)
FIXED_INPUT_MODELS = ("swin_unetr",)  # inputs must be multiples of 32: the CPU cap leaves them alone
MIN_SIDE = 16  # a capped axis keeps at least this many voxels (or all it has)
# EMA decay bounds: a time constant of at least 10 steps (an average over fewer is hardly one) and at most
# 10,000 (a fifth of 50,000 steps, beyond any run of this recipe)
EMA_DECAY_RANGE = (0.9, 0.9999)
# the settings the number of optimizer steps depends on, besides the plan: a user's value of any of them
# changes the steps that run, and with them the recipe's EMA decay
STEP_KEYS = ("train.epochs", "train.batch_size", "train.grad_accum")


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


def ema_decay_for_steps(total_steps: int) -> float:
    """The EMA decay whose time constant ``1 / (1 - decay)`` is a fifth of ``total_steps`` optimizer steps,
    rounded down to 4 digits and kept in :data:`EMA_DECAY_RANGE`.

    Example:
        >>> ema_decay_for_steps(2600), ema_decay_for_steps(600), ema_decay_for_steps(100)
        (0.998, 0.9916, 0.95)
    """
    low, high = EMA_DECAY_RANGE
    decay = math.floor((1 - 1 / (0.2 * max(1, total_steps))) * 1e4 + 1e-9) / 1e4
    return min(high, max(low, decay))


def optimizer_steps(n_train: int, batch: int, accum: int, epochs: int, processes: int = 1) -> int:
    """The optimizer steps of ``epochs`` epochs over ``n_train`` cases, counted as the trainer counts them: each
    of ``processes`` DDP ranks reads ``ceil(n_train / processes)`` cases (the shard is padded) in batches of
    ``batch``, dropping a smaller last batch when the shard holds more than one batch
    (:class:`~medvox.data.loader.ArrayLoader`), and steps every ``accum`` batches, the last ones included.

    Example:
        >>> optimizer_steps(1028, 16, 1, 40), optimizer_steps(1028, 8, 2, 40), optimizer_steps(10, 16, 1, 3)
        (2560, 2560, 3)
    """
    processes = max(1, processes)
    shard = math.ceil(n_train / processes)
    full = shard // batch
    batches = full if (n_train // processes > batch and full > 0) else math.ceil(shard / batch)
    return max(1, epochs * math.ceil(max(1, batches) / accum))


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
    # where the deepest map is one voxel (a micro-batch of 1 crashes there)
    batch, accum = fit_batch(per_sample, fixed, free, smallest=min(PROBE_BATCHES))
    over = fixed + batch * per_sample > 0.8 * free
    why = (f"GPU: {per_sample / 2**20:.0f} MiB per sample + {fixed / 2**20:.0f} MiB fixed in a bf16 step, "
           f"{free / 2**30:.1f} GiB free -> batch {batch} x {accum} accumulation"
           + (" (above the 80 % headroom: the smallest batch BatchNorm trains with; it trained in the probe)"
              if over else ""))
    return batch, accum, why


def auto_recipe(plan: dict[str, Any], folds: int, pretrained: bool, gpu_model: str | None = None,
                gpu_model_kwargs: dict | None = None, cpu_input_voxels: int | None = None,
                given: dict[str, Any] | None = None, processes: int = 1) -> tuple[dict[str, Any], list[str]]:
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
        given: the user's own values of :data:`STEP_KEYS` (epochs, batch, accumulation): they win over the
            recipe's (the caller drops the recipe's values of every key the user set), so the EMA decay is
            computed from the optimizer steps they make.
        processes: DDP processes (each reads a shard of the training cases).

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
    # the EMA's time constant follows the steps that will run: the user's epochs / batch / accumulation win
    mine = {"train.epochs": epochs, "train.batch_size": batch, "train.grad_accum": accum}
    users = {k: v for k, v in (given or {}).items() if k in mine and v is not None}
    run = {**mine, **users}
    total_steps = optimizer_steps(n_train, run["train.batch_size"], run["train.grad_accum"], run["train.epochs"],
                                  processes)
    ema = ema_decay_for_steps(total_steps)
    imbalance = float(plan.get("imbalance_ratio", 1.0))
    loss = "weighted_CE" if imbalance >= 1.5 else "CE"
    values = {
        "model.name": "resnet18", "model.dropout": 0.2,
        "train.batch_size": batch, "train.grad_accum": accum, "train.epochs": epochs, "train.early_stopping": 10,
        "train.ema_decay": ema, "optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05,
        "loss.name": loss, "augment.flip_axes": [2], "train.threshold_rule": "youden",
        "train.feature_fusion": True, "train.final_weights": "best",
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
        f"EMA decay {ema}: time constant a fifth of the {total_steps} optimizer steps that run "
        f"({run['train.epochs']} epochs x {total_steps // run['train.epochs']})"
        + (f" with your {', '.join(f'{k} {v}' for k, v in sorted(users.items()))}" if users else ""),
        "final weights: the better of the raw and the EMA weights on validation",
        f"class imbalance {imbalance:g}:1 -> {loss}",
        "from scratch: ResNet-18-3D, dropout 0.2, AdamW lr 1e-3, weight decay 0.05, left-right flips, "
        "Youden threshold on validation (class weights maximising balanced accuracy for more than two classes)",
        "medvox cv: a logistic regression on shape and intensity descriptors beside the fold ensemble, mixed in "
        "at the weight with the best out-of-fold AUC (log-loss for more than two classes; 0 keeps the CNN alone)",
    ]
    return values, why


def explicit_keys(file_data: dict[str, Any] | None, overrides: dict[str, Any]) -> set[str]:
    """Dotted keys the user set: in the config file (nested) or as flags / ``--set``."""
    return set(overrides) | set(flat_keys(file_data or {}))


def changed_keys(cfg) -> set[str]:
    """Dotted keys whose value in ``cfg`` differs from the code default: what a config built in Python set.

    Example:
        >>> from medvox.config import ExperimentConfig, TrainConfig
        >>> sorted(changed_keys(ExperimentConfig(train=TrainConfig(recipe="auto", epochs=12))))
        ['train.epochs', 'train.recipe']
    """
    from medvox.config import ExperimentConfig, to_dict

    now, default = flat_keys(to_dict(cfg)), flat_keys(to_dict(ExperimentConfig()))
    return {key for key, value in now.items() if default.get(key) != value}


def apply_recipe(cfg, given: set[str] | None = None):
    """``cfg`` with its recipe applied: for ``train.recipe = "auto"``, the plan's choice of every setting in
    :func:`auto_recipe` that the user did not give, and ``train.recipe_applied = True``.

    The recipe is applied once: a config that records ``train.recipe_applied`` (or uses the original recipe)
    is returned as it is, so ``cross_validate`` applies it and its folds' ``train`` calls do not again, and a
    run's ``config.json`` trains the same again.

    Args:
        cfg: the resolved :class:`~medvox.config.ExperimentConfig`.
        given: the dotted keys the user set (the command line passes its config file's keys and flags,
            :func:`explicit_keys`); ``None``: the keys whose value differs from the code default
            (:func:`changed_keys`), which is what a config built in Python can tell. A setting given at its
            default value is only seen as given through ``given``.

    Example:
        >>> from medvox.config import ExperimentConfig, TrainConfig
        >>> cfg = apply_recipe(ExperimentConfig())  # the original recipe: nothing to apply
        >>> cfg.train.recipe, cfg.train.recipe_applied
        ('original', False)
    """
    from medvox.config import apply_overrides, validate

    tc = cfg.train
    if tc.recipe != "auto" or tc.recipe_applied or not cfg.data.path:
        return cfg  # without data, train() reports the missing data with its fix
    validate(cfg)  # the plan reads the data: a bad setting fails first
    given = changed_keys(cfg) if given is None else set(given)
    from medvox.data import plan_dataset

    plan = plan_dataset(cfg.data)  # no volume is preprocessed here: the recipe may change the input grid
    gpu_model = None
    if tc.gpu or tc.multi_gpu:  # the micro-batch is fitted to the GPU's memory for the model trained
        gpu_model = cfg.model.name if "model.name" in given else "resnet18"
    # on a CPU the CNN's input is made coarser, unless the user chose the grid or the model needs its own
    cap_input = (gpu_model is None and not {"data.target_shape", "data.target_spacing"} & given
                 and cfg.model.name not in FIXED_INPUT_MODELS)
    processes = tc.devices or 1
    if tc.devices is None and tc.multi_gpu:  # make_fabric's count: every visible GPU
        import torch

        processes = max(1, torch.cuda.device_count())
    processes *= tc.num_nodes  # every node runs that many: the global batch, and so the steps, scale with both
    values = {"train.epochs": tc.epochs, "train.batch_size": tc.batch_size, "train.grad_accum": tc.grad_accum}
    chosen, why = auto_recipe(plan, cfg.data.folds, pretrained=bool(cfg.model.pretrained_path), gpu_model=gpu_model,
                              gpu_model_kwargs=cfg.model.kwargs if "model.kwargs" in given else None,
                              cpu_input_voxels=CPU_INPUT_VOXELS if cap_input else None,
                              given={k: v for k, v in values.items() if k in given}, processes=processes)
    log.info("--recipe auto: %s", "; ".join(why))
    kept = sorted(set(chosen) & given)
    if kept:
        log.info("--recipe auto: your settings win for %s", ", ".join(kept))
    return apply_overrides(cfg, {**{k: v for k, v in chosen.items() if k not in given}, "train.recipe_applied": True})
