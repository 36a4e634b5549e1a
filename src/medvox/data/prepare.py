"""``prepare``: check -> fingerprint + plan -> preprocess into the cache -> splits, once per dataset.

Everything after the source is read runs under a file lock on the dataset's cache folder, so two
processes (DDP ranks) that start together build it once: the first builds, the second waits and
then finds it all cached. A second run decodes no image: inspection records, the array store and
the split are all found by key; the store is verified first (sizes, per-row CRC-32: ``cache.check_store``)
and what is damaged is rebuilt, with a warning. On a failed check nothing is written (apart from the
empty lock file next to the dataset folder). The check's warnings (a sheared grid, a manifest that is not
UTF-8, one-hot labels converted, ...) are logged once per call on the ``medvox`` logger.

Example:
    >>> data = prepare(DataConfig(path="manifest.csv", folds=5))
    >>> train_idx, val_idx = data.fold(0)
    >>> x = data.images[train_idx[:6]]  # (6, C, D, H, W) from the memory map
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.data import cache
from medvox.data.check import check_case_set, check_data
from medvox.data.fingerprint import make_fingerprint, make_plan
from medvox.data.preprocess import build_images
from medvox.data.report import CheckReport
from medvox.data.sources import Case, CaseSet, SourceError, load_source
from medvox.data.splits import load_or_make_splits
from medvox.errors import DataError

log = logging.getLogger("medvox")


@dataclass
class Prepared:
    """A prepared dataset: cached arrays, labels, plan and folds.

    Attributes:
        classes: class names; ``labels`` index into it.
        cases: every kept case (pool and test), in the store's row order.
        images: memory-mapped ``(N, C, D, H, W)`` array (float16 or float32, read-only).
        labels: int64 ``(N,)`` (-1 for an unlabeled case).
        plan, fingerprint, splits: the JSON documents written to the cache.
        cache_dir: the plan folder holding ``images.npy``.
        data_hash: the dataset folder's name.
        cache_hit: True when nothing had to be preprocessed.
        n_built: cases preprocessed by this call (0 on a hit).
        skipped: what ``skip_bad`` dropped (also in ``skipped_cases.json``).
        warnings: the check's warnings, one line each (also logged).
        repaired: what was found damaged in the store and rebuilt, or None.
        images_digest: blake2b of the store's bytes (``digest.json``, written when the store is built).
    """

    classes: list[str]
    cases: list[Case]
    images: np.ndarray
    labels: np.ndarray
    plan: dict[str, Any]
    fingerprint: dict[str, Any]
    splits: dict[str, Any]
    cache_dir: Path
    data_hash: str
    cache_hit: bool = False
    n_built: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    images_digest: str | None = None
    warnings: list[str] = field(default_factory=list)
    repaired: str | None = None

    def __post_init__(self) -> None:
        self._row = {c.id: i for i, c in enumerate(self.cases)}

    def _rows(self, ids: list[str]) -> np.ndarray:
        return np.array([self._row[i] for i in ids if i in self._row], dtype=np.int64)

    def fold(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(train_idx, val_idx)``: int64 rows of ``images`` for fold ``k`` (0-based)."""
        folds = self.splits["folds"]
        if not 0 <= k < len(folds):
            raise ValueError(f"fold {k} does not exist: the split has folds 0..{len(folds) - 1}")
        return self._rows(folds[k]["train"]), self._rows(folds[k]["val"])

    @property
    def test_idx(self) -> np.ndarray:
        """Rows of the held-out test cases (empty when there are none)."""
        return self._rows(self.splits["test"])

    def class_counts(self, idx: np.ndarray | list[int] | None = None) -> list[int]:
        """Cases per class among rows ``idx`` (all rows when None)."""
        labels = self.labels if idx is None else self.labels[np.asarray(idx, dtype=np.int64)]
        return np.bincount(labels[labels >= 0], minlength=len(self.classes)).tolist()

    def summary(self) -> str:
        """Classes and counts, shape, spacing, normalisation, folds, cache path and hit/miss."""
        n_test = len(self.test_idx)
        pool = np.setdiff1d(np.arange(len(self.cases)), self.test_idx)
        counts = ", ".join(f"{name} {n}" for name, n in zip(self.classes, self.class_counts(pool), strict=True))
        norms = ", ".join(n["scheme"] for n in self.plan["normalization"])
        lines = [
            f"data:     {len(self.cases)} cases: {len(pool)} cross-validation pool + {n_test} held-out test",
            f"classes:  {counts} (pool; imbalance {self.plan['imbalance_ratio']:g}:1)",
        ]
        if n_test:
            lines.append("test:     " + ", ".join(f"{c} {n}" for c, n in zip(
                self.classes, self.class_counts(self.test_idx), strict=True)))
        spacing = " x ".join(f"{v:g}" for v in self.plan["target_spacing"])
        lines += [
            f"images:   {tuple(self.images.shape)} {self.images.dtype} (N, C, D, H, W); spacing {spacing} mm; "
            f"normalisation {norms}; modality {', '.join(self.plan['modality'])}",
            f"folds:    {self.splits['k']} x {self.splits['method']}"
            + (f" (seed {self.splits['seed']})" if self.splits.get("seed") is not None else ""),
        ]
        for k in range(len(self.splits["folds"])):
            train, val = self.fold(k)
            lines.append(f"  fold {k}: train {len(train)} {self.class_counts(train)}, "
                         f"val {len(val)} {self.class_counts(val)}")
        state = "cache hit: nothing decoded" if self.cache_hit else f"built {self.n_built} case(s)"
        state += f"; repaired: {self.repaired}" if self.repaired else ""
        lines.append(f"cache:    {self.cache_dir} ({state})")
        if self.skipped:
            lines.append(f"skipped:  {len(self.skipped)} bad case(s), listed in skipped_cases.json")
        return "\n".join(lines)


