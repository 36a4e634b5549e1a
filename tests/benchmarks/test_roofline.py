"""The roofline MFU bound: op bytes and FLOPs recorded on meta tensors, and the max(compute, memory) sum."""

from __future__ import annotations

import math

import pytest
from benchmarks.gpu import op_costs, roofline, roofline_bounds, train_step_flops


@pytest.fixture(scope="module")
def ops():
    return op_costs("resnet18", 16, 2)


def test_flops_are_those_of_the_flop_counter(ops):
    assert sum(o["flops"] for o in ops) == train_step_flops("resnet18", 16, 2)


def test_the_stem_convolution_moves_its_input_weight_and_output_once(ops):
    # MedicalNet ResNet stem: 64 filters 7^3 stride 2, no bias; bf16 (2 bytes); 16^3 -> 8^3, batch 2
    first = next(o for o in ops if o["op"] == "convolution")
    expected = 2 * (2 * 1 * 16**3 + 64 * 1 * 7**3 + 2 * 64 * 8**3)
    assert first["bytes"] == expected
    assert first["flops"] == 2 * (2 * 64 * 8**3) * (7**3)  # a multiply-add = 2 FLOPs per output x tap


def test_elementwise_ops_count_no_flops_and_views_move_nothing(ops):
    relu = next(o for o in ops if o["op"] == "relu_")
    assert relu["flops"] == 0 and relu["bytes"] == 2 * (2 * 2 * 64 * 8**3)  # read + write of the stem output
    views = [o for o in ops if o["op"] in ("view", "t", "expand", "slice", "detach")]
    assert len(views) > 10 and all(o["bytes"] == 0 for o in views)


def test_each_op_takes_the_longer_of_its_compute_and_memory_time():
    ops = [{"op": "conv", "flops": 4e12, "bytes": 1e9},  # 4 ms compute vs 0.5 ms memory
           {"op": "bn", "flops": 0, "bytes": 6e9},  # 3 ms memory
           {"op": "conv", "flops": 1e12, "bytes": 4e9}]  # 1 ms compute vs 2 ms memory: memory-bound
    r = roofline(ops, peak_tflops=1000, bandwidth_tbs=2)
    assert r["seconds"] == pytest.approx(0.004 + 0.003 + 0.002)
    assert r["mfu_bound"] == pytest.approx(0.005 / 0.009)
    assert r["mfu_bound_fused"] == pytest.approx(0.005 / 0.006)
    assert list(r["by_op"]) == ["conv", "bn"] and r["by_op"]["conv"]["calls"] == 2


def test_bounds_for_the_benchmark_cases_are_below_one_and_fusion_raises_them():
    rows = roofline_bounds(cards=("H100 SXM", "H200 SXM"), cases=(("resnet18", 32, 2),))
    assert [r["card"] for r in rows] == ["H100 SXM", "H200 SXM"]
    for r in rows:
        assert 0 < r["mfu_bound"] < r["mfu_bound_fused"] <= 1 and math.isfinite(r["seconds"])
    assert rows[1]["mfu_bound"] > rows[0]["mfu_bound"]  # same peak, more bandwidth
