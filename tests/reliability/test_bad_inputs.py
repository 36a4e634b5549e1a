"""Bad inputs through the real CLI: ``medvox check`` and ``medvox train`` name the row, case, file, reason and
fix of every bad case, exit 1, and write nothing: the data folder, the preprocessing cache and a previous
run's folder (checkpoints included) are byte-for-byte what they were. ``--skip-bad`` drops exactly the bad
cases, lists each with its reason, and trains on the rest. Odd but valid manifests (BOM, whitespace,
semicolons, CRLF) just work."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medvox.cli import main
from medvox.config import DataConfig
from medvox.data import load_source, prepare
from tests.reliability.corpus import (
    ACCEPTED,
    CLASSES,
    CORPUS,
    N_GOOD,
    all_bad_rows,
    good_rows,
    write_manifest,
)
from tests.reliability.helpers import FAST, MIL, assert_nothing_written, read_json, snapshot


@dataclass
class PreviousRun:
    out: Path  # --output root holding mil/fold_0
    cache: Path  # the preprocessing cache it filled


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> PreviousRun:
    """A finished 1-epoch run (tiny MIL) on a clean data set, with its cache: what bad inputs must not touch."""
    root = tmp_path_factory.mktemp("previous")
    rows = good_rows(root / "data")
    manifest = write_manifest(root / "data" / "manifest.csv", rows)
    argv = ["train", "--data", str(manifest), "--folds", "2", "--epochs", "1", *MIL, *FAST,
            "--output", str(root / "out"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    assert (root / "out" / "mil" / "fold_0" / "best.pt").is_file()
    return PreviousRun(root / "out", root / "cache")


def _block(expect) -> str:
    return "\n".join(expect.lines())


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_is_reported_exactly_and_nothing_is_written(name, previous, tmp_path, capsys):
    case = CORPUS[name](tmp_path / "data")
    before = snapshot(previous.out, previous.cache, tmp_path)

    assert main(["check", str(case.manifest), *case.args]) == 1
    out = capsys.readouterr().out
    for expect in case.expect:  # row, case id, file as written; the reason; the fix: word for word
        assert _block(expect) in out, out
    assert out.count("  ERROR   ") == len(case.expect), out  # nothing else is blamed
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"FAILED: {len(case.expect)} error(s), 0 warning(s), ") and last.endswith(
        "; nothing was written."), last
    named = len({(e.row, e.case_id) for e in case.expect if e.case_id is not None})  # cases, not dataset problems
    named += sum(e.affected - 1 for e in case.expect if e.affected)  # a grouped problem names many
    assert f", {named} of " in last and " cases affected (" in last, last

    argv = ["train", "--data", str(case.manifest), *case.args, "--epochs", "1", *MIL, *FAST,
            "--output", str(previous.out), "--run-name", f"bad_{name}", "--cache-dir", str(previous.cache)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"medvox: error: medvox check: {case.manifest} (manifest, "), captured.err
    for expect in case.expect:
        assert _block(expect) in captured.err
    assert "Traceback" not in captured.err

    # the data, the cache and the previous run: byte-identical; no run folder for the failed run
    assert_nothing_written(before, snapshot(previous.out, previous.cache, tmp_path), lock_root=previous.cache)
    assert not (previous.out / f"bad_{name}").exists()


@pytest.mark.parametrize("name", ["label_spelled_two_ways", "class_absent_from_fold"])
def test_skip_bad_refuses_the_dataset_wide_problems_it_cannot_drop(name, tmp_path, capsys):
    """A problem --skip-bad cannot blame on one image (a label spelled two ways, a class absent from a fold)
    stops it as it stops a plain run; the image problems are dropped (the next test trains on what is left)."""
    case = CORPUS[name](tmp_path / "data")
    assert not case.skippable
    argv = ["train", "--data", str(case.manifest), *case.args, "--epochs", "1", *MIL, *FAST, "--skip-bad",
            "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert all(_block(expect) in err for expect in case.expect), err
    assert not (tmp_path / "out").exists()


def test_skip_bad_drops_each_bad_case_lists_why_and_trains_on_the_rest(tmp_path, capsys):
    manifest, bad = all_bad_rows(tmp_path / "data")
    common = ["--data", str(manifest), "--folds", "2", "--epochs", "1", *MIL, *FAST,
              "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common]) == 1  # without --skip-bad: refused, every bad row named
    err = capsys.readouterr().err
    for b in bad:
        assert f"  ERROR   row {b['row']}, case {b['id']}, file {b['file']}\n" in err
    assert not (tmp_path / "out").exists()

    assert main(["train", *common, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    (listed,) = (tmp_path / "cache").glob("*/*/skipped_cases.json")  # <cache>/<dataset>/<plan>/
    assert f"--skip-bad: skipped {len(bad)} bad case(s), listed with the reasons in {listed}" in out
    skipped = read_json(listed)
    assert [(s["row"], s["id"], s["file"]) for s in skipped] == [(b["row"], b["id"], b["file"]) for b in bad]
    for s, b in zip(skipped, bad, strict=True):
        if b["what"].startswith("2 channel(s) but"):  # counted against the other readable cases
            assert len(s["problems"]) == 1 and s["problems"][0].startswith("2 channel(s) but 10 other cases have 1")
        else:
            assert s["problems"] == [b["what"]]

    run = tmp_path / "out" / "mil" / "fold_0"
    assert read_json(run / "skipped_cases.json") == skipped  # the run's own record says what was left out
    splits = read_json(run / "splits.json")
    pool = sorted(i for fold in splits["folds"][:1] for part in ("train", "val") for i in fold[part])
    assert pool == [f"good_{i:02d}" for i in range(N_GOOD)]  # exactly the clean cases (good_03 once)
    assert read_json(run / "metrics.json")["status"] == "complete"


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_but_valid_manifests_are_parsed_right(name, tmp_path, capsys):
    manifest = ACCEPTED[name](tmp_path / "data")
    plain = write_manifest(tmp_path / "plain" / "manifest.csv", good_rows(tmp_path / "plain"))
    if name == "excel_export":  # BOM + semicolons + padded values + CRLF: all at once
        raw = manifest.read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf") and b";" in raw and b"\r\n" in raw and b"  good_00 " in raw

    assert main(["check", str(manifest), "--folds", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"OK: {N_GOOD} cases checked, no errors."

    got, want = (load_source(DataConfig(path=str(m))) for m in (manifest, plain))
    assert got.classes == list(CLASSES)
    assert [(c.id, c.group, c.label, c.row) for c in got.cases] == [(c.id, c.group, c.label, c.row) for c in want.cases]
    assert [c.images for c in got.cases] == [[tmp_path / "data" / "images" / f"good_{i:02d}.nii.gz"]
                                             for i in range(N_GOOD)]
    data = prepare(DataConfig(path=str(manifest), folds=2, cache_dir=str(tmp_path / "cache")), progress=False)
    ref = prepare(DataConfig(path=str(plain), folds=2, cache_dir=str(tmp_path / "cache")), progress=False)
    np.testing.assert_array_equal(data.images, ref.images)
    assert data.splits["folds"] == ref.splits["folds"]


def test_an_accepted_manifest_trains(tmp_path):
    """The Excel-style export (BOM, ';', padded values, CRLF) through ``medvox train``."""
    manifest = ACCEPTED["excel_export"](tmp_path / "data")
    argv = ["train", "--data", str(manifest), "--folds", "2", "--epochs", "1", *MIL, *FAST,
            "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    splits = read_json(tmp_path / "out" / "mil" / "fold_0" / "splits.json")
    assert sorted(splits["folds"][0]["train"] + splits["folds"][0]["val"]) == [f"good_{i:02d}" for i in range(N_GOOD)]
    shutil.rmtree(tmp_path / "out")