def prepare(cfg: DataConfig, progress: bool = True) -> Prepared:
    """Check, fingerprint, plan, preprocess into the cache and split a labeled dataset.

    Raises:
        DataError: the check found errors (the message is the full report); with ``cfg.skip_bad``
            only dataset-wide errors raise, bad cases are dropped.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a spawned preprocessing worker is importing an unguarded script that calls prepare():
        # going on would wait forever for the lock its parent holds
        raise RuntimeError("prepare() was called while a worker process was starting: put the calling "
                           "script's top-level code under `if __name__ == '__main__':`")
    caseset, root, data_hash, ident = _open(cfg)
    dataset_dir = root / data_hash
    with cache.locked(root / f"{data_hash}.lock"):
        cases, skipped, fingerprint, plan, warnings = _survey(cfg, caseset, dataset_dir, ident, progress)
        plan_dir, n_built, repaired = _ensure_store(dataset_dir, cases, plan, fingerprint, skipped, cfg, progress)
        splits = load_or_make_splits(dataset_dir, cases, caseset.classes, cfg.folds, cfg.split_seed)
        images = np.load(plan_dir / "images.npy", mmap_mode="r")  # opened under the lock: never mid-swap
        images_digest = _ensure_digest(plan_dir)  # a new store (or one from before digest.json) gets one, once
    labels = np.array([-1 if c.label is None else c.label for c in cases], dtype=np.int64)
    return Prepared(classes=list(caseset.classes), cases=cases, images=images, labels=labels, plan=plan,
                    fingerprint=fingerprint, splits=splits, cache_dir=plan_dir, data_hash=data_hash,
                    cache_hit=n_built == 0, n_built=n_built, skipped=skipped, images_digest=images_digest,
                    warnings=warnings, repaired=repaired)


def plan_dataset(cfg: DataConfig, progress: bool = True) -> dict[str, Any]:
    """The plan :func:`prepare` would make (check, fingerprint, plan), without preprocessing a volume: what
    ``--recipe auto`` needs to choose its settings. The inspection records are cached, so the
    ``prepare`` that follows decodes no header again.

    Raises:
        DataError: as :func:`prepare`.
    """
    caseset, root, data_hash, ident = _open(cfg)
    with cache.locked(root / f"{data_hash}.lock"):
        return _survey(cfg, caseset, root / data_hash, ident, progress)[3]


def _open(cfg: DataConfig) -> tuple[CaseSet, Path, str, dict]:
    """(case set, cache root, dataset folder name, what it stands for); a bad source raises its report."""
    try:
        caseset = load_source(cfg)
    except SourceError as exc:
        raise DataError(CheckReport(str(cfg.path), list(exc.problems)).format()) from None
    root = cache.cache_root(cfg)
    return (caseset, root, *cache.dataset_hash(cfg, caseset.kind, caseset.source))


def _survey(cfg: DataConfig, caseset: CaseSet, dataset_dir: Path, ident: dict, progress: bool,
            ) -> tuple[list[Case], list[dict], dict, dict, list[str]]:
    """(kept cases, skipped, fingerprint, plan, warnings): check (cached inspections), fingerprint of the pool,
    plan; saves the inspection records; logs the check's warnings. Called under the dataset's lock."""
    records_cache = cache.read_json(dataset_dir / "inspect.json", {})
    known = dict(records_cache)
    report = check_data(cfg, cases=caseset, cache=records_cache, progress=progress)
    warnings = [f"{p.where()}: {p.what}" + (f" (fix: {p.fix})" if p.fix else "")
                for p in report.problems if p.level == "warning"]
    for line in warnings:
        log.warning("check: %s", line)
    kept, skipped = _kept_cases(report, caseset, cfg)
    cases = [caseset.cases[i] for i in kept]
    records = [report.inspections[i] for i in kept]
    pool = [j for j, c in enumerate(cases) if c.subset != "test"]
    fingerprint = make_fingerprint([cases[j] for j in pool], [records[j] for j in pool], caseset.classes)
    _write_if_changed(dataset_dir / "dataset.json", ident)
    _save_records(dataset_dir, records_cache, known, cases)
    return cases, skipped, fingerprint, make_plan(fingerprint, cfg), warnings


def _kept_cases(report: CheckReport, caseset: CaseSet, cfg: DataConfig) -> tuple[list[int], list[dict]]:
    """All cases when the check passed; with ``skip_bad`` the good ones; else raise the report."""
    if report.ok:
        return list(range(len(caseset.cases))), []
    if not cfg.skip_bad or report.dataset_errors:
        raise DataError(report.format())
    bad = report.bad_case_indices
    kept = [i for i in range(len(caseset.cases)) if i not in bad]
    remaining = check_case_set([caseset.cases[i] for i in kept], caseset.classes, cfg)
    if not kept or remaining:
        report.problems += remaining
        raise DataError(report.format() + "\nafter skipping the bad cases the dataset itself is unusable")
    skipped = []
    for i in sorted(bad):
        case = caseset.cases[i]
        whats = [p.what for p in report.errors if p.case_index == i or any(a[2] == i for a in p.also)]
        skipped.append({"row": case.row, "id": case.id, "file": case.file, "problems": whats})
    return kept, skipped


def _save_records(dataset_dir: Path, records: dict[str, Any], known: dict[str, Any], cases: list[Case]) -> None:
    """Keep the inspection records of the current files only; write when something changed (a record added,
    dropped or inspected again, e.g. after ``RECORD_VERSION`` changed)."""
    current = {key for c in cases if (key := cache.inspection_key(c)) is not None}
    pruned = {k: v for k, v in records.items() if k in current}
    if pruned.keys() != known.keys() or any(pruned[k] is not known[k] for k in pruned):
        cache.write_json(dataset_dir / "inspect.json", pruned)


def _ensure_store(dataset_dir: Path, cases: list[Case], plan: dict, fingerprint: dict, skipped: list[dict],
                  cfg: DataConfig, progress: bool) -> tuple[Path, int, str | None]:
    """The plan folder with an up-to-date, verified store: reused, patched (changed or damaged rows only) or
    built. Returns the folder, the rows built and what was found damaged (None when nothing was)."""
    plan_id = cache.plan_hash(plan)
    plan_dir = dataset_dir / plan_id
    keys = [cache.case_key(plan_id, cache.case_signature(c)) for c in cases]
    index = cache.read_json(plan_dir / "index.json")
    damaged, repaired = set(), None
    if index is not None and index.get("keys") == keys and (plan_dir / "images.npy").is_file():
        damage = cache.check_store(plan_dir, index)
        if damage is None:
            _write_documents(plan_dir, cases, keys, plan, fingerprint, skipped)  # labels/counts may have changed
            return plan_dir, 0, None
        what, bad = damage
        repaired = f"{what}; rebuilt {'the whole store' if bad is None else f'{len(bad)} row(s)'}"
        log.warning("cache: %s is damaged: %s; rebuilding %s", plan_dir / "images.npy", what,
                    "it" if bad is None else "those rows")
        if bad is None:
            index = None  # nothing in it can be trusted
        else:
            damaged = set(bad)
    for stale in dataset_dir.glob(f".{plan_id}.*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dataset_dir / f".{plan_id}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        todo = _copy_unchanged(tmp / "images.npy", plan_dir, index, keys, plan, damaged)
        build_images(tmp / "images.npy", cases, plan, todo, cfg.workers, progress)
        _write_documents(tmp, cases, keys, plan, fingerprint, skipped)
        cache.write_json(tmp / "digest.json", cache.store_checksums(np.load(tmp / "images.npy", mmap_mode="r")))
        _swap(tmp, plan_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan_dir, len(todo), repaired


def _ensure_digest(folder: Path) -> str:
    """The store's content digest from ``digest.json``; it and the per-row checksums are computed and written
    when missing (a store from before them; under the lock)."""
    known = cache.read_json(folder / "digest.json")
    if isinstance(known, dict) and isinstance(known.get("blake2b"), str) and isinstance(known.get("rows"), list):
        return known["blake2b"]
    sums = cache.store_checksums(np.load(folder / "images.npy", mmap_mode="r"))
    cache.write_json(folder / "digest.json", sums)
    return sums["blake2b"]


def _copy_unchanged(store: Path, plan_dir: Path, index: dict | None, keys: list[str], plan: dict,
                    damaged: set[int] = frozenset()) -> list[int]:
    """Create the new store, copy rows whose key is in the old one (and whose old row is not ``damaged``);
    return the rows still to build."""
    shape = (len(keys), plan["in_channels"], *plan["target_shape"])
    images = np.lib.format.open_memmap(store, mode="w+", dtype=np.dtype(plan["storage_dtype"]), shape=shape)
    old_rows = {k: r for r, k in enumerate(index["keys"]) if r not in damaged} if index else {}
    old = np.load(plan_dir / "images.npy", mmap_mode="r") if old_rows and (plan_dir / "images.npy").is_file() else None
    todo = []
    for row, key in enumerate(keys):
        if old is not None and key in old_rows and old.shape[1:] == shape[1:]:
            images[row] = old[old_rows[key]]
        else:
            todo.append(row)
    images.flush()
    del images, old
    return todo


def _write_documents(folder: Path, cases: list[Case], keys: list[str], plan: dict, fingerprint: dict,
                     skipped: list[dict]) -> None:
    _write_if_changed(folder / "plan.json", plan)
    _write_if_changed(folder / "fingerprint.json", fingerprint)
    _write_if_changed(folder / "index.json", {
        "version": cache.CACHE_VERSION, "plan_hash": cache.plan_hash(plan), "keys": keys,
        "ids": [c.id for c in cases], "labels": [c.label for c in cases],
        "shape": [len(cases), plan["in_channels"], *plan["target_shape"]], "dtype": plan["storage_dtype"],
    })
    if skipped:
        _write_if_changed(folder / "skipped_cases.json", skipped)
    else:
        (folder / "skipped_cases.json").unlink(missing_ok=True)


def _write_if_changed(path: Path, obj: Any) -> None:
    """A cache hit rewrites nothing: JSON documents are written only when their content differs."""
    if cache.read_json(path) != obj:
        cache.write_json(path, obj)


def _swap(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` with renames (open memory maps of the old store stay valid)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, trash)
        os.rename(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)
