"""``medvox cv``: every fold in turn, resumable fold by fold, then the cross-validation summary."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from medvox.config import ExperimentConfig

log = logging.getLogger("medvox")


def cross_validate(cfg: ExperimentConfig, tta: bool = True) -> dict:
    """Train folds 0..k-1 (finished folds are skipped, an interrupted one resumes) and summarise.

    ``train.recipe = "auto"`` is applied here, once (:func:`medvox.recipe.apply_recipe`): every fold trains
    the same resolved config, which records ``train.recipe_applied``.

    Writes ``<output>/<run>/cv_summary.json``, ``oof_predictions.csv``, ``test_predictions.csv`` (when a
    held-out test set exists) and ``cv_table.md``; returns the summary.

    Example:
        >>> from medvox.config import resolve
        >>> cfg = resolve(overrides={"data.path": "demo_data/manifest.csv", "train.recipe": "auto"})
        >>> summary = cross_validate(cfg)  # results/resnet18/fold_0..4, cv_summary.json, cv_table.md
    """
    from medvox.engine.setup import one_gpu_warning
    from medvox.engine.trackers import check_tracker
    from medvox.logs import library_logging
    from medvox.recipe import apply_recipe
    from medvox.run import require_output_folder

    require_output_folder(cfg.train.output, "--output")  # before the recipe reads the data or anything is built
    check_tracker(cfg)  # a missing tracker extra, too
    with library_logging():
        cfg = apply_recipe(cfg)
        with one_gpu_warning(cfg.train.gpu or cfg.train.multi_gpu, "--gpu/--multi_gpu",
                             f"all {cfg.data.folds} folds and the test ensemble"):
            return _run_cv(cfg, tta)


def _run_cv(cfg: ExperimentConfig, tta: bool) -> dict:
    from medvox.cv.summary import format_table
    from medvox.engine import _finished, train  # _finished: the fold train() reuses
    from medvox.engine.distributed import current_ranks, launched_as_rank_zero, on_rank_zero
    from medvox.engine.timing import cv_position
    from medvox.run import RunLock

    started = time.time()
    run_dir = Path(cfg.train.output) / (cfg.train.run_name or cfg.model.name)
    # With several processes (torchrun, srun, --devices N) every rank trains each fold together; rank 0 alone
    # locks the run folder and writes the summary, and the others wait for it and return the same summary.
    with RunLock(run_dir, "run") if launched_as_rank_zero() else contextlib.nullcontext():
        fold_dirs = []
        # the folds still to train (finished ones are reused): each fold's ETA line counts those after it
        to_train = [k for k in range(cfg.data.folds) if not _finished(run_dir / f"fold_{k}")]
        for k in range(cfg.data.folds):
            fold_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold=k, resume=True))
            log.info("=== fold %d/%d (fold_%d) ===", k + 1, cfg.data.folds, k)
            with cv_position(k + 1, cfg.data.folds, sum(1 for j in to_train if j > k)):
                train(fold_cfg)
            fold_dirs.append(run_dir / f"fold_{k}")
        summary = on_rank_zero(current_ranks(),
                               lambda: _summarize(cfg, run_dir, fold_dirs, tta, _timing(cfg, started, len(to_train))))
    table = format_table(summary)
    log.info("cross-validation of %s over %d folds:\n%s", cfg.model.name, cfg.data.folds, table)
    log.info("results: %s (%s: cv_summary.json, cv_table.md, oof_predictions.csv%s, fold_0..%d/)", run_dir,
             _size_text(run_dir), ", test_predictions.csv" if summary.get("test") else "", cfg.data.folds - 1)
    log.info("next: medvox report %s  |  medvox predict --run %s SCANS... --out predictions.csv", run_dir, run_dir)
    return summary


def _timing(cfg: ExperimentConfig, started: float, folds_trained: int):
    """What ``cv_summary.json`` records as ``time``, computed when the summary is written: the recipe's forecast
    (:mod:`medvox.engine.timing`, when a time budget was fitted) and the minutes the run took from it (from the
    start of the folds without one)."""
    from medvox.engine.timing import forecast_for

    forecast = forecast_for(cfg)

    def record() -> dict:
        since = forecast.made_at if forecast is not None else started
        return {**(forecast.record() if forecast is not None else {}),
                "measured_min": round((time.time() - since) / 60, 2), "folds_trained": folds_trained}

    return record


def _summarize(cfg: ExperimentConfig, run_dir: Path, fold_dirs: list[Path], tta: bool, timing=None) -> dict:
    """The cross-validation summary of the trained folds, written to the run folder (``cv_summary.json``, the
    predictions, ``cv_table.md``); ``timing()`` gives its ``time`` record."""
    from medvox.cv.summary import format_table, summarize
    from medvox.data import prepare
    from medvox.inference.models import inference_device
    from medvox.run import CV_TABLE

    prepared = prepare(cfg.data, progress=False)
    features_from = None
    if cfg.train.feature_fusion:
        from medvox.descriptors import feature_data

        features_from = feature_data(cfg.data, prepared, cfg.train.feature_grid)
    summary = summarize(run_dir, fold_dirs, prepared, tta=tta, threshold_rule=cfg.train.threshold_rule,
                        feature_fusion=cfg.train.feature_fusion, seed=cfg.train.seed, features_from=features_from,
                        device=inference_device(cfg.train.gpu or cfg.train.multi_gpu), timing=timing)
    (run_dir / CV_TABLE).write_text(format_table(summary) + "\n", encoding="utf-8")
    return summary


def _size_text(folder: Path) -> str:
    """The folder's size on disk, in words (``1.3 GB``)."""
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if total >= scale:
            return f"{total / scale:.1f} {unit}"
    return f"{total} B"
