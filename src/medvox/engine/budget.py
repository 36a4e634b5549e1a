"""The auto recipe's time budget: how long a cross-validation takes from measured throughput, and the schedule
(epochs, and if need be a coarser input) that fits a budget.

The arithmetic only; :func:`medvox.recipe.apply_recipe` measures (:mod:`medvox.engine.probe`) and applies the
choice. A cross-validation of ``k`` folds takes::

    k x (epochs x epoch + fold's fixed part) + summary
    epoch   = training samples / train rate + validation samples x (2 with EMA) / evaluation rate
              + last.pt (and on average one best checkpoint of a quarter its size) + the epoch's images
              + the curves' draw / the epochs between two draws (one draw per CURVES_EVERY_S at most)
    fixed   = start + the final weights on validation and test + their images + the final curves
              + the slimmed last.pt
    summary = k x test cases x (1 + TTA views) / fp32 prediction rate + a fixed part

Example:
    >>> from medvox.engine.probe import Throughput
    >>> tp = Throughput(train=16.0, evaluate=48.0, predict=40.0, save_s=1.0, images_s=0.3, curves_s=0.7,
    ...                 precision="32-true", threads=2, device="cpu")
    >>> work = Workload(folds=5, n_train=1028, n_val=258, n_test=298, batch=16)
    >>> round(forecast(40, work, tp).total_s / 60)  # 5 x (40 x 77 s + 14 s) + 189 s
    261
    >>> epochs_within(120 * 60, work, tp, most=40, least=10)
    18
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from medvox.engine.probe import Throughput
from medvox.engine.timing import CURVES_EVERY_S, Forecast

DEFAULT_CPU_BUDGET_MIN = 120.0  # the whole cv on a CPU when no --time-budget is given (none on a GPU)
MIN_EPOCHS = 10  # the shortest useful schedule: warmup + cosine over fewer epochs hardly anneals
# the coarser inputs the budget may fall back to, as the side of a cube of as many voxels (same proportions)
INPUT_SIDES = (64, 48, 40, 32, 28, 24, 20, 16)
TTA_VIEWS = 4  # medvox.transforms.tta.tta_views' default: the test ensemble's TTA pass runs this many views
FOLD_START_S = 1.0  # a fold's start besides the measured parts: Fabric, the cache hit, the model, its files
SUMMARY_FIXED_S = 3.0  # the summary besides the test ensemble: calibration, descriptors, fusion, plots, tables


@dataclass(frozen=True)
class Workload:
    """What a cross-validation runs, in cases: ``folds`` folds of ``n_train`` training and ``n_val`` validation
    cases (each process of ``processes`` a share), ``n_test`` held-out cases scored by every fold after each
    fold's final evaluation, micro-batches of ``batch``; ``ema``: the EMA weights are validated every epoch
    too; ``tta``: the test ensemble runs test-time augmentation as well (``medvox cv``'s default)."""

    folds: int
    n_train: int
    n_val: int
    n_test: int
    batch: int
    processes: int = 1
    ema: bool = True
    tta: bool = True


def train_batches(n_train: int, batch: int, processes: int = 1) -> int:
    """Micro-batches per epoch on each process, as :class:`~medvox.data.loader.ArrayLoader` makes them: each
    rank reads ``ceil(n_train / processes)`` cases and drops a smaller last batch when it holds more than one."""
    processes = max(1, processes)
    shard = math.ceil(n_train / processes)
    full = shard // batch
    return max(1, full if (n_train // processes > batch and full > 0) else math.ceil(shard / batch))


def forecast(epochs: int, work: Workload, tp: Throughput) -> Forecast:
    """The seconds of a cross-validation of ``work`` with ``epochs`` epochs per fold at throughput ``tp``
    (no early stopping: an upper bound when it stops a fold sooner)."""
    p = max(1, work.processes)
    train_s = train_batches(work.n_train, work.batch, p) * work.batch / tp.train
    val_s = math.ceil(work.n_val / p) * (2 if work.ema else 1) / tp.evaluate
    # the epoch's confusion matrix and ROC (train.plots = all; best_last draws them only where the monitor
    # improved: counted every epoch, an upper bound), and the curves, redrawn once CURVES_EVERY_S have passed
    core_s = train_s + val_s + 1.25 * tp.save_s + tp.images_s
    between = max(1, math.ceil(CURVES_EVERY_S / core_s)) if core_s > 0 else 1
    epoch_s = core_s + tp.curves_s / between
    # the final weights on validation and test with their images, the curves drawn whole, and last.pt read back
    # and rewritten with the weights alone
    fixed_s = (FOLD_START_S + math.ceil((work.n_val + work.n_test) / p) / tp.evaluate + 2 * tp.images_s
               + tp.curves_s + 0.5 * tp.save_s)
    fold_s = epochs * epoch_s + fixed_s
    views = 1 + (TTA_VIEWS if work.tta else 0)
    summary_s = SUMMARY_FIXED_S + work.folds * work.n_test * views / tp.predict
    return Forecast(total_s=work.folds * fold_s + summary_s, fold_s=fold_s, epoch_s=epoch_s, fold_fixed_s=fixed_s,
                    summary_s=summary_s, folds=work.folds, epochs=epochs)


def epochs_within(budget_s: float, work: Workload, tp: Throughput, most: int, least: int = MIN_EPOCHS) -> int | None:
    """The most epochs, at most ``most``, whose cross-validation fits in ``budget_s``; None when ``least``
    (or ``most``, when smaller) does not fit."""
    least = max(1, min(least, most))
    one = forecast(1, work, tp)
    per_epoch = work.folds * one.epoch_s
    rest = one.total_s - per_epoch  # what does not grow with the epochs
    fits = math.floor((budget_s - rest) / per_epoch + 1e-9) if per_epoch > 0 else most
    if fits < least:
        return None
    return min(most, fits)


@dataclass(frozen=True)
class Schedule:
    """The budget's choice: ``epochs`` at input ``shape`` (``index`` in the candidates), its forecast and the
    throughput it was fitted to; ``fits``: within the budget (False: the shortest schedule at the coarsest
    input allowed, still over it); ``chosen``: the budget chose the epochs (False: the user's, or no budget)."""

    epochs: int
    shape: list[int]
    index: int
    forecast: Forecast
    throughput: Throughput
    fits: bool
    chosen: bool


def choose_schedule(budget_s: float | None, candidates: list[list[int]], measure: Callable[[int], Throughput],
                    workload: Callable[[int], Workload], most: int, least: int = MIN_EPOCHS,
                    user_epochs: int | None = None) -> Schedule:
    """The schedule that fits ``budget_s``: the most epochs (up to ``most``, the recipe's own) at the first input
    of ``candidates`` (the recipe's, then coarser ones) where at least ``least`` epochs fit.

    ``measure(i)`` and ``workload(i)`` give the throughput and the workload at ``candidates[i]`` (measured only
    when reached). ``user_epochs`` (the user's ``--epochs``) are kept, at the first input, and only forecast;
    so is the recipe's own length when there is no budget. When even ``least`` epochs fit at none of them, the
    choice is ``least`` epochs at the input whose forecast is the shortest (a coarser input is not always
    measured faster: a small network's per-sample overheads do not shrink with the voxels), with ``fits`` False.

    Example:
        >>> from medvox.engine.probe import Throughput
        >>> tp = lambda rate: Throughput(rate, 3 * rate, 3 * rate, 0.5, 0.2, 0.3, "32-true", 2, "cpu")
        >>> work = lambda i: Workload(folds=5, n_train=1028, n_val=258, n_test=298, batch=16)
        >>> s = choose_schedule(60 * 60, [[28] * 3, [20] * 3], lambda i: tp([10.0, 30.0][i]), work, most=40)
        >>> s.epochs, s.shape, s.fits  # 28^3: not even 10 epochs in an hour; 20^3: 16
        (16, [20, 20, 20], True)
    """
    if user_epochs is not None or budget_s is None:
        tp = measure(0)
        epochs = user_epochs if user_epochs is not None else most
        fc = forecast(epochs, workload(0), tp)
        return Schedule(epochs, list(candidates[0]), 0, fc, tp, budget_s is None or fc.total_s <= budget_s, False)
    least = max(1, min(least, most))
    shortest = None
    for i, shape in enumerate(candidates):
        tp, work = measure(i), workload(i)
        epochs = epochs_within(budget_s, work, tp, most, least)
        if epochs is not None:
            return Schedule(epochs, list(shape), i, forecast(epochs, work, tp), tp, True, True)
        fc = forecast(least, work, tp)
        if shortest is None or fc.total_s < shortest.forecast.total_s:
            shortest = Schedule(least, list(shape), i, fc, tp, False, True)
    return shortest
