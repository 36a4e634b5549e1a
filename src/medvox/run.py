"""Read a finished (or partly finished) cross-validation run folder back into memory.

The report and the model comparison read the same things: ``cv_summary.json``, the folds' JSON files,
and the prediction CSVs. Everything optional is ``None`` when absent, and :attr:`Run.notes` says in
words what is missing or unusual (no test set, EMA off, one fold), so a page can show it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """One predictions CSV: its rows (as read), integer labels ``(N,)`` and probabilities ``(N, K)``."""

    rows: list[dict[str, str]]
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [r["case_id"] for r in self.rows]


@dataclass
class Fold:
    name: str
    path: Path
    metrics: dict[str, Any] | None
    calibration: dict[str, Any] | None


@dataclass
class Run:
    """What a run folder holds; missing pieces are ``None`` / empty and listed in ``notes``."""

    path: Path
    name: str
    summary: dict[str, Any] | None
    folds: list[Fold]
    classes: list[str]
    config: dict[str, Any]
    plan: dict[str, Any]
    run_info: dict[str, Any]
    splits: dict[str, Any]
    fingerprint: dict[str, Any] | None
    oof: Predictions | None
    test: Predictions | None
    notes: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_predictions_csv(path: Path, classes: list[str] | None = None) -> Predictions | None:
    """A predictions CSV (``case_id, ..., label, prob_<class>...``); rows without a known label are dropped.

    Raises:
        ValueError: the CSV's ``prob_`` columns do not match ``classes``.
    """
    from medvox.cv.summary import read_predictions

    if not Path(path).is_file():
        return None
    rows, found = read_predictions(Path(path))
    if classes is not None and found and found != list(classes):
        raise ValueError(f"{path}: probability columns {found} do not match the run's classes {list(classes)}")
    classes = found or list(classes or [])
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in rows if r.get("label") in index]
    if not rows:
        return None
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    return Predictions(rows, labels, probs, classes)


def load_run(path: Path) -> Run:
    """Load a run folder (``<output>/<run>``).

    Raises:
        FileNotFoundError: the folder is missing or holds neither ``cv_summary.json`` nor ``fold_<k>``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    summary = read_json(path / "cv_summary.json")
    fold_dirs = sorted((p for p in path.glob("fold_*") if p.is_dir() and re.fullmatch(r"fold_\d+", p.name)),
                       key=lambda p: int(p.name.split("_")[1]))
    if summary is None and not fold_dirs:
        raise FileNotFoundError(f"{path} is not a medvox run folder (no cv_summary.json and no fold_<k>/ folders)")
    folds = [Fold(d.name, d, read_json(d / "metrics.json"), read_json(d / "calibration.json")) for d in fold_dirs]
    first = _first(fold_dirs, "config.json"), _first(fold_dirs, "plan.json")
    config, plan = first[0] or {}, first[1] or {}
    classes = list((summary or {}).get("classes") or next(
        (f.metrics["classes"] for f in folds if f.metrics and f.metrics.get("classes")), plan.get("classes") or []))
    run = Run(path=path, name=path.name, summary=summary, folds=folds, classes=classes, config=config, plan=plan,
              run_info=_first(fold_dirs, "run_info.json") or {}, splits=_first(fold_dirs, "splits.json") or {},
              fingerprint=find_fingerprint(config, plan, _first(fold_dirs, "run_info.json") or {}),
              oof=read_final_oof(path, summary, classes or None),
              test=read_predictions_csv(path / "test_predictions.csv", classes or None))
    run.notes = _notes(run)
    return run


def read_final_oof(path: Path, summary: dict[str, Any] | None, classes: list[str] | None = None) -> Predictions | None:
    """The run's final pooled out-of-fold predictions, the ones its decision threshold rests on: the fused
    ones (``oof_fused_predictions.csv``, already calibrated) or ``oof_predictions.csv`` with each fold
    rescaled by its own temperature (``cv_summary.json``'s ``calibration``), so a plain run and a fused one
    are compared on the same footing. Raw while the run holds no temperatures (not finished)."""
    from medvox.cv.summary import rescale_folds

    fused = read_predictions_csv(path / "oof_fused_predictions.csv", classes)
    if fused is not None:
        return fused
    raw = read_predictions_csv(path / "oof_predictions.csv", classes)
    calibration = (summary or {}).get("calibration") or []
    if raw is None or not calibration or any("fold" not in r for r in raw.rows):
        return raw
    folds = np.array([int(r["fold"]) for r in raw.rows])
    if folds.max() >= len(calibration):
        return raw
    return Predictions(raw.rows, raw.labels, rescale_folds(raw.probs, folds, calibration), raw.classes)


