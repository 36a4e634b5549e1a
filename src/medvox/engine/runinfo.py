"""What a run needs to be audited: versions, hardware, command line, data hash, git commit."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from medvox.data.cache import array_digest


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def content_hash(prepared: Any) -> str:
    """A digest of the data a run trained and was evaluated on: every kept case's id, label, patient
    and held-out flag, and the bytes of its preprocessed array. It changes when an input file's content
    or a label changes (the cache folder's name, ``cache_dataset``, names only the source path and columns).
    The bytes' digest is the one ``prepare`` wrote beside the store when it built it (``digest.json``);
    an object without one (``images_digest`` None) has its images read and hashed here (~1 GB/s)."""
    digest = hashlib.blake2b(digest_size=16)
    cases = [[c.id, c.group, c.subset, None if c.label is None else int(c.label)] for c in prepared.cases]
    digest.update(json.dumps({"classes": list(prepared.classes), "cases": cases}).encode())
    known = getattr(prepared, "images_digest", None)
    digest.update((known or array_digest(prepared.images)).encode())
    return digest.hexdigest()


def run_info(data_hash: str | None = None, cache_dataset: str | None = None,
             precision: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-safe record of the software, hardware and command behind a run.

    ``data_hash`` is :func:`content_hash` of the prepared data; ``cache_dataset`` the name of the
    dataset's folder in the preprocessing cache (where its fingerprint and splits live); ``precision``
    the precision used and why (``PrecisionChoice.record()``). The hardware part names the CPU's ATen
    capability and whether it runs bf16 natively: what the precision was chosen from.
    """
    from medvox.machine import available_cpus, cpu_bf16_basis, cpu_bf16_native, cpu_capability, cpu_name

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": _version("monai"),
            "lightning_fabric": _version("lightning-fabric"),
            "numpy": _version("numpy"),
            "medvox": _version("medvox"),
        },
        "git_commit": _git_commit(),
        "hardware": {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "cpus_available": available_cpus(),  # affinity, SLURM_CPUS_PER_TASK, cgroup quota
            "cpu_capability": cpu_capability(),
            "cpu_bf16_native": cpu_bf16_native(),
            "cpu_bf16_basis": cpu_bf16_basis(),
            "torch_threads": torch.get_num_threads(),
            "gpus": gpus,
            "cuda": torch.version.cuda,
        },
        "precision": precision,
        "data_hash": data_hash,
        "cache_dataset": cache_dataset,
    }
