"""Which best weights are a fold's result (``train.final_weights``), and the record of the choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medvox.engine.trainer import FoldTrainer


def _choose(rule: str, raw: float | None, ema: float | None, monitor: str = "auc", with_ema: bool = True):
    """FoldTrainer._choose_final on a trainer whose best raw / EMA validation values are ``raw`` / ``ema``."""
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(final_weights=rule, monitor=monitor)),
        mode="min" if "loss" in monitor else "max", ema=object() if with_ema else None,
        best={"raw": {"value": raw, "epoch": None if raw is None else 3},
              "ema": {"value": ema, "epoch": None if ema is None else 5}})
    return FoldTrainer._choose_final(trainer)


@pytest.mark.parametrize(("rule", "raw", "ema", "kind", "margin"), [
    ("ema", 0.80, 0.70, "ema", -0.10),  # the original recipe keeps the EMA, and records that it trailed
    ("ema", 0.70, 0.80, "ema", 0.10),
    ("best", 0.80, 0.70, "raw", 0.10),  # the auto recipe takes the better one
    ("best", 0.70, 0.80, "ema", 0.10),
    ("best", 0.75, 0.75, "ema", 0.0),  # a tie keeps the EMA
    ("raw", 0.70, 0.80, "raw", -0.10),
])
def test_the_rule_picks_the_weights_and_records_by_how_much(rule, raw, ema, kind, margin):
    got, record = _choose(rule, raw, ema)
    assert got == kind and record["margin"] == pytest.approx(margin)
    assert (record["raw_value"], record["ema_value"]) == (raw, ema)
    assert record["chosen_by"].startswith(f"train.final_weights = {rule}")


def test_a_monitored_loss_is_better_when_lower():
    kind, record = _choose("best", raw=0.40, ema=0.55, monitor="loss")
    assert kind == "raw" and record["margin"] == pytest.approx(0.15)
    kind, record = _choose("ema", raw=0.40, ema=0.55, monitor="loss")
    assert kind == "ema" and record["margin"] == pytest.approx(-0.15)


def test_without_ema_or_an_ema_score_the_raw_weights_are_the_result():
    kind, record = _choose("best", raw=0.7, ema=None, with_ema=False)
    assert kind == "raw" and record["chosen_by"] == "no EMA (train.ema_decay = 0)" and record["margin"] is None
    kind, record = _choose("ema", raw=0.7, ema=None)  # e.g. an AUC that was undefined at every epoch
    assert kind == "raw" and record["chosen_by"] == "no validation auc for the EMA weights"
