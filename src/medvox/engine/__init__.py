"""The training engine: ``train(cfg)`` trains one fold (see ``trainer.FoldTrainer``)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from medvox.config import ConfigError, ExperimentConfig, flat_keys, validate
from medvox.engine.timing import current_position
from medvox.errors import CheckpointError, DataError
from medvox.logs import library_logging, train_log
from medvox.run import TRAIN_LOG, RunLock

log = logging.getLogger("medvox")


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
    """The tracker, the model name, its arguments and the pretrained file, checked before the data is read (a first
    ``prepare`` of a large dataset takes minutes; a typo should not wait for it)."""
    from medvox.engine.trackers import check_tracker
    from medvox.models import check_model

    check_tracker(cfg)  # a missing tracker extra fails here too, not after the first prepare
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


# settings that say where and how fast a fold runs, not what it learns: a finished fold trained with other
# values of these is still the same fold (fold-parallel jobs on other machines, a moved cache, more threads)
EXECUTION_KEYS = frozenset({
    "data.path", "data.cache_dir", "data.workers", "data.skip_bad", "data.max_volume_mb",
    "train.fold", "train.resume", "train.output", "train.run_name", "train.plots", "train.keep_last",
    "train.keep_resume_state", "train.safetensors", "train.threads", "train.gpu", "train.multi_gpu", "train.devices",
    "train.compile", "train.channels_last", "train.precision", "train.amp", "train.num_nodes",
    "train.feature_fusion", "train.feature_grid", "train.threshold_rule", "train.logger",
})


def check_same_settings(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse to reuse or resume a fold folder trained with other settings than ``cfg``'s.

    A finished fold is skipped and an unfinished one resumed only when its ``config.json`` equals ``cfg`` in
    every key that changes what the model learns (all but :data:`EXECUTION_KEYS`); otherwise its results
    would be reported as this command's. Nothing is written before this check.

    Raises:
        TrainingError: naming the differing keys, both values, and the fix.
    """
    from medvox.config import to_dict
    from medvox.errors import TrainingError
    from medvox.run import CONFIG, read_json

    old = read_json(run_dir / CONFIG)
    if old is None:
        return
    if not {"data", "model", "train"} <= set(old):
        raise TrainingError(f"{run_dir / CONFIG} is not a medvox config (no data / model / train sections); nothing "
                            "was changed. Write to a new run with --run-name NAME (or another --output)")
    new = json.loads(json.dumps(to_dict(cfg), default=str))
    old_flat, new_flat = flat_keys(old), flat_keys(new)
    differ = sorted(k for k in set(old_flat) | set(new_flat)
                    if k not in EXECUTION_KEYS and old_flat.get(k) != new_flat.get(k))
    if not differ:
        return
    shown = "; ".join(f"{k}: {old_flat.get(k)!r} there, {new_flat.get(k)!r} now" for k in differ[:6])
    more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
    raise TrainingError(
        f"{run_dir} was trained with other settings ({shown}{more}); nothing was changed. Its results are not "
        f"this command's: write to a new run with --run-name NAME (or another --output), or run the command "
        f"with the settings in {run_dir / CONFIG}")


def check_same_plan(run_dir: Path, plan: dict, recorded: dict | None = None) -> None:
    """Refuse a fold folder whose inputs were preprocessed with another plan than ``plan`` (other data, or a
    medvox that plans differently): its results would be reported as this data's. ``recorded``: the plan to
    compare with (a resumed checkpoint's); default the folder's ``plan.json``.

    Raises:
        TrainingError: naming the plan keys that differ.
    """
    from medvox.errors import TrainingError
    from medvox.run import PLAN, read_json

    old = read_json(run_dir / PLAN) if recorded is None else recorded
    if old is None:
        return
    old, new = (json.loads(json.dumps(p, sort_keys=True, default=str)) for p in (old, plan))
    if old == new:
        return
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise TrainingError(
        f"{run_dir} was trained on inputs preprocessed with another plan (it differs in {', '.join(differ)}: the "
        "data or its preprocessing changed); nothing was changed. Write to a new run with --run-name NAME (or "
        "another --output)")


def train(cfg: ExperimentConfig) -> dict:
    """Train fold ``cfg.train.fold`` and write its run folder; returns the final ``metrics.json`` content.

    ``train.recipe = "auto"`` is applied here (:func:`medvox.recipe.apply_recipe`) unless the config records
    that it was (``train.recipe_applied``, as the command line's and ``cross_validate``'s do). The progress is
    logged on the ``logging.getLogger("medvox")`` logger, which has no handler of its own apart from the fold's
    ``train.log``: configure logging (``logging.basicConfig(level=logging.INFO)``) to see it.

    Example:
        >>> from medvox.config import resolve
        >>> cfg = resolve(overrides={"data.path": "demo_data/manifest.csv", "model.name": "resnet10",
        ...                          "train.epochs": 2})
        >>> metrics = train(cfg)  # writes results/resnet10/fold_0/{best,best_ema,last}.pt, metrics.json, ...
    """
    with library_logging():
        return _train(cfg)


