"""``--recipe auto --time-budget``: the recipe fitted to a measured throughput (a made-up one here, so the choice
does not depend on the machine the suite runs on): the epochs and the EMA decay follow the budget, a coarser input
comes only when the shortest schedule does not fit, the user's epochs and input win and are forecast, and mixed
precision that measures slower than fp32 on a CPU is not used."""

from __future__ import annotations

import logging
import math

import pytest

from medvox.cli import build_parser, config_from_args
from medvox.engine import budget, probe, timing
from medvox.engine.probe import Throughput
from medvox.recipe import ema_decay_for_steps, optimizer_steps

# tiny_medmnist: a pool of 100 cases (2 folds: 50 training, 50 validation per fold) and 30 test cases
WORK = budget.Workload(folds=2, n_train=50, n_val=50, n_test=30, batch=16)


class FakeProbe:
    """A stand-in for measure_throughput: ``rate`` samples/s at 28^3, faster in proportion to fewer voxels,
    bf16 at ``bf16`` times the fp32 rate; records every call's settings."""

    def __init__(self, rate: float = 4.0, bf16: float = 1.0):
        self.rate, self.bf16, self.calls = rate, bf16, []

    def throughput(self, shape, precision="32-true") -> Throughput:
        rate = self.rate * 28 ** 3 / math.prod(shape) * (self.bf16 if "bf16" in precision else 1.0)
        return Throughput(train=rate, evaluate=3 * rate, predict=3 * rate, save_s=0.5, images_s=0.3,
                          curves_s=0.7, precision=precision, threads=2, device="cpu")

    def __call__(self, model_name, shape, channels, num_classes, batch, **kw):
        self.calls.append({"model_name": model_name, "shape": list(shape), "batch": batch, **kw})
        return self.throughput(shape, kw["precision"])


@pytest.fixture
def fake(monkeypatch):
    f = FakeProbe()
    monkeypatch.setattr(probe, "measure_throughput", f)
    monkeypatch.delenv("MEDVOX_CPU_BF16", raising=False)
    return f


def _cfg(data, *flags):
    return config_from_args(build_parser().parse_args(["cv", "--data", str(data), "--recipe", "auto", "--folds", "2",
                                                       *flags]))


def test_the_budget_picks_the_epochs_and_the_ema_follows(tiny_medmnist, fake, caplog):
    caplog.set_level(logging.INFO, logger="medvox")
    cfg = _cfg(tiny_medmnist, "--time-budget", "30")
    expected = budget.epochs_within(30 * 60, WORK, fake.throughput([28] * 3), most=100)
    assert expected is not None and budget.MIN_EPOCHS <= expected < 100  # the recipe's own would be 100
    assert cfg.train.epochs == expected and cfg.data.target_shape is None
    assert cfg.train.ema_decay == ema_decay_for_steps(optimizer_steps(50, 16, 1, expected))
    call = fake.calls[0]
    assert (call["model_name"], call["shape"], call["batch"], call["precision"]) == ("resnet18", [28] * 3, 16, "32-true")
    assert call["accelerator"] == "cpu" and call["ema"] and call["plots"] and call["threads"] >= 1
    said = caplog.text
    assert f"2 folds ~ {budget.forecast(expected, WORK, fake.throughput([28] * 3)).total_s / 60:.0f} min on this CPU" in said
    assert f"{expected} epochs at 28^3 (within the 30 min time budget" in said and "4.0 samples/s measured" in said
    assert f"{expected} epochs to fit the time budget (the recipe's own: 100" in said
    fc = timing.forecast_for(cfg)
    assert fc is not None and fc.epochs == expected and fc.folds == 2 and fc.total_s <= 30 * 60
    # a smaller budget never gives more epochs; a larger one at most the recipe's own
    found = [_cfg(tiny_medmnist, "--time-budget", str(m)).train.epochs for m in (20, 30, 60, 600)]
    assert found == sorted(found) and found[1] == expected and found[-1] == 100
    assert len(fake.calls) == 1  # the one measurement, kept in the cache, served every later choice


def test_a_coarser_input_only_when_the_shortest_schedule_does_not_fit(tiny_medmnist, fake, caplog):
    caplog.set_level(logging.INFO, logger="medvox")
    # 10 epochs at 28^3 need ~9 min here: with 6 min the recipe goes down the list of coarser inputs
    assert budget.epochs_within(6 * 60, WORK, fake.throughput([28] * 3), most=100) is None
    cfg = _cfg(tiny_medmnist, "--time-budget", "6")
    shape = cfg.data.target_shape
    assert shape is not None and math.prod(shape) < 28 ** 3 and len(set(shape)) == 1
    assert [c["shape"] for c in fake.calls] == [[28] * 3] + [[s] * 3 for s in (24, 20, 16) if s >= shape[0]]
    assert budget.forecast(cfg.train.epochs, WORK, fake.throughput(shape)).total_s <= 6 * 60
    assert cfg.train.epochs >= budget.MIN_EPOCHS
    assert f"time budget: the CNN's input is the whole 28x28x28 volume resized to {'x'.join(map(str, shape))}" in caplog.text
    # nothing fits: the shortest schedule at the fastest input (the coarsest here), with a warning that says what
    # to do
    caplog.clear()
    hopeless = _cfg(tiny_medmnist, "--time-budget", "0.5")
    assert hopeless.data.target_shape == [16, 16, 16] and hopeless.train.epochs == budget.MIN_EPOCHS
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("over the 0.5 min time budget even with the shortest useful schedule" in r.getMessage()
               and "--time-budget" in r.getMessage() for r in warned)


