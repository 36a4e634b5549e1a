"""A new user's first hour, from the README's own words: install, the own-data commands, the Python example and
the report, each taken from README.md and run as written on generated demo data.

What a new user does differently is only what this machine cannot: ``pip install medvox`` installs the wheel
built from this checkout (no index holds it here), into a fresh environment that sees the declared dependencies
but not the editable checkout, so the commands run the installed package; and the schedules are shortened
(arguments appended to the README's commands, numbers replaced in its Python example), each change listed
in ``FASTER`` / ``PYTHON_FASTER``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from medvox.metrics.decision import Decision
from medvox.run import read_predictions
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
# appended to the README's `medvox cv` line: 2 folds of 1 epoch at 16^3, no time-budget probe
FASTER = ["--folds", "2", "--epochs", "1", "--target-shape", "16", "16", "16", "--time-budget", "0"]
# replaced in the README's Python example: the same calls, a shorter schedule
PYTHON_FASTER = {'"data.folds": 3': '"data.folds": 2', '"train.epochs": 2': '"train.epochs": 1'}


def _section(title: str) -> str:
    """The README's text under the ``## title`` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[list[str]]:
    """The block's command lines, comments dropped."""
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A Python whose ``medvox`` is the wheel of this checkout, installed the way ``pip install medvox`` would,
    beside the dependencies this venv holds (through a .pth line: the editable install's own .pth file there is
    not processed for a folder added that way)."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("medvox-*.whl")
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    venv.create(root / "venv", with_pip=False, symlinks=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = Path(__import__("torch").__file__).resolve().parents[1]
    Path(site, "medvox_walkthrough.pth").write_text(f"{target}\n{deps}\n")
    return python, target, wheel


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(python: Path, argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """A README command line (``medvox ...``) through the installed package."""
    assert argv[0] == "medvox", argv
    done = subprocess.run([str(python), "-m", "medvox", *argv[1:]], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_readme_install_installs_the_package_with_its_license(installed):
    python, target, wheel = installed
    lines = [c for c in _commands(_blocks(_section("Install"), "bash")[0])]
    assert ["pip", "install", "medvox"] in lines
    pin = re.search(r"^TORCH_PIN \?= (\S+)", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert ["pip", "install", pin] in lines  # the README's CPU-torch line is the Makefile's pin
    where = subprocess.run([str(python), "-c", "import medvox, sys; print(medvox.__file__)"], capture_output=True,
                           text=True, env=_env(), cwd=target.parent)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(target)  # the wheel, not the editable checkout
    assert list(target.glob("medvox-*.dist-info/licenses/LICENSE")) or list(target.glob("medvox-*.dist-info/LICENSE"))


def test_own_data_python_example_and_report_as_the_readme_writes_them(installed, tmp_path):
    python, _, _ = installed
    work = tmp_path
    _run(python, ["medvox", "make-demo-data", "data", "--n-cases", "24"], work)
    manifest = (_blocks(_section("Your own data, in three commands"), "csv")[0]).splitlines()
    assert manifest[0].split(",")[:2] == ["image", "label"]
    commands = _commands(_blocks(_section("Your own data, in three commands"), "bash")[0])
    assert [c[:2] for c in commands] == [["medvox", "check"], ["medvox", "cv"], ["medvox", "predict"]]

    check, cv, predict = commands
    said = _run(python, check, work)
    assert "data/manifest.csv" in said.stdout + said.stderr
    _run(python, cv + FASTER, work)
    run = work / "results" / "resnet18"  # where the README says the results are
    assert json.loads((run / "cv_summary.json").read_text())["folds"] == 2
    new_scans = work / "new_scans"
    new_scans.mkdir()
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        (new_scans / name).write_bytes((work / "data" / "images" / name).read_bytes())
    _run(python, predict, work)
    rows = list(csv.DictReader((work / "predictions.csv").open(encoding="utf-8")))
    assert sorted(Path(r["source"]).name for r in rows) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert {r["status"] for r in rows} == {"ok"}
    assert len(read_predictions(work / "predictions.csv").ids) == 2  # each label follows from its row

    report = _run(python, ["medvox", "report", str(run.relative_to(work))], work)
    page = run / "report.html"
    assert page.is_file() and page.stat().st_size > 10_000, report.stdout[-1000:]

    # the Python example, with the demo data where its comment says it is
    _run(python, ["medvox", "make-demo-data", "demo_data", "--n-cases", "24"], work)
    (code,) = _blocks(_section("From Python"), "python")
    for slow, fast in PYTHON_FASTER.items():
        assert slow in code
        code = code.replace(slow, fast)
    (work / "example.py").write_text(code, encoding="utf-8")
    done = subprocess.run([str(python), "example.py"], capture_output=True, text=True, cwd=work, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    ran = Decision.from_json(json.loads((work / "results" / "resnet10" / "cv_summary.json").read_text())["decision"])
    assert printed[0] == f"{ran.text()} ['fold_0', 'fold_1']"
    case_id, label, probs = printed[1].split(" ", 2)  # the case's probability of each class
    values = [float(v) for v in re.findall(r"[0-9.eE+-]+", probs)]
    assert case_id == "case_000" and label in ran.classes
    assert len(values) == len(ran.classes) and abs(sum(values) - 1) < 1e-5
