"""medvox's side of the comparisons: its engine, loader and batched augmentation, nothing re-implemented.

The training case builds the real ``FoldTrainer`` (model, bf16 guard, memory format, optimizer,
loss, EMA, ``torch.compile``) from a resolved config, then runs the real ``loop.train_one_epoch``
over the same volumes the peer trains on: all ``n`` cached rows, not one fold's training part, so
both sides see the same data and the same number of steps. Validation, checkpoints and plots (which
the peer's loop does not do either) are left out.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.peer_monai import PROB, ROTATE_DEG, TRANSLATE, ZOOM


def medvox_augment(flip_axes: list[int] | None = None):
    """``BatchAugment`` with the same ranges as the peers' ``RandAffined`` / ``RandomAffine``."""
    from medvox.config import AugmentConfig
    from medvox.transforms import BatchAugment

    return BatchAugment(AugmentConfig(prob=PROB, rotate_deg=ROTATE_DEG, zoom=ZOOM, translate=TRANSLATE,
                                      flip_axes=list(flip_axes or []), flip_prob=0.5))


class _Timed:
    """Wraps the augmentation to add up its time: wall time on the CPU; on a GPU the time between CUDA
    events recorded on the stream around each call (no sync inside the loop; read ``seconds`` after the
    epoch's final synchronize)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self._cpu_seconds = fn, 0.0
        self.cuda, self._events = device.type == "cuda", []

    def __call__(self, x, generator):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(x, generator)
            end.record()
            self._events.append((start, end))
            return out
        t = time.perf_counter()
        out = self.fn(x, generator)
        self._cpu_seconds += time.perf_counter() - t
        return out

    @property
    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self._cpu_seconds


def engine_config(spec: dict):
    """The resolved ``ExperimentConfig`` of a medvox training case.

    Like-for-like with the peer (default): CE loss, batch ``spec["batch"]``, no accumulation, no
    clipping, no EMA, no weight decay, flips on all three axes. ``engine_defaults`` keeps medvox's
    own defaults instead (LDAM, accumulation 2, clipping 0.5, EMA 0.999).
    """
    from medvox.config import resolve

    amp = spec.get("amp", spec["precision"] == "bf16")
    overrides = {
        "data.path": spec["npz"], "data.cache_dir": spec["cache_dir"], "model.name": spec["model"],
        "data.folds": 2,  # the split is unused (every row trains) but must exist: 2 folds fit tiny subsets
        "optim.lr": spec["lr"], "train.batch_size": spec["batch"], "train.precision": spec["precision"],
        "train.amp": amp, "train.compile": bool(spec.get("compile")), "train.output": spec["out_dir"],
        "train.run_name": spec["name"], "train.gpu": spec.get("device", "cpu") == "cuda",
        "train.seed": spec.get("seed", 0), "augment.flip_axes": [0, 1, 2], "train.epochs": 100,
    }
    if spec.get("size"):  # the volumes are stored at this size (subset_npz): keep it, whatever the plan says
        overrides["data.target_shape"] = [spec["size"]] * 3
    if "channels_last" in spec:  # only set to compare memory formats; otherwise the engine decides
        overrides["train.channels_last"] = spec["channels_last"]
    if not spec.get("engine_defaults"):
        overrides.update({"loss.name": "CE", "train.grad_accum": 1, "train.grad_clip": 0.0, "train.ema_decay": 0.0,
                          "optim.weight_decay": 0.0, "optim.scheduler": "none"})
    return resolve(overrides=overrides)


class MedvoxTrainer:
    """medvox's engine on ``spec["n"]`` cached volumes; ``setup`` / ``epoch`` / ``finish``."""

    def __init__(self, spec: dict):
        self.spec, self.name = spec, spec["name"]
        self.epoch_no = 0

    def setup(self) -> dict:
        from medvox.data import prepare
        from medvox.data.loader import ArrayLoader
        from medvox.engine.setup import make_fabric, seed_everything
        from medvox.engine.trainer import FoldTrainer

        t0 = time.perf_counter()
        self.cfg = cfg = engine_config(self.spec)
        self.fabric = make_fabric(cfg.train)
        self.fabric.launch()
        seed_everything(cfg.train.seed, cfg.train.deterministic, cfg.train.threads)
        prepared = prepare(cfg.data, progress=False)
        run_dir = Path(cfg.train.output) / self.name
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = FoldTrainer(cfg, self.fabric, prepared, run_dir)
        rows = np.arange(len(prepared.cases))
        tc = cfg.train
        self.loader = ArrayLoader(prepared.images, prepared.labels, rows, tc.batch_size, shuffle=True, seed=tc.seed,
                                  drop_last=len(rows) > tc.batch_size)
        warm = ArrayLoader(prepared.images, prepared.labels, rows[: tc.batch_size * tc.grad_accum], tc.batch_size)
        self._run(warm)  # warm-up (oneDNN primitives, torch.compile): excluded from every timing
        return {"setup_seconds": time.perf_counter() - t0, "precision": str(self.fabric._precision.precision),
                "channels_last": self._channels_last(), "threads": torch.get_num_threads(),
                "fused_adam": bool(self.trainer.optimizer.defaults.get("fused"))}

    def _channels_last(self) -> bool:
        # the memory format the engine really uses (it may ignore the flag on some devices)
        return bool(getattr(self.trainer, "channels_last", self.cfg.train.channels_last))

    def _run(self, loader) -> dict:
        from benchmarks.common import tree_cpu_seconds
        from medvox.engine import loop
        from medvox.engine.ema import update_ema
        from medvox.engine.setup import epoch_seed

        t, tc = self.trainer, self.cfg.train
        self.epoch_no += 1
        loader.set_epoch(self.epoch_no)
        gen = torch.Generator().manual_seed(epoch_seed(tc.seed, self.epoch_no, 0))
        augment = _Timed(t.augment, self.fabric.device) if t.augment is not None else None
        t.model.train()
        cpu0 = tree_cpu_seconds()
        stats = loop.train_one_epoch(
            self.fabric, t.model, loader, t.optimizer, t.criterion, t.schedule, accum=tc.grad_accum,
            grad_clip=tc.grad_clip, augment=augment, generator=gen,
            ema_update=lambda: update_ema(t.ema, t.raw_model), channels_last=self._channels_last())
        if self.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return {"seconds": stats.seconds, "samples": stats.samples, "steps": len(loader),
                "optimizer_steps": stats.optimizer_steps, "data_wait": stats.data_wait,
                "aug_seconds": augment.seconds if augment is not None else None,
                "cpu_seconds": tree_cpu_seconds() - cpu0, "nonfinite_losses": 0}

    def epoch(self) -> dict:
        return self._run(self.loader)

    def finish(self) -> dict:
        from benchmarks.common import max_rss_gb

        return max_rss_gb()
