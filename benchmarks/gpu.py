"""FLOPs of a training step, and the GPU part of the benchmark (runs only where CUDA is available).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward on the
``meta`` device (shapes only, no compute), so the count is available on any machine. On a GPU the
achieved TFLOP/s of medvox's training step is that count divided by the measured step time, and the
model FLOPs utilisation (MFU) is its share of the card's dense peak from ``PEAK_TFLOPS``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import log, summary

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: bf16, and TF32 for fp32.
# Matched in order against torch.cuda.get_device_name() (so "A100" is tried before "A10", "L40S" before "L4").
PEAK_TFLOPS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("H200",), "H200 SXM", {"bf16": 989.0, "fp32": 494.0}),
    (("H100", "NVL"), "H100 NVL", {"bf16": 835.0, "fp32": 418.0}),
    (("H100", "PCIe"), "H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    (("H100",), "H100 SXM", {"bf16": 989.0, "fp32": 494.0}),
    (("A100",), "A100", {"bf16": 312.0, "fp32": 156.0}),
    (("L40S",), "L40S", {"bf16": 362.0, "fp32": 183.0}),
    (("L4",), "L4", {"bf16": 121.0, "fp32": 60.0}),
    (("A10G",), "A10G", {}),  # no published data sheet: no MFU rather than a guessed one
    (("A10",), "A10", {"bf16": 125.0, "fp32": 62.5}),
    (("RTX 4090",), "RTX 4090", {"bf16": 165.0, "fp32": 82.6}),
]


def peak_tflops(device_name: str, precision: str) -> tuple[str, float] | None:
    """(card, dense peak TFLOP/s) for a CUDA device name, or None for a card not in the table."""
    for needles, card, peaks in PEAK_TFLOPS:
        if all(n.lower() in device_name.lower() for n in needles):
            return (card, peaks["bf16" if precision == "bf16" else "fp32"]) if peaks else None
    return None


def _meta_train_step(model_name: str, size: int, batch: int, mode, dtype: torch.dtype = torch.float32) -> None:
    """One forward + backward of ``model_name`` on ``(batch, 1, size^3)`` in ``dtype`` on ``meta`` tensors
    (shapes only, no compute), under the dispatch ``mode`` that records it."""
    from medvox.models import create_model

    model = create_model(model_name, in_channels=1, num_classes=2).to(device="meta", dtype=dtype)
    x = torch.empty(batch, 1, size, size, size, device="meta", dtype=dtype)
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    with mode:
        torch.nn.functional.cross_entropy(model(x), y).backward()


def train_step_flops(model_name: str, size: int, batch: int) -> int:
    """FLOPs of one forward + backward of ``model_name`` on ``(batch, 1, size^3)`` (counted on ``meta``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    _meta_train_step(model_name, size, batch, counter)
    return int(counter.get_total_flops())


# Peak memory bandwidth in TB/s from the same data sheets (HBM/GDDR), for the roofline bound below.
BANDWIDTH_TBS: dict[str, float] = {"H200 SXM": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100 SXM": 3.35, "A100": 2.04,
                                   "L40S": 0.864, "L4": 0.3, "A10": 0.6, "RTX 4090": 1.008}


def op_costs(model_name: str, size: int, batch: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every ATen op of one training step (forward, backward, no optimizer) with its FLOPs and the bytes it
    reads and writes, recorded on ``meta`` tensors (no compute) in ``dtype`` (what bf16 autocast gives the
    activations). Bytes count each op's tensor arguments and results once, as an unfused (eager) op moves
    them through memory; views move nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    ops: list[dict] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
            moved = 0 if func.is_view else sum(
                t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            ops.append({"op": str(packet).removeprefix("aten."), "flops": flops, "bytes": moved})
            return out

    _meta_train_step(model_name, size, batch, _Record(), dtype)
    return ops


def roofline(ops: list[dict], peak_tflops: float, bandwidth_tbs: float) -> dict:
    """The fastest an unfused step can run: each op takes ``max(FLOPs / peak, bytes / bandwidth)`` (every
    convolution at the card's full peak, every other op at full memory bandwidth). The MFU of that time is
    an upper bound for eager execution; ``by_op`` says where the time goes (memory-bound ops count no FLOPs).

    Example:
        >>> ops = [{"op": "convolution", "flops": 2e12, "bytes": 1e9}, {"op": "relu", "flops": 0, "bytes": 2e9}]
        >>> r = roofline(ops, peak_tflops=1000, bandwidth_tbs=2)
        >>> round(r["seconds"], 6), round(r["mfu_bound"], 3), r["mfu_bound_fused"]
        (0.003, 0.667, 1.0)
    """
    by_op: dict[str, dict] = {}
    total = flops = compute_ops = 0.0
    for o in ops:
        t = max(o["flops"] / (peak_tflops * 1e12), o["bytes"] / (bandwidth_tbs * 1e12))
        total += t
        flops += o["flops"]
        compute_ops += t if o["flops"] else 0.0
        agg = by_op.setdefault(o["op"], {"seconds": 0.0, "flops": 0, "bytes": 0, "calls": 0})
        agg["seconds"] += t
        agg["flops"] += o["flops"]
        agg["bytes"] += o["bytes"]
        agg["calls"] += 1
    ideal = flops / (peak_tflops * 1e12)
    return {"seconds": total, "flops": flops, "mfu_bound": ideal / total if total else None,
            # every op without FLOPs (BatchNorm, ReLU, adds, pooling) fused away for free: the ceiling of fusion
            "mfu_bound_fused": ideal / compute_ops if compute_ops else None,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["seconds"]))}


ROOFLINE_CASES = (("resnet50", 128, 6), ("resnet18", 64, 4))
ROOFLINE_CARDS = ("H100 SXM", "H200 SXM")


def roofline_bounds(cards: tuple[str, ...] = ROOFLINE_CARDS, cases=ROOFLINE_CASES) -> list[dict]:
    """The roofline MFU bounds of the benchmark's training steps on the given cards (names in both tables)."""
    peaks = {card: p.get("bf16") for _, card, p in PEAK_TFLOPS}
    out = []
    for model_name, size, batch in cases:
        ops = op_costs(model_name, size, batch)
        for card in cards:
            r = roofline(ops, peaks[card], BANDWIDTH_TBS[card])
            top = [(k, v["seconds"]) for k, v in r["by_op"].items()][:6]
            out.append({"model": model_name, "size": size, "batch": batch, "card": card, "seconds": r["seconds"],
                        "mfu_bound": r["mfu_bound"], "mfu_bound_fused": r["mfu_bound_fused"], "top_ops": top})
    return out


def _gpu_augment(size: int, batch: int, steps: int) -> dict:
    from benchmarks.medvox_side import medvox_augment

    augment, gen = medvox_augment(), torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, size, device="cuda")
    augment(x, gen)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        augment(x, gen)
    torch.cuda.synchronize()
    return {"size": size, "batch": batch, "samples_per_s": steps * batch / (time.perf_counter() - t0)}


