"""``--recipe auto``: the recipe derived from the plan, and the user's settings always winning over it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import pytest

from medvox.cli import build_parser, config_from_args
from medvox.data import plan_dataset, prepare
from medvox.recipe import (
    CPU_INPUT_VOXELS,
    MIN_SIDE,
    auto_recipe,
    capped_shape,
    ema_decay_for_steps,
    explicit_keys,
    fit_batch,
    optimizer_steps,
)
from tests.conftest import medmnist_subset


def _plan(shape, n=1286, channels=1, imbalance=3.58):
    return {"target_shape": list(shape), "in_channels": channels, "n_cases": n, "imbalance_ratio": imbalance}


@pytest.mark.parametrize(("shape", "channels", "batch", "accum"), [
    ((28, 28, 28), 1, 16, 1), ((40, 40, 40), 1, 16, 1), ((32, 32, 32), 2, 16, 1),  # 2 x 32^3 = 40.3^3 voxels
    ((64, 64, 64), 1, 8, 2), ((128, 128, 128), 1, 4, 4), ((64, 64, 64), 3, 4, 4),
])
def test_batch_follows_voxels_with_an_effective_batch_of_16(shape, channels, batch, accum):
    values, _ = auto_recipe(_plan(shape, channels=channels), folds=5, pretrained=False)
    if (shape, channels) == ((32, 32, 32), 2):
        batch, accum = 8, 2  # 65,536 voxels > 40^3 = 64,000
    assert (values["train.batch_size"], values["train.grad_accum"]) == (batch, accum)


def test_length_ema_and_loss_follow_the_dataset():
    # AdrenalMNIST3D: 1,286 pool cases, 5 folds -> 1,028 per fold / 16 = 65 steps -> 40 epochs, EMA tau 520 steps
    values, why = auto_recipe(_plan((28, 28, 28)), folds=5, pretrained=False)
    assert values["train.epochs"] == 40 and values["train.ema_decay"] == 0.998
    assert values["loss.name"] == "weighted_CE" and values["model.name"] == "resnet18"
    assert any("3.58:1" in line for line in why)
    assert values["train.feature_fusion"] is True and any("descriptors" in line for line in why)
    small, _ = auto_recipe(_plan((28, 28, 28), n=100, imbalance=1.2), folds=5, pretrained=False)
    assert small["train.epochs"] == 100 and small["loss.name"] == "CE"  # 5 steps per epoch: capped at 100 epochs
    big, _ = auto_recipe(_plan((28, 28, 28), n=20000), folds=5, pretrained=False)
    assert big["train.epochs"] == 20  # 1000 steps per epoch: at least 20 epochs
    assert 0.99 <= small["train.ema_decay"] < big["train.ema_decay"] <= 0.9999


def test_pretrained_keeps_the_original_fine_tuning_settings():
    values, why = auto_recipe(_plan((28, 28, 28)), folds=5, pretrained=True)
    assert values == {} and "pretrained" in why[0]


def test_explicit_keys_from_file_and_flags():
    keys = explicit_keys({"optim": {"lr": 1e-3}, "model": {"kwargs": {"stem_stride": 1}}}, {"loss.name": "CE"})
    assert keys == {"optim.lr", "model.kwargs", "loss.name"}


def test_cli_auto_recipe_fills_only_what_the_user_left_open(tiny_medmnist, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="medvox")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.json").write_text(json.dumps({"loss": {"name": "focal"}}))
    args = build_parser().parse_args(["cv", "--data", str(tiny_medmnist), "--recipe", "auto", "--lr", "5e-4",
                                      "--config", "exp.json", "--time-budget", "0"])  # 0: nothing measured
    cfg = config_from_args(args)
    assert cfg.optim.lr == 5e-4 and cfg.loss.name == "focal"  # flag and config file win
    assert cfg.model.name == "resnet18" and cfg.optim.optimizer == "adamw" and cfg.train.batch_size == 16
    assert cfg.augment.flip_axes == [2] and cfg.train.recipe == "auto"
    assert cfg.train.recipe_applied and cfg.train.final_weights == "best"
    said = caplog.text
    assert "--recipe auto" in said and "your settings win for loss.name, optim.lr" in said
    # the default stays the original pipeline's settings
    original = config_from_args(build_parser().parse_args(["cv", "--data", str(tiny_medmnist)]))
    assert (original.model.name, original.optim.lr, original.train.batch_size, original.loss.name) == (
        "resnet50", 2e-4, 6, "LDAM")


def test_fit_batch_halves_until_the_step_fits():
    gib = 2**30
    assert fit_batch(0.1 * gib, 1 * gib, 80 * gib) == (16, 1)  # plenty of room: the whole effective batch
    assert fit_batch(3 * gib, 2 * gib, 40 * gib) == (8, 2)  # 2 + 8 * 3 = 26 <= 32; 16 would need 50
    assert fit_batch(3 * gib, 2 * gib, 20 * gib) == (4, 4)  # 2 + 4 * 3 = 14 <= 16
    assert fit_batch(30 * gib, 2 * gib, 20 * gib) == (1, 16)  # not even one fits: batch 1, reported as is
    assert fit_batch(1 * gib, 0, 10 * gib, effective=12) == (8, 2)  # powers of two: 8 GiB fits the 8 GiB headroom
    assert fit_batch(1 * gib, 0.5 * gib, 10 * gib, effective=12) == (4, 3)  # 8.5 does not: 4, and 12 / 4 = 3
    assert fit_batch(30 * gib, 2 * gib, 20 * gib, smallest=2) == (2, 8)  # the floor the GPU route uses
    assert fit_batch(3 * gib, 2 * gib, 20 * gib, smallest=2) == (4, 4)  # a floor below the fit changes nothing


def _fake_cuda(monkeypatch, free_gib: float, total_gib: float = 80.0):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, total_gib * 2**30))


def test_gpu_batch_never_goes_below_two_samples(monkeypatch):
    """A card that holds the probe's 2 samples but not 2 within the 80 % headroom still trains at batch 2
    (never 1: ResNet-18 on 28^3 cannot train BatchNorm on one sample), and the reason says so."""
    from medvox import recipe

    gib = 2**30
    _fake_cuda(monkeypatch, free_gib=10)
    monkeypatch.setattr(recipe, "measure_step_memory", lambda *a, **k: (4.5 * gib, 1 * gib))  # 2 samples: 10 GiB
    batch, accum, why = recipe.gpu_batch(_plan((28, 28, 28)), "resnet18")
    assert (batch, accum) == (2, 8) and "above the 80 % headroom" in why
    monkeypatch.setattr(recipe, "measure_step_memory", lambda *a, **k: (0.5 * gib, 1 * gib))  # 1 + 8 * 0.5 = 5 <= 8
    batch, accum, why = recipe.gpu_batch(_plan((28, 28, 28)), "resnet18")
    assert (batch, accum) == (8, 2) and "headroom" not in why


def test_a_model_too_large_for_the_gpu_is_refused_with_the_fix(monkeypatch):
    import torch

    from medvox import recipe
    from medvox.config import ConfigError

    _fake_cuda(monkeypatch, free_gib=1.5, total_gib=24)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(recipe, "measure_step_memory", out_of_memory)
    with pytest.raises(ConfigError) as err:
        recipe.gpu_batch(_plan((256, 256, 128)), "resnet50")
    text = str(err.value)
    assert "resnet50 on 2 samples of 256x256x128 x 1 channel(s)" in text
    assert "1.5 of 24.0 GiB free" in text and "22.5 GiB of it is in use" in text
    assert "--target-shape" in text and "--model" in text


def test_gpu_model_without_a_visible_gpu_keeps_the_voxel_rule(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    values, why = auto_recipe(_plan((64, 64, 64)), folds=5, pretrained=False, gpu_model="resnet50")
    assert (values["train.batch_size"], values["train.grad_accum"]) == (8, 2) and "voxels" in why[0]


def test_the_gpu_memory_probe_trains_where_the_deepest_map_is_one_voxel():
    """ResNet-18 on 28^3 (AdrenalMNIST3D) ends in a 1-voxel map, where BatchNorm cannot train on one sample:
    the probe of `--recipe auto --gpu` must not use batch 1. Its steps run on any device, so the CPU checks
    them here."""
    import torch

    from medvox.models import create_model
    from medvox.recipe import PROBE_BATCHES, probe_step

    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, num_classes=2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        probe_step(model, opt, 1, 1, [28, 28, 28], 2, "cpu")  # batch 1: BatchNorm on a 1-voxel map cannot train
    before = [p.detach().clone() for p in model.parameters()]
    probe_step(model, opt, min(PROBE_BATCHES), 1, [28, 28, 28], 2, "cpu")  # the smallest batch the probe uses
    assert min(PROBE_BATCHES) >= 2 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_step_memory_splits_the_peaks_into_per_sample_and_fixed(monkeypatch):
    import torch

    from medvox import recipe

    mib = 2**20
    batches = []
    monkeypatch.setattr(recipe, "probe_step", lambda model, opt, batch, *a: batches.append(batch))
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 700 * mib + batches[-1] * 90 * mib)
    per_sample, fixed = recipe.measure_step_memory("resnet10", [16, 16, 16], 1, 2, "cpu")
    assert batches == list(recipe.PROBE_BATCHES) and (per_sample, fixed) == (90 * mib, 700 * mib)


@pytest.mark.parametrize(("shape", "capped"), [
    ((64, 64, 64), [28, 28, 28]),  # AdrenalMNIST3D's 64^3 release -> the 28^3 the accuracy study trains at
    ((28, 28, 28), None), ((20, 20, 20), None),  # already within the cap: the plan's grid
    ((160, 160, 20), [37, 37, 16]),  # a thin axis keeps MIN_SIDE slices, the others take the reduction
    ((512, 512, 8), [52, 52, 8]),  # an axis under MIN_SIDE is never shrunk
    ((96, 64, 48), [40, 26, 20]),  # one factor (0.42, floored): the proportions stay
])
def test_capped_shape_keeps_proportions_within_the_voxel_budget(shape, capped):
    out = capped_shape(shape)
    assert out == capped
    if out is not None:
        assert math.prod(out) <= CPU_INPUT_VOXELS
        assert all(min(side, MIN_SIDE) <= o <= side for o, side in zip(out, shape, strict=True))


def test_cpu_cap_sets_the_cnn_input_and_sizes_the_batch_for_it():
    values, why = auto_recipe(_plan((64, 64, 64)), folds=5, pretrained=False, cpu_input_voxels=CPU_INPUT_VOXELS)
    assert values["data.target_shape"] == [28, 28, 28]
    assert (values["train.batch_size"], values["train.grad_accum"]) == (16, 1)  # 28^3: 16 x 1, not 64^3's 8 x 2
    assert "64x64x64 volume resized to 28x28x28" in why[0] and "descriptors keep the native grid" in why[0]
    small, why = auto_recipe(_plan((28, 28, 28)), folds=5, pretrained=False, cpu_input_voxels=CPU_INPUT_VOXELS)
    assert "data.target_shape" not in small and not any("resized" in line for line in why)


def test_cli_caps_the_cpu_input_unless_the_user_or_the_model_decides(medmnist_64, tmp_path, monkeypatch, caplog):
    """`--recipe auto` on the 64^3 release without --gpu trains the CNN at 28^3 (the whole volume) and keeps the
    descriptors at 64^3; a grid or a Swin UNETR given by the user, or --gpu, keeps the user's / plan's input."""
    import torch

    caplog.set_level(logging.INFO, logger="medvox")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = medmnist_subset(medmnist_64, {"train": 40, "val": 10, "test": 10}, tmp_path / "adrenal64_tiny.npz")

    def cfg_for(*flags):
        return config_from_args(build_parser().parse_args(["cv", "--data", str(data), "--recipe", "auto",
                                                           "--time-budget", "0", *flags]))  # 0: nothing measured

    cfg = cfg_for()
    assert cfg.data.target_shape == [28, 28, 28] and cfg.data.target_spacing is None
    assert cfg.train.feature_grid == "native" and cfg.train.batch_size == 16
    assert "64x64x64 volume resized to 28x28x28" in caplog.text
    assert cfg == cfg_for("--target-shape", "28", "28", "28")  # the accuracy study's auto64 command, exactly
    cache_dir = Path(os.environ["MEDVOX_CACHE"])
    assert not list(cache_dir.rglob("images.npy"))  # the recipe read the plan only: no volume preprocessed
    native = dataclasses.replace(cfg.data, target_shape=None)
    assert plan_dataset(native, progress=False) == prepare(native, progress=False).plan
    assert len(list(cache_dir.rglob("images.npy"))) == 1
    assert cfg_for("--target-shape", "40", "40", "40").data.target_shape == [40, 40, 40]
    spaced = cfg_for("--target-spacing", "2", "2", "2").data
    assert spaced.target_shape is None and spaced.target_spacing == [2.0, 2.0, 2.0]
    assert cfg_for("--model", "swin_unetr").data.target_shape is None
    assert cfg_for("--gpu").data.target_shape is None  # a GPU trains on the plan's grid


@pytest.mark.parametrize(("steps", "decay"), [
    (2600, 0.998),  # the recipe's own length: time constant 520 steps
    (768, 0.9934),  # AdrenalMNIST3D's 64 steps per epoch at --epochs 12: tau 153.6 -> 0.99349, rounded down
    (600, 0.9916), (100, 0.95),
    (20, 0.9), (1, 0.9),  # a time constant of at least 10 steps
    (10**6, 0.9999),  # and at most 10,000
])
def test_ema_decay_has_a_time_constant_of_a_fifth_of_the_steps(steps, decay):
    assert ema_decay_for_steps(steps) == decay
    if 50 <= steps <= 50_000:  # within the bounds: 1 / (1 - decay) is a fifth of the steps, to the rounding
        assert 1 / (1 - decay) <= 0.2 * steps < 1 / (1 - decay - 1e-4)


@pytest.mark.parametrize(("n", "batch", "accum", "processes"), [
    (1028, 16, 1, 1), (1028, 8, 2, 1), (50, 16, 1, 1), (16, 16, 1, 1), (10, 16, 1, 1), (101, 4, 3, 1),
    (101, 4, 3, 2), (1028, 16, 1, 4), (33, 16, 2, 2),
])
def test_optimizer_steps_count_what_the_trainer_runs(n, batch, accum, processes):
    """The recipe counts steps as FoldTrainer does: ceil(len(train loader of rank 0) / accumulation) per epoch,
    the loader built as the trainer builds it (drop_last when a rank's shard holds more than one batch)."""
    import numpy as np

    from medvox.data.loader import ArrayLoader

    images, labels = np.zeros((n, 1, 2, 2, 2), np.float32), np.zeros(n, np.int64)
    loader = ArrayLoader(images, labels, np.arange(n), batch, shuffle=True, seed=0,
                         drop_last=n // processes > batch, rank=0, world_size=processes)
    assert optimizer_steps(n, batch, accum, epochs=3, processes=processes) == 3 * math.ceil(len(loader) / accum)


def test_user_epochs_or_batch_give_the_ema_of_the_steps_that_run():
    """`--epochs 12` under the recipe gets the EMA decay of the steps the user's settings make, not that of the
    recipe's own 40 epochs (0.998, a time constant of most of a 768-step run)."""
    plan = _plan((28, 28, 28))  # 1,028 training cases per fold, batch 16 x 1: 64 steps per epoch
    own, _ = auto_recipe(plan, folds=5, pretrained=False)
    assert (own["train.epochs"], own["train.ema_decay"]) == (40, ema_decay_for_steps(40 * 64)) == (40, 0.998)
    short, why = auto_recipe(plan, folds=5, pretrained=False, given={"train.epochs": 12})
    assert short["train.ema_decay"] == ema_decay_for_steps(12 * 64) == 0.9934
    assert any("768 optimizer steps that run (12 epochs x 64) with your train.epochs 12" in line for line in why)
    small_batch, _ = auto_recipe(plan, folds=5, pretrained=False, given={"train.batch_size": 4})
    assert small_batch["train.ema_decay"] == ema_decay_for_steps(40 * 257) == 0.9995  # 1028 // 4 = 257 steps
    accumulated, _ = auto_recipe(plan, folds=5, pretrained=False, given={"train.grad_accum": 4, "train.epochs": 12})
    assert accumulated["train.ema_decay"] == ema_decay_for_steps(12 * 16) == 0.9739
    two_ranks, _ = auto_recipe(plan, folds=5, pretrained=False, given={"train.epochs": 12}, processes=2)
    assert two_ranks["train.ema_decay"] == ema_decay_for_steps(12 * 32)  # each rank: 514 cases, 32 steps


def test_apply_recipe_from_python_fills_the_same_keys_and_applies_once(tiny_medmnist, caplog):
    """A config built in Python gets the recipe the CLI gives it (the keys that differ from the defaults are the
    user's); the resolved config records that it was applied, and applying it again changes nothing."""
    from medvox.config import DataConfig, ExperimentConfig, TrainConfig
    from medvox.recipe import apply_recipe, changed_keys

    caplog.set_level(logging.INFO, logger="medvox")
    cfg = ExperimentConfig(data=DataConfig(path=str(tiny_medmnist), folds=2), train=TrainConfig(recipe="auto",
                                                                                              epochs=3,
                                                                                              time_budget_min=0))
    assert changed_keys(cfg) == {"data.path", "data.folds", "train.recipe", "train.epochs", "train.time_budget_min"}
    done = apply_recipe(cfg)
    cli = config_from_args(build_parser().parse_args(["train", "--data", str(tiny_medmnist), "--folds", "2",
                                                      "--recipe", "auto", "--epochs", "3", "--time-budget", "0"]))
    assert done == cli and done.train.recipe_applied and done.train.epochs == 3  # the user's epochs win
    assert (done.model.name, done.optim.optimizer, done.train.final_weights) == ("resnet18", "adamw", "best")
    n_train = 100 // 2  # the pool's 100 cases, 2 folds
    assert done.train.ema_decay == ema_decay_for_steps(optimizer_steps(n_train, done.train.batch_size,
                                                                       done.train.grad_accum, 3))
    lines = caplog.text.count("--recipe auto: ")
    assert apply_recipe(done) is done and caplog.text.count("--recipe auto: ") == lines  # once, silently
    # the user's explicit value at its default is seen through `given` (the CLI's flags / file keys)
    assert apply_recipe(cfg, given={"data.path", "data.folds", "train.recipe", "train.batch_size"}).train.batch_size == 6
    original = ExperimentConfig(data=DataConfig(path=str(tiny_medmnist)))
    assert apply_recipe(original) is original
