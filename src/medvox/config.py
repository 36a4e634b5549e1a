"""One typed configuration tree: code defaults -> ``--config`` file -> CLI flags.

Every hyperparameter lives here, never as a hard-coded trainer attribute. The resolved tree is
written to the run folder as ``config.json`` and stored in every checkpoint, so a run folder alone
is enough to rebuild the model and the preprocessing.

Example:
    >>> cfg = ExperimentConfig()
    >>> cfg = apply_overrides(cfg, {"optim.lr": 1e-3, "train.epochs": 5})
    >>> cfg.optim.lr
    0.001
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvox.metrics.classification import THRESHOLD_RULES


@dataclass
class DataConfig:
    """Where the cases come from and how they are preprocessed."""

    path: str | None = None  # manifest (.csv/.tsv), MedMNIST .npz, or folder-per-class
    image_cols: list[str] = field(default_factory=lambda: ["image"])
    label_col: str = "label"
    group_col: str = "patient_id"
    fold_col: str = "fold"
    id_col: str = "id"
    cache_dir: str | None = None  # default: $MEDVOX_CACHE or ~/.cache/medvox
    target_shape: list[int] | None = None  # None: from the fingerprint plan
    target_spacing: list[float] | None = None  # None: from the fingerprint plan
    normalization: str | None = None  # "ct" | "zscore" | "minmax" | "none"; None: from the plan
    ct_window: list[float] | None = None  # [low, high] HU; None: from the plan
    folds: int = 5
    split_seed: int = 0
    skip_bad: bool = False  # drop bad cases (written to skipped_cases.json) instead of failing
    workers: int | None = None  # preprocessing processes; None: auto
    classes: list[str] = field(default_factory=list)  # the expected labels, in class order; empty: inferred
    max_volume_mb: float = 2048.0  # refuse an image whose reading needs more memory (MB, from its header)


@dataclass
class ModelConfig:
    """Which registered model, and how it is initialised."""

    name: str = "resnet50"
    dropout: float = 0.4
    pretrained_path: str | None = None
    allow_partial: bool = False  # accept a checkpoint with missing/mismatched backbone tensors
    head_lr_mult: float = 1.0  # learning-rate multiplier for newly initialised head parameters
    cosine_head: bool | None = None  # None: on for LDAM, off otherwise
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra factory arguments


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (stepped once per optimizer step)."""

    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 2e-4
    weight_decay: float = 1e-5  # not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # SGD (Nesterov)
    scheduler: str = "cosine"  # cosine | step | plateau | none
    warmup_frac: float = 0.1  # warmup length as a fraction of the epochs ...
    warmup_min_epochs: int = 3  # ... but at least this many epochs
    min_lr: float = 0.0
    step_size: int = 10  # step scheduler: epochs between decays
    gamma: float = 0.1  # step / plateau decay factor
    plateau_patience: int = 3


@dataclass
class LossConfig:
    """Classification loss; LDAM follows Cao et al. (2019) with deferred re-weighting."""

    name: str = "LDAM"  # CE | weighted_CE | focal | LDAM
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start: float = 0.8  # fraction of the epochs after which class-balanced weights switch on
    drw_beta: float = 0.9999


@dataclass
class AugmentConfig:
    """Batched on-device augmentation (one fused affine resample per batch)."""

    enabled: bool = True
    prob: float = 0.6  # per-sample probability of the affine transform
    rotate_deg: float = 11.5
    zoom: float = 0.08
    translate: float = 0.08  # fraction of the image size
    flip_axes: list[int] = field(default_factory=list)  # spatial axes (0=D, 1=H, 2=W) to flip at random
    flip_prob: float = 0.5
    intensity_prob: float = 0.0  # gamma / contrast / noise jitter
    gamma: float = 0.2
    contrast: float = 0.1
    noise_std: float = 0.02
    mixup: float = 0.0  # Beta(a, a) parameter of mixup (samples and labels mixed in pairs); 0 disables


