"""The time budget's arithmetic, with made-up throughput: the forecast adds up, a smaller budget never gives more
epochs, the floors hold, the user's epochs are kept, and a coarser input is measured only when needed."""

from __future__ import annotations

import math

import pytest

from medvox.engine import budget, timing
from medvox.engine.budget import MIN_EPOCHS, Workload, choose_schedule, epochs_within, forecast
from medvox.engine.probe import Throughput

WORK = Workload(folds=5, n_train=1028, n_val=258, n_test=298, batch=16)


def _tp(train: float, images_s: float = 0.4, curves_s: float = 0.6, save_s: float = 1.0) -> Throughput:
    return Throughput(train=train, evaluate=3 * train, predict=2.5 * train, save_s=save_s, images_s=images_s,
                      curves_s=curves_s, precision="32-true", threads=2, device="cpu")


def test_the_forecast_adds_up_its_parts():
    tp = _tp(16.0)
    fc = forecast(40, WORK, tp)
    # 64 batches of 16 at 16 samples/s, 258 validation cases twice (raw + EMA) at 48/s, last.pt + a quarter, the
    # epoch's images; the epoch outlasts CURVES_EVERY_S, so the curves are drawn after every epoch
    core = 64 * 16 / 16 + 2 * 258 / 48 + 1.25 * 1.0 + 0.4
    assert core > timing.CURVES_EVERY_S
    epoch = core + 0.6
    assert fc.epoch_s == pytest.approx(epoch)
    # the final weights on validation and test with their images, the curves drawn whole, the slimmed last.pt
    fixed = budget.FOLD_START_S + (258 + 298) / 48 + 2 * 0.4 + 0.6 + 0.5 * 1.0
    assert fc.fold_fixed_s == pytest.approx(fixed) and fc.fold_s == pytest.approx(40 * epoch + fixed)
    summary = budget.SUMMARY_FIXED_S + 5 * 298 * (1 + budget.TTA_VIEWS) / 40
    assert fc.summary_s == pytest.approx(summary)
    assert fc.total_s == pytest.approx(5 * (40 * epoch + fixed) + summary)
    assert fc.record()["forecast_min"] == round(fc.total_s / 60, 2) and fc.record()["epochs"] == 40
    # without EMA one validation pass, without TTA one test view, two processes each a half
    lean = forecast(40, Workload(5, 1028, 258, 298, 16, ema=False, tta=False), tp)
    assert lean.epoch_s == pytest.approx(epoch - 258 / 48)
    assert lean.summary_s == pytest.approx(budget.SUMMARY_FIXED_S + 5 * 298 / 40)
    two = forecast(40, Workload(5, 1028, 258, 298, 16, processes=2), tp)
    assert two.epoch_s == pytest.approx(32 * 16 / 16 + 2 * 129 / 48 + 1.25 + 0.4 + 0.6)


def test_the_curves_of_short_epochs_count_once_per_redraw():
    """Epochs shorter than CURVES_EVERY_S share one draw of the curves: a 10x faster machine forecasts the
    images every epoch but the curves only every few."""
    tp = _tp(160.0, images_s=0.4, curves_s=0.6)
    core = 64 * 16 / 160 + 2 * 258 / 480 + 1.25 + 0.4
    between = math.ceil(timing.CURVES_EVERY_S / core)
    assert between > 1
    assert forecast(40, WORK, tp).epoch_s == pytest.approx(core + 0.6 / between)
    # without plots (train.plots = final) the epoch is its work alone
    bare = forecast(40, WORK, _tp(160.0, images_s=0.0, curves_s=0.0))
    assert bare.epoch_s == pytest.approx(core - 0.4)


