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
  stopping after 10 epochs without improvement; fewer epochs (not below 10), and if need be a coarser input,
  when the whole cross-validation would not fit ``train.time_budget_min`` on this machine (default 120 minutes
  on a CPU, none on a GPU): the model's throughput is measured here, in seconds (:func:`_fit_time_budget`,
  :mod:`medvox.engine.probe`, :mod:`medvox.engine.budget`), and the forecast is logged;
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
    from medvox.engine.budget import train_batches

    return max(1, epochs * math.ceil(train_batches(n_train, batch, processes) / accum))


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
                given: dict[str, Any] | None = None, processes: int = 1, max_epochs: int | None = None,
                input_reason: str = "CPU") -> tuple[dict[str, Any], list[str]]:
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
        max_epochs: the time budget's number of epochs, when fewer than the recipe's own
            (:func:`medvox.engine.budget.choose_schedule`); the EMA decay follows it.
        input_reason: why the input is capped at ``cpu_input_voxels`` ("CPU", or "time budget" when the budget
            chose a coarser input), for the reason's line.

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
    own_epochs = int(min(100, max(20, round(TARGET_STEPS / steps_per_epoch))))
    epochs = min(own_epochs, max_epochs) if max_epochs else own_epochs
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
        *([f"{input_reason}: the CNN's input is the whole {'x'.join(map(str, native))} volume resized to "
           f"{'x'.join(map(str, shape))} (at most {round(cpu_input_voxels ** (1 / 3))}^3 voxels; each doubling of "
           f"the side costs ~8x the time); medvox cv's descriptors keep the native grid; --target-shape or --gpu keep "
           f"the plan's input"] if shape != native else []),
        batch_why,
        f"{n_train} training cases per fold -> {steps_per_epoch} optimizer steps per epoch -> "
        + (f"{epochs} epochs (~{TARGET_STEPS} steps)" if epochs == own_epochs else
           f"{epochs} epochs to fit the time budget (the recipe's own: {own_epochs}, ~{TARGET_STEPS} steps)")
        + ", early stopping after 10 epochs",
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

    def recipe(voxels: int | None = CPU_INPUT_VOXELS if cap_input else None, max_epochs: int | None = None,
               reason: str = "CPU"):
        return auto_recipe(plan, cfg.data.folds, pretrained=bool(cfg.model.pretrained_path), gpu_model=gpu_model,
                           gpu_model_kwargs=cfg.model.kwargs if "model.kwargs" in given else None,
                           cpu_input_voxels=voxels, given={k: v for k, v in values.items() if k in given},
                           processes=processes, max_epochs=max_epochs, input_reason=reason)

    chosen, why = recipe()
    chosen, why, forecast_lines, forecast = _fit_time_budget(cfg, given, plan, chosen, why, recipe, processes)
    log.info("--recipe auto: %s", "; ".join(why))
    for level, line in forecast_lines:
        log.log(level, "--recipe auto: %s", line)
    kept = sorted(set(chosen) & given)
    if kept:
        log.info("--recipe auto: your settings win for %s", ", ".join(kept))
    out = apply_overrides(cfg, {**{k: v for k, v in chosen.items() if k not in given}, "train.recipe_applied": True})
    if forecast is not None:
        from medvox.engine.timing import remember

        remember(out, forecast)
    return out


def _shape_text(shape: list[int]) -> str:
    """``28^3`` for a cube, ``40x40x16`` otherwise."""
    return f"{shape[0]}^3" if len(set(shape)) == 1 and len(shape) == 3 else "x".join(map(str, shape))


def _n_test(cfg) -> int:
    """The held-out test cases of the data (scored by every fold's model in medvox cv's test ensemble)."""
    from medvox.data import load_source

    try:
        return sum(1 for c in load_source(cfg.data).cases if c.subset == "test")
    except Exception:  # noqa: BLE001 - the plan has read this source already; a count is not worth failing on
        return 0