def run_gpu(quick: bool) -> dict:
    """The GPU figures, or ``status: pending`` where no CUDA device is visible."""
    flops = {"resnet18_64_b4": train_step_flops("resnet18", 64, 4),
             "resnet50_128_b6": train_step_flops("resnet50", 128, 6)}
    roof = roofline_bounds()
    if not torch.cuda.is_available():
        return {"status": "pending", "reason": "no CUDA device on this machine", "train_step_flops": flops,
                "roofline": roof}
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, "bf16")
    steps = 5 if quick else 20
    out = {"status": "measured", "device": name, "peak": peak, "train_step_flops": flops, "roofline": roof, "runs": []}
    for model_name, size, batch, key in (("resnet18", 64, 4, "resnet18_64_b4"), ("resnet50", 128, 6, "resnet50_128_b6")):
        for ckpt in (False, True):
            log(f"gpu: {model_name} {size}^3 batch {batch} bf16 checkpointing={ckpt}")
            run = train_steps(model_name, size, batch, steps, checkpointing=ckpt)
            del run["step"]
            tflops = flops[key] / run["step_seconds"]["median"] / 1e12
            run.update({"model": model_name, "size": size, "batch": batch, "checkpointing": ckpt,
                        "samples_per_s": batch / run["step_seconds"]["median"], "tflops": tflops,
                        "mfu": tflops / peak[1] if peak else None})
            out["runs"].append(run)
    out["augment"] = _gpu_augment(96, 8, steps)
    return out


# ------------------------------------------------------------------------------------------- MFU sweep
# Where does ResNet-50-3D's step time go on a GPU, and which lever moves the MFU? One call measures the
# step (bf16, fused Adam) at several batches, with and without channels_last_3d, torch.compile and the
# on-device augmentation, and profiles the default configuration's CUDA kernels. It runs on any device
# (the test smoke-runs it on the CPU at a tiny size); the figures that matter come from a GPU:
#   python benchmarks/gpu.py --mfu-sweep --json /tmp/mfu.json


