"""Fabric, precision, seeds, the run folder and the resume rules."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvox.config import CHOICES, ExperimentConfig, TrainConfig, from_dict, to_dict
from medvox.engine.checkpoint import finished_status, load_checkpoint
from medvox.engine.distributed import fabric_module, process_layout
from medvox.errors import TrainingError

log = logging.getLogger("medvox")

# Settings --recipe auto derives from the machine as well as the data (input cap on a CPU, GPU batch fit).
_MACHINE_RECIPE_KEYS = {"data.target_shape", "train.batch_size", "train.grad_accum", "train.epochs",
                        "train.ema_decay"}
# Keys that may differ between an interrupted run and its --resume without changing the result.
_RESUME_FREE_KEYS = {"train.resume", "train.threads", "data.workers", "data.cache_dir", "train.plots",
                     "train.keep_last", "train.keep_resume_state", "train.safetensors"}


@dataclass(frozen=True)
class PrecisionChoice:
    """The Fabric precision a run uses, why, and the warning to give (explicit bf16 on an emulating CPU)."""

    precision: str  # "bf16-mixed" | "16-mixed" | "32-true"
    reason: str
    warning: str | None = None

    def record(self) -> dict[str, str]:
        """What ``run_info.json`` keeps: the precision and the reason."""
        return {"used": self.precision, "reason": self.reason}


_FABRIC = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


def precision_name(fabric_precision: str) -> str:
    """The user's name (``--precision``) of a Fabric precision: ``"32-true"`` -> ``"fp32"``."""
    return {v: k for k, v in _FABRIC.items()}.get(fabric_precision, fabric_precision)


def choose_precision(tc: TrainConfig, accelerator: str) -> PrecisionChoice:
    """The precision for ``tc`` on ``accelerator`` ("cpu" | "cuda"), with its reason.

    On a GPU: bf16 where supported, fp16 with a grad scaler otherwise. On a CPU: ``--amp`` means bf16 only
    where the CPU runs it natively (:func:`medvox.machine.cpu_bf16_native`), fp32 elsewhere; an explicit
    ``--precision bf16`` is honoured everywhere, with a warning where it is emulated. ``auto`` without
    ``--amp`` is fp32 on a CPU and mixed precision on a GPU.
    """
    from medvox.machine import EMULATED_BF16_SLOWDOWN, cpu_bf16_basis, cpu_bf16_native

    choice = tc.precision.lower()
    if choice not in CHOICES["train.precision"]:
        raise ValueError(f"unknown precision {tc.precision!r}; choose auto, bf16, fp16 or fp32")
    if choice == "fp32":
        return PrecisionChoice("32-true", "fp32: --precision fp32")
    if accelerator == "cuda":
        if choice == "auto":
            if torch.cuda.is_bf16_supported():
                return PrecisionChoice("bf16-mixed", "bf16: mixed precision on a GPU that supports bf16")
            return PrecisionChoice("16-mixed", "fp16 + grad scaler: mixed precision on a GPU without bf16")
        return PrecisionChoice(_FABRIC[choice], f"{choice}: --precision {choice}")
    if choice == "auto" and not tc.amp:
        return PrecisionChoice("32-true", "fp32: no mixed precision asked for (--amp or --precision) on the CPU")
    native = cpu_bf16_native()
    basis = cpu_bf16_basis()
    if choice == "bf16":
        if native:
            return PrecisionChoice("bf16-mixed", f"bf16: --precision bf16, native on this CPU ({basis})")
        return PrecisionChoice(
            "bf16-mixed", f"bf16: --precision bf16, emulated on this CPU ({basis})",
            warning=f"--precision bf16: this CPU has no native bf16 ({basis}); oneDNN emulates it, "
                    f"{EMULATED_BF16_SLOWDOWN} slower per step than fp32 on such CPUs (ResNet-10, 8 x 32^3). "
                    "Leave --precision out (or use --amp) to let medvox choose fp32 here")
    asked = "--amp" if choice == "auto" else "--precision fp16 (a GPU feature)"
    if native:
        return PrecisionChoice("bf16-mixed", f"bf16: {asked} on a CPU with native bf16 ({basis})")
    return PrecisionChoice("32-true", f"fp32: {asked}, but this CPU has no native bf16 ({basis}); emulated bf16 "
                                      f"runs {EMULATED_BF16_SLOWDOWN} slower than fp32")


def resolve_precision(tc: TrainConfig, accelerator: str) -> str:
    """The Fabric precision string of :func:`choose_precision`."""
    return choose_precision(tc, accelerator).precision


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
    """A Lightning Fabric for the configured device(s) and node(s); DDP when more than one process in all.

    Under torchrun or srun, Fabric takes the ranks from the launcher's environment and the process counts
    come from it too (:func:`medvox.engine.distributed.process_layout`).
    """
    lf = fabric_module()

    wants_gpu = use_gpu(tc.gpu or tc.multi_gpu, "--gpu/--multi_gpu", "training")
    accelerator = "cuda" if wants_gpu else "cpu"
    layout = process_layout(tc, wants_gpu)
    n_dev = torch.cuda.device_count() if layout.devices == -1 else layout.devices
    strategy = "ddp" if n_dev * layout.num_nodes > 1 else "auto"
    if strategy == "ddp" and accelerator == "cpu":
        strategy = lf.strategies.DDPStrategy(process_group_backend="gloo")
    precision = resolve_precision(tc, accelerator)
    if accelerator == "cuda":
        torch.backends.cudnn.benchmark = not tc.deterministic
    return lf.Fabric(accelerator=accelerator, devices=layout.devices, num_nodes=layout.num_nodes, strategy=strategy,
                     precision=precision)


def compute_threads(threads: int | None, processes: int = 1) -> int:
    """Intra-op threads for each of ``processes`` on this machine: ``threads`` when given, else an equal share
    of the CPUs granted to the process (:func:`medvox.machine.available_cpus`); never more than that share,
    so a job granted 4 cores does not start 64 threads (or 2 DDP ranks 4 each)."""
    from medvox.machine import available_cpus

    share = max(1, available_cpus() // max(1, processes))
    if threads and threads > share:
        log.warning("--threads %d: %d CPU(s) are granted to each of %d process(es) here (affinity, "
                    "SLURM_CPUS_PER_TASK, cgroup quota); using %d", threads, share, processes, share)
    return min(threads or share, share)


def seed_everything(seed: int, deterministic: bool, threads: int | None, processes: int = 1) -> None:
    torch.set_num_threads(compute_threads(threads, processes))
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
        if existing:  # only worth a line when the folder held something: a fresh fold starts silently
            log.info("--resume: no last.pt in %s, starting a fresh run", run_dir)
        return None
    state = load_checkpoint(last)
    finished = finished_status(state)
    if finished is not None:  # _finish slims last.pt only after metrics.json says the fold finished
        raise TrainingError(
            f"--resume: {last} holds only the last weights of a finished fold ({finished}; "
            f"its optimizer and RNG state were dropped then), but {run_dir / 'metrics.json'} does not record the "
            "finish; nothing was changed. The fold's results are its best.pt / best_ema.pt: to train it again, "
            "choose another --output / --run-name."
        )
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