def test_the_users_epochs_and_input_win_and_are_forecast(tiny_medmnist, fake, caplog):
    caplog.set_level(logging.INFO, logger="medvox")
    cfg = _cfg(tiny_medmnist, "--time-budget", "6", "--epochs", "7")
    assert cfg.train.epochs == 7 and cfg.data.target_shape is None  # no coarser input either: only a forecast
    assert cfg.train.ema_decay == ema_decay_for_steps(optimizer_steps(50, 16, 1, 7))
    assert "your --epochs win over the 6 min time budget: 2 folds ~" in caplog.text and "7 epochs at 28^3" in caplog.text
    assert timing.forecast_for(cfg).epochs == 7
    caplog.clear()
    over = _cfg(tiny_medmnist, "--time-budget", "1", "--epochs", "7")
    assert over.train.epochs == 7
    assert any(r.levelno == logging.WARNING and "over the 1 min time budget" in r.getMessage() for r in caplog.records)
    # a grid the user gives is kept: the epochs shrink to the floor, the input does not
    shaped = _cfg(tiny_medmnist, "--time-budget", "6", "--target-shape", "28", "28", "28")
    assert shaped.data.target_shape == [28, 28, 28] and shaped.train.epochs == budget.MIN_EPOCHS
    assert {tuple(c["shape"]) for c in fake.calls} <= {(28, 28, 28), (24, 24, 24), (20, 20, 20), (16, 16, 16)}


def test_no_budget_measures_nothing(tiny_medmnist, fake, monkeypatch):
    assert _cfg(tiny_medmnist, "--time-budget", "0").train.epochs == 100 and fake.calls == []
    # a GPU without --time-budget: no budget (the batch is fitted to its memory as before)
    import torch

    import medvox.recipe as recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a stand-in GPU")
    monkeypatch.setattr(recipe, "gpu_batch", lambda plan, model, kwargs=None: (16, 1, "GPU: a stand-in"))
    assert _cfg(tiny_medmnist, "--gpu").train.epochs == 100 and fake.calls == []
    gpu = _cfg(tiny_medmnist, "--gpu", "--time-budget", "6")
    assert fake.calls and fake.calls[-1]["accelerator"] == "cuda" and gpu.train.epochs < 100


def test_amp_measured_slower_than_fp32_runs_fp32(tiny_medmnist, fake, monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="medvox")
    monkeypatch.setenv("MEDVOX_CPU_BF16", "1")  # a CPU with native bf16: --amp would mean bf16
    fake.bf16 = 0.5
    cfg = _cfg(tiny_medmnist, "--time-budget", "30", "--amp")
    assert cfg.train.precision == "fp32" and [c["precision"] for c in fake.calls] == ["bf16-mixed", "32-true"]
    assert "precision: fp32, measured faster than bf16" in caplog.text
    assert cfg.train.epochs == budget.epochs_within(30 * 60, WORK, fake.throughput([28] * 3), most=100)
    # where bf16 is the faster, --amp keeps it, and the budget is fitted to the bf16 figures
    faster = FakeProbe(bf16=2.0)
    monkeypatch.setattr(probe, "measure_throughput", faster)
    monkeypatch.setenv("MEDVOX_CACHE", str(tmp_path / "another_machine"))  # the first figures are not kept there
    fast = _cfg(tiny_medmnist, "--time-budget", "30", "--amp")
    assert fast.train.precision == "auto" and fast.train.amp
    assert fast.train.epochs == budget.epochs_within(30 * 60, WORK, faster.throughput([28] * 3, "bf16"), most=100)
    # an explicit --precision bf16 is the user's: measured, used, not compared
    slower = FakeProbe(bf16=0.5)
    monkeypatch.setattr(probe, "measure_throughput", slower)
    monkeypatch.setenv("MEDVOX_CACHE", str(tmp_path / "a_third_machine"))
    assert _cfg(tiny_medmnist, "--time-budget", "30", "--precision", "bf16").train.precision == "bf16"
    assert [c["precision"] for c in slower.calls] == ["bf16-mixed"]
