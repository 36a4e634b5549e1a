"""How fast this machine runs one fold's work, measured in seconds: what the auto recipe's time budget is fitted to.

:func:`measure_throughput` trains the model on random volumes of the real input shape for a few steps through
the trainer's own loop (:func:`medvox.engine.loop.train_one_epoch`: on-device augmentation, forward, backward,
clipping, optimizer step, EMA update) in the precision and with the threads the run will use, times validation
forwards the same way and the test ensemble's fp32 forwards, writes one ``last.pt``-sized checkpoint and draws
one epoch's plots. The figures go into a :class:`Throughput`, which the recipe turns into a forecast
(:func:`medvox.recipe.forecast`).

:func:`cached_throughput` keeps each measurement in the preprocessing cache (``<cache>/throughput/``), keyed by
the machine and every setting measured, so that a resumed ``medvox cv`` (or a second one) on the same machine
is fitted to the same figures and chooses the same schedule: a fold finished with 38 epochs is not refused by
a rerun that measured a little faster and chose 40.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("medvox")

PROBE_VERSION = 2  # part of the cache key: a change in what is measured measures again
MIN_SECONDS = 2.0  # the timed training steps last at least this long (evaluation: half), ...
MAX_PASSES = 20  # ... unless this many more passes over them are done
PLOT_DRAWS = 2  # each kind of plot drawn this many times (a fast model's epoch is mostly its plots)


@dataclass(frozen=True)
class Throughput:
    """What one process measured on this machine for one model, input and batch.

    Attributes:
        train: training samples per second (augmentation, forward, backward, optimizer step, EMA update).
        evaluate: validation samples per second (forward only, in the training precision).
        predict: test-ensemble samples per second (the Predictor's fp32 forward, batch 8).
        save_s: seconds to write one ``last.pt`` (weights, EMA and optimizer state).
        images_s: seconds of one evaluation's images (confusion matrix and ROC curve); 0 with
            ``train.plots = final``.
        curves_s: seconds of one draw of the loss and learning curves; 0 with ``train.plots = final``.
        precision: the Fabric precision measured (``"32-true"``, ``"bf16-mixed"``, ...).
        threads: intra-op threads measured with.
        device: ``"cpu"`` or the GPU's name.
    """

    train: float
    evaluate: float
    predict: float
    save_s: float
    images_s: float
    curves_s: float
    precision: str
    threads: int
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Throughput:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__})


def _timed_batches() -> tuple[list[float], Any]:
    """A progress callback for the trainer's loop that records when each batch ended, and the list it fills."""
    ends: list[float] = []

    def progress(_n: int, _loss: float) -> None:
        ends.append(time.perf_counter())

    return ends, progress


def _rate(ends: list[float], start: float, batch: int, warmup: int) -> float:
    """Samples per second over the batches after the first ``warmup`` (their end times in ``ends``)."""
    t0 = ends[warmup - 1] if warmup > 0 else start
    timed = len(ends) - warmup
    return batch * timed / max(ends[-1] - t0, 1e-9)


def measure_throughput(model_name: str, shape: list[int], channels: int, num_classes: int, batch: int, *,
                       precision: str, threads: int, accelerator: str = "cpu", model_kwargs: dict | None = None,
                       augment=None, ema: bool = True, plots: bool = True, channels_last: bool = False,
                       steps: int = 3, warmup: int = 1, workdir: str | Path | None = None) -> Throughput:
    """Measure one training step's and one evaluation pass's throughput, a checkpoint write and a plot.

    Args:
        model_name, model_kwargs: the registered model and its arguments.
        shape: the input grid ``(D, H, W)``; ``channels``: input channels.
        num_classes: the classes (the head's size).
        batch: the micro-batch (the optimizer steps after every micro-batch here: with accumulation the run
            steps less often, so this errs on the slow side by an optimizer step per micro-batch).
        precision: the Fabric precision string the run will use (:func:`medvox.engine.setup.choose_precision`).
        threads: the intra-op threads the run will use; the process's setting is restored afterwards.
        accelerator: ``"cpu"`` or ``"cuda"``.
        augment: the :class:`~medvox.config.AugmentConfig` (None or disabled: no augmentation).
        ema: the run keeps an EMA (updated every step, validated every epoch).
        plots: the run draws plots every epoch (``train.plots`` all / best_last).
        channels_last: the model runs in ``channels_last_3d`` (GPU only, as the trainer does).
        steps, warmup: timed training steps, after ``warmup`` untimed ones; more passes of ``steps`` are timed
            while the timed part lasts less than :data:`MIN_SECONDS` (at most :data:`MAX_PASSES`).
        workdir: where the checkpoint and the plots are written and deleted (the run's output root: the same
            disk); default a temporary folder.

    Example:
        >>> tp = measure_throughput("resnet10", [16, 16, 16], 1, 2, 4, precision="32-true", threads=1)
        >>> tp.train > 0 and tp.evaluate > 0
        True
    """
    from medvox.engine import loop
    from medvox.engine.checkpoint import atomic_save
    from medvox.engine.ema import create_ema, update_ema
    from medvox.engine.setup import fabric_module
    from medvox.models import create_model

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        fabric = fabric_module().Fabric(accelerator=accelerator, devices=1, precision=precision)
        model = create_model(model_name, in_channels=channels, num_classes=num_classes, **(model_kwargs or {}))
        model = model.to(fabric.device)
        if fabric.device.type == "cpu" and "bf16" in precision:
            from medvox.engine.compat import guard_cpu_bf16_conv3d

            guard_cpu_bf16_conv3d(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        averaged = create_ema(model, 0.99, True) if ema else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        wrapped, optimizer = fabric.setup(model, optimizer)
        augmenter = None
        if augment is not None and getattr(augment, "enabled", False):
            from medvox.transforms import BatchAugment

            augmenter = BatchAugment(augment)

        # training: the trainer's loop over (warmup + steps) random batches held in memory as float16, as the
        # cache stores volumes
        from medvox.data.loader import ArrayLoader

        n = batch * (warmup + steps)
        images = np.random.default_rng(0).standard_normal((n, channels, *shape)).astype(np.float16)
        labels = np.arange(n) % max(2, num_classes)
        train_loader = ArrayLoader(images, labels, np.arange(n), batch, shuffle=False, drop_last=True)
        ends, progress = _timed_batches()
        gen = torch.Generator().manual_seed(0)

        def one_pass(loader) -> None:
            loop.train_one_epoch(fabric, wrapped, loader, optimizer, torch.nn.CrossEntropyLoss(), _NoSchedule(),
                                 accum=1, grad_clip=0.5, augment=augmenter, generator=gen,
                                 ema_update=(lambda: update_ema(averaged, model)) if averaged is not None else (lambda: None),
                                 channels_last=channels_last, progress=progress)

        start = time.perf_counter()
        one_pass(train_loader)
        # a fast model's few steps take milliseconds, where a scheduler's time slice decides the figure: more
        # passes of ``steps`` batches until the timed part lasts MIN_SECONDS
        again = ArrayLoader(images, labels, np.arange(batch * steps), batch, shuffle=False, drop_last=True)
        for _ in range(MAX_PASSES):
            if ends[-1] - (ends[warmup - 1] if warmup else start) >= MIN_SECONDS:
                break
            one_pass(again)
        train_rate = _rate(ends, start, batch, warmup)

        # validation: the trainer's evaluation batches (max(batch, 16)), one untimed, then timed
        eval_batch = max(batch, 16)
        eval_rate = _eval_rate(lambda loader: loop.predict(fabric, wrapped, loader, channels_last=channels_last),
                               eval_batch, channels, shape)
        # the test ensemble: the Predictor's plain fp32 forward in batches of 8 (the same as validation in fp32)
        if precision == "32-true" and eval_batch == 8:
            predict_rate = eval_rate
        else:
            predict_rate = _predict_rate(model, fabric.device, channels, shape)

        with tempfile.TemporaryDirectory(dir=_existing(workdir), prefix=".medvox-probe-") as tmp:
            tmp = Path(tmp)
            state = {"model": model.state_dict(), "ema": averaged.state_dict() if averaged is not None else None,
                     "optimizer": optimizer.state_dict()}
            t0 = time.perf_counter()
            atomic_save(state, tmp / "last.pt")
            save_s = time.perf_counter() - t0
            images_s, curves_s = _plot_seconds(tmp, num_classes, ema) if plots else (0.0, 0.0)
        device = "cpu" if fabric.device.type == "cpu" else torch.cuda.get_device_name(fabric.device)
        return Throughput(train=train_rate, evaluate=eval_rate, predict=predict_rate, save_s=save_s, images_s=images_s,
                          curves_s=curves_s, precision=precision, threads=torch.get_num_threads(), device=device)
    finally:
        torch.set_num_threads(before)
        torch.set_rng_state(rng_state)


class _NoSchedule:
    """The loop steps a schedule after every optimizer step; the probe keeps its learning rate."""

    def step(self) -> None:
        pass


def _existing(folder: str | Path | None) -> str | None:
    if folder is None:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder)


def _eval_rate(run, eval_batch: int, channels: int, shape: list[int]) -> float:
    """Samples per second of ``run(loader)`` over one batch of ``eval_batch``, after an untimed one."""
    from medvox.data.loader import ArrayLoader

    n = eval_batch * 2
    images = np.random.default_rng(1).standard_normal((n, channels, *shape)).astype(np.float16)
    labels = np.arange(n) % 2
    first = ArrayLoader(images, labels, np.arange(eval_batch), eval_batch)
    timed = ArrayLoader(images, labels, np.arange(eval_batch, n), eval_batch)
    run(first)  # untimed: first-call allocations and kernel choices
    t0, done = time.perf_counter(), 0
    while done == 0 or (time.perf_counter() - t0 < MIN_SECONDS / 2 and done < MAX_PASSES):
        run(timed)
        done += 1
    return done * eval_batch / max(time.perf_counter() - t0, 1e-9)


@torch.inference_mode()
def _predict_rate(model, device, channels: int, shape: list[int], batch: int = 8) -> float:
    """Samples per second of the plain fp32 forward of ``model`` on ``batch`` volumes, after an untimed one."""
    model.eval()
    x = torch.randn(batch, channels, *shape, device=device)
    model(x)
    t0, done = time.perf_counter(), 0
    while done == 0 or (time.perf_counter() - t0 < MIN_SECONDS / 2 and done < MAX_PASSES):
        model(x).float().cpu()
        done += 1
    return done * batch / max(time.perf_counter() - t0, 1e-9)


def _plot_seconds(folder: Path, num_classes: int, ema: bool) -> tuple[float, float]:
    """Seconds of one evaluation's images (confusion matrix, ROC) and of one draw of the curves (loss, learning
    curves), each the mean of :data:`PLOT_DRAWS` draws after an untimed first one (importing matplotlib is paid
    once per process, not per epoch)."""
    from medvox import plots
    from medvox.engine import artifacts
    from medvox.metrics.classification import compute_metrics

    classes = [str(i) for i in range(max(2, num_classes))]
    labels = np.arange(32) % len(classes)
    probs = np.random.default_rng(2).dirichlet(np.ones(len(classes)), size=len(labels))
    metrics = compute_metrics(labels, probs, class_names=classes)
    metrics["loss"] = 0.5
    entry = {"epoch": 1, "lr": 1e-3, "train": {"loss": 0.6}, "val": metrics, **({"val_ema": metrics} if ema else {})}
    history = [{**entry, "epoch": i} for i in range(1, 21)]  # the curves' cost grows a little with the epochs

    def images(tag: str) -> None:
        artifacts.epoch_plots(folder, tag, labels, probs, metrics, classes)

    def curves(tag: str) -> None:
        plots.plot_loss_curve(history, folder / f"loss_{tag}.png")
        plots.plot_learning_curves(history, folder / f"curves_{tag}.png")

    def timed(draw) -> float:
        t0 = time.perf_counter()
        for i in range(PLOT_DRAWS):
            draw(f"timed{i}")
        return (time.perf_counter() - t0) / PLOT_DRAWS

    images("warm")
    curves("warm")
    return timed(images), timed(curves)


def cache_key(settings: dict[str, Any]) -> str:
    """The cache file name of a measurement: a digest of the machine and the settings measured."""
    import hashlib
    import platform

    from medvox.machine import cpu_capability, cpu_name

    machine = {"cpu": cpu_name(), "capability": cpu_capability(), "platform": platform.machine(),
               "torch": torch.__version__, "probe": PROBE_VERSION,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    text = json.dumps({"machine": machine, "settings": settings}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def cached_throughput(cache_dir: Path | None, settings: dict[str, Any], measure) -> tuple[Throughput, bool]:
    """``(throughput, from_cache)``: the measurement of ``settings`` kept in ``cache_dir``, else ``measure()``
    stored there. The first measurement written wins: two jobs that measure at once both use the one on disk.

    ``settings`` are the keyword arguments of :func:`measure_throughput` that the figures depend on; the key
    adds the machine (CPU model and capability, GPU, torch version), not the host name, so nodes of one kind
    sharing a cache share their measurement.
    """
    path = None if cache_dir is None else Path(cache_dir) / "throughput" / f"{cache_key(settings)}.json"
    if path is not None:
        found = _read(path)
        if found is not None:
            return found, True
    tp = measure()
    if path is None:
        return tp, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": settings, "throughput": tp.to_json()}, indent=1, default=str),
                       encoding="utf-8")
        try:
            os.link(tmp, path)  # fails when another job wrote it first: theirs is used
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: the measurement is used without being kept
        log.debug("throughput not cached in %s: %s", path, exc)
        return tp, False
    return _read(path) or tp, False


def _read(path: Path) -> Throughput | None:
    try:
        return Throughput.from_json(json.loads(path.read_text(encoding="utf-8"))["throughput"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