@dataclass
class TrainConfig:
    """The loop: epochs, batches, precision, devices, checkpoints."""

    recipe: str = "original"  # original | auto (see medvox.recipe): auto fills what is not set from the plan
    recipe_applied: bool = False  # set by medvox.recipe.apply_recipe: the settings here already hold the recipe's
    # --recipe auto: minutes for the whole cross-validation on this machine, measured (medvox.engine.budget);
    # None: 120 on a CPU, no budget on a GPU; 0: no budget (the recipe's own length, nothing measured)
    time_budget_min: float | None = None
    fold: int = 0
    epochs: int = 60
    batch_size: int = 6
    grad_accum: int = 2
    grad_clip: float = 0.5  # 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    ema_debias: bool = True  # bias-corrected EMA: a true weighted mean from the first step (see engine/ema.py)
    early_stopping: int = 7  # patience in epochs; 0 disables
    monitor: str = "auc"  # validation metric that picks best.pt / best_ema.pt
    # the fold's final weights: "ema" (best_ema.pt; best.pt when EMA is off), "raw" (best.pt), or "best"
    # (whichever of the two scored better on validation by the monitored metric)
    final_weights: str = "ema"
    threshold_rule: str = "youden"  # decision threshold (K > 2: class weights) chosen on validation/OOF data (youden | f1 | accuracy)
    feature_fusion: bool = False  # medvox cv: fuse a descriptor model with the fold ensemble, weight chosen on OOF
    feature_grid: str = "native"  # descriptors on the plan's own grid ("native") or the CNN's input ("input")
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: mixed precision with --amp, else fp32)
    # --amp: bf16 on a GPU that has it (else fp16 + scaler); on a CPU bf16 only where it is native, else fp32
    amp: bool = False
    gpu: bool = False
    multi_gpu: bool = False
    devices: int | None = None  # processes (DDP when > 1); None: 1, or every visible GPU with multi_gpu
    # nodes of a multi-node DDP run, each running `devices` processes; under torchrun / srun both are read from
    # the launcher when left at their defaults (see engine/distributed.py)
    num_nodes: int = 1
    seed: int = 42
    deterministic: bool = False
    resume: bool = False
    output: str = "results"
    run_name: str | None = None  # default: the model name
    # where the hyperparameters and per-epoch metrics go besides log.csv: tensorboard (tensorboard/ in the fold
    # folder) | csv (log.csv alone) | mlflow | wandb (extras medvox[mlflow] / medvox[wandb]; see engine/trackers.py)
    logger: str = "tensorboard"
    plots: str = "all"  # all | best_last | final: per-epoch confusion/ROC images to keep ("final": none, curves at the end)
    keep_last: bool = True  # keep last.pt (the last epoch's weights) once the fold has finished; false deletes it
    # a finished fold's last.pt drops the optimizer / schedule / scaler / RNG / EMA state it needs only for
    # --resume (a ResNet-10's 220 MB -> its 55 MB of weights); true keeps all of it
    keep_resume_state: bool = False
    safetensors: bool = False  # also write best.pt / best_ema.pt's weights as best*.safetensors (no pickle)
    channels_last: bool = True
    compile: bool = False
    threads: int | None = None


@dataclass
class ExperimentConfig:
    """Every setting of an experiment: ``data``, ``model``, ``optim``, ``loss``, ``augment``, ``train``.

    Example:
        >>> cfg = ExperimentConfig(data=DataConfig(path="data.npz", folds=3), train=TrainConfig(recipe="auto"))
        >>> cfg.model.name, cfg.train.recipe, cfg.train.recipe_applied
        ('resnet50', 'auto', False)
        >>> apply_overrides(cfg, {"train.epochs": 12}).train.epochs
        12
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """An unknown key, a value that does not parse to the field's type, or one outside its valid range."""


