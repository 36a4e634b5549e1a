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


def train_step_flops(model_name: str, size: int, batch: int) -> int:
    """FLOPs of one forward + backward of ``model_name`` on ``(batch, 1, size^3)`` (counted on ``meta``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medvox.models import create_model

    model = create_model(model_name, in_channels=1, num_classes=2).to("meta")
    x = torch.empty(batch, 1, size, size, size, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def _gpu_train_steps(model_name: str, size: int, batch: int, steps: int, checkpointing: bool) -> dict:
    """medvox's recipe on the GPU: bf16 autocast, channels_last_3d, fused Adam, BatchAugment on the device."""
    from benchmarks.medvox_side import medvox_augment
    from medvox.models import create_model

    dev = torch.device("cuda")
    model = create_model(model_name, in_channels=1, num_classes=2, grad_checkpointing=checkpointing)
    model = model.to(dev).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    augment, gen = medvox_augment([0, 1, 2]), torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, size, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)

    def step() -> None:
        xa = augment(x, gen).contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(xa).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_seconds": summary(times), "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}


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
    if not torch.cuda.is_available():
        return {"status": "pending", "reason": "no CUDA device on this machine", "train_step_flops": flops}
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, "bf16")
    steps = 5 if quick else 20
    out = {"status": "measured", "device": name, "peak": peak, "train_step_flops": flops, "runs": []}
    for model_name, size, batch, key in (("resnet18", 64, 4, "resnet18_64_b4"), ("resnet50", 128, 6, "resnet50_128_b6")):
        for ckpt in (False, True):
            log(f"gpu: {model_name} {size}^3 batch {batch} bf16 checkpointing={ckpt}")
            run = _gpu_train_steps(model_name, size, batch, steps, ckpt)
            tflops = flops[key] / run["step_seconds"]["median"] / 1e12
            run.update({"model": model_name, "size": size, "batch": batch, "checkpointing": ckpt,
                        "samples_per_s": batch / run["step_seconds"]["median"], "tflops": tflops,
                        "mfu": tflops / peak[1] if peak else None})
            out["runs"].append(run)
    out["augment"] = _gpu_augment(96, 8, steps)
    return out
