"""Round two of the bad-input corpus through the real command line, in a fresh process each time:
``medvox check`` and ``medvox prepare`` on sources that cannot be read (exit 1, the problem and its fix on the
output, no traceback, nothing written), on inputs that are usable but odd (exit 0, each warning with its row,
case, file and fix; ``prepare`` logs them and builds), on numeric labels (-1 / 1 are two classes), and on a
cache damaged between two runs (rebuilt with a message; the arrays are those of a clean build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.reliability.corpus import SOURCE_ERRORS, WARNED, good_rows, write_manifest
from tests.reliability.helpers import medvox as _medvox
from tests.reliability.helpers import snapshot


def medvox(*args, **kwargs):
    """The CLI in a fresh process, its output read as UTF-8 (it names files and labels as written)."""
    return _medvox(*args, encoding="utf-8", errors="replace", **kwargs)


def _no_traceback(result) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", list(SOURCE_ERRORS))
def test_an_unreadable_source_is_one_message_with_its_fix(name, tmp_path):
    case = SOURCE_ERRORS[name](tmp_path / "data")
    before = snapshot(tmp_path)
    for command in ("check", "prepare"):
        result = medvox(command, case.source, *case.args, "--cache-dir", tmp_path / "cache")
        _no_traceback(result)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        text = result.stdout + result.stderr
        assert case.what in text and case.fix in text, text
    assert "FAILED: the source could not be read (1 error(s)); nothing was written." in medvox(
        "check", case.source, *case.args).stdout
    after = snapshot(tmp_path)
    assert {k for k in after if "/cache/" in k and not k.endswith(".lock")} == set()  # no cache folder written
    assert {k: v for k, v in after.items() if "/cache" not in k} == before


@pytest.mark.parametrize("name", list(WARNED))
def test_odd_but_usable_input_is_warned_about_and_still_prepared(name, tmp_path):
    case = WARNED[name](tmp_path / "data")
    result = medvox("check", case.source, *case.args)
    _no_traceback(result)
    assert result.returncode == 0, result.stdout
    for expect in case.expect:
        assert "\n".join(expect.lines()) in result.stdout, result.stdout
    assert result.stdout.count("  WARNING ") == len(case.expect)
    assert result.stdout.strip().splitlines()[-1].endswith(f"no errors, {len(case.expect)} warning(s).")

    result = medvox("prepare", case.source, *case.args, "--cache-dir", tmp_path / "cache", "--workers", "1")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    for expect in case.expect:  # logged (on the medvox logger: the command line prints it) with where and the fix
        assert expect.what in result.stdout + result.stderr
    assert "cache:    " in result.stdout


def test_numeric_labels_are_classes_by_value_through_check_and_prepare(tmp_path):
    rows = good_rows(tmp_path / "data")
    for i, row in enumerate(rows):
        row["label"] = ("-1", "1")[i % 2] if i < 6 else ("-1.0", "01")[i % 2]
    manifest = write_manifest(tmp_path / "data" / "manifest.csv", rows)
    result = medvox("check", manifest, "--folds", "2")
    _no_traceback(result)
    assert result.returncode == 0, result.stdout
    assert "classes: -1, 1)" in result.stdout.splitlines()[0]
    result = medvox("prepare", manifest, "--folds", "2", "--cache-dir", tmp_path / "cache", "--workers", "1")
    assert result.returncode == 0 and "classes:  -1 4, 1 4 (pool" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_cache_is_rebuilt_to_what_a_clean_build_gives(damage, small_npz, tmp_path):
    """The 32+8-case AdrenalMNIST3D subset: prepared, its store damaged in place, prepared again."""
    def run(cache: Path):
        result = medvox("prepare", small_npz, "--folds", "2", "--cache-dir", cache, "--workers", "1")
        _no_traceback(result)
        assert result.returncode == 0, result.stderr
        return result

    run(tmp_path / "cache")
    (store,) = (tmp_path / "cache").glob("*/*/images.npy")
    size = store.stat().st_size
    if damage == "zeroed":  # 88 % of the file zeroed from the back: the header stays valid, every row but a few goes
        with open(store, "r+b") as fh:
            fh.seek(size - int(size * 0.88))
            fh.write(bytes(int(size * 0.88)))
    else:
        store.write_bytes(store.read_bytes()[: size // 2])
    result = run(tmp_path / "cache")
    assert f"cache: {store} is damaged: " in result.stdout + result.stderr
    assert "cache hit: nothing decoded" not in result.stdout and "repaired: " in result.stdout
    run(tmp_path / "clean")
    (clean,) = (tmp_path / "clean").glob("*/*/images.npy")
    np.testing.assert_array_equal(np.load(store), np.load(clean))
    assert "cache hit: nothing decoded" in run(tmp_path / "cache").stdout  # verified and intact from now on
