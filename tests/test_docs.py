"""The documentation: the MkDocs site builds with ``--strict`` (no broken link, no unresolved reference, no
docstring griffe cannot read), the configuration page's tables are what ``docs/gen_config.py`` makes of
``config.py`` now, and the README stays short, links only to files that exist and lists every command."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _gen_config():
    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_what_config_py_generates():
    gen = _gen_config()
    assert gen.current() == gen.render(), "docs/configuration.md is out of date: run python docs/gen_config.py"


def test_the_configuration_tables_hold_every_field_with_its_default():
    import dataclasses

    from medvox.config import ExperimentConfig

    page = _gen_config().render()
    for section in dataclasses.fields(ExperimentConfig):
        for f in dataclasses.fields(section.default_factory):
            assert f"| `{section.name}.{f.name}` |" in page
    assert "| `optim.lr` | float | `0.0002` | > 0 |" in page
    assert "| `loss.name` | str | `\"LDAM\"` | `CE`, `weighted_CE`, `focal`, `LDAM` |" in page
    assert "| `data.path` | str \\| None | `null` |" in page


def test_the_generator_reads_comments_above_and_beside_a_field():
    notes = _gen_config()._field_notes(
        "class C:\n    a: int = 1  # beside\n    # above, line one\n    # line two\n    b: str = 'x'\n    c: int = 2\n", "C")
    assert notes == {"a": ("int", "beside"), "b": ("str", "above, line one line two"), "c": ("int", "")}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return True


@pytest.mark.skipif(any(_missing(m) for m in ("mkdocs", "mkdocstrings_handlers.python", "material")),
                    reason="MkDocs, mkdocstrings[python] or mkdocs-material is not installed (pip install -e '.[dev]')")
def test_mkdocs_build_strict(tmp_path):
    # not --quiet: it hides the warnings that --strict counts, and the build then passes whatever they say
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                             str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("medvox.run.Run", "medvox.inference.predictor.Predictor", "medvox.metrics.decision.Decision",
                 "medvox.config.ExperimentConfig", "medvox.api.cross_validate", "medvox.api.check"):
        assert f'id="{name}"' in api, name
    assert ":class:" not in api and "&gt;&gt;&gt;" not in re.sub(r"<code.*?</code>", "", api, flags=re.S)


def test_the_readme_is_short_and_its_links_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        if not (ROOT / target.split("#")[0]).exists():
            missing.append(target)
    assert missing == []


def test_the_readme_lists_every_command():
    from medvox.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    table = README.read_text(encoding="utf-8")
    assert [c for c in sub.choices if f"| `medvox {c}" not in table] == []


def test_the_architecture_page_lists_the_import_stages_in_order():
    from tests.test_import_graph import STAGES

    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(STAGES)
    for row, stage in zip(rows, STAGES, strict=True):
        modules = re.findall(r"`(medvox[\w.]*)`", row.split("|")[2])
        assert modules == list(stage), row
