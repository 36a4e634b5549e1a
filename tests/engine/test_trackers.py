"""Experiment trackers (``--logger``): the config as hyperparameters and every epoch's metrics reach
TensorBoard, MLflow (its local file store, read back with its own client) and W&B (a stand-in client); a
tracker whose extra is missing is refused in one line before any data is read."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from medvox.cli import main
from medvox.config import CHOICES, ExperimentConfig, apply_overrides, flat_keys, to_dict
from medvox.engine import trackers
from medvox.engine.artifacts import EpochLogger


def _entry(epoch: int, auc: float) -> dict:
    return {"epoch": epoch, "lr": 1e-3 * epoch, "train": {"loss": 1.0 / epoch},
            "val": {"auc": auc, "loss": 0.5, "confusion_matrix": [[1, 0], [0, 1]]}, "time": {"train_seconds": 2.0}}


def test_the_trackers_are_the_configs_choices():
    assert trackers.TRACKERS == CHOICES["train.logger"] == ("tensorboard", "csv", "mlflow", "wandb")
    assert ExperimentConfig().train.logger == "tensorboard"


def test_tensorboard_gets_the_hparams_every_epoch_and_the_final_value(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = apply_overrides(ExperimentConfig(), {"optim.lr": 3e-3})
    logger = EpochLogger(tmp_path, cfg)
    history = [_entry(1, 0.61), _entry(2, 0.67)]
    for i, entry in enumerate(history):
        logger.log(entry, history[: i + 1])
    logger.close({"val": {"auc": 0.66, "n": 20}}, step=2)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("val/auc")] == [(1, 0.61), (2, 0.67)]
    assert [s.step for s in events.Scalars("lr")] == [1, 2] and "val/confusion_matrix" not in events.Tags()["scalars"]
    assert events.Scalars("final/val/auc")[0].value == pytest.approx(0.66)
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(0.66)  # the hparams view's metric
    assert events.PluginTagToContent("hparams")  # the config, in TensorBoard's hparams view
    assert len((tmp_path / "log.csv").read_text().strip().splitlines()) == 3  # log.csv as before


def test_csv_writes_log_csv_alone(tmp_path):
    logger = EpochLogger(tmp_path, apply_overrides(ExperimentConfig(), {"train.logger": "csv"}))
    logger.log(_entry(1, 0.6), [_entry(1, 0.6)])
    logger.close({"val": {"auc": 0.6}}, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_wandb_gets_the_nested_config_each_epoch_at_its_step_and_the_end(tmp_path, monkeypatch):
    """W&B itself is not installed for the tests: a stand-in ``wandb`` module records what medvox calls."""
    calls = []

    class Run:
        id = "abc123"

        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_PROJECT", "adrenal")
    cfg = apply_overrides(ExperimentConfig(), {"train.logger": "wandb", "train.fold": 2, "train.run_name": "r18"})
    logger = EpochLogger(tmp_path, cfg)
    logger.log(_entry(1, 0.6), [_entry(1, 0.6)])
    logger.close({"val": {"auc": 0.7}}, step=1)
    (_, init_kwargs), (_, first, step), (_, final, final_step), end = calls
    assert init_kwargs["config"] == to_dict(cfg) and init_kwargs["project"] == "adrenal"
    assert (init_kwargs["name"], init_kwargs["group"], init_kwargs["dir"]) == ("r18/fold_2", "r18", str(tmp_path))
    assert step == 1 and first["val/auc"] == 0.6 and first["train/loss"] == 1.0 and "epoch" not in first
    assert final == {"final/val/auc": 0.7} and final_step == 1 and end == ("finish", 0)


@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_missing_tracker_extra_is_one_line_before_any_data_is_read(command, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    code = main([command, "--data", str(tmp_path / "no_such_data.npz"), "--logger", "wandb", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "pip install 'medvox[wandb]'" in err[0] and "train.logger = 'wandb'" in err[0]
    assert not out.exists() and not (tmp_path / "cache").exists()  # the data (missing here) was never read


@pytest.mark.slow
def test_mlflow_file_store_holds_the_params_and_the_epoch_metrics_of_a_training_run(tiny_medmnist, tmp_path,
                                                                                     monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a file store
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    assert main(["train", "--data", str(tiny_medmnist), "--model", "resnet10", "--epochs", "2", "--batch_size", "8",
                 "--folds", "3", "--fold", "1", "--threads", "1", "--plots", "final", "--output", str(out),
                 "--lr", "3e-3", "--logger", "mlflow"]) == 0
    fold = out / "resnet10" / "fold_1"
    metrics = json.loads((fold / "metrics.json").read_text())

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("resnet10")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet10/fold_1"
    assert run.data.tags["medvox.fold_dir"] == str(fold)
    config = json.loads((fold / "config.json").read_text())
    assert run.data.params == {key: str(value) for key, value in flat_keys(config).items()}
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.logger"] == "mlflow"
    for key in ("val/auc", "val/loss", "train/loss", "val_ema/auc"):
        history = client.get_metric_history(run.info.run_id, key)
        section, name = key.split("/")
        logged = sorted((m.step, m.value) for m in history)
        expected = [(h["epoch"], h[section][name]) for h in metrics["history"]]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected]), key
    assert run.data.metrics["final/val/auc"] == pytest.approx(metrics["final"]["val"]["auc"])
    assert not (out / "mlruns").exists() and not (fold / "tensorboard").exists()
