"""Experiment trackers: where a fold's hyperparameters and per-epoch metrics go besides its ``log.csv``.

``train.logger`` (``--logger``) picks one of :data:`TRACKERS`:

* ``tensorboard`` (the default): ``tensorboard/`` in the fold folder, through Lightning Fabric's
  ``TensorBoardLogger``; the flattened config as hparams, with ``hp_metric`` the final validation value of
  ``train.monitor``;
* ``csv``: the fold's ``log.csv`` alone (always written; the config is its ``config.json``);
* ``mlflow`` (extra ``medvox[mlflow]``): one MLflow run per fold start, in the experiment named by
  ``MLFLOW_EXPERIMENT_NAME`` or else the run's name, on ``MLFLOW_TRACKING_URI`` or else the file store
  ``<train.output>/mlruns``;
* ``wandb`` (extra ``medvox[wandb]``): one W&B run per fold start in project ``WANDB_PROJECT`` (else
  ``medvox``), grouped by the run's name; ``WANDB_MODE=offline`` keeps it on disk.

MLflow and W&B are driven through their own clients behind Fabric's ``Logger`` interface (Lightning's
``MLFlowLogger`` / ``WandbLogger`` live in the full ``lightning`` package, which medvox does not depend on).
Only rank 0 creates a tracker (the fold's :class:`~medvox.engine.artifacts.EpochLogger`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from medvox.config import CHOICES, ConfigError, ExperimentConfig, flat_keys, to_dict
from medvox.engine.distributed import fabric_module

_loggers = importlib.import_module(f"{fabric_module().__name__}.loggers")  # Fabric's Logger, TensorBoardLogger

TRACKERS: tuple[str, ...] = CHOICES["train.logger"]
# tracker -> (the module it needs, the extra that installs it)
_EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_tracker(cfg: ExperimentConfig) -> None:
    """Refuse a tracker that cannot run here, before any data is read: a missing extra, or an MLflow file
    store that MLflow refuses to open.

    Raises:
        ConfigError: naming the tracker and the fix (exit code 2 on the command line).
    """
    name = cfg.train.logger
    if name not in _EXTRAS:
        return
    module, extra = _EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"train.logger = {name!r} needs {module}, which is not installed: "
                          f"pip install 'medvox[{extra}]' (or choose --logger tensorboard or csv)")
    if name == "mlflow":
        uri = mlflow_tracking_uri(cfg)
        if uri.startswith("file:"):  # a local store: open it now (a server is reached when the fold starts)
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except MlflowException as exc:
                text = " ".join(str(exc).split())
                raise ConfigError(f"--logger mlflow: MLflow cannot open the tracking store {uri}: {text[:500]}") from None


def mlflow_tracking_uri(cfg: ExperimentConfig) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the file store ``<train.output>/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(cfg.train.output).resolve() / "mlruns").as_uri()


def hyperparameters(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as ``{dotted key: value}``, what every tracker records as the run's hyperparameters."""
    return flat_keys(to_dict(cfg))


def create_tracker(cfg: ExperimentConfig, run_dir: Path):
    """The tracker ``cfg.train.logger`` names, for the fold folder ``run_dir``: a Fabric ``Logger``, or None
    for ``csv``. It has logged the hyperparameters when it is returned."""
    name = cfg.train.logger
    if name not in TRACKERS:
        raise ConfigError(f"train.logger = {name!r}: not one of {', '.join(TRACKERS)}")
    if name == "csv":
        return None
    if name == "tensorboard":
        tracker = _tensorboard(run_dir)
    elif name == "mlflow":
        tracker = MLflowTracker(cfg, run_dir)
    else:
        tracker = WandbTracker(cfg, run_dir)
    if tracker is not None:
        tracker.log_hyperparams(hyperparameters(cfg))
    return tracker


def _tensorboard(run_dir: Path):
    try:
        import tensorboard  # noqa: F401  (a dependency; an environment without it logs to log.csv alone)
    except ImportError:
        return None
    # version "": the events go to <fold>/tensorboard/ itself, not to a version_N sub-folder
    return _loggers.TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="")


def _run_name(cfg: ExperimentConfig) -> str:
    return cfg.train.run_name or cfg.model.name


class MLflowTracker(_loggers.Logger):
    """One MLflow run for one fold start: params (the flattened config), metrics per epoch (step = epoch)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or _run_name(cfg)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=f"{_run_name(cfg)}/fold_{cfg.train.fold}",
                                      tags={"medvox.fold_dir": str(run_dir), "medvox.fold": str(cfg.train.fold)})
        self.run_id, self.experiment_id = run.info.run_id, experiment_id

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def finalize(self, status: str) -> None:
        self._client.set_terminated(self.run_id, "FINISHED" if status == "success" else "FAILED")


class WandbTracker(_loggers.Logger):
    """One W&B run for one fold start: the nested config as its config, metrics per epoch (step = epoch)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "medvox", group=_run_name(cfg),
                               name=f"{_run_name(cfg)}/fold_{cfg.train.fold}", dir=str(run_dir),
                               config=to_dict(cfg), tags=[f"fold_{cfg.train.fold}"])

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str:
        return str(getattr(self._run, "id", ""))

    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        pass  # the config went to wandb.init(config=...), where W&B shows a run's hyperparameters

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._run.log(dict(metrics), step=step)

    def finalize(self, status: str) -> None:
        self._run.finish(exit_code=0 if status == "success" else 1)
