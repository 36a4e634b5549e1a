"""Augmentation throughput at 96^3: medvox ``BatchAugment`` vs MONAI ``RandAffined`` vs TorchIO ``RandomAffine``.

All three resample the same real volumes (AdrenalMNIST3D, 64^3 resampled to 96^3, float32) with
the same ranges (rotation +-11.5 deg, zoom +-8 %, translation +-8 %, p = 0.6, trilinear):

* medvox: batches of ``batch`` volumes, in this process, on the training device (here the CPU);
* MONAI: per sample in a DataLoader with ``workers`` worker processes, as the tutorials do;
* TorchIO: per sample, the same DataLoader; and in this process (SimpleITK uses every core itself).

Each round runs one pass of every method, in turn; the medians over the rounds are reported, with
CPU-seconds per sample (workers included) beside the wall-clock rate. DataLoader workers are
persistent and warmed up first: steady-state throughput, not worker start-up, is compared.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import load_average, load_volumes, log, summary, tree_cpu_seconds
from benchmarks.medvox_side import medvox_augment
from benchmarks.peer_monai import monai_aug_loader, torchio_aug_loader, torchio_rand_affine


def _has_torchio() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchio") is not None

METHODS = {
    "medvox": "medvox BatchAugment (batched, in-process)",
    "monai": "MONAI RandAffined (per sample, DataLoader workers)",
    "torchio": "TorchIO RandomAffine (per sample, DataLoader workers)",
    "torchio_inproc": "TorchIO RandomAffine (per sample, in-process)",
}


def _medvox_pass(volumes: torch.Tensor, batch: int, augment, generator) -> int:
    for i in range(0, len(volumes), batch):
        augment(volumes[i : i + batch], generator)
    if volumes.is_cuda:
        torch.cuda.synchronize()
    return len(volumes)


def _loader_pass(loader) -> int:
    n = 0
    for b in loader:
        n += len(b["image"] if isinstance(b, dict) else b)
    return n


def _torchio_inproc_pass(volumes: np.ndarray, transform) -> int:
    import torchio as tio

    for v in volumes:
        transform(tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(v))))
    return len(volumes)


def run_augmentation(npz, n: int, size: int, batch: int, rounds: int, workers: int,
                     methods: tuple[str, ...] = tuple(METHODS), device: str = "cpu") -> dict:
    """Interleaved passes of every method over the same ``n`` volumes; returns rates and ratios.

    ``device="cuda"`` runs medvox's side on the GPU (the volumes already there, as in training, where
    batches are moved before augmentation); the peers stay on the CPU, which is where they run.
    TorchIO is skipped where it is not installed.
    """
    log(f"augmentation: loading {n} volumes and resampling them to {size}^3")
    volumes_np, _ = load_volumes(npz, n, size)
    volumes = torch.from_numpy(volumes_np).to(device)
    if not _has_torchio():
        methods = tuple(m for m in methods if not m.startswith("torchio"))
    augment, generator = medvox_augment(), torch.Generator().manual_seed(0)
    builders = {  # built only for the methods asked for (TorchIO may be missing)
        "medvox": lambda: lambda: _medvox_pass(volumes, batch, augment, generator),
        "monai": lambda: (lambda ld: lambda: _loader_pass(ld))(monai_aug_loader(volumes_np, batch, workers)),
        "torchio": lambda: (lambda ld: lambda: _loader_pass(ld))(torchio_aug_loader(volumes_np, batch, workers)),
        "torchio_inproc": lambda: (lambda tf: lambda: _torchio_inproc_pass(volumes_np, tf))(torchio_rand_affine(size)),
    }
    passes = {k: build() for k, build in builders.items() if k in methods}
    log("augmentation: warm-up pass of every method (workers start, kernels load)")
    for fn in passes.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in passes}
    cpu: dict[str, list[float]] = {k: [] for k in passes}
    loads = []
    for r in range(rounds):
        for name, fn in passes.items():
            cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
            count = fn()
            seconds = time.perf_counter() - t0
            rates[name].append(count / seconds)
            cpu[name].append((tree_cpu_seconds() - cpu0) / count)
        loads.append(load_average()[0] if load_average() else None)
        log("augmentation: round {}/{}: {}".format(
            r + 1, rounds, ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items())))
    results = {name: {"label": METHODS[name], "samples_per_s": summary(rates[name]),
                      "cpu_seconds_per_sample": summary(cpu[name])} for name in passes}
    return {"size": size, "n": n, "batch": batch, "workers": workers, "rounds": rounds, "load_1min": loads,
            "medvox_device": str(device),
            "methods": results, "ratios": aug_ratios(results)}


def aug_ratios(methods: dict) -> dict:
    """medvox's median rate over each peer's; TorchIO's target uses its faster way of running."""
    ours = methods.get("medvox", {}).get("samples_per_s", {}).get("median")
    out = {}
    for peer in ("monai", "torchio", "torchio_inproc"):
        theirs = methods.get(peer, {}).get("samples_per_s", {}).get("median")
        if ours and theirs:
            out[f"vs_{peer}"] = ours / theirs
    tio = [out[k] for k in ("vs_torchio", "vs_torchio_inproc") if k in out]
    if tio:
        out["vs_torchio_best"] = min(tio)  # against the faster TorchIO set-up
    return out
