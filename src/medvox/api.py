"""The functions behind ``medvox.check``, ``medvox.prepare``, ``medvox.train`` and ``medvox.cross_validate``.

Each is a thin caller of the function the command line calls (``medvox check | prepare | train | cv``) and
takes its settings the ways a Python user has them at hand:

* an :class:`~medvox.config.ExperimentConfig`;
* a mapping: dotted keys (``{"data.path": "data.npz", "train.epochs": 2}``), nested sections
  (``{"data": {"path": "data.npz"}}``) or both;
* the path of a YAML / JSON config file, as ``--config`` reads it.

Mappings and files are resolved as the command line resolves its config file and flags: code defaults <
file or nested sections < dotted keys < ``overrides``. The keys they hold are the keys the user set, so
``train.recipe = "auto"`` fills exactly the others (an :class:`~medvox.config.ExperimentConfig` tells only
which values differ from the defaults: :func:`medvox.recipe.apply_recipe`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvox.config import (
    DataConfig,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_file,
    merge_dict,
    resolve,
    to_dict,
)
from medvox.logs import library_logging

ConfigLike = ExperimentConfig | Mapping[str, Any] | str | os.PathLike
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def experiment_config(config: ConfigLike, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The resolved, checked config of ``config`` with ``overrides`` (dotted keys) on top, its recipe applied.

    Example:
        >>> cfg = experiment_config({"data.path": "data.npz", "model": {"name": "resnet10"}}, {"train.epochs": 2})
        >>> cfg.data.path, cfg.model.name, cfg.train.epochs, cfg.optim.lr
        ('data.npz', 'resnet10', 2, 0.0002)

    Raises:
        ConfigError: an unknown key, a value of the wrong type or outside its range, a missing file.
    """
    from medvox.recipe import apply_recipe, changed_keys, explicit_keys

    overrides = dict(overrides or {})
    if isinstance(config, ExperimentConfig):
        given = changed_keys(config) | set(overrides)
        cfg = apply_overrides(config, overrides)
    elif isinstance(config, Mapping):
        nested = {k: v for k, v in config.items() if "." not in k}
        dotted = {**{k: v for k, v in config.items() if "." in k}, **overrides}
        cfg = apply_overrides(from_dict(merge_dict(to_dict(ExperimentConfig()), nested)), dotted)
        given = explicit_keys(nested, dotted)
    elif isinstance(config, (str, os.PathLike)):
        cfg = resolve(config, overrides)
        given = explicit_keys(load_file(config), overrides)
    else:
        raise TypeError(f"config: an ExperimentConfig, a mapping or a YAML/JSON path, got {type(config).__name__}")
    return apply_recipe(cfg, given)


def data_config(data: DataConfig | ExperimentConfig | Mapping[str, Any] | str | os.PathLike,
                **settings: Any) -> DataConfig:
    """The :class:`~medvox.config.DataConfig` of ``data``: a data source path (manifest, ``.npz``, folder), a
    YAML / JSON config file (its ``data`` section), a mapping of ``DataConfig`` fields, a ``DataConfig`` or an
    ``ExperimentConfig``; ``settings`` are ``DataConfig`` fields set on top.

    Example:
        >>> data_config("manifest.csv", label_col="diagnosis", folds=3).label_col
        'diagnosis'
    """
    if isinstance(data, ExperimentConfig):
        data = data.data
    if isinstance(data, (str, os.PathLike)):
        if Path(data).suffix.lower() in CONFIG_SUFFIXES:
            data = resolve(data).data
        else:
            data = {"path": os.fspath(data)}
    if isinstance(data, DataConfig):
        data = to_dict(data)
    if not isinstance(data, Mapping):
        raise TypeError(f"data: a path, a mapping or a DataConfig, got {type(data).__name__}")
    fields = merge_dict(dict(data), settings)
    return apply_overrides(ExperimentConfig(data=from_dict(fields, DataConfig, "data.")), {}).data


def check(data: DataConfig | ExperimentConfig | Mapping[str, Any] | str | os.PathLike, **settings: Any):
    """Check a dataset: every problem, by row and file, before anything runs (``medvox check``).

    Args:
        data: the data source (a CSV/TSV manifest, a MedMNIST ``.npz``, a folder per class), or its config
            (see :func:`data_config`).
        **settings: :class:`~medvox.config.DataConfig` fields (``label_col``, ``image_cols``, ``folds``, ...).

    Returns:
        The :class:`~medvox.data.report.CheckReport`: ``.ok``, ``.problems``, ``.format()``.

    Example:
        >>> import medvox
        >>> report = medvox.check("demo_data/manifest.csv", label_col="label")  # doctest: +SKIP
        >>> print(report.format())  # doctest: +SKIP
    """
    from medvox.data.check import check_data

    return check_data(data_config(data, **settings))


def prepare(data: DataConfig | ExperimentConfig | Mapping[str, Any] | str | os.PathLike, **settings: Any):
    """Check, fingerprint, preprocess into the cache and split a dataset, once (``medvox prepare``).

    Args:
        data: as :func:`check`.
        **settings: :class:`~medvox.config.DataConfig` fields.

    Returns:
        The :class:`~medvox.data.prepare.Prepared` dataset: ``.images`` (memory-mapped ``(N, C, D, H, W)``),
        ``.labels``, ``.classes``, ``.plan``, ``.fold(k)`` -> (train indices, validation indices).

    Example:
        >>> import medvox
        >>> data = medvox.prepare("demo_data/manifest.csv", folds=5)  # doctest: +SKIP
        >>> train_idx, val_idx = data.fold(0)  # doctest: +SKIP
    """
    from medvox.data import prepare as prepare_data

    return prepare_data(data_config(data, **settings))


def train(config: ConfigLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """Train one fold (``train.fold``) and write its run folder (``medvox train``).

    Args:
        config: see :func:`experiment_config`; ``train.recipe = "auto"`` is applied as on the command line.
        overrides: dotted keys set on top (``{"train.fold": 1}``).

    Returns:
        The fold's ``metrics.json`` content (``final`` holds the final weights' validation and test metrics).

    Example:
        >>> import logging, medvox
        >>> logging.basicConfig(level=logging.INFO)  # medvox logs on the "medvox" logger  # doctest: +SKIP
        >>> metrics = medvox.train({"data.path": "demo_data/manifest.csv", "model.name": "resnet10",
        ...                         "train.epochs": 2})  # doctest: +SKIP
        >>> metrics["final"]["val"]["auc"]  # doctest: +SKIP
    """
    from medvox.engine import train as train_fold

    with library_logging():  # the recipe's lines too, not only the fold's
        return train_fold(experiment_config(config, overrides))


def cross_validate(config: ConfigLike, overrides: Mapping[str, Any] | None = None, tta: bool = True) -> dict:
    """Train every fold (finished ones are reused, an interrupted one resumes) and summarise (``medvox cv``).

    Args:
        config: see :func:`experiment_config`.
        overrides: dotted keys set on top.
        tta: test-time augmentation for the held-out test set's fold ensemble.

    Returns:
        The cross-validation summary (``cv_summary.json``): pooled out-of-fold metrics, the decision, the test
        ensemble's metrics.

    Example:
        >>> import medvox
        >>> summary = medvox.cross_validate("experiment.yaml", {"train.recipe": "auto"})  # doctest: +SKIP
        >>> run = medvox.Run("results/resnet18")  # doctest: +SKIP
    """
    from medvox.cv.crossval import cross_validate as run_folds

    with library_logging():
        return run_folds(experiment_config(config, overrides), tta=tta)
