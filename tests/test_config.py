"""The config tree's own checks: every enumerated setting and every numeric range is refused before any data is
read, with the key, the value and the fix; and each listed choice is one the code that reads it accepts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from medvox import config as config_mod
from medvox.cli import main
from medvox.config import CHOICES, ConfigError, ExperimentConfig, config_problems, resolve


def test_defaults_are_valid_and_every_checked_key_exists():
    assert config_problems(ExperimentConfig()) == []
    keys = set(config_mod._flatten(ExperimentConfig()))
    assert set(CHOICES) <= keys
    assert set(config_mod._RANGES) <= keys
    for key, choices in CHOICES.items():  # every default is one of its own choices
        default = config_mod._flatten(ExperimentConfig())[key]
        assert default is None or default in choices, key


def test_every_listed_choice_is_accepted_by_the_code_that_reads_it():
    """The one list of choices and the modules that branch on them cannot drift apart."""
    from medvox.data.fingerprint import _normalization
    from medvox.data.preprocess import normalize
    from medvox.engine.optim import Schedule, build_optimizer
    from medvox.engine.setup import resolve_precision
    from medvox.losses import build_loss
    from medvox.metrics.classification import best_threshold, compute_metrics

    for name in CHOICES["loss.name"]:
        loss = build_loss(dataclasses.replace(config_mod.LossConfig(), name=name), [30, 10], epochs=5)
        value = loss(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
        assert torch.isfinite(value)
    param = torch.nn.Parameter(torch.zeros(3))
    for name in CHOICES["optim.optimizer"]:
        opt = build_optimizer([{"params": [param]}], dataclasses.replace(config_mod.OptimConfig(), optimizer=name))
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    for name in CHOICES["optim.scheduler"]:
        opt = torch.optim.SGD([param], lr=0.1)
        Schedule(opt, dataclasses.replace(config_mod.OptimConfig(), scheduler=name), epochs=10, steps_per_epoch=4)
    for name in CHOICES["train.precision"]:
        assert resolve_precision(dataclasses.replace(config_mod.TrainConfig(), precision=name), "cpu") in (
            "32-true", "bf16-mixed", "16-mixed", "bf16-true")
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    probs = np.array([0.1, 0.3, 0.35, 0.8, 0.4, 0.2, 0.9, 0.6])
    for rule in CHOICES["train.threshold_rule"]:
        assert 0 < best_threshold(labels, probs, rule=rule) < 1
    metrics = compute_metrics(labels, probs)
    for monitor in CHOICES["train.monitor"]:  # "loss" is added beside the metrics by the trainer
        assert monitor == "loss" or isinstance(metrics[monitor], float), monitor
    x = np.random.default_rng(0).normal(100, 20, (4, 4, 4)).astype(np.float32)
    stats = {"fg_sample": x.ravel().tolist(), "fg_p00_5": 60.0, "fg_p99_5": 140.0, "median_case_min": 40.0,
             "median_case_max": 160.0}
    for scheme in CHOICES["data.normalization"]:
        norm = _normalization(stats, "CT", config_mod.DataConfig(normalization=scheme))
        assert norm["scheme"] == scheme and np.isfinite(normalize(x, norm)).all()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"train.monitor": "acc"}, "train.monitor = 'acc': not one of auc, accuracy, balanced_accuracy, f1, sensitivity, "
                               "specificity, precision, loss (did you mean 'auc'?)"),
    ({"train.plots": "none"}, "train.plots = 'none': not one of all, best_last, final"),
    ({"train.ema_decay": 1.0}, "train.ema_decay = 1.0: must be in [0, 1)"),
    ({"model.dropout": 1.0}, "model.dropout = 1.0: must be in [0, 1)"),
    ({"data.folds": 1}, "data.folds = 1: must be >= 2"),
    ({"train.fold": 5}, "train.fold = 5: must be in 0..4 for data.folds = 5"),
    ({"optim.lr": "nan"}, "optim.lr = nan: must be > 0"),
    ({"train.batch_size": 0}, "train.batch_size = 0: must be >= 1"),
    ({"augment.flip_axes": [2, 3]}, "augment.flip_axes = [2, 3]: distinct spatial axes among 0, 1, 2"),
    ({"data.target_shape": [28, 28]}, "data.target_shape = [28, 28]: give three positive ints (D H W)"),
    ({"data.ct_window": [400, -100]}, "data.ct_window = [400.0, -100.0]: give [low, high] in HU with low < high"),
    ({"optim.betas": [0.9, 1.0]}, "optim.betas = [0.9, 1.0]: give two values in [0, 1)"),
])
def test_an_invalid_setting_is_refused_with_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=overrides)
    assert expected in str(info.value)


def test_the_edges_of_each_range_that_are_valid_are_accepted():
    cfg = resolve(overrides={"train.ema_decay": 0.0, "model.dropout": 0.0, "data.folds": 2, "train.fold": 1,
                             "train.early_stopping": 0, "train.grad_clip": 0.0, "augment.prob": 1.0,
                             "optim.warmup_frac": 0.0, "augment.flip_axes": [0, 1, 2]})
    assert (cfg.train.ema_decay, cfg.data.folds, cfg.train.fold) == (0.0, 2, 1)


def test_all_problems_are_listed_at_once_and_case_is_forgiven():
    with pytest.raises(ConfigError) as info:
        resolve(overrides={"train.epochs": 0, "augment.prob": 1.5, "train.monitor": "AUROC"})
    message = str(info.value)
    assert message.startswith("3 invalid settings:")
    assert "train.epochs = 0: must be >= 1" in message and "augment.prob = 1.5: must be in [0, 1]" in message
    # another case of a valid choice is taken as that choice, spelled the canonical way
    cfg = resolve(overrides={"optim.optimizer": "Adam", "loss.name": "ldam", "train.precision": "BF16"})
    assert (cfg.optim.optimizer, cfg.loss.name, cfg.train.precision) == ("adam", "LDAM", "bf16")


def test_a_bad_config_file_fails_before_any_data_is_read_or_anything_written(tmp_path, capsys):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("train:\n  monitor: val_auc\n  ema_decay: 1.5\noptim:\n  scheduler: cosin\n", encoding="utf-8")
    out = tmp_path / "runs"
    code = main(["train", "--config", str(cfg_file), "--data", str(tmp_path / "missing.npz"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "missing.npz" not in err  # the config is refused before the data source is opened
    assert "optim.scheduler = 'cosin': not one of cosine, step, plateau, none (did you mean 'cosine'?)" in err
    assert "train.ema_decay = 1.5: must be in [0, 1)" in err
    assert "train.monitor = 'val_auc'" in err and "(did you mean 'auc'?)" in err
    # the flag overrides the file: the same file with a valid --monitor/--ema_decay leaves only the scheduler
    code = main(["train", "--config", str(cfg_file), "--monitor", "auc", "--ema_decay", "0.99", "--scheduler",
                 "cosine", "--data", str(tmp_path / "missing.npz"), "--output", str(out)])
    assert code != 0 and "invalid setting" not in capsys.readouterr().err  # now the data path is what fails


def test_cv_ignores_the_fold_a_config_file_sets_for_train_and_refuses_the_flag(tmp_path, capsys, monkeypatch):
    """A project's medvox.json may name the fold `medvox train` runs; `medvox cv --folds 3` trains all three
    (a file's fold 4 is not out of range for cv). `medvox cv --fold 2` is refused (cv trains every fold)."""
    from medvox.cv import crossval as cv

    got = []
    monkeypatch.setattr(cv, "cross_validate", lambda cfg, tta=True: got.append(cfg))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "medvox.json").write_text(json.dumps({"train": {"fold": 4}, "data": {"path": "x.npz"}}))
    assert main(["cv", "--folds", "3", "--output", str(tmp_path / "runs")]) == 0
    assert len(got) == 1 and got[0].data.folds == 3 and got[0].data.path == "x.npz"
    assert main(["train", "--folds", "3", "--output", str(tmp_path / "runs")]) == 2  # train still checks it
    assert "train.fold = 4: must be in 0..2 for data.folds = 3" in capsys.readouterr().err
    assert main(["cv", "--fold", "2", "--output", str(tmp_path / "runs")]) == 2 and len(got) == 1
    err = capsys.readouterr().err
    assert "--fold 2: `medvox cv` trains every fold" in err and "medvox train --fold K" in err
    assert not (tmp_path / "runs").exists()


