"""`medvox cv --recipe auto --time-budget`: the recipe measures this machine, chooses a schedule that fits, and the
whole cross-validation takes the time it forecast (within 30 %), with an ETA line after every epoch.

The run is the real command in a fresh process on a tiny subset of AdrenalMNIST3D (100 pool cases, 2 folds, 30
test cases) with a small slab-MIL model, so it takes under a minute on two cores. ``--early_stopping 0``: the
forecast is that of every epoch (early stopping can only end a fold sooner); ``--threads 1``: a tiny model's
two-thread steps on a shared two-core machine mostly wait for the second thread, and the figure swings with
whatever else runs there (33 against 245 samples/s measured one after the other).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from medvox.engine.budget import MIN_EPOCHS

pytestmark = [pytest.mark.slow, pytest.mark.alone]

MIL_KWARGS = {"instance": "slab", "slab_size": 3, "slab_stride": 2, "channels": [8], "embed_dim": 16,
              "attention_dim": 8}
BUDGET_MIN = 0.8


def test_the_forecast_matches_the_time_the_cv_takes(tiny_medmnist, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medvox", "cv", "--data", str(tiny_medmnist), "--recipe", "auto",
               "--folds", "2", "--model", "mil", "--set", f"model.kwargs={json.dumps(MIL_KWARGS)}",
               "--time-budget", str(BUDGET_MIN), "--early_stopping", "0", "--threads", "1", "--output", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wall_s = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = done.stdout + done.stderr
    line = re.search(r"--recipe auto: 2 folds ~ (\d+) min on this CPU \(.*samples/s measured\): (\d+) epochs at "
                     rf"(\S+) \(within the {BUDGET_MIN:g} min time budget", said)
    assert line, said[-3000:]
    summary = json.loads((out / "mil" / "cv_summary.json").read_text())
    times = summary["time"]
    epochs = int(line.group(2))
    assert times["epochs"] == epochs and times["folds"] == 2 and times["folds_trained"] == 2
    assert MIN_EPOCHS <= epochs <= 100
    for k in (0, 1):
        config = json.loads((out / "mil" / f"fold_{k}" / "config.json").read_text())
        assert config["train"]["epochs"] == epochs and config["train"]["time_budget_min"] == BUDGET_MIN
        assert "ETA: fold ~" in (out / "mil" / f"fold_{k}" / "train.log").read_text()
    assert "cv ~" in said and "1 more fold to train, then the summary" in said
    forecast, measured = times["forecast_min"], times["measured_min"]
    assert forecast <= BUDGET_MIN
    assert measured * 60 <= wall_s  # the run's own figure: from the forecast (after start-up and the probe) to the end
    error = abs(forecast - measured) / measured
    figures = (f"forecast {forecast:.2f} min, measured {measured:.2f} min ({error:.0%} off; {epochs} epochs at "
               f"{line.group(3)}; the whole command {wall_s / 60:.2f} min)")
    print(figures)  # shown with pytest -s / -rP
    assert error <= 0.30, figures