def _train(cfg: ExperimentConfig) -> dict:
    from medvox.data import prepare
    from medvox.engine.distributed import all_or_none, on_rank_zero, rank_zero_first
    from medvox.engine.setup import fold_dir, make_fabric, resume_state, seed_everything

    if not cfg.data.path:
        raise DataError("no data given: pass --data (a manifest .csv/.tsv, a MedMNIST .npz or a folder-per-class), "
                        "set data.path in ./medvox.yaml or --config, or set MEDVOX_DATA "
                        "(try `medvox make-demo-data demo_data` and --data demo_data/manifest.csv)")
    validate(cfg)  # a config built in code skipped resolve()'s check: every choice and range, before any data
    from medvox.recipe import apply_recipe
    from medvox.run import require_output_folder

    require_output_folder(cfg.train.output, "--output")  # before the recipe reads the data or anything is built

    cfg = apply_recipe(cfg)  # a no-op for the original recipe and for a config that records it was applied
    _check_model_and_weights(cfg)
    fabric = make_fabric(cfg.train)
    fabric.launch()
    seed_everything(cfg.train.seed, cfg.train.deterministic, cfg.train.threads,
                    processes=getattr(fabric.strategy, "num_processes", 1))  # the ranks on this node share its CPUs
    run_dir = fold_dir(cfg)
    RunLock(run_dir, "fold").refuse_if_held()  # another trainer on this fold: refused before any work
    # With several processes (devices x nodes), rank 0 alone reads the fold folder and decides; the others follow
    # its decision, build nothing and write nothing (engine/distributed.py): one cache build, one set of files.
    kept: dict = {}

    def decide() -> tuple[dict | None, int | None]:
        check_same_settings(run_dir, cfg)
        done = _finished(run_dir) if cfg.train.resume else None
        # refuses to touch an existing run first
        kept["state"] = resume_state(cfg, run_dir) if done is None else None
        return done, None if kept["state"] is None else int(kept["state"]["epoch"])

    done, resume_epoch = on_rank_zero(fabric, decide)
    state = all_or_none(fabric, lambda: kept["state"] if fabric.is_global_zero
                        else _resume_state_of_rank_zero(run_dir, resume_epoch, fabric.global_rank))
    # rank 0 builds (or finds) the cache first; the others then find it built, on a shared file system
    prepared = rank_zero_first(fabric, lambda: prepare(cfg.data, progress=fabric.is_global_zero))
    on_rank_zero(fabric, lambda: check_same_plan(run_dir, prepared.plan))
    if state is not None:  # the checkpoint records the plan its epochs saw
        on_rank_zero(fabric, lambda: check_same_plan(run_dir, prepared.plan, state.get("plan") or prepared.plan))
    if done is not None:
        log.info("%s is already finished (%s) with these settings: reused", run_dir, done["status"])
        return done
    with contextlib.ExitStack() as held:

        def lock() -> None:  # rank 0 holds the fold's lock; a fold another job is training is refused on every rank
            held.enter_context(RunLock(run_dir, "fold"))

        on_rank_zero(fabric, lock)
        return _train_locked(cfg, fabric, prepared, run_dir, state)


def _resume_state_of_rank_zero(run_dir: Path, epoch: int | None, rank: int) -> dict | None:
    """The state rank 0 resumes from (its ``last.pt`` at ``epoch``; None: a fresh start), read by another rank
    from the same ``--output`` folder.

    Raises:
        TrainingError: this rank sees no such ``last.pt`` (the folder is not on a file system every node shares).
    """
    if epoch is None:
        return None
    from medvox.engine.checkpoint import load_checkpoint
    from medvox.errors import TrainingError

    last = run_dir / "last.pt"
    state = load_checkpoint(last) if last.is_file() else None
    if state is None or int(state["epoch"]) != epoch:
        seen = "no such file" if state is None else f"epoch {state['epoch']} there"
        raise TrainingError(f"rank 0 resumes {last} at epoch {epoch}, but rank {rank} finds {seen}: --output must be on "
                            "a file system every node shares (as must the cache, --cache-dir)")
    return state


def _train_locked(cfg: ExperimentConfig, fabric, prepared, run_dir: Path, state: dict | None) -> dict:
    """The part of :func:`train` that writes the fold folder (rank 0 holds its lock)."""
    from medvox.engine.setup import choose_precision
    from medvox.engine.trainer import FoldTrainer

    if fabric.is_global_zero:
        from medvox.engine.checkpoint import remove_stale_temp_files

        remove_stale_temp_files(run_dir)  # half-written checkpoints of a killed run: never loaded, only deleted
    fabric.barrier()
    # the fold's own lines go to its train.log; later lines of this process (the next fold, predict) do not
    with train_log(run_dir / TRAIN_LOG if fabric.is_global_zero else None):
        if prepared.skipped:
            log.warning("--skip-bad: skipped %d bad case(s), listed with the reasons in %s", len(prepared.skipped),
                        prepared.cache_dir / "skipped_cases.json")
        position = current_position()
        if fabric.is_global_zero and (position is None or position.number == 1):  # once per cv, and per train
            log.info("%s", prepared.summary())
        precision = choose_precision(cfg.train, fabric.device.type)  # what make_fabric chose, with its reason
        if precision.warning:
            log.warning(precision.warning)
        log.info("training %s on fold %d of %d (%s, precision %s, %d process(es)) -> %s", cfg.model.name,
                 cfg.train.fold, cfg.data.folds, fabric.device, fabric._precision.precision, fabric.world_size,
                 run_dir)
        if cfg.train.amp or cfg.train.precision != "auto":  # mixed precision was asked for: say what it became
            log.info("precision: %s", precision.reason)
        trainer = FoldTrainer(cfg, fabric, prepared, run_dir)
        if state is not None:
            trainer.load_state(state)
        return trainer.fit()
