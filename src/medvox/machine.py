"""What the machine this process runs on grants it: CPUs (affinity, SLURM, cgroup quota) and native CPU bf16.

Imported by ``data/`` (worker counts) as well as ``engine/`` (threads, precision), so it depends on
nothing else in medvox. Both answers can be forced for tests and benchmarks: ``SLURM_CPUS_PER_TASK``
is read as the scheduler sets it; ``MEDVOX_CPU_BF16=0|1`` overrides the bf16 probe.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

BF16_ENV = "MEDVOX_CPU_BF16"
# One ResNet-10 training step on 8 x 32^3: 14.0 s in bf16 autocast vs 0.53 s in fp32 on a 2-core AMD EPYC
# with AVX2 only (oneDNN emulates bf16 there); the warning for an explicit --precision bf16 quotes it.
EMULATED_BF16_SLOWDOWN = "~26x"

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


# ---------------------------------------------------------------------------------------------- CPUs
def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def _quota_cpus(quota: float, period: float) -> int | None:
    """Whole CPUs a CFS quota grants (floor, at least 1): 1.5 CPUs of quota run 1 thread unthrottled, not 2."""
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.floor(quota / period))


def _own_cgroup_dirs(root: Path, controller: str | None) -> list[Path]:
    """The folders under ``root`` whose limits apply to this process: its own cgroup and every parent up to
    ``root`` (in a container ``root`` is already its cgroup; on a host it is the hierarchy's top)."""
    dirs = [root]
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            own = root / rel.lstrip("/")
            while own != root and root in own.parents:
                dirs.append(own)
                own = own.parent
    return dirs


def _cgroup_cpus(root: Path | None = None) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs, the tightest along its path; None without one.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` in microseconds, ``"max <period>"`` for no quota.
    cgroup v1: ``cpu.cfs_quota_us`` (-1 for no quota) over ``cpu.cfs_period_us``, under ``cpu/`` or
    ``cpu,cpuacct/``.
    """
    root = CGROUP_ROOT if root is None else root
    found: list[int] = []
    for folder in _own_cgroup_dirs(root, None):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            try:
                n = _quota_cpus(float(quota), float(period))
            except ValueError:
                continue
            if n is not None:
                found.append(n)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / mount
        if not base.is_dir():
            continue
        for folder in _own_cgroup_dirs(base, "cpu"):
            try:
                quota = float((folder / "cpu.cfs_quota_us").read_text().strip())
                period = float((folder / "cpu.cfs_period_us").read_text().strip())
            except (OSError, ValueError):
                continue
            n = _quota_cpus(quota, period)
            if n is not None:
                found.append(n)
    return min(found) if found else None


def available_cpus() -> int:
    """CPUs this process may use: the fewest of its affinity mask (``taskset``, a batch scheduler's
    binding), ``SLURM_CPUS_PER_TASK`` and its cgroup's CPU quota (a container's or a job's ``--cpus``).

    ``os.cpu_count()`` counts the whole machine: a job granted 4 of 64 cores that starts 64 compute
    threads runs them time-sliced, several times slower than with 4.

    Example:
        >>> available_cpus() >= 1
        True
    """
    counts = [_affinity_cpus(), _slurm_cpus(), _cgroup_cpus()]
    return max(1, min(n for n in counts if n is not None))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows: ``"AMD EPYC"``."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- bf16
def cpu_capability() -> str:
    """ATen's CPU kernel level on this machine: ``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ``"SVE256"``, ..."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


@functools.cache
def _mkldnn_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _bf16_override() -> bool | None:
    value = os.environ.get(BF16_ENV, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{BF16_ENV}={value!r}: set 0 (treat this CPU as without native bf16: fp32), 1 (as with "
                         "it), or leave it unset to probe the CPU")
    return value == "1"


def cpu_bf16_native() -> bool:
    """True where bf16 autocast runs natively on this CPU, False where oneDNN would emulate it.

    oneDNN runs bf16 convolutions with its own kernels from AVX-512 (``avx512_core``; AVX512-BF16 and AMX
    natively); below that (AVX2, no AVX) it converts every operand and one ResNet-10 step takes ~26x its
    fp32 time. The answer is oneDNN's probe (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours
    ``ONEDNN_MAX_CPU_ISA``), refused on an x86 CPU whose ATen capability is below AVX-512.
    ``MEDVOX_CPU_BF16=0|1`` overrides both.

    Example:
        >>> cpu_bf16_native() in (True, False)
        True
    """
    forced = _bf16_override()
    if forced is not None:
        return forced
    capability = cpu_capability()
    below_avx512 = capability in ("DEFAULT", "NO AVX", "AVX", "AVX2") and _is_x86()
    return _mkldnn_bf16() and not below_avx512


def cpu_bf16_basis() -> str:
    """Why :func:`cpu_bf16_native` said what it said, for a log line or ``run_info.json``."""
    forced = _bf16_override()
    if forced is not None:
        return f"{BF16_ENV}={int(forced)}"
    return f"CPU capability {cpu_capability()}, oneDNN bf16 probe {_mkldnn_bf16()}"


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
