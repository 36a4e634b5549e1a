"""The training engine: ``train(cfg)`` trains one fold (see ``trainer.FoldTrainer``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from medvox.config import ConfigError, ExperimentConfig, validate
from medvox.errors import CheckpointError, DataError

log = logging.getLogger("medvox")


def _setup_logging(run_dir: Path | None, is_zero: bool) -> None:
    log.setLevel(logging.INFO if is_zero else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_medvox", False):
            log.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_zero:
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        h._medvox = True
        log.addHandler(h)


def _finished(run_dir: Path) -> dict | None:
    """The metrics of a fold that ran to its end (with a final evaluation), else None."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return doc if "final" in doc else None


def _check_model_and_weights(cfg: ExperimentConfig) -> None:
    """The model name, its arguments and the pretrained file, checked before the data is read (a first
    ``prepare`` of a large dataset takes minutes; a typo should not wait for it)."""
    from medvox.models import check_model

    mc = cfg.model
    try:  # the arguments FoldTrainer passes (cosine_head is always given there), on a stand-in shape
        check_model(mc.name, {"in_channels": 1, "num_classes": 2, "dropout": mc.dropout, "cosine_head": True,
                              **mc.kwargs})
    except ValueError as exc:
        raise ConfigError(f"{exc}; see `medvox models`") from None
    if mc.pretrained_path and not Path(mc.pretrained_path).is_file():
        raise CheckpointError(f"--pretrained-path {mc.pretrained_path}: no such file. Weights are never downloaded: "
                              "give the local MedicalNet .pth (e.g. pretrained/medicalnet_resnet50_3d.pth), or leave "
                              "the flag out to train from scratch")


def check_resume_plan(previous: dict | None, plan: dict, run_dir: Path) -> None:
    """Refuse to resume a run whose checkpoint was trained on inputs of another preprocessing plan.

    The config can be the same while the plan is not: the data changed, or a newer medvox plans differently
    (2026-11-26: anti-aliased downsampling). The rest of the run would then see other inputs than its first
    epochs did. Nothing is written before this check.

    Raises:
        TrainingError: naming the plan keys that differ.
    """
    from medvox.errors import TrainingError

    if previous is None:  # a checkpoint from before plans were saved in it
        return
    old, new = (json.loads(json.dumps(p, sort_keys=True, default=str)) for p in (previous, plan))
    if old == new:
        return
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise TrainingError(
        f"--resume: {run_dir / 'last.pt'} was trained on inputs preprocessed with another plan (it differs in "
        f"{', '.join(differ)}: the data or medvox's planning changed since the run started); nothing was changed. "
        "Start a new run under another --output / --run-name, or resume with the medvox version and the data "
        "the run started with."
    )


def train(cfg: ExperimentConfig) -> dict:
    """Train fold ``cfg.train.fold`` and write its run folder; returns the final ``metrics.json`` content.

    Example:
        >>> from medvox.config import resolve
        >>> cfg = resolve(overrides={"data.path": "demo_data/manifest.csv", "model.name": "resnet10",
        ...                          "train.epochs": 2})
        >>> metrics = train(cfg)  # writes results/resnet10/fold_0/{best,best_ema,last}.pt, metrics.json, ...
    """
    from medvox.data import prepare
    from medvox.engine.setup import choose_precision, fold_dir, make_fabric, resume_state, seed_everything
    from medvox.engine.trainer import FoldTrainer

    if not cfg.data.path:
        raise DataError("no data given: pass --data (a manifest .csv/.tsv, a MedMNIST .npz or a folder-per-class), "
                        "set data.path in ./medvox.yaml or --config, or set MEDVOX_DATA "
                        "(try `medvox make-demo-data demo_data` and --data demo_data/manifest.csv)")
    validate(cfg)  # a config built in code skipped resolve()'s check: every choice and range, before any data
    _check_model_and_weights(cfg)
    fabric = make_fabric(cfg.train)
    fabric.launch()
    seed_everything(cfg.train.seed, cfg.train.deterministic, cfg.train.threads,
                    processes=getattr(fabric.strategy, "num_processes", 1))  # the ranks on this node share its CPUs
    _setup_logging(None, fabric.is_global_zero)
    run_dir = fold_dir(cfg)
    done = _finished(run_dir) if cfg.train.resume else None
    if done is not None:
        log.info("%s is already finished (%s); nothing to resume", run_dir, done["status"])
        return done
    state = resume_state(cfg, run_dir)  # refuses to touch an existing run before anything is written
    prepared = prepare(cfg.data, progress=fabric.is_global_zero)
    if state is not None:
        check_resume_plan(state.get("plan"), prepared.plan, run_dir)
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        from medvox.engine.checkpoint import remove_stale_temp_files

        remove_stale_temp_files(run_dir)  # half-written checkpoints of a killed run: never loaded, only deleted
    fabric.barrier()
    _setup_logging(run_dir, fabric.is_global_zero)
    if prepared.skipped:
        log.warning("--skip-bad: skipped %d bad case(s), listed with the reasons in %s", len(prepared.skipped),
                    prepared.cache_dir / "skipped_cases.json")
    precision = choose_precision(cfg.train, fabric.device.type)  # what make_fabric chose, with its reason
    if precision.warning:
        log.warning(precision.warning)
    log.info("training %s on fold %d of %d (%s, precision %s, %d process(es)) -> %s", cfg.model.name,
             cfg.train.fold, cfg.data.folds, fabric.device, fabric._precision.precision, fabric.world_size, run_dir)
    if cfg.train.amp or cfg.train.precision != "auto":  # mixed precision was asked for: say what it became
        log.info("precision: %s", precision.reason)
    try:
        trainer = FoldTrainer(cfg, fabric, prepared, run_dir)
        if state is not None:
            trainer.load_state(state)
        return trainer.fit()
    finally:  # later log lines of this process (the next fold, predict) must not land in this run's train.log
        _setup_logging(None, fabric.is_global_zero)