def _first(dirs: list[Path], name: str) -> dict[str, Any] | None:
    return next((d for d in (read_json(p / name) for p in dirs) if d is not None), None)


def find_fingerprint(config: dict[str, Any], plan: dict[str, Any], run_info: dict[str, Any]) -> dict | None:
    """The dataset fingerprint from the preprocessing cache (``<cache>/<data hash>/<plan hash>/``), if still there.

    The run folder stores the plan, not the fingerprint; the cache folder whose ``plan.json`` equals the
    run's plan holds the fingerprint it was made from.
    """
    from medvox.config import DataConfig
    from medvox.data.cache import cache_root

    # the cache folder's name; runs from before run_info.json had "cache_dataset" stored it as "data_hash"
    data_hash = run_info.get("cache_dataset") or run_info.get("data_hash")
    if not data_hash or not plan:
        return None
    root = cache_root(DataConfig(cache_dir=(config.get("data") or {}).get("cache_dir")))
    for plan_file in sorted((root / str(data_hash)).glob("*/plan.json")):
        if read_json(plan_file) == plan:
            return read_json(plan_file.parent / "fingerprint.json")
    return None


def _notes(run: Run) -> list[str]:
    notes = []
    if run.summary is None:
        notes.append("cv_summary.json is missing: the cross-validation has not finished.")
    fusion = (run.summary or {}).get("fusion")
    if fusion:
        notes.append(f"Fused with a descriptor model (weight {fusion['weight']:.2f}, chosen on out-of-fold AUC): the "
                     "out-of-fold and test predictions are the mixture (oof_fused_predictions.csv).")
    if len(run.folds) == 1:
        notes.append("Only one fold: no spread over folds (standard deviation and CI need two or more).")
    ema = (run.config.get("train") or {}).get("ema_decay")
    weights = [((f.metrics or {}).get("final") or {}).get("weights") for f in run.folds]
    if ema == 0 or (weights and all(w == "best.pt" for w in weights)):
        notes.append("EMA was off: the final weights are the raw weights at their best epoch (best.pt).")
    if run.summary is not None and not run.summary.get("test"):
        notes.append("No held-out test set: only cross-validation results.")
    if run.oof is None:
        notes.append("oof_predictions.csv is missing: no pooled out-of-fold curves.")
    if run.summary is not None and run.summary.get("test") and run.test is None:
        notes.append("test_predictions.csv is missing: no test curves.")
    for fold in run.folds:
        if fold.metrics is None:
            notes.append(f"{fold.name}: metrics.json is missing (the fold did not start or was deleted).")
        elif fold.metrics.get("status") not in ("complete", "early_stopped"):
            notes.append(f"{fold.name}: status {fold.metrics.get('status')!r} (not finished).")
    return notes


def run_source(source: Path, fold: int | None = None) -> Path:
    """The folder (or file) whose models a command uses: ``<run>/fold_<fold>`` when a fold of a run folder is
    asked for, else ``source``."""
    source = Path(source)
    if fold is not None and source.is_dir() and (source / f"fold_{fold}").is_dir():
        return source / f"fold_{fold}"
    return source


def resolve_checkpoints(source: Path, fold: int | None = None) -> list[Path]:
    """The checkpoints a command works with: a ``.pt`` file, a fold folder's final checkpoint, a run folder's
    (every fold's), or with ``fold`` only ``<run>/fold_<fold>``'s.

    Raises:
        CheckpointError: nothing found.
    """
    from medvox.errors import CheckpointError
    from medvox.inference.models import final_checkpoint, find_checkpoints

    source = run_source(source, fold)
    if fold is not None and not re.fullmatch(rf"fold_{fold}", source.name):
        raise CheckpointError(f"{source} has no fold_{fold} folder")
    if source.is_dir() and not any(source.glob("fold_*")):  # a fold folder, with or without metrics.json
        checkpoint = final_checkpoint(source)
        if checkpoint is None:
            raise CheckpointError(f"no best_ema.pt or best.pt in {source}")
        return [checkpoint]
    return find_checkpoints([source])
