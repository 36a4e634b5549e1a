"""Cross-validation folds: seeded, stratified by class, grouped by patient; made once, then reused.

The split lives in the dataset cache folder (``splits_k{k}_seed{seed}.json``), not in the plan
folder: changing preprocessing never changes the folds. A provided fold column wins
(``splits_provided_k{k}.json``; fold ``i`` is the i-th smallest value in the column). Held-out test
cases (a manifest's ``split`` column, MedMNIST's official test split) never enter a fold. For
MedMNIST the official train and val splits together form the pool that is split k-fold: the
official val split is not kept separately.

A stored split is reused only while the pool is the same (same ids, labels, patients and provided
folds); when cases were added or relabeled a new split is drawn and a warning says so.

File content::

    {"k": 5, "seed": 0, "method": "StratifiedGroupKFold", "classes": [...],
     "folds": [{"train": [case ids], "val": [case ids]}, ...], "test": [case ids], "pool_hash": "..."}
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medvox.data.cache import read_json, stable_hash, write_json
from medvox.data.sources import Case


def splits_path(dataset_dir: Path, cases: list[Case], k: int, seed: int) -> Path:
    pool = [c for c in cases if c.subset != "test"]
    if any(c.fold is not None for c in pool):
        return Path(dataset_dir) / f"splits_provided_k{len({c.fold for c in pool})}.json"
    return Path(dataset_dir) / f"splits_k{k}_seed{seed}.json"


def load_or_make_splits(dataset_dir: Path, cases: list[Case], classes: list[str], k: int,
                        seed: int) -> dict[str, Any]:
    """The stored split when it matches the pool, else a new one (written; the caller holds the lock)."""
    path = splits_path(dataset_dir, cases, k, seed)
    pool_hash = _pool_hash(cases)
    stored = read_json(path)
    if stored is not None and stored.get("pool_hash") == pool_hash:
        return stored
    if stored is not None:
        warnings.warn(f"{path.name}: the cases changed since this split was made; drawing a new split",
                      stacklevel=2)
    splits = make_splits(cases, classes, k, seed)
    splits["pool_hash"] = pool_hash
    write_json(path, splits)
    return splits


def make_splits(cases: list[Case], classes: list[str], k: int, seed: int) -> dict[str, Any]:
    """Folds of the pool (provided fold column, else ``StratifiedGroupKFold``) and the test ids.

    Raises:
        ValueError: fewer patients than folds.
    """
    pool = [c for c in cases if c.subset != "test"]
    test = [c.id for c in cases if c.subset == "test"]
    if any(c.fold is not None for c in pool):
        values = sorted({c.fold for c in pool})
        folds = [{"train": [c.id for c in pool if c.fold != v], "val": [c.id for c in pool if c.fold == v]}
                 for v in values]
        return {"k": len(values), "seed": None, "method": "fold column", "fold_values": values,
                "classes": list(classes), "folds": folds, "test": test}
    groups = [c.group for c in pool]
    if len(set(groups)) < k:
        raise ValueError(f"{len(set(groups))} patients cannot be split into {k} folds; use fewer folds")
    labels = np.array([c.label for c in pool])
    # imported here: scikit-learn costs ~1 s of start-up, and a warm run only reads splits.json
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for train, val in splitter.split(np.zeros(len(pool)), labels, groups):
        folds.append({"train": [pool[i].id for i in train], "val": [pool[i].id for i in val]})
    return {"k": k, "seed": seed, "method": "StratifiedGroupKFold", "classes": list(classes),
            "folds": folds, "test": test}


def _pool_hash(cases: list[Case]) -> str:
    return stable_hash([[c.id, c.label, c.group, c.fold, c.subset] for c in cases])
