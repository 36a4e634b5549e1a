"""Train one fold: the original ResNet50-3D pipeline's options, exact resume, per-fold artifacts.

Per epoch: train (augmented on the device, accumulated, clipped, mixed precision), validate the raw
and the EMA weights, keep ``best.pt`` / ``best_ema.pt`` by their own monitored metric (with ``--safetensors``
their weights also as ``best.safetensors`` / ``best_ema.safetensors``: no pickle), write ``last.pt``
(everything needed to resume exactly), ``metrics.json``, logs and plots. At the end, the final weights at
their best epoch (``train.final_weights``: the EMA ones, the raw ones, or the better of the two on validation;
the raw ones when EMA is off) are evaluated once more: that is the result, and
``last.pt`` keeps only the last epoch's weights (``train.keep_resume_state`` keeps all of it).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvox._version import __version__
from medvox.config import ExperimentConfig, save, to_dict
from medvox.data.loader import ArrayLoader
from medvox.engine import artifacts, loop, timing
from medvox.engine.checkpoint import (
    atomic_save,
    atomic_save_safetensors,
    load_checkpoint,
    safetensors_epoch,
    without_resume_state,
)
from medvox.engine.compat import guard_cpu_bf16_conv3d
from medvox.engine.ema import create_ema, update_ema
from medvox.engine.optim import Schedule, build_optimizer, param_groups
from medvox.engine.runinfo import content_hash, run_info
from medvox.engine.setup import choose_precision, epoch_seed
from medvox.errors import TrainingError
from medvox.run import write_json

log = logging.getLogger("medvox")


def _better(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


class FoldTrainer:
    """Holds the model, optimizer, EMA and state of one fold's training."""

    def __init__(self, cfg: ExperimentConfig, fabric, prepared, run_dir: Path):
        self.cfg, self.fabric, self.data, self.run_dir = cfg, fabric, prepared, run_dir
        tc = cfg.train
        self.train_idx, self.val_idx = prepared.fold(tc.fold)
        # channels_last_3d speeds up cuDNN's 3D convolutions; oneDNN's on the CPU ran slower with it
        # (bf16 ResNet-18-3D: ~1.3-1.5x the CPU time per sample, mostly layout reorders; fp32 no gain;
        # benchmarks/RESULTS.md), so the CPU keeps the default layout.
        self.channels_last = tc.channels_last and fabric.device.type != "cpu"
        self.classes = list(prepared.classes)
        self.mode = "min" if "loss" in tc.monitor else "max"
        self._eta_clock: tuple[float, int] | None = None  # (when, epoch) of the first epoch this process ran
        self._curves_drawn: float | None = None  # when the learning curves were last drawn (perf_counter)
        self.loaders = self._make_loaders()
        self.model, self.ema = self._make_model()
        self.raw_model = self.model  # the unwrapped module: its state_dict has clean keys
        groups = param_groups(self.model, cfg.optim, self._head_names(), cfg.model.head_lr_mult)
        optimizer = build_optimizer(groups, cfg.optim)
        compiled = torch.compile(self.model) if tc.compile else self.model
        self.model, self.optimizer = fabric.setup(compiled, optimizer)
        steps = math.ceil(len(self.loaders["train"]) / tc.grad_accum)
        self.schedule = Schedule(self.optimizer, cfg.optim, tc.epochs, steps)
        self.criterion = self._make_loss()
        self.augment = self._make_augment()
        self.history: list[dict] = []
        self.best: dict[str, dict] = {"raw": {"value": None, "epoch": None}, "ema": {"value": None, "epoch": None}}
        self.bad_epochs = 0
        self.start_epoch = 1
        self.logger = artifacts.EpochLogger(run_dir, cfg) if fabric.is_global_zero else None

    # ---------------------------------------------------------------- construction
    def _make_loaders(self) -> dict[str, ArrayLoader]:
        tc, f = self.cfg.train, self.fabric
        common = dict(rank=f.global_rank, world_size=f.world_size)
        train = ArrayLoader(self.data.images, self.data.labels, self.train_idx, tc.batch_size, shuffle=True,
                            seed=tc.seed, drop_last=len(self.train_idx) // f.world_size > tc.batch_size, **common)
        val = ArrayLoader(self.data.images, self.data.labels, self.val_idx, max(tc.batch_size, 16), **common)
        loaders = {"train": train, "val": val}
        if len(self.data.test_idx):
            loaders["test"] = ArrayLoader(self.data.images, self.data.labels, self.data.test_idx,
                                          max(tc.batch_size, 16), **common)
        return loaders

    def _make_model(self):
        from medvox.models import create_model, load_pretrained, uses_cosine_head

        mc = self.cfg.model
        cosine = uses_cosine_head(self.cfg)
        model = create_model(mc.name, in_channels=int(self.data.images.shape[1]), num_classes=len(self.classes),
                             dropout=mc.dropout, cosine_head=cosine, **mc.kwargs)
        self.pretrained_report = None
        if mc.pretrained_path:
            # load_pretrained logs its one-line report ("Successfully loaded 318/318 backbone tensors ...")
            self.pretrained_report = load_pretrained(model, mc.pretrained_path, allow_partial=mc.allow_partial)
        model = model.to(self.fabric.device)
        if self.fabric.device.type == "cpu" and "bf16" in str(self.fabric._precision.precision):
            guard_cpu_bf16_conv3d(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        ema = create_ema(model, self.cfg.train.ema_decay, self.cfg.train.ema_debias)  # after .to(device), before DDP
        return model, ema

    def _head_names(self) -> set[str]:
        if self.pretrained_report is not None and hasattr(self.raw_model, "head_param_names"):
            return set(self.raw_model.head_param_names())
        return set()

    def _make_loss(self):
        from medvox.losses import build_loss

        counts = self.data.class_counts(self.train_idx)
        return build_loss(self.cfg.loss, counts, self.cfg.train.epochs).to(self.fabric.device)

    def _make_augment(self):
        if not self.cfg.augment.enabled:
            return None
        from medvox.transforms import BatchAugment

        return BatchAugment(self.cfg.augment)

    # ---------------------------------------------------------------- state
    def _common(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "plan": self.data.plan, "classes": self.classes,
                "in_channels": int(self.data.images.shape[1]), "medvox_version": __version__}

    def _state(self, epoch: int) -> dict[str, Any]:
        scaler = getattr(self.fabric._precision, "scaler", None)
        return {
            **self._common(), "kind": "last", "epoch": epoch, "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": artifacts.to_jsonable(self.history), "best": self.best, "bad_epochs": self.bad_epochs,
            "rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore everything ``_state`` saved; training continues at the next epoch."""
        self.raw_model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        scaler = getattr(self.fabric._precision, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        torch.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"]) + 1
        if self.fabric.is_global_zero:
            self._sync_safetensors()
        log.info("resumed from %s at epoch %d", self.run_dir / "last.pt", state["epoch"])

    # ---------------------------------------------------------------- one epoch
    def _evaluate(self, model, split: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
        from medvox.metrics.classification import compute_metrics

        idx, labels, logits = loop.predict(self.fabric, model, self.loaders[split],
                                           channels_last=self.channels_last)
        if not np.isfinite(logits).all():
            # the last optimizer step of an epoch can make the weights non-finite after a finite loss:
            # stop with the clear error here, before anything is written with these weights
            raise TrainingError(
                f"the model's outputs on the {split} set are NaN/Inf: its weights diverged; stopping before any "
                "checkpoint is overwritten. Lower --lr, keep --grad_clip on, or use --precision fp32."
            )
        probs = loop.softmax_np(logits)
        metrics = compute_metrics(labels, probs, class_names=self.classes)
        metrics["loss"] = loop.cross_entropy_np(logits, labels)
        return metrics, idx, labels, probs

    def _train_epoch(self, epoch: int):
        tc, f = self.cfg.train, self.fabric
        seed = epoch_seed(tc.seed, epoch, f.global_rank)
        torch.manual_seed(seed)  # dropout: the same randomness whether or not the run was resumed
        gen = torch.Generator().manual_seed(seed)
        self.loaders["train"].set_epoch(epoch)
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch - 1)
        with _Progress(f.is_global_zero, f"epoch {epoch}/{tc.epochs}",
                       len(self.loaders["train"]) * tc.batch_size) as bar:
            return loop.train_one_epoch(
                f, self.model, self.loaders["train"], self.optimizer, self.criterion, self.schedule,
                accum=tc.grad_accum, grad_clip=tc.grad_clip, augment=self.augment, generator=gen,
                ema_update=lambda: update_ema(self.ema, self.raw_model), channels_last=self.channels_last,
                mixup_alpha=self.cfg.augment.mixup if self.cfg.augment.enabled else 0.0, progress=bar.advance)

    def _run_epoch(self, epoch: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """Train one epoch and validate it: the history entry, and the validation labels and probabilities."""
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self._train_epoch(epoch)
        self._sync_buffers()
        t0 = time.perf_counter()
        val, _, labels, probs = self._evaluate(self.model, "val")
        entry = {"epoch": epoch, "lr": lr, "train": {"loss": stats.loss, "optimizer_steps": stats.optimizer_steps,
                                                      "skipped_steps": stats.skipped_steps}, "val": val}
        if self.ema is not None:
            entry["val_ema"] = self._evaluate(self.ema.module, "val")[0]
        d = stats.as_dict()
        entry["time"] = {"train_seconds": d["seconds"], "samples_per_s": d["samples_per_s"],
                         "data_wait_frac": d["data_wait_frac"], "val_seconds": time.perf_counter() - t0}
        self.schedule.epoch_end(val.get(self.cfg.train.monitor))
        return entry, labels, probs

    def _epoch_plots(self, entry: dict, labels: np.ndarray, probs: np.ndarray, last: bool) -> None:
        """The epoch's confusion matrix and ROC images: every epoch with ``train.plots = all``; with
        ``best_last`` only where the raw weights' monitor improved, and for the last epoch of the fold (the images
        of bests since overtaken are deleted at the fold's end)."""
        plots, epoch = self.cfg.train.plots, entry["epoch"]
        wanted = plots == "all" or (plots == "best_last" and (last or self.best["raw"]["epoch"] == epoch))
        if wanted and self.fabric.is_global_zero:
            artifacts.epoch_plots(self.run_dir, f"epoch_{epoch:03d}", labels, probs, entry["val"], self.classes)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), of the raw and the EMA model.

        DDP broadcasts rank 0's buffers before each training forward, so after an epoch's last step every rank
        holds statistics updated by its own last batch (and an EMA of those). Validated with them, each rank's
        share of the validation set would be scored by another model than the one rank 0 saves in best.pt.
        """
        if self.fabric.world_size == 1:
            return
        import torch.distributed as dist

        for module in (self.raw_model, self.ema):
            if module is not None:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def _update_best(self, epoch: int, entry: dict) -> bool:
        """Save best.pt / best_ema.pt where their metric improved; True when either improved."""
        monitor, improved = self.cfg.train.monitor, False
        for kind, key, fname in (("raw", "val", "best.pt"), ("ema", "val_ema", "best_ema.pt")):
            if key not in entry:
                continue
            value = entry[key].get(monitor)
            if _better(value, self.best[kind]["value"], self.mode):
                self.best[kind] = {"value": value, "epoch": epoch}
                improved = True
                weights = (self.raw_model if kind == "raw" else self.ema.module).state_dict()
                if self.fabric.is_global_zero:
                    # --safetensors: the same weights without pickle (best.safetensors / best_ema.safetensors),
                    # loadable where unpickling is not allowed; the metadata says what to build them into
                    twin = self._safetensors_metadata(kind, epoch) if self.cfg.train.safetensors else None
                    atomic_save({**self._common(), "kind": kind, "epoch": epoch, "model": weights,
                                 "metrics": entry[key]}, self.run_dir / fname, twin)
                    if twin is None:  # a twin left by a start with --safetensors would now lag its .pt
                        (self.run_dir / fname).with_suffix(".safetensors").unlink(missing_ok=True)
        return improved

    def _sync_safetensors(self) -> None:
        """On resume: rewrite a ``.safetensors`` twin that does not hold its ``.pt``'s epoch (a run killed
        between the two renames, or one from before they were written together); without ``--safetensors``,
        delete such a twin instead (a run started with the flag and resumed without it)."""
        for kind, fname in (("raw", "best.pt"), ("ema", "best_ema.pt")):
            pt = self.run_dir / fname
            twin = pt.with_suffix(".safetensors")
            if not pt.is_file() or not (self.cfg.train.safetensors or twin.exists()):
                continue
            best = load_checkpoint(pt)
            if safetensors_epoch(twin) == int(best["epoch"]):
                continue
            if not self.cfg.train.safetensors:
                log.warning("%s did not hold the weights of %s (epoch %d): deleted (no --safetensors)", twin.name,
                            fname, best["epoch"])
                twin.unlink(missing_ok=True)
            else:
                log.warning("%s did not hold the weights of %s (epoch %d): rewritten", twin.name, fname, best["epoch"])
                atomic_save_safetensors(best["model"], twin, self._safetensors_metadata(kind, int(best["epoch"])))

    def _safetensors_metadata(self, kind: str, epoch: int) -> dict[str, str]:
        import json

        common = self._common()
        return {"format": "pt", "kind": kind, "epoch": str(epoch), "model": self.cfg.model.name,
                "in_channels": str(common["in_channels"]), "classes": json.dumps(self.classes),
                "medvox_version": __version__, "config": json.dumps(common["config"]),
                "plan": json.dumps(artifacts.to_jsonable(common["plan"]))}

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict:
        tc, f = self.cfg.train, self.fabric
        if f.is_global_zero and self.start_epoch == 1:
            self._write_start()
        status = "complete"
        for epoch in range(self.start_epoch, tc.epochs + 1):
            try:
                entry, labels, probs = self._run_epoch(epoch)
            except TrainingError as exc:
                self._record_failure(f"epoch {epoch}: {exc}")
                raise TrainingError(f"epoch {epoch}: {exc}") from exc
            self.history.append(entry)
            improved = self._update_best(epoch, entry)
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
            stop = tc.early_stopping > 0 and self.bad_epochs >= tc.early_stopping
            self._epoch_plots(entry, labels, probs, last=stop or epoch == tc.epochs)
            if f.is_global_zero:
                # everything --resume needs; _finish drops the resume state once the fold has finished
                atomic_save(self._state(epoch), self.run_dir / "last.pt")
                self._write_epoch(entry, "early_stopped" if stop else "running")
            f.barrier()
            if stop:
                log.info("early stopping: no %s improvement for %d epochs", tc.monitor, self.bad_epochs)
                status = "early_stopped"
                break
        return self._finish(status)

    def _record_failure(self, message: str) -> None:
        """Mark metrics.json and the tracker's run as failed (the checkpoints on disk stay as they were)."""
        if not self.fabric.is_global_zero:
            return
        self.logger.close(status="failed")  # the tracker's run ends as failed, not left running
        if not self.history:
            return
        try:
            write_json(self.run_dir / "metrics.json", {**self._metrics_doc("failed"), "error": message})
        except OSError:  # e.g. the disk is full: the previous metrics.json stays
            pass

    def _write_start(self) -> None:
        save(self.cfg, self.run_dir / "config.json")
        precision = choose_precision(self.cfg.train, self.fabric.device.type).record()
        write_json(self.run_dir / "run_info.json", run_info(content_hash(self.data), cache_dataset=self.data.data_hash, precision=precision))
        if self.data.skipped:  # what --skip-bad dropped belongs to the run's record, not only to the cache
            write_json(self.run_dir / "skipped_cases.json", self.data.skipped)
        write_json(self.run_dir / "splits.json", self.data.splits)
        write_json(self.run_dir / "plan.json", self.data.plan)
        if self.pretrained_report is not None:
            self.pretrained_report.save(self.run_dir / "pretrained_report.json")

    def _metrics_doc(self, status: str, final: dict | None = None) -> dict:
        return {"status": status, "model": self.cfg.model.name, "fold": self.cfg.train.fold,
                "monitor": self.cfg.train.monitor, "mode": self.mode, "classes": self.classes,
                "epochs_run": len(self.history), "best": self.best, "history": self.history, **(final or {})}

    def _write_epoch(self, entry: dict, status: str) -> None:
        write_json(self.run_dir / "metrics.json", self._metrics_doc(status))
        self.logger.log(entry, self.history)
        # redrawn at most every CURVES_EVERY_S ("final": only in _finish, for sweeps where plotting costs more
        # than a GPU epoch); _finish draws them whole in every mode
        if self.cfg.train.plots != "final" and (
                self._curves_drawn is None or time.perf_counter() - self._curves_drawn >= timing.CURVES_EVERY_S):
            self._curves()
        log.info(_summary_line(entry, self.cfg.train.monitor, self.cfg.loss.name))
        # the ETA from the mean wall time of the epochs since the first this process ran (checkpoints and plots
        # included); after that first one, the forecast's epoch when there is one, else its training + validation
        now, forecast = time.perf_counter(), timing.forecast_for(self.cfg)
        if self._eta_clock is None:
            self._eta_clock = (now, entry["epoch"])
        since, first = self._eta_clock
        epoch_s = ((now - since) / (entry["epoch"] - first) if entry["epoch"] > first else
                   forecast.epoch_s if forecast is not None else entry["time"]["train_seconds"] + entry["time"]["val_seconds"])
        position = timing.current_position()
        if status == "running" and (entry["epoch"] < self.cfg.train.epochs or position is not None):
            log.info(timing.eta_line(entry["epoch"], self.cfg.train.epochs, epoch_s, forecast, position))

    def _curves(self) -> None:
        from medvox import plots

        plots.plot_loss_curve(self.history, self.run_dir / "loss_curve.png", train_loss=self.cfg.loss.name)
        plots.plot_learning_curves(self.history, self.run_dir / "learning_curves.png", train_loss=self.cfg.loss.name)
        self._curves_drawn = time.perf_counter()

    def _choose_final(self) -> tuple[str, dict]:
        """Which best weights are the fold's result (``train.final_weights``), and the record of the choice.

        ``ema``: the EMA weights (the original recipe); ``raw``: the raw ones; ``best`` (the auto recipe):
        whichever scored better on validation by the monitored metric, the EMA on a tie. Without EMA (or when
        the EMA never scored) the raw weights. ``margin`` is how much better the chosen weights scored than the
        others (negative: worse), in the metric's own direction.
        """
        rule, monitor = self.cfg.train.final_weights, self.cfg.train.monitor
        raw, ema = self.best["raw"], self.best["ema"]
        if self.ema is None or ema["epoch"] is None:
            kind = "raw"
            chosen_by = "no EMA (train.ema_decay = 0)" if self.ema is None else f"no validation {monitor} for the EMA weights"
        elif rule == "raw" and raw["epoch"] is not None:
            kind, chosen_by = "raw", "train.final_weights = raw"
        elif rule == "best" and _better(raw["value"], ema["value"], self.mode):
            kind, chosen_by = "raw", f"train.final_weights = best: the better validation {monitor}"
        elif rule == "best":
            kind, chosen_by = "ema", f"train.final_weights = best: the better validation {monitor}"
        else:
            kind, chosen_by = "ema", f"train.final_weights = {rule}"
        other = self.best["ema" if kind == "raw" else "raw"]["value"]
        value = self.best[kind]["value"]
        margin = None
        if value is not None and other is not None:
            margin = (other - value) if self.mode == "min" else (value - other)
        return kind, {"chosen_by": chosen_by, "raw_value": raw["value"], "ema_value": ema["value"], "margin": margin}

    def _finish(self, status: str) -> dict:
        """Evaluate the final weights (:meth:`_choose_final`, at their best epoch) on validation and test."""
        kind, choice = self._choose_final()
        fname = "best_ema.pt" if kind == "ema" else "best.pt"
        final_model = self.ema.module if kind == "ema" else self.raw_model
        if (self.run_dir / fname).exists():
            final_model.load_state_dict(load_checkpoint(self.run_dir / fname)["model"])
        final = {"weights": fname, "epoch": self.best[kind]["epoch"], **choice}
        monitor = self.cfg.train.monitor
        margin = "" if choice["margin"] is None else f" ({choice['margin']:+.4f})"
        log.info("fold %d final weights: %s (%s, epoch %s), %s; validation %s: raw %s, EMA %s%s",
                 self.cfg.train.fold, fname, "EMA" if kind == "ema" else "raw", final["epoch"], choice["chosen_by"],
                 monitor, _fmt(choice["raw_value"]), _fmt(choice["ema_value"]), margin)
        for split in ("val", "test"):
            if split in self.loaders:
                final[split] = self._final_split(final_model, split)
        doc = self._metrics_doc(status, {"final": final})
        if self.fabric.is_global_zero:
            write_json(self.run_dir / "metrics.json", doc)
            if self.cfg.train.plots == "best_last":
                artifacts.prune_epoch_plots(self.run_dir, {self.best["raw"]["epoch"], len(self.history)})
            if self.history:
                self._curves()
            self._finish_last(status)
            self.logger.close(final, step=len(self.history))
            log.info("fold %d %s: final (%s) val %s=%s", self.cfg.train.fold, status, fname,
                     self.cfg.train.monitor, _fmt(final["val"].get(self.cfg.train.monitor)))
        return artifacts.to_jsonable(doc)

    def _finish_last(self, status: str) -> None:
        """The fold is finished (metrics.json says so, written just before): ``--resume`` will not read last.pt
        again, so it keeps the last epoch's weights and drops the optimizer / schedule / scaler / RNG / EMA state
        (``train.keep_resume_state`` keeps them; ``train.keep_last=false`` deletes the file). A kill before this
        rewrite leaves the full last.pt of a finished fold: larger, never wrong."""
        tc, last = self.cfg.train, self.run_dir / "last.pt"
        if not tc.keep_last:
            last.unlink(missing_ok=True)
        elif not tc.keep_resume_state and last.is_file():
            state = load_checkpoint(last)
            if "optimizer" in state:
                atomic_save(without_resume_state(state, status), last)

    def _final_split(self, model, split: str) -> dict:
        """The final weights on ``split``: metrics at the argmax, and at the fold's own decision (chosen on its
        validation set, raw probabilities) as ``at_val_threshold`` with the decision recorded beside them."""
        from medvox.metrics.classification import compute_metrics
        from medvox.metrics.decision import Decision
        from medvox.run import write_predictions

        metrics, idx, labels, probs = self._evaluate(model, split)
        if split == "val":
            self.decision = Decision.fit(labels, probs, self.classes, rule=self.cfg.train.threshold_rule,
                                         probabilities="raw", fitted_on=f"fold {self.cfg.train.fold}'s validation set")
        decision = getattr(self, "decision", None) or Decision.argmax(self.classes, "no validation set",
                                                                      probabilities="raw")
        if not decision.is_argmax:
            metrics["at_val_threshold"] = compute_metrics(labels, probs, threshold=decision.cut,
                                                          class_names=self.classes)
        metrics["decision"] = decision.to_json()
        if self.fabric.is_global_zero:
            cases = [self.data.cases[i] for i in idx]
            write_predictions(self.run_dir / f"{split}_predictions.csv", [c.id for c in cases],
                              [c.group for c in cases], labels, probs, self.classes, decision)
            artifacts.epoch_plots(self.run_dir, f"{split}_final", labels, probs, metrics.get("at_val_threshold", metrics),
                                  self.classes, decision=decision)
        return metrics


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _summary_line(entry: dict, monitor: str, loss_name: str = "CE") -> str:
    """One epoch in one line; each loss named by its kind (the training loss is the configured one, e.g.
    LDAM's scaled margins, the validation loss plain cross-entropy: they are not on one scale)."""
    v, e, t = entry["val"], entry.get("val_ema", {}), entry["time"]
    parts = [f"epoch {entry['epoch']:3d}", f"lr {entry['lr']:.2e}", f"train {loss_name} loss {entry['train']['loss']:.4f}",
             f"val CE loss {_fmt(v.get('loss'))}", f"val {monitor} {_fmt(v.get(monitor))}",
             f"acc {_fmt(v.get('accuracy'))}", f"f1 {_fmt(v.get('f1'))}"]
    if e:
        parts.append(f"ema {monitor} {_fmt(e.get(monitor))}")
    parts.append(f"{t['samples_per_s'] or 0:.1f} samples/s")
    return " | ".join(parts)


class _Progress:
    """A rich progress bar over the samples of one epoch, with the running loss and throughput."""

    def __init__(self, enabled: bool, description: str, total: int):
        import sys

        # a bar only on a terminal: in a log file the one-line epoch summary says it all
        enabled = enabled and sys.stdout.isatty()
        self.enabled, self.description, self.total = enabled, description, total
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, loss="", rate="")
            self._t0 = time.perf_counter()
        return self

    def advance(self, n: int, loss: float) -> None:
        if self._progress is not None:
            done = self._progress.tasks[0].completed + n
            rate = f"{done / max(time.perf_counter() - self._t0, 1e-9):.1f} samples/s"
            self._progress.update(self._task, advance=n, loss=f"loss {loss:.4f}", rate=rate)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