def train_steps(model_name: str, size: int, batch: int, steps: int, device: str = "cuda", channels_last: bool = True,
                compile_model: bool = False, augment_on: bool = True, checkpointing: bool = False) -> dict:
    """medvox's recipe, timed: bf16 autocast, fused Adam (on CUDA), BatchAugment on the device; by default
    channels_last_3d, no torch.compile. Returns the step times, warm-up time, peak memory and the step."""
    from benchmarks.medvox_side import medvox_augment
    from medvox.models import create_model

    dev = torch.device(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = create_model(model_name, in_channels=1, num_classes=2, grad_checkpointing=checkpointing)
    model = model.to(dev).to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=dev.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    augment, gen = medvox_augment([0, 1, 2]), torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, size, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        xa = (augment(x, gen) if augment_on else x).contiguous(memory_format=fmt)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(xa).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up: compilation, cuDNN autotuning, the allocator
        step()
    sync()
    warmup = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"step_seconds": summary(times), "warmup_seconds": warmup, "peak_allocated_gb": peak, "step": step}


def _kernel_table(step, device: str, top: int = 15) -> list[dict]:
    """The ``top`` kernels (or CPU ops) by self time over 3 profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    return [{"name": e.key[:120], "calls": e.count, "ms_per_step": getattr(e, attr, 0) / 3 / 1e3,
             "share": getattr(e, attr, 0) / total} for e in events[:top]]


def mfu_sweep(model_name: str = "resnet50", size: int = 128, batches: tuple[int, ...] = (6, 12, 24),
              steps: int = 10, device: str = "cuda", compile_too: bool = True) -> dict:
    """Step time, TFLOP/s and MFU of ``model_name`` at ``size^3`` over batches and options; kernel profile."""
    peak = peak_tflops(torch.cuda.get_device_name(0), "bf16") if device == "cuda" else None
    configs = [dict(batch=b, channels_last=True, compile_model=False, augment_on=True) for b in batches]
    configs += [dict(batch=batches[0], channels_last=False, compile_model=False, augment_on=True),
                dict(batch=batches[0], channels_last=True, compile_model=False, augment_on=False)]
    if compile_too:
        configs += [dict(batch=b, channels_last=True, compile_model=True, augment_on=True) for b in batches[:2]]
    out = {"model": model_name, "size": size, "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
           "peak": peak, "runs": []}
    for cfg in configs:
        log(f"mfu sweep: {model_name} {size}^3 {cfg}")
        try:
            run = train_steps(model_name, size, steps=steps, device=device, **cfg)
        except torch.OutOfMemoryError:
            out["runs"].append({**cfg, "error": "out of memory"})
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        step = run.pop("step")
        flops = train_step_flops(model_name, size, cfg["batch"])
        tflops = flops / run["step_seconds"]["median"] / 1e12
        run.update({**cfg, "gflop_per_step": flops / 1e9, "tflops": tflops, "mfu": tflops / peak[1] if peak else None,
                    "samples_per_s": cfg["batch"] / run["step_seconds"]["median"]})
        if cfg == configs[0]:
            run["kernels"] = _kernel_table(step, device)
        out["runs"].append(run)
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def format_sweep(result: dict) -> str:
    """A Markdown table of the sweep and the default configuration's top kernels."""
    lines = [f"MFU sweep: {result['model']} at {result['size']}^3 on {result['device']} (bf16 autocast, fused Adam)",
             "", "| batch | channels_last_3d | compile | augmentation | step ms | samples/s | TFLOP/s | MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['channels_last']} | {r['compile_model']} | {r['augment_on']} | "
                         f"{r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_allocated_gb']:.1f}" if r["peak_allocated_gb"] is not None else "n/a"
        lines.append(f"| {r['batch']} | {r['channels_last']} | {r['compile_model']} | {r['augment_on']} | "
                     f"{1e3 * r['step_seconds']['median']:.1f} | {r['samples_per_s']:.1f} | {r['tflops']:.1f} | "
                     f"{mfu} | {peak} |")
    kernels = next((r["kernels"] for r in result["runs"] if "kernels" in r), [])
    if kernels:
        lines += ["", "Top kernels of the first configuration (self time per step):", "",
                  "| kernel / op | calls (3 steps) | ms per step | share |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['ms_per_step']:.2f} | {100 * k['share']:.1f} % |"
                  for k in kernels]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    p = argparse.ArgumentParser(description="GPU MFU sweep of ResNet-3D training steps")
    p.add_argument("--mfu-sweep", action="store_true", required=True)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[6, 12, 24])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    res = mfu_sweep(a.model, a.size, tuple(a.batches), a.steps, "cuda" if torch.cuda.is_available() else "cpu",
                    not a.no_compile)
    a.json.write_text(json.dumps(res, indent=1, default=str))
    a.json.with_suffix(".md").write_text(format_sweep(res))
    print(format_sweep(res))
