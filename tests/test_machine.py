"""What the machine grants: CPUs from affinity, SLURM and cgroup quotas (v1 and v2, tmp files standing in for
/sys/fs/cgroup), and the native-bf16 decision with its MEDVOX_CPU_BF16 override."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from medvox import machine


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A machine with 16 CPUs in the affinity mask, no SLURM job, an empty cgroup tree under ``tmp_path``."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    root.mkdir()
    proc.write_text("0::/\n")
    monkeypatch.setattr(machine, "CGROUP_ROOT", root)
    monkeypatch.setattr(machine, "PROC_SELF_CGROUP", proc)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    return root, proc


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_affinity_alone(host, monkeypatch):
    assert machine.available_cpus() == 16
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)  # taskset -c 3,5
    assert machine.available_cpus() == 2


def test_slurm_cpus_per_task(host, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert machine.available_cpus() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")  # more than the affinity mask: the mask wins
    assert machine.available_cpus() == 16
    for junk in ("", "0", "four"):  # unset-like or unparsable values are ignored
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", junk)
        assert machine.available_cpus() == 16


def test_cgroup_v2_quota(host):
    root, _ = host
    _write(root / "cpu.max", "max 100000\n")  # no quota
    assert machine.available_cpus() == 16
    _write(root / "cpu.max", "300000 100000\n")  # docker --cpus 3
    assert machine.available_cpus() == 3
    _write(root / "cpu.max", "150000 100000\n")  # 1.5 CPUs: 1 thread runs unthrottled, 2 would not
    assert machine.available_cpus() == 1
    _write(root / "cpu.max", "50000 100000\n")  # half a CPU: still 1
    assert machine.available_cpus() == 1


def test_cgroup_v2_nested_takes_the_tightest_limit(host):
    root, proc = host
    proc.write_text("0::/job/step\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "job" / "cpu.max", "200000 100000\n")
    _write(root / "job" / "step" / "cpu.max", "max 100000\n")
    assert machine.available_cpus() == 2


def test_cgroup_v1_quota(host):
    root, proc = host
    proc.write_text("4:cpu,cpuacct:/\n3:memory:/\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # no quota
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert machine.available_cpus() == 16
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "400000\n")
    assert machine.available_cpus() == 4


def test_the_minimum_of_all_three(host, monkeypatch):
    root, _ = host
    _write(root / "cpu.max", "600000 100000\n")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert machine.available_cpus() == 6


def test_no_affinity_api_falls_back_to_the_cpu_count(host, monkeypatch):
    def unsupported(pid):
        raise OSError("not here")

    monkeypatch.setattr(machine.os, "sched_getaffinity", unsupported, raising=False)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 6)
    assert machine.available_cpus() == 6


def test_compute_threads_never_exceed_the_granted_cpus(host, monkeypatch, caplog):
    from medvox.engine.setup import compute_threads

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert compute_threads(None) == 4
    assert compute_threads(2) == 2
    assert compute_threads(None, processes=2) == 2  # two DDP ranks on this node share its CPUs
    assert compute_threads(None, processes=8) == 1
    with caplog.at_level("WARNING", logger="medvox"):
        assert compute_threads(16) == 4
    assert "--threads 16: 4 CPU(s) are granted" in caplog.text


def test_the_inspection_pool_defaults_to_the_granted_cpus(host, monkeypatch):
    """Reader threads for `medvox check` / `prepare`: one per granted CPU, not one per core of the machine."""
    from medvox.data import inspection
    from medvox.data.sources import Case

    monkeypatch.setattr(machine.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(inspection, "inspect_case", lambda case, max_mb=None: (None, []))
    sizes = []
    real_pool = inspection.ThreadPoolExecutor

    def recording_pool(workers):
        sizes.append(workers)
        return real_pool(workers)

    monkeypatch.setattr(inspection, "ThreadPoolExecutor", recording_pool)
    cases = [Case(id=f"c{i}", group=f"c{i}", images=[Path(f"c{i}.nii.gz")]) for i in range(10)]
    inspection.inspect_cases(cases, progress=False)
    inspection.inspect_cases(cases[:2], progress=False)  # never more threads than files
    assert sizes == [3, 2]


# ---------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize(("capability", "probe", "native"), [
    ("AVX512", True, True),  # avx512_core and above: oneDNN's own bf16 kernels
    ("AVX2", False, False),  # the 26x case: bf16 is emulated
    ("AVX2", True, False),  # a probe that says yes on an x86 CPU below AVX-512 is not trusted
    ("AVX512", False, False),  # ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 machine
])
def test_bf16_native_from_the_capability_and_the_probe(capability, probe, native, monkeypatch):
    monkeypatch.delenv(machine.BF16_ENV, raising=False)
    monkeypatch.setattr(machine, "cpu_capability", lambda: capability)
    monkeypatch.setattr(machine, "_mkldnn_bf16", lambda: probe)
    monkeypatch.setattr(machine, "_is_x86", lambda: True)
    assert machine.cpu_bf16_native() is native
    assert machine.cpu_bf16_basis() == f"CPU capability {capability}, oneDNN bf16 probe {probe}"


def test_bf16_override(monkeypatch):
    monkeypatch.setattr(machine, "_mkldnn_bf16", lambda: True)
    monkeypatch.setenv(machine.BF16_ENV, "0")
    assert machine.cpu_bf16_native() is False and machine.cpu_bf16_basis() == "MEDVOX_CPU_BF16=0"
    monkeypatch.setattr(machine, "_mkldnn_bf16", lambda: False)
    monkeypatch.setenv(machine.BF16_ENV, "1")
    assert machine.cpu_bf16_native() is True and machine.cpu_bf16_basis() == "MEDVOX_CPU_BF16=1"
    monkeypatch.setenv(machine.BF16_ENV, "yes")
    with pytest.raises(ValueError, match="MEDVOX_CPU_BF16='yes': set 0"):
        machine.cpu_bf16_native()


def test_docstring_examples_run():
    result = doctest.testmod(machine, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
