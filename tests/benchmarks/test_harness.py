"""The benchmark harness (``benchmarks/run.py``) runs end to end at tiny sizes and reports what it measured.

No wall-clock assertion: only that every table is there and that every ratio is computed from the
measured medians written next to it in ``results.json``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from benchmarks.gpu import peak_tflops
from benchmarks.memory_bench import extrapolate
from benchmarks.report import render, target_rows
from benchmarks.train_bench import ratios

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, medmnist_28):
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "RESULTS.md", out / "results.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--smoke", "--npz", str(medmnist_28),
                           "--out", str(md), "--json", str(js)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return md.read_text(), json.loads(js.read_text())


def test_smoke_run_writes_every_table(smoke):
    md, results = smoke
    for heading in ("## Machine", "## Targets", "## Augmentation", "## Training", "## GPU"):
        assert heading in md
    assert "| method | samples/s, median (min-max) | CPU s/sample (all processes) | medvox / method |" in md
    assert "| pipeline | epoch s | samples/s, median (min-max) | data wait |" in md
    assert "No GPU figures from this machine" in md or results["gpu"]["status"] == "measured"
    assert results["machine"]["cores"] >= 1 and len(results["machine"]["load_average"]) == 3
    assert {r["key"] for r in results["targets"]} >= {"aug_vs_monai", "train_fp32_vs_a", "amp_time", "data_wait"}
    machine = results["machine"]
    assert machine["cpu_capability"] and machine["bf16_native"] in (True, False)
    assert f"**CPU kind: {machine['kind']}.**" in md


def test_augmentation_ratios_are_the_measured_medians_divided(smoke):
    md, results = smoke
    methods = results["augmentation"]["methods"]
    ours = methods["medvox"]["samples_per_s"]["median"]
    for peer in ("monai", "torchio", "torchio_inproc"):
        theirs = methods[peer]["samples_per_s"]["median"]
        assert theirs > 0
        assert results["augmentation"]["ratios"][f"vs_{peer}"] == pytest.approx(ours / theirs)
        assert f"| {ours / theirs:.2f}x |" in md
    tio = min(ours / methods[p]["samples_per_s"]["median"] for p in ("torchio", "torchio_inproc"))
    assert results["augmentation"]["ratios"]["vs_torchio_best"] == pytest.approx(tio)


def test_training_ratios_are_the_measured_medians_divided(smoke):
    md, results = smoke
    configs = results["training"]["configs"]
    for c in configs.values():
        rates = [e["samples"] / e["seconds"] for e in c["epochs"]]
        assert c["samples_per_s"]["median"] == pytest.approx(sorted(rates)[len(rates) // 2])
        assert 0 <= c["data_wait_frac"]["median"] < 1
    rate = {n: c["samples_per_s"]["median"] for n, c in configs.items()}
    expected = rate["medvox_fp32"] / rate["peer_a"]
    assert results["training"]["ratios"]["fp32_vs_peer_a"] == pytest.approx(expected)
    row = next(r for r in results["targets"] if r["key"] == "train_fp32_vs_a")
    assert row["value"] == pytest.approx(expected) and row["met"] == (expected >= 1.3)
    assert f"{expected:.2f}x fp32_vs_peer_a" in md and f"| {expected:.3f}x |" in md
    amp = next(r for r in results["targets"] if r["key"] == "amp_time")
    per_round = [a / b for a, b in zip(configs["medvox_fp32"]["samples_per_s"]["values"],
                                        configs["medvox_amp"]["samples_per_s"]["values"], strict=True)]
    assert amp["value"] == pytest.approx(statistics.median(per_round))  # the per-round (paired) median
    assert amp["met"] == (amp["value"] <= 1.1)
    # --amp resolves to bf16 only where it is native here, and the report says what it chose
    chosen = configs["medvox_amp"]["setup"]["precision"]
    assert chosen == ("bf16-mixed" if results["machine"]["bf16_native"] else "32-true")
    assert f"`--amp` chose `{chosen}` here." in md


def _config(rate: float) -> dict:
    stat = {"median": rate, "min": rate, "max": rate, "values": [rate]}
    return {"samples_per_s": stat}


def test_ratios_pick_medvox_fastest_and_report_renders_them():
    configs = {"peer_a": _config(2.0), "peer_b": _config(4.0), "medvox_fp32": _config(4.4), "medvox_bf16": _config(5.0),
               "medvox_amp": _config(5.0)}
    r = ratios(configs)
    assert r["medvox"] == "medvox_bf16"
    assert r["bf16_vs_peer_a"] == pytest.approx(2.5) and r["bf16_vs_peer_b"] == pytest.approx(1.25)
    assert r["fp32_vs_peer_a"] == pytest.approx(2.2) and r["fp32_vs_amp"] == pytest.approx(0.88)
    results = {"meta": {"command": "x", "date": "d", "mode": "smoke", "duration_s": 60, "load_end": [1, 1, 1]},
               "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 1, "cpu_flags": {}, "gpu": None, "python": "3",
                           "torch": "t", "torch_threads": 2, "monai": "m", "torchio": "i", "lightning": "l",
                           "load_average": [1, 1, 1], "bf16_native": True},
               "training": {"ratios": r}}
    rows = {row["key"]: row for row in target_rows(results)}
    assert rows["train_bf16_vs_a"]["met"] is True and rows["train_bf16_vs_b"]["met"] is True
    assert rows["train_fp32_vs_a"]["met"] is True and rows["amp_time"]["met"] is True
    assert rows["aug_vs_monai"]["met"] is None  # the section did not run: no verdict
    md = render(results)
    assert ("| Training, bf16: medvox / (a) MONAI tutorial pipeline (fp32, as written) (samples/s) | 2.500x | >= 2 "
            "| yes |") in md
    # where bf16 is emulated the bf16 targets have no verdict, whatever was measured
    results["machine"]["bf16_native"] = False
    rows = {row["key"]: row for row in target_rows(results)}
    assert rows["train_bf16_vs_a"]["met"] is None and "not on this machine" in rows["train_bf16_vs_a"]["target"]
    assert rows["train_fp32_vs_a"]["met"] is True


def test_memory_extrapolates_linearly_in_the_batch():
    rows = [{"precision": "bf16", "checkpointing": False, "batch": b, "peak_gb": 1.0 + 0.5 * b, "params": 2**28}
            for b in (1, 2)]
    (e,) = extrapolate(rows, 6)
    assert e["per_sample_gb"] == pytest.approx(0.5) and e["peak_b6_gb"] == pytest.approx(4.0)
    assert e["adam_and_grads_gb"] == pytest.approx(3.0)


def test_gpu_peak_table_matches_names_in_order():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == ("H100 SXM", 989.0)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == "H100 PCIe"
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "bf16")[0] == "A100"
    assert peak_tflops("NVIDIA L40S", "bf16")[0] == "L40S"
    assert peak_tflops("NVIDIA A10G", "bf16") is None and peak_tflops("Tesla V100", "bf16") is None


def test_mfu_sweep_measures_every_configuration_and_profiles_the_first():
    """The GPU MFU sweep, smoke-run on the CPU at a tiny size: one row per configuration, FLOPs from the
    meta-device count, the first configuration's top ops from torch.profiler, a Markdown table."""
    from benchmarks.gpu import format_sweep, mfu_sweep, train_step_flops

    res = mfu_sweep("resnet10", 16, (2, 4), steps=1, device="cpu", compile_too=False)
    runs = res["runs"]
    assert [(r["batch"], r["channels_last"], r["augment_on"]) for r in runs] == [
        (2, True, True), (4, True, True), (2, False, True), (2, True, False)]
    for r in runs:
        assert r["gflop_per_step"] == pytest.approx(train_step_flops("resnet10", 16, r["batch"]) / 1e9)
        assert r["tflops"] > 0 and r["mfu"] is None and r["step_seconds"]["median"] > 0
    assert runs[1]["gflop_per_step"] == pytest.approx(2 * runs[0]["gflop_per_step"], rel=0.01)
    kernels = runs[0]["kernels"]
    assert kernels and any("conv" in k["name"].lower() for k in kernels)
    assert sum(k["share"] for k in kernels) <= 1.0 + 1e-9
    table = format_sweep(res)
    assert table.count("\n| 2 | ") == 3 and "Top kernels" in table