def test_a_smaller_budget_never_gives_more_epochs_and_the_floors_hold():
    tp = _tp(16.0)
    budgets = [10, 60, 100, 120, 180, 240, 300, 600, 10_000]  # minutes
    chosen = [epochs_within(m * 60, WORK, tp, most=40, least=MIN_EPOCHS) for m in budgets]
    assert chosen[0] is None  # 10 minutes: not even 10 epochs
    found = [e for e in chosen if e is not None]
    assert found == sorted(found) and found[-1] == 40  # monotone, and never more than the recipe's own
    assert all(MIN_EPOCHS <= e <= 40 for e in found)
    for minutes, epochs in zip(budgets, chosen, strict=True):
        if epochs is not None:  # the most that fit: one more would not (unless capped at the recipe's)
            assert forecast(epochs, WORK, tp).total_s <= minutes * 60
            assert epochs == 40 or forecast(epochs + 1, WORK, tp).total_s > minutes * 60
    # the floor is the recipe's own length when that is shorter
    assert epochs_within(10_000 * 60, WORK, tp, most=6, least=MIN_EPOCHS) == 6
    assert epochs_within(1, WORK, tp, most=6, least=MIN_EPOCHS) is None


def test_a_faster_machine_gets_at_least_as_many_epochs():
    found = [epochs_within(120 * 60, WORK, _tp(rate), most=100) or 0 for rate in (4, 8, 16, 32, 64, 128)]
    assert found == sorted(found) and found[0] == 0 and found[-1] == 100


def test_choose_schedule_coarsens_the_input_only_when_needed_and_measures_lazily():
    candidates = [[28, 28, 28], [24, 24, 24], [20, 20, 20], [16, 16, 16]]
    rates = [4.0, 8.0, 14.0, 30.0]
    measured: list[int] = []

    def measure(i):
        measured.append(i)
        return _tp(rates[i])

    def work(i):
        return WORK

    roomy = choose_schedule(10_000 * 60, candidates, measure, work, most=40)
    assert (roomy.epochs, roomy.shape, roomy.fits, roomy.chosen, measured) == (40, candidates[0], True, True, [0])
    measured.clear()
    tight = choose_schedule(100 * 60, candidates, measure, work, most=40)
    assert tight.fits and tight.index == 2 and measured == [0, 1, 2]  # 16^3 never measured
    assert MIN_EPOCHS <= tight.epochs <= 40 and tight.forecast.total_s <= 100 * 60
    assert tight.throughput.train == 14.0
    # nothing fits: the shortest schedule at the input forecast fastest (the coarsest here), flagged
    hopeless = choose_schedule(5 * 60, candidates, measure, work, most=40)
    assert (hopeless.epochs, hopeless.shape, hopeless.fits) == (MIN_EPOCHS, candidates[-1], False)
    # ... which need not be the coarsest: a small network's per-sample overheads do not shrink with the voxels
    rates[:] = [4.0, 6.0, 5.0, 4.5]
    odd = choose_schedule(5 * 60, candidates, measure, work, most=40)
    assert (odd.shape, odd.throughput.train, odd.fits) == (candidates[1], 6.0, False)


def test_the_users_epochs_win_and_are_only_forecast():
    measured: list[int] = []

    def measure(i):
        measured.append(i)
        return _tp(4.0)

    over = choose_schedule(60 * 60, [[28] * 3, [16] * 3], measure, lambda i: WORK, most=40, user_epochs=30)
    assert (over.epochs, over.shape, over.chosen, over.fits, measured) == (30, [28] * 3, False, False, [0])
    assert over.forecast.total_s == pytest.approx(forecast(30, WORK, _tp(4.0)).total_s)
    within = choose_schedule(10_000 * 60, [[28] * 3], measure, lambda i: WORK, most=40, user_epochs=3)
    assert (within.epochs, within.fits, within.chosen) == (3, True, False)
    # no budget: the recipe's own length, forecast
    free = choose_schedule(None, [[28] * 3], measure, lambda i: WORK, most=40)
    assert (free.epochs, free.fits, free.chosen) == (40, True, False)


def test_train_batches_count_what_the_loader_yields():
    assert budget.train_batches(1028, 16) == 64  # the smaller last batch is dropped
    assert budget.train_batches(10, 16) == 1  # one batch that is smaller than the batch size is kept
    assert budget.train_batches(1028, 16, processes=2) == 32
