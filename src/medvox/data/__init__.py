"""Data layer: sources -> cases -> check -> fingerprint/plan -> cached preprocessing -> splits.

Example:
    >>> from medvox.data import prepare
    >>> data = prepare(DataConfig(path="manifest.csv"))
    >>> train_idx, val_idx = data.fold(0)
"""

from medvox.data.check import check_data
from medvox.data.prepare import Prepared, plan_dataset, prepare
from medvox.data.preprocess import preprocess_case
from medvox.data.sources import Case, CaseSet, cases_from_paths, load_source
from medvox.errors import DataError

__all__ = [
    "Case",
    "CaseSet",
    "DataError",
    "Prepared",
    "cases_from_paths",
    "check_data",
    "load_source",
    "plan_dataset",
    "prepare",
    "preprocess_case",
]
