"""The example configs in configs/ and `medvox config`: each example loads through the real loader and
validates; the printed defaults load back to the defaults; a printed resolved config reproduces the run's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medvox import config as config_mod
from medvox.cli import EXAMPLES, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.y*ml"))


def test_there_are_three_to_five_examples_and_every_one_the_help_names_exists():
    assert 3 <= len(CONFIGS) <= 5
    named = {m for lines in EXAMPLES.values() for line in lines for m in re.findall(r"configs/[\w.-]+", line)}
    assert named and all((ROOT / name).is_file() for name in named), named


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_example_config_loads_validates_and_says_what_it_is(path):
    raw = config_mod.load_file(path)
    cfg = config_mod.resolve(path)  # unknown keys, wrong types and values out of range raise ConfigError
    flat = config_mod.flat_keys(raw)
    resolved = config_mod.flat_keys(config_mod.to_dict(cfg))
    assert flat and all(resolved[key] == pytest.approx(value) if isinstance(value, float) else resolved[key] == value
                        for key, value in flat.items())
    assert path.read_text(encoding="utf-8").startswith("# ")  # each opens with what it is for and how to run it
    assert f"--config configs/{path.name}" in path.read_text(encoding="utf-8")


def test_an_unknown_key_in_a_config_file_is_refused_by_the_same_loader(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0]).read_text(encoding="utf-8") + "  learning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(config_mod.ConfigError, match="unknown config key.*learning_rate"):
        config_mod.resolve(bad)


def test_config_defaults_prints_yaml_that_loads_back_to_the_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no medvox.yaml here
    assert main(["config", "--defaults"]) == 0
    saved = tmp_path / "defaults.yaml"
    saved.write_text(capsys.readouterr().out, encoding="utf-8")
    assert config_mod.resolve(saved) == config_mod.ExperimentConfig()
    # every section and field is written out, not only those that differ from something
    assert set(config_mod.flat_keys(config_mod.load_file(saved))) == set(
        config_mod.flat_keys(config_mod.to_dict(config_mod.ExperimentConfig())))


def test_config_show_prints_the_file_and_flags_resolved(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = ROOT / "configs" / "medmnist_quick.yaml"
    assert main(["config", "--show", "--config", str(example), "--lr", "3e-3", "--logger", "mlflow"]) == 0
    saved = tmp_path / "shown.yaml"
    saved.write_text(capsys.readouterr().out, encoding="utf-8")
    expected = config_mod.resolve(example, {"optim.lr": 3e-3, "train.logger": "mlflow"})
    assert config_mod.resolve(saved) == expected
    assert (expected.model.name, expected.optim.lr, expected.train.logger) == ("resnet10", 3e-3, "mlflow")


def test_config_defaults_refuses_settings_in_one_line(capsys):
    assert main(["config", "--defaults", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs" in err[0] and "--show" in err[0]
