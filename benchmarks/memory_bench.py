"""Peak memory of one forward + backward pass of ResNet-50-3D at 128^3 on the CPU, with and without
activation checkpointing, in fp32 and bf16 (autocast, as ``--amp`` trains on the CPU).

Each measurement runs in a fresh process (``getrusage`` peaks only grow), for batch 1 and 2; the
default batch of 6 is extrapolated linearly, ``peak(6) = peak(1) + 5 * (peak(2) - peak(1))``: the
weights and the framework are paid once, the activations once per sample. Adam's state (two more
copies of the weights) and the gradients come on top in training; they are listed from the
parameter count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, log

_PREFIX = "BENCH "


def _rss_gb() -> float:
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 2**20


def measure_one(spec: dict) -> dict:
    """In this (fresh) process: build the model and a batch, one forward + backward, the peaks."""
    import resource

    import torch

    from medvox.engine.compat import guard_cpu_bf16_conv3d
    from medvox.models import create_model

    torch.manual_seed(0)
    model = create_model(spec["model"], in_channels=1, num_classes=2, grad_checkpointing=spec["checkpointing"])
    bf16 = spec["precision"] == "bf16"
    if bf16:
        guard_cpu_bf16_conv3d(model)  # as the engine does on the CPU
    model.train()
    size, batch = spec["size"], spec["batch"]
    x, y = torch.randn(batch, 1, size, size, size), torch.zeros(batch, dtype=torch.long)
    baseline = _rss_gb()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in model.parameters())
    return {**spec, "baseline_gb": baseline, "peak_gb": peak, "activation_gb": peak - baseline,
            "seconds": seconds, "params": params}


def _run_child(spec: dict, log_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = log_dir / f"memory_{spec['precision']}_ckpt{int(spec['checkpointing'])}_b{spec['batch']}.log"
    with open(log_path, "w", encoding="utf-8") as err:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_bench", "one", json.dumps(spec)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_PREFIX)), None)
    if line is None:
        raise RuntimeError(f"memory measurement {spec} failed (code {proc.returncode}); see {log_path}")
    return json.loads(line[len(_PREFIX):])


def run_memory(model: str, size: int, precisions: tuple[str, ...], log_dir: Path, batches=(1, 2),
               target_batch: int = 6) -> dict:
    """Every (precision, checkpointing, batch) in its own process; extrapolates to ``target_batch``."""
    rows = []
    for precision in precisions:
        for ckpt in (False, True):
            for batch in batches:
                spec = {"model": model, "size": size, "batch": batch, "precision": precision, "checkpointing": ckpt}
                row = _run_child(spec, log_dir)
                log(f"memory: {model} {size}^3 {precision} checkpointing={ckpt} batch {batch}: peak "
                    f"{row['peak_gb']:.2f} GiB (activations {row['activation_gb']:.2f} GiB, {row['seconds']:.1f} s)")
                rows.append(row)
    return {"model": model, "size": size, "target_batch": target_batch, "rows": rows,
            "extrapolated": extrapolate(rows, target_batch)}


def extrapolate(rows: list[dict], target_batch: int) -> list[dict]:
    """Linear in the batch from the two smallest batches of each (precision, checkpointing)."""
    out = []
    for key in sorted({(r["precision"], r["checkpointing"]) for r in rows}):
        pts = sorted((r["batch"], r["peak_gb"]) for r in rows if (r["precision"], r["checkpointing"]) == key)
        if len(pts) < 2:
            continue
        (b1, p1), (b2, p2) = pts[0], pts[1]
        per_sample = (p2 - p1) / (b2 - b1)
        params = next(r["params"] for r in rows if (r["precision"], r["checkpointing"]) == key)
        out.append({"precision": key[0], "checkpointing": key[1], "per_sample_gb": per_sample,
                    f"peak_b{target_batch}_gb": p1 + (target_batch - b1) * per_sample,
                    "adam_and_grads_gb": 3 * params * 4 / 2**30})  # grads + exp_avg + exp_avg_sq, fp32
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "one":
        result = measure_one(json.loads(sys.argv[2]))
        print(_PREFIX + json.dumps(result), flush=True)
    else:
        sys.exit("usage: python -m benchmarks.memory_bench one SPEC_JSON (run benchmarks/run.py instead)")
