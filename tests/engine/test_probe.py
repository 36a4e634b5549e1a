"""The throughput probe: real training steps of a tiny model through the trainer's loop give positive figures and
leave the process's threads and RNG as they were; measurements are kept per machine and setting, the first one
written wins."""

from __future__ import annotations

import json

import torch

from medvox.config import AugmentConfig
from medvox.engine.probe import Throughput, cache_key, cached_throughput, measure_throughput

MIL_KWARGS = {"instance": "slab", "slab_size": 3, "slab_stride": 2, "channels": [8], "embed_dim": 16,
              "attention_dim": 8}


def test_the_probe_trains_a_tiny_model_and_returns_positive_throughput(tmp_path):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    tp = measure_throughput("mil", [16, 16, 16], 1, 2, 4, precision="32-true", threads=1, model_kwargs=MIL_KWARGS,
                            augment=AugmentConfig(flip_axes=[2]), workdir=tmp_path)
    assert isinstance(tp, Throughput)
    assert tp.train > 0 and tp.evaluate > 0 and tp.predict > 0 and tp.save_s > 0 and tp.images_s > 0
    assert tp.curves_s > 0
    assert (tp.precision, tp.threads, tp.device) == ("32-true", 1, "cpu")
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert list(tmp_path.iterdir()) == []  # its checkpoint and plots were written there and deleted
    # a ResNet (BatchNorm, batch 2) without EMA or plots
    resnet = measure_throughput("resnet10", [16, 16, 16], 1, 2, 2, precision="32-true", threads=1, plots=False,
                                ema=False, steps=2)
    assert resnet.train > 0 and resnet.images_s == resnet.curves_s == 0.0
    assert Throughput.from_json(json.loads(json.dumps(resnet.to_json()))) == resnet


def _tp(rate: float) -> Throughput:
    return Throughput(rate, rate, rate, 0.1, 0.05, 0.05, "32-true", 1, "cpu")


def test_a_measurement_is_kept_per_setting_and_the_first_written_wins(tmp_path):
    calls = []

    def measure(rate):
        def run():
            calls.append(rate)
            return _tp(rate)
        return run

    settings = {"model_name": "resnet18", "shape": [28, 28, 28], "batch": 16, "precision": "32-true"}
    first, hit = cached_throughput(tmp_path, settings, measure(10.0))
    assert (first.train, hit, calls) == (10.0, False, [10.0])
    again, hit = cached_throughput(tmp_path, settings, measure(99.0))
    assert (again, hit, calls) == (first, True, [10.0])  # from the cache: not measured again
    other, hit = cached_throughput(tmp_path, {**settings, "batch": 8}, measure(20.0))
    assert (other.train, hit) == (20.0, False)
    assert cache_key(settings) != cache_key({**settings, "batch": 8})
    files = sorted(p.name for p in (tmp_path / "throughput").iterdir())
    assert len(files) == 2 and all(f.endswith(".json") for f in files)
    # another job wrote its figures between our look and our write: theirs are used by both
    key = cache_key({**settings, "shape": [20, 20, 20]})
    path = tmp_path / "throughput" / f"{key}.json"

    def racing():
        path.write_text(json.dumps({"throughput": _tp(5.0).to_json()}))
        return _tp(7.0)

    raced, hit = cached_throughput(tmp_path, {**settings, "shape": [20, 20, 20]}, racing)
    assert raced.train == 5.0 and not hit
    # no cache folder: measured each time, nothing written
    assert cached_throughput(None, settings, measure(3.0)) == (_tp(3.0), False)
