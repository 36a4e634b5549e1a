"""Precision by capability: --amp on a CPU is bf16 only where bf16 is native (forced either way with
MEDVOX_CPU_BF16), an explicit --precision bf16 is honoured with a warning where it is emulated, a GPU keeps
bf16 or fp16 + scaler; the run's run_info.json and train.log say what was used and why."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from medvox.cli import main
from medvox.config import TrainConfig
from medvox.engine.setup import choose_precision, resolve_precision
from tests.reliability.helpers import FAST, MIL


def _tc(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **kw)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setenv("MEDVOX_CPU_BF16", "0")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setenv("MEDVOX_CPU_BF16", "1")


def test_cpu_without_native_bf16(no_native_bf16):
    amp = choose_precision(_tc(amp=True), "cpu")
    assert amp.precision == "32-true" and amp.warning is None
    assert amp.reason == ("fp32: --amp, but this CPU has no native bf16 (MEDVOX_CPU_BF16=0); emulated bf16 runs ~26x "
                          "slower than fp32")
    assert choose_precision(_tc(precision="fp16"), "cpu").precision == "32-true"  # fp16 is GPU-only; not bf16 here
    explicit = choose_precision(_tc(precision="bf16"), "cpu")
    assert explicit.precision == "bf16-mixed"  # asked for by name: honoured
    assert explicit.reason == "bf16: --precision bf16, emulated on this CPU (MEDVOX_CPU_BF16=0)"
    assert explicit.warning.startswith("--precision bf16: this CPU has no native bf16 (MEDVOX_CPU_BF16=0); oneDNN "
                                       "emulates it, ~26x slower per step than fp32 on such CPUs (ResNet-10, 8 x 32^3)")
    assert choose_precision(_tc(), "cpu").precision == "32-true"
    assert choose_precision(_tc(amp=True, precision="fp32"), "cpu").reason == "fp32: --precision fp32"


def test_cpu_with_native_bf16(native_bf16):
    amp = choose_precision(_tc(amp=True), "cpu")
    assert (amp.precision, amp.warning) == ("bf16-mixed", None)
    assert amp.reason == "bf16: --amp on a CPU with native bf16 (MEDVOX_CPU_BF16=1)"
    assert choose_precision(_tc(precision="bf16"), "cpu").warning is None
    assert choose_precision(_tc(precision="fp16"), "cpu").precision == "bf16-mixed"
    assert choose_precision(_tc(), "cpu").reason == "fp32: no mixed precision asked for (--amp or --precision) on the CPU"


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_gpu_is_unchanged_by_the_cpu_probe(bf16_gpu, no_native_bf16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    want = "bf16-mixed" if bf16_gpu else "16-mixed"
    assert resolve_precision(_tc(), "cuda") == want  # mixed precision by default on a GPU
    assert resolve_precision(_tc(amp=True), "cuda") == want
    assert resolve_precision(_tc(precision="fp16"), "cuda") == "16-mixed"
    assert resolve_precision(_tc(precision="fp32"), "cuda") == "32-true"


def test_a_bad_override_is_refused(monkeypatch):
    monkeypatch.setenv("MEDVOX_CPU_BF16", "maybe")
    with pytest.raises(ValueError, match="MEDVOX_CPU_BF16='maybe'"):
        choose_precision(_tc(amp=True), "cpu")


def _train(data, out, *extra) -> int:
    return main(["train", "--data", str(data), *MIL, *FAST, "--epochs", "1", "--folds", "2", "--target-shape", "16",
                 "16", "16", "--output", str(out), *extra])


@pytest.mark.parametrize(("native", "flag", "used", "reason_start"), [
    ("0", "--amp", "32-true", "fp32: --amp, but this CPU has no native bf16 (MEDVOX_CPU_BF16=0)"),
    ("1", "--amp", "bf16-mixed", "bf16: --amp on a CPU with native bf16 (MEDVOX_CPU_BF16=1)"),
], ids=["emulated", "native"])
def test_amp_run_records_the_precision_and_why(native, flag, used, reason_start, tiny_medmnist, tmp_path,
                                               monkeypatch, capsys, clean_process):
    monkeypatch.setenv("MEDVOX_CPU_BF16", native)
    assert _train(tiny_medmnist, tmp_path, flag) == 0
    run = tmp_path / "mil" / "fold_0"
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"]["used"] == used and info["precision"]["reason"].startswith(reason_start)
    assert info["hardware"]["cpu_bf16_native"] is (native == "1")
    assert info["hardware"]["cpu_bf16_basis"] == f"MEDVOX_CPU_BF16={native}"
    assert info["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"precision {used}, 1 process(es)" in capsys.readouterr().out
    log_text = (run / "train.log").read_text()
    assert log_text.count("precision: ") == 1 and f"precision: {reason_start}" in log_text


def test_explicit_bf16_on_an_emulating_cpu_is_honoured_with_a_warning(tiny_medmnist, tmp_path, monkeypatch, capsys,
                                                                      clean_process):
    monkeypatch.setenv("MEDVOX_CPU_BF16", "0")
    assert _train(tiny_medmnist, tmp_path, "--precision", "bf16") == 0
    run = tmp_path / "mil" / "fold_0"
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"] == {"used": "bf16-mixed",
                                 "reason": "bf16: --precision bf16, emulated on this CPU (MEDVOX_CPU_BF16=0)"}
    out = capsys.readouterr().out
    assert "--precision bf16: this CPU has no native bf16 (MEDVOX_CPU_BF16=0); oneDNN emulates it, ~26x slower" in out
    assert "~26x slower per step" in (run / "train.log").read_text()


def test_demo_asks_for_amp_only_where_bf16_is_native(monkeypatch, tmp_path, caplog):
    """The demo's mixed precision follows the capability: bf16 where native, fp32 (amp off) elsewhere, and it
    says why it trains in fp32."""
    from medvox.demo import DEMO_OVERRIDES, demo_config

    caplog.set_level(logging.INFO, logger="medvox")

    assert "train.amp" not in DEMO_OVERRIDES and "train.precision" not in DEMO_OVERRIDES
    seen = []
    for native in ("0", "1"):
        monkeypatch.setenv("MEDVOX_CPU_BF16", native)
        cfg = demo_config(tmp_path / "manifest.csv", tmp_path / "out")
        seen.append((cfg.train.amp, resolve_precision(cfg.train, "cpu")))
    assert seen == [(False, "32-true"), (True, "bf16-mixed")]
    said = [r.getMessage() for r in caplog.records if "the demo trains in fp32" in r.getMessage()]
    assert said == ["the demo trains in fp32: bf16 is emulated on this CPU (MEDVOX_CPU_BF16=0), ~26x slower than fp32"]