def test_train_called_in_code_checks_the_config_before_the_data(tmp_path):
    """A config built field by field skips resolve(); train() checks it before reading anything."""
    from medvox.engine import train

    cfg = ExperimentConfig()
    cfg.data.path = str(tmp_path / "missing.npz")
    cfg.train.output = str(tmp_path / "runs")
    cfg.train.threshold_rule = "youdens"
    with pytest.raises(ConfigError, match="train.threshold_rule = 'youdens'.*did you mean 'youden'"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_config_json_round_trips_through_validation(tmp_path):
    cfg = resolve(overrides={"loss.name": "CE", "optim.optimizer": "sgd", "augment.flip_axes": [2]})
    config_mod.save(cfg, tmp_path / "config.json")
    again = resolve(tmp_path / "config.json")
    assert config_mod.to_dict(again) == config_mod.to_dict(cfg)
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "CE"


@pytest.mark.parametrize(("flags", "code", "expected"), [
    (["--model", "resnet5O"], 2, "unknown model 'resnet5O' (did you mean 'resnet50'?)"),
    (["--model", "resnet18", "--set", 'model.kwargs={"depth": 18}'], 2, "model 'resnet18' got unknown argument(s) depth"),
    (["--pretrained-path", "pretrained/nowhere.pth"], 1, "--pretrained-path pretrained/nowhere.pth: no such file"),
])
def test_model_and_weights_are_checked_before_the_data(tmp_path, capsys, flags, code, expected):
    """A mistyped model, a model argument it does not take or a missing weights file fails at once, before the
    data source is read (a first preprocessing of a large dataset takes minutes)."""
    out = tmp_path / "runs"
    got = main(["train", "--data", str(tmp_path / "missing.npz"), "--output", str(out), *flags])
    err = capsys.readouterr().err
    assert got == code and expected in err and "missing.npz" not in err
    assert not out.exists()
