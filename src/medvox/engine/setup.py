"""Fabric, precision, seeds, the run folder and the resume rules."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvox.config import CHOICES, ExperimentConfig, TrainConfig, from_dict, to_dict
from medvox.engine.checkpoint import load_checkpoint
from medvox.errors import TrainingError

log = logging.getLogger("medvox")

# Settings --recipe auto derives from the machine as well as the data (input cap on a CPU, GPU batch fit).
_MACHINE_RECIPE_KEYS = {"data.target_shape", "train.batch_size", "train.grad_accum", "train.epochs",
                        "train.ema_decay"}
# Keys that may differ between an interrupted run and its --resume without changing the result.
_RESUME_FREE_KEYS = {"train.resume", "train.threads", "data.workers", "data.cache_dir", "train.plots",
                     "train.keep_last"}


def resolve_precision(tc: TrainConfig, accelerator: str) -> str:
    """Fabric precision string: bf16 where supported, fp16 with a grad scaler otherwise, fp32 on request.

    ``auto`` means mixed precision on a GPU or with ``--amp``, fp32 otherwise.
    """
    choice = tc.precision.lower()
    if choice not in CHOICES["train.precision"]:
        raise ValueError(f"unknown precision {tc.precision!r}; choose auto, bf16, fp16 or fp32")
    if choice == "auto":
        if not (tc.amp or accelerator == "cuda"):
            return "32-true"
        bf16_ok = accelerator == "cpu" or torch.cuda.is_bf16_supported()
        choice = "bf16" if bf16_ok else "fp16"
    if choice == "fp16" and accelerator == "cpu":
        log.info("fp16 autocast is a GPU feature; using bf16 on the CPU instead")
        choice = "bf16"
    return {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[choice]


def fabric_module():
    """``lightning_fabric`` (our dependency), or the same Fabric bundled as ``lightning.fabric``.

    Both are the same code; we depend on the standalone package because the full ``lightning`` one
    installs torchmetrics, and Fabric imports whatever torchmetrics is installed (with matplotlib and
    SciPy's signal module) to check its version: about 1 s of every start-up on a 2-core CPU.
    """
    try:
        import lightning_fabric
    except ImportError:  # an environment with the full `lightning` package only
        import lightning.fabric as lightning_fabric
    return lightning_fabric


_GPU_WARNING_GIVEN = contextvars.ContextVar("medvox_gpu_warning_given", default=False)


def use_gpu(wanted: bool, flags: str, doing: str) -> bool:
    """``wanted``, when a CUDA device is visible; else False, with a warning if a GPU was asked for (``flags``):
    the original command line always carries --gpu/--multi_gpu, and it keeps working on a CPU-only machine.
    Inside :func:`one_gpu_warning` the warning has already been given and is not repeated."""
    if wanted and not torch.cuda.is_available():
        if not _GPU_WARNING_GIVEN.get():
            log.warning("%s was given but no CUDA device is visible: %s on the CPU", flags, doing)
        return False
    return wanted


@contextlib.contextmanager
def one_gpu_warning(wanted: bool, flags: str, doing: str):
    """Give :func:`use_gpu`'s warning here, once, for a job made of several steps that each ask for the device
    (``medvox cv``: every fold, then the test ensemble), and keep it quiet inside."""
    use_gpu(wanted, flags, doing)
    token = _GPU_WARNING_GIVEN.set(True)
    try:
        yield
    finally:
        _GPU_WARNING_GIVEN.reset(token)


def make_fabric(tc: TrainConfig):
    """A Lightning Fabric for the configured device(s); DDP when more than one process."""
    lf = fabric_module()

    wants_gpu = use_gpu(tc.gpu or tc.multi_gpu, "--gpu/--multi_gpu", "training")
    accelerator = "cuda" if wants_gpu else "cpu"
    devices = tc.devices if tc.devices is not None else (-1 if tc.multi_gpu and wants_gpu else 1)
    n_dev = torch.cuda.device_count() if devices == -1 else devices
    strategy = "ddp" if n_dev > 1 else "auto"
    if strategy == "ddp" and accelerator == "cpu":
        strategy = lf.strategies.DDPStrategy(process_group_backend="gloo")
    precision = resolve_precision(tc, accelerator)
    if accelerator == "cuda":
        torch.backends.cudnn.benchmark = not tc.deterministic
    return lf.Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)


def seed_everything(seed: int, deterministic: bool, threads: int | None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The RNG seed of one epoch on one rank: a resumed run replays exactly the same randomness."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63 - 1)


def fold_dir(cfg: ExperimentConfig) -> Path:
    """``<output>/<run_name or model>/fold_<k>``."""
    return Path(cfg.train.output) / (cfg.train.run_name or cfg.model.name) / f"fold_{cfg.train.fold}"


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "kwargs":
            keys += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def resume_state(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any] | None:
    """The state to resume from, None for a fresh run; refuses to overwrite an existing run.

    Raises:
        TrainingError: the folder holds a run and ``--resume`` was not given, or ``--resume`` was given
            with a config that differs from the interrupted run's.
    """
    last = run_dir / "last.pt"
    existing = [p.name for p in (last, run_dir / "metrics.json") if p.exists()]
    if not cfg.train.resume:
        if existing:
            raise TrainingError(
                f"{run_dir} already holds a run ({', '.join(existing)}); nothing was changed. Pass --resume to "
                "continue it, or choose another --output / --run-name for a new run."
            )
        return None
    if not last.exists():
        log.info("--resume: no last.pt in %s, starting a fresh run", run_dir)
        return None
    state = load_checkpoint(last)
    # settings added to medvox since the run started take their defaults: an upgrade does not block --resume
    try:
        previous = to_dict(from_dict(state["config"]))
    except ValueError:
        previous = state["config"]
    differ = [k for k in _diff(previous, to_dict(cfg)) if k not in _RESUME_FREE_KEYS]
    if differ:
        machine = sorted(set(differ) & _MACHINE_RECIPE_KEYS) if cfg.train.recipe == "auto" else []
        hint = (f" --recipe auto chose {', '.join(machine)} for the machine it ran on (on a CPU the input is capped, on "
                "a GPU the batch is fitted to its free memory): resume on the same kind of machine with the same "
                "flags, or give those settings as flags (--target-shape, --batch_size, --gradient_accumulation_steps, "
                "--epochs, --ema_decay) as config.json has them." if machine else "")
        raise TrainingError(
            f"--resume: the config differs from the interrupted run in {', '.join(differ)}; resume with the "
            f"same settings (see {run_dir / 'config.json'}) or start a new run under another --output.{hint}"
        )
    return state