# The enumerated settings, one place for all: the CLI's ``choices=`` and the modules' own membership checks
# (threshold rules, feature grids, losses, schedulers, precisions) read them from here, and :func:`validate`
# refuses anything else before any data is read.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.normalization": ("ct", "zscore", "minmax", "none"),
    "optim.optimizer": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("cosine", "step", "plateau", "none"),
    "loss.name": ("CE", "weighted_CE", "focal", "LDAM"),
    "train.recipe": ("original", "auto"),
    "train.monitor": ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision",
                      "loss"),
    "train.threshold_rule": THRESHOLD_RULES,
    "train.feature_grid": ("native", "input"),
    "train.final_weights": ("ema", "raw", "best"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.plots": ("all", "best_last", "final"),
    "train.logger": ("tensorboard", "csv", "mlflow", "wandb"),
}

# (low, high, low_open, high_open): the range of each numeric setting; None = unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.folds": (2, None, False, False),
    "data.workers": (1, None, False, False),
    "data.max_volume_mb": (0, None, True, False),
    "model.dropout": (0, 1, False, True),
    "model.head_lr_mult": (0, None, True, False),
    "optim.lr": (0, None, True, False),
    "optim.weight_decay": (0, None, False, False),
    "optim.eps": (0, None, True, False),
    "optim.momentum": (0, 1, False, True),
    "optim.warmup_frac": (0, 1, False, False),
    "optim.warmup_min_epochs": (0, None, False, False),
    "optim.min_lr": (0, None, False, False),
    "optim.step_size": (1, None, False, False),
    "optim.gamma": (0, 1, True, False),
    "optim.plateau_patience": (0, None, False, False),
    "loss.label_smoothing": (0, 1, False, True),
    "loss.focal_gamma": (0, None, False, False),
    "loss.ldam_max_margin": (0, None, True, False),
    "loss.ldam_scale": (0, None, True, False),
    "loss.drw_start": (0, 1, False, False),
    "loss.drw_beta": (0, 1, False, True),
    "augment.prob": (0, 1, False, False),
    "augment.rotate_deg": (0, 180, False, False),
    "augment.zoom": (0, 1, False, True),
    "augment.translate": (0, 1, False, False),
    "augment.flip_prob": (0, 1, False, False),
    "augment.intensity_prob": (0, 1, False, False),
    "augment.gamma": (0, 1, False, True),
    "augment.contrast": (0, 1, False, True),
    "augment.noise_std": (0, None, False, False),
    "augment.mixup": (0, None, False, False),
    "train.fold": (0, None, False, False),
    "train.epochs": (1, None, False, False),
    "train.batch_size": (1, None, False, False),
    "train.grad_accum": (1, None, False, False),
    "train.grad_clip": (0, None, False, False),
    "train.ema_decay": (0, 1, False, True),
    "train.early_stopping": (0, None, False, False),
    "train.devices": (1, None, False, False),
    "train.num_nodes": (1, None, False, False),
    "train.time_budget_min": (0, None, False, False),
    "train.threads": (1, None, False, False),
}


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def config_problems(cfg: ExperimentConfig) -> list[str]:
    """Every setting of ``cfg`` outside its choices or range, one line each naming the key and the fix.

    Example:
        >>> config_problems(ExperimentConfig())
        []
        >>> bad = ExperimentConfig()
        >>> bad.train.plots = "best"
        >>> bad.augment.prob = 1.5
        >>> for line in config_problems(bad):
        ...     print(line)
        augment.prob = 1.5: must be in [0, 1]
        train.plots = 'best': not one of all, best_last, final (did you mean 'best_last'?)
    """
    import difflib

    values = _flatten(cfg)
    problems = []
    for key in sorted(set(CHOICES) | set(_RANGES)):
        value = values[key]
        if value is None:  # optional settings: None means "from the plan" / "auto"
            continue
        if key in CHOICES:
            if value not in CHOICES[key]:
                close = difflib.get_close_matches(str(value), CHOICES[key], n=1, cutoff=0.5)
                close = close or _same_but_case(str(value), CHOICES[key])
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key} = {value!r}: not one of {', '.join(CHOICES[key])}{hint}")
            continue
        low, high, low_open, high_open = _RANGES[key]
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or value != value:  # value != value: NaN
            problems.append(f"{key} = {value!r}: must be {_range_text(low, high, low_open, high_open)}")
    d = cfg.data
    if d.folds >= 2 and not 0 <= cfg.train.fold < d.folds:
        problems.append(f"train.fold = {cfg.train.fold}: must be in 0..{d.folds - 1} for data.folds = {d.folds}")
    for key, vec, kind in (("data.target_shape", d.target_shape, int), ("data.target_spacing", d.target_spacing, float)):
        if vec is not None and (len(vec) != 3 or any(not v > 0 for v in vec)):
            problems.append(f"{key} = {vec}: give three positive {kind.__name__}s (D H W)")
    if any(not c.strip() for c in d.classes) or len({c.strip() for c in d.classes}) != len(d.classes):
        problems.append(f"data.classes = {d.classes}: give distinct, non-empty class names")
    if d.classes and len(d.classes) < 2:
        problems.append(f"data.classes = {d.classes}: a classifier needs at least two classes")
    if d.ct_window is not None and (len(d.ct_window) != 2 or not d.ct_window[0] < d.ct_window[1]):
        problems.append(f"data.ct_window = {d.ct_window}: give [low, high] in HU with low < high")
    if len(cfg.optim.betas) != 2 or any(not 0 <= b < 1 for b in cfg.optim.betas):
        problems.append(f"optim.betas = {cfg.optim.betas}: give two values in [0, 1)")
    axes = cfg.augment.flip_axes
    if len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
        problems.append(f"augment.flip_axes = {axes}: distinct spatial axes among 0, 1, 2 (0=D, 1=H, 2=W)")
    return problems


