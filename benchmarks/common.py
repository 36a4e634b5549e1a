"""What every benchmark section shares: data, machine facts, statistics, memory sampling, progress.

Timings on a shared machine are noisy, so every section measures the contenders interleaved
(A, B, A, B, ...) in one process tree and reports medians; the load average is recorded next to
every figure, and CPU-seconds (which other users' processes do not inflate as much) beside wall time.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The shared data sets live next to the repository and are never copied into it.
DEFAULT_NPZ = Path(os.environ.get("MEDVOX_BENCH_NPZ", REPO.parent / "shared" / "data" / "medmnist"
                                  / "adrenalmnist3d_64.npz"))
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line: elapsed time, load average, message (stderr, so JSON on stdout stays clean)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"[bench {time.perf_counter() - _T0:6.0f}s load {load:4.1f}] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


# ---------------------------------------------------------------------------------------- data


def load_volumes(npz: Path, n: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` training volumes of a MedMNIST npz as float32 in [0, 1], shape (n, 1, S, S, S).

    ``size`` resamples them (trilinear) to ``size^3``: the same real anatomy at a larger grid, so the
    augmentation benchmark runs on realistic content at 96^3.
    """
    with np.load(npz) as data:
        images = data["train_images"][:n].astype(np.float32) / 255.0
        labels = data["train_labels"][:n].reshape(-1).astype(np.int64)
    x = images[:, None]
    if size is not None and size != x.shape[-1]:
        import torch
        import torch.nn.functional as F

        x = F.interpolate(torch.from_numpy(x), size=(size,) * 3, mode="trilinear", align_corners=False).numpy()
    return np.ascontiguousarray(x), labels


def subset_npz(src: Path, out: Path, n: int, size: int | None = None) -> Path:
    """Write the first ``n`` training volumes of ``src`` as a MedMNIST-format npz (train split only).

    Both sides of the training benchmark read these same ``n`` volumes: the peer from the arrays,
    medvox through ``prepare`` (min-max to [0, 1], cached as float16 -- exact for these 0/255 masks).
    ``size`` resamples them to ``size^3`` first (uint8 again), e.g. 128^3 for the GPU benchmark.
    """
    with np.load(src) as data:
        images, labels = data["train_images"][:n], data["train_labels"][:n]
    if size is not None and size != images.shape[-1]:
        x, _ = load_volumes(src, n, size)
        images = np.clip(np.rint(x[:, 0] * 255.0), 0, 255).astype(np.uint8)
    np.savez(out, train_images=images, train_labels=labels)
    return out


# ---------------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(values: list[float]) -> dict:
    """Median, min, max and the raw values (rounded), for the JSON results."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 4) for v in values]}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs`` (higher is better for rates), None when either is missing or zero."""
    if not ours or not theirs:
        return None
    return ours / theirs


# ------------------------------------------------------------------------------------- machine


def _cpu_flags() -> set[str]:
    try:
        match = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return set()
    return set(match.group(1).split()) if match else set()


def _mem_total_gb() -> float | None:
    try:
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return round(int(match.group(1)) / 2**20, 1) if match else None


def machine_info() -> dict:
    """CPU, cores, memory, library versions, GPU (if any) and the load average now."""
    import monai
    import torch

    from medvox.engine.setup import fabric_module

    try:
        import torchio
    except ImportError:  # the GPU machines have no TorchIO: its rows are left out there
        torchio = None
    from medvox.machine import cpu_bf16_basis, cpu_bf16_native, cpu_capability, cpu_name

    flags = _cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    capability, native = cpu_capability(), cpu_bf16_native()
    return {
        "kind": f"{capability}, bf16 {'native' if native else 'emulated (medvox trains in fp32)'}",
        "cpu_capability": capability, "bf16_native": native, "bf16_basis": cpu_bf16_basis(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cores": os.cpu_count(), "memory_gb": _mem_total_gb(),
        "cpu_flags": {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "monai": monai.__version__, "torchio": torchio.__version__ if torchio else None,
        "lightning": fabric_module().__version__, "load_average": load_average(),
    }


# -------------------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (DataLoader workers, preprocessing pools)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    rss = re.search(r"^Rss:\s*(\d+) kB", text, re.M)
    pss = re.search(r"^Pss:\s*(\d+) kB", text, re.M)
    return (int(rss.group(1)) * 1024 if rss else 0), (int(pss.group(1)) * 1024 if pss else 0)


class TreeMemory:
    """Samples a process tree's memory in a background thread; keeps the peaks.

    PSS (proportional set size) splits pages shared by forked workers among them, so the sum over
    the tree is the memory the pipeline really holds; the RSS sum counts shared pages once per process.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.active = True  # the owner pauses sampling while the process idles (its memory cannot grow)
        self.peak_pss = self.peak_rss_sum = self.peak_main_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"mem-{pid}")

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.active:
                self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        tree = process_tree(self.pid)
        values = [_rollup(p) for p in tree]
        self.peak_rss_sum = max(self.peak_rss_sum, sum(r for r, _ in values))
        self.peak_pss = max(self.peak_pss, sum(p for _, p in values))
        self.peak_main_rss = max(self.peak_main_rss, values[0][0] if values else 0)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        gib = 2**30
        return {"peak_tree_pss_gb": self.peak_pss / gib, "peak_tree_rss_sum_gb": self.peak_rss_sum / gib,
                "peak_main_rss_gb": self.peak_main_rss / gib}


def max_rss_gb() -> dict:
    """``getrusage`` peaks of this process and of its reaped children, in GiB (Linux reports KiB)."""
    import resource

    to_gb = 1024 / 2**30
    return {"self_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_gb,
            "children_max_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_gb}


def tree_cpu_seconds() -> float:
    """User+system CPU seconds of this process and all its children, live (from /proc) or reaped
    (``getrusage``): DataLoader workers that exit at the end of an epoch still count."""
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = reaped.ru_utime + reaped.ru_stime
    for p in process_tree(os.getpid()):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total
