"""The public API: ``import medvox`` stays light, every name resolves, and the library does what the CLI does
(the auto recipe applied by ``train`` itself, the host's logging left alone)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import medvox
from medvox.cli import main
from medvox.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

PUBLIC = ("check", "prepare", "train", "cross_validate", "Run", "Predictor", "ExperimentConfig")


def test_import_medvox_loads_neither_torch_nor_numpy_and_every_name_resolves():
    code = ("import sys, medvox; light = not {'torch', 'numpy', 'lightning'} & set(sys.modules); "
            f"names = [getattr(medvox, n) for n in {PUBLIC!r}]; print(light, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]  # nothing heavy on import; the names load their modules when asked for
    assert set(PUBLIC) <= set(medvox.__all__) and set(PUBLIC) <= set(dir(medvox))
    from medvox.cv.crossval import cross_validate
    from medvox.inference.predictor import Predictor
    from medvox.run import Run

    assert (medvox.Run, medvox.Predictor, medvox.ExperimentConfig) == (Run, Predictor, ExperimentConfig)
    assert medvox.cross_validate.__module__ == "medvox.api" and cross_validate.__name__ == "cross_validate"
    for name in PUBLIC:
        assert ">>> " in (getattr(medvox, name).__doc__ or "") or name in ("Run", "Predictor"), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medvox.nope  # noqa: B018


def test_configs_as_mappings_and_files_resolve_like_the_command_line(tmp_path):
    from medvox.api import data_config, experiment_config
    from medvox.config import ConfigError

    (tmp_path / "exp.yaml").write_text("data:\n  path: data.npz\ntrain:\n  epochs: 3\n", encoding="utf-8")
    from_file = experiment_config(tmp_path / "exp.yaml", {"model.name": "resnet10"})
    from_dict = experiment_config({"data": {"path": "data.npz"}, "train.epochs": 3, "model.name": "resnet10"})
    built = experiment_config(ExperimentConfig(data=DataConfig(path="data.npz"), train=TrainConfig(epochs=3)),
                              {"model.name": "resnet10"})
    assert from_file == from_dict == built and from_file.train.epochs == 3
    with pytest.raises(ConfigError, match="unknown config key"):
        experiment_config({"epochs": 3})
    with pytest.raises(ConfigError, match="train.epochs = 0"):
        experiment_config({"train.epochs": 0})
    assert data_config(tmp_path / "exp.yaml").path == "data.npz"
    assert data_config("cases.csv", folds=3) == DataConfig(path="cases.csv", folds=3)


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_python_auto_recipe_writes_the_cli_config_and_keeps_the_hosts_logging(tiny_medmnist, tmp_path,
                                                                              restore_torch_threads):
    """`TrainConfig(recipe="auto")` from Python trains what `medvox train --recipe auto` trains (the same
    config.json), picks its final weights by validation and says so; `train()` leaves a host's handler on the
    root logger in place and sends it medvox's records, and takes its own train.log handler away after."""
    out = tmp_path / "runs"
    # --time-budget 0: the recipe without its throughput probe (tests/cv/test_time_budget.py covers that)
    assert main(["train", "--data", str(tiny_medmnist), "--recipe", "auto", "--folds", "2", "--epochs", "1",
                 "--model", "resnet10", "--plots", "final", "--time-budget", "0", "--output", str(out)]) == 0
    fold = out / "resnet10" / "fold_0"
    cli_config = (fold / "config.json").read_text()
    (out / "resnet10").rename(out / "from_cli")  # the Python run writes the same folder (train.output is in it)

    class Host(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    host, root, medvox_log = Host(), logging.getLogger(), logging.getLogger("medvox")
    root.addHandler(host)
    before = (list(root.handlers), list(medvox_log.handlers), medvox_log.level, medvox_log.propagate, root.level)
    try:
        cfg = ExperimentConfig(data=DataConfig(path=str(tiny_medmnist), folds=2), model=ModelConfig(name="resnet10"),
                               train=TrainConfig(recipe="auto", epochs=1, plots="final", time_budget_min=0,
                                                 output=str(out)))
        metrics = medvox.train(cfg)
        after = (list(root.handlers), list(medvox_log.handlers), medvox_log.level, medvox_log.propagate, root.level)
    finally:
        root.removeHandler(host)
    assert after == before and host in after[0]
    assert (fold / "config.json").read_text() == cli_config
    config = json.loads(cli_config)
    assert config["train"]["recipe_applied"] and config["optim"]["optimizer"] == "adamw"  # the recipe's
    assert config["train"]["final_weights"] == "best"

    said = [r.getMessage() for r in host.records if r.name.startswith("medvox")]
    assert any(m.startswith("--recipe auto: ") for m in said) and any("training resnet10 on fold 0" in m for m in said)
    log_text = (fold / "train.log").read_text()
    assert "training resnet10 on fold 0" in log_text and "final weights: " in log_text

    final = metrics["final"]
    raw, ema = final["raw_value"], final["ema_value"]
    better_raw = raw is not None and (ema is None or raw > ema)
    assert final["weights"] == ("best.pt" if better_raw else "best_ema.pt")
    assert final["chosen_by"] == "train.final_weights = best: the better validation auc"
    assert final["margin"] == pytest.approx(abs(raw - ema)) and final["margin"] >= 0
    assert json.loads((fold / "metrics.json").read_text())["final"]["weights"] == final["weights"]