def _same_but_case(value: str, choices: tuple[str, ...]) -> list[str]:
    return [c for c in choices if c.lower() == value.lower()]


def _canonical_choices(cfg: ExperimentConfig) -> ExperimentConfig:
    """Spell an enumerated setting given in another case the canonical way (``Adam`` -> ``adam``,
    ``ldam`` -> ``LDAM``), in place: config files written for the modules' old case-insensitive reading
    keep working, and ``config.json`` holds one spelling."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        node = getattr(cfg, section)
        value = getattr(node, name)
        if isinstance(value, str) and value not in choices:
            same = _same_but_case(value, choices)
            if len(same) == 1:
                setattr(node, name, same[0])
    return cfg


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Return ``cfg`` unchanged, or raise :class:`ConfigError` listing every setting outside its choices or
    range (see :func:`config_problems`). Called by :func:`resolve` / :func:`apply_overrides` and at the start
    of training, so a typo fails before any data is read."""
    problems = config_problems(cfg)
    if problems:
        n = len(problems)
        raise ConfigError(f"{n} invalid setting{'s' if n > 1 else ''}:\n  " + "\n  ".join(problems))
    return cfg


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-safe Python types."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_keys(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted key: value}`` (``model.kwargs`` stays one value).

    Example:
        >>> flat_keys({"train": {"epochs": 3}, "model": {"kwargs": {"a": 1}}})
        {'train.epochs': 3, 'model.kwargs': {'a': 1}}
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(data: dict[str, Any], cls: type = ExperimentConfig, _where: str = "") -> Any:
    """Build a (nested) dataclass from a dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join((_where + k) for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, f"{_where}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{_where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from exc
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Return a copy with dotted-key overrides applied (``{"optim.lr": 1e-3}``)."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node[parts[-1]] = value
    return validate(_canonical_choices(from_dict(data)))


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file as a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def merge_dict(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = merge_dict(out[key], value)
        else:
            out[key] = value
    return out


def resolve(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Code defaults -> config file -> overrides (dotted keys)."""
    data = to_dict(ExperimentConfig())
    if config_file:
        data = merge_dict(data, load_file(config_file))
    return apply_overrides(from_dict(data), overrides or {})


def to_yaml(cfg: ExperimentConfig, title: str | None = None) -> str:
    """The whole config as YAML, in the sections' field order; :func:`load_file` / :func:`resolve` read it back
    to an equal config. ``title``: a comment line on top.

    Example:
        >>> import yaml
        >>> from_dict(yaml.safe_load(to_yaml(ExperimentConfig()))) == ExperimentConfig()
        True
    """
    import yaml

    head = f"# {title}\n" if title else ""
    return head + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def save(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