def _fit_time_budget(cfg, given: set[str], plan: dict[str, Any], chosen: dict[str, Any], why: list[str], recipe,
                     processes: int):
    """The recipe fitted to ``train.time_budget_min`` on this machine: ``(values, reasons, forecast lines,
    forecast)``.

    Measures the throughput of the model, input, micro-batch, precision and threads that will run
    (:func:`medvox.engine.probe.measure_throughput`, kept per machine by
    :func:`~medvox.engine.probe.cached_throughput`) and picks the most epochs, up to the recipe's own, with which
    the whole cross-validation fits the budget; when even :data:`~medvox.engine.budget.MIN_EPOCHS` do not fit and
    the input is the recipe's to choose, the first coarser input of :data:`~medvox.engine.budget.INPUT_SIDES`
    where they do (:func:`~medvox.engine.budget.choose_schedule`). The user's epochs and input win: then the
    forecast is only given. Mixed precision that measures slower than fp32 on a CPU (``--amp`` where bf16 is
    native but slow for this model) is replaced by fp32. No budget (a GPU without ``--time-budget``): no
    measurement, the recipe as it is.
    """
    import torch

    from medvox.config import apply_overrides, to_dict
    from medvox.data.cache import cache_root
    from medvox.engine import budget
    from medvox.engine.probe import cached_throughput, measure_throughput
    from medvox.engine.setup import choose_precision, compute_threads, precision_name
    from medvox.machine import cpu_bf16_native, cpu_capability, cpu_name

    tc = cfg.train
    on_gpu = (tc.gpu or tc.multi_gpu) and torch.cuda.is_available()
    minutes = tc.time_budget_min if tc.time_budget_min is not None else (None if on_gpu else
                                                                         budget.DEFAULT_CPU_BUDGET_MIN)
    if not minutes:  # 0: no budget, the recipe's own length on every machine
        return chosen, why, [], None
    accelerator = "cuda" if on_gpu else "cpu"
    native = [int(v) for v in plan["target_shape"]]
    runs = {0: apply_overrides(cfg, {k: v for k, v in chosen.items() if k not in given})}
    first = [int(v) for v in (runs[0].data.target_shape or native)]
    candidates, sides = [first], [None]
    input_free = not {"data.target_shape", "data.target_spacing"} & given and runs[0].model.name not in FIXED_INPUT_MODELS
    if input_free and chosen:
        for side in budget.INPUT_SIDES:
            shape = capped_shape(native, side ** 3)
            if shape is not None and math.prod(shape) < math.prod(candidates[-1]):
                candidates.append(shape)
                sides.append(side)

    def run_cfg(i: int):
        if i not in runs:
            values = recipe(voxels=sides[i] ** 3, reason="time budget")[0]
            runs[i] = apply_overrides(cfg, {k: v for k, v in values.items() if k not in given})
        return runs[i]

    per_node = max(1, processes // max(1, tc.num_nodes))
    share = compute_threads(None, per_node)
    threads = min(tc.threads, share) if tc.threads else share
    n_cases, folds = int(plan["n_cases"]), cfg.data.folds
    n_train = max(1, n_cases * max(folds - 1, 1) // max(folds, 1))
    n_test = _n_test(cfg)
    precision_now = {"value": choose_precision(runs[0].train, accelerator).precision}
    cached: dict[tuple[int, str], bool] = {}  # (candidate, precision) -> the measurement came from the cache

    def settings(i: int, precision: str) -> dict[str, Any]:
        rc = run_cfg(i)
        return {"model_name": rc.model.name, "model_kwargs": dict(rc.model.kwargs), "shape": list(candidates[i]),
                "channels": int(plan.get("in_channels", 1)), "num_classes": max(2, len(plan.get("classes", [])) or 2),
                "batch": int(rc.train.batch_size), "precision": precision, "threads": int(threads),
                "accelerator": accelerator, "augment": to_dict(rc.augment), "ema": rc.train.ema_decay > 0,
                "plots": rc.train.plots != "final", "channels_last": bool(rc.train.channels_last and on_gpu)}

    def measure_with(i: int, precision: str):
        from medvox.config import AugmentConfig

        s = settings(i, precision)
        tp, hit = cached_throughput(cache_root(cfg.data), s, lambda: measure_throughput(
            **{**s, "augment": AugmentConfig(**s["augment"])}, workdir=tc.output))
        cached[(i, precision)] = hit
        return tp

    lines: list[tuple[int, str]] = []
    extra: dict[str, Any] = {}

    def measure(i: int):
        tp = measure_with(i, precision_now["value"])
        if (i == 0 and accelerator == "cpu" and precision_now["value"] == "bf16-mixed"
                and "train.precision" not in given):
            fp32 = measure_with(0, "32-true")  # --amp on a CPU: never a precision slower than fp32
            if fp32.train > tp.train:
                precision_now["value"], extra["train.precision"] = "32-true", "fp32"
                lines.append((logging.INFO, f"precision: fp32, measured faster than bf16 for this model on this CPU "
                                            f"({fp32.train:.1f} vs {tp.train:.1f} samples/s)"))
                tp = fp32
        return tp

    def workload(i: int):
        rc = run_cfg(i)
        return budget.Workload(folds=folds, n_train=n_train, n_val=n_cases - n_train, n_test=n_test,
                               batch=int(rc.train.batch_size), processes=processes, ema=rc.train.ema_decay > 0)

    user_epochs = cfg.train.epochs if ("train.epochs" in given or "train.epochs" not in chosen) else None
    most = int(chosen.get("train.epochs", cfg.train.epochs))
    plan_s = budget.choose_schedule(minutes * 60, candidates, measure, workload, most=most, user_epochs=user_epochs)
    tp, fc = plan_s.throughput, plan_s.forecast
    if plan_s.chosen and (plan_s.index or plan_s.epochs != most):
        coarser = {"voxels": sides[plan_s.index] ** 3, "reason": "time budget"} if plan_s.index else {}
        chosen, why = recipe(**coarser, max_epochs=plan_s.epochs)
    chosen = {**chosen, **extra}
    precision = precision_name(tp.precision)
    if accelerator == "cpu":
        where = (f"this CPU ({cpu_name()}, {cpu_capability()}, bf16 {'native' if cpu_bf16_native() else 'emulated'}; "
                 f"{threads} thread{'s' if threads != 1 else ''}, {precision}")
    else:
        where = f"this GPU ({tp.device}, {precision}"
    hit = cached.get((plan_s.index, tp.precision), False)
    measured = f"{tp.train:.1f} samples/s {'measured earlier, kept in the cache' if hit else 'measured'}"
    headline = (f"{folds} folds ~ {fc.total_s / 60:.0f} min on {where}; {measured}): {plan_s.epochs} epochs at "
                f"{_shape_text(plan_s.shape)}")
    budget_text = f"the {minutes:g} min time budget"
    if user_epochs is not None:
        whose = "your --epochs" if "train.epochs" in given else "the original fine-tuning settings' epochs"
        over = "" if plan_s.fits else f", over {budget_text}: give fewer --epochs or a larger --time-budget"
        lines.append((logging.INFO if plan_s.fits else logging.WARNING,
                      f"{whose} win over {budget_text}: {headline}{over}"))
    elif not plan_s.fits:
        lines.append((logging.WARNING, f"{headline}: over {budget_text} even with the shortest useful schedule "
                                       f"({plan_s.epochs} epochs) at the fastest input measured; give a larger "
                                       "--time-budget, fewer --folds, a smaller --model or a GPU"))
    else:
        lines.append((logging.INFO, f"{headline} (within {budget_text}; early stopping can end folds sooner)"))
    why = [*why, f"time budget {minutes:g} min for the whole cv ({folds} folds, {fc.epoch_s:.1f} s per epoch, "
                 f"test ensemble with TTA): {plan_s.epochs} epochs at {_shape_text(plan_s.shape)}"]
    return chosen, why, lines, fc
