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
    fold: int = 0
    epochs: int = 60
    batch_size: int = 6
    grad_accum: int = 2
    grad_clip: float = 0.5  # 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    ema_debias: bool = True  # bias-corrected EMA: a true weighted mean from the first step (see engine/ema.py)
    early_stopping: int = 7  # patience in epochs; 0 disables
    monitor: str = "auc"  # validation metric that picks best.pt / best_ema.pt
    threshold_rule: str = "youden"  # binary: decision threshold chosen on validation/OOF data (youden | f1 | accuracy)
    feature_fusion: bool = False  # medvox cv: fuse a descriptor model with the fold ensemble, weight chosen on OOF
    feature_grid: str = "native"  # descriptors on the plan's own grid ("native") or the CNN's input ("input")
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: mixed precision with --amp, else fp32)
    amp: bool = False
    gpu: bool = False
    multi_gpu: bool = False
    devices: int | None = None  # processes (DDP when > 1); None: 1, or every visible GPU with multi_gpu
    seed: int = 42
    deterministic: bool = False
    resume: bool = False
    output: str = "results"
    run_name: str | None = None  # default: the model name
    plots: str = "all"  # all | best_last | final: per-epoch confusion/ROC images to keep ("final": none, curves at the end)
    keep_last: bool = True  # keep last.pt (optimizer + EMA state) once the fold has finished
    channels_last: bool = True
    compile: bool = False
    threads: int | None = None


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """An unknown key or a value that does not parse to the field's type."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-safe Python types."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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
    return from_dict(data)


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
    cfg = from_dict(data)
    return apply_overrides(cfg, overrides or {})


def save(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
