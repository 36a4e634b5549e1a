"""The cache verifies what it serves: a store zeroed in place, cut short, or with a header that does not match
its index is found on the next hit and rebuilt (the damaged rows, or all of it), with a message; the result is
byte-for-byte a clean build. Through ``prepare`` and the ``medvox prepare`` command."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from medvox.data import cache, prepare


def _store(data):
    return data.cache_dir / "images.npy"


def _data_offset(path) -> int:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
        return fh.tell()


@pytest.fixture
def built(small_dataset, data_cfg, tmp_path):
    """A built store and a clean reference build of the same data in another cache."""
    cfg = data_cfg(small_dataset)
    first = prepare(cfg, progress=False)
    ref = np.array(prepare(data_cfg(small_dataset, cache_dir=str(tmp_path / "ref")), progress=False).images)
    return cfg, first, ref


def test_digest_json_holds_a_checksum_per_row(built):
    cfg, first, _ = built
    digest = json.loads((first.cache_dir / "digest.json").read_text())
    assert digest["rows"] == cache.row_checksums(np.asarray(first.images)) and len(digest["rows"]) == 12
    assert digest["blake2b"] == cache.array_digest(np.asarray(first.images)) == first.images_digest


def test_a_store_zeroed_in_place_is_found_and_its_rows_rebuilt(built, caplog):
    cfg, first, ref = built
    store = _store(first)
    offset, size = _data_offset(store), store.stat().st_size
    with open(store, "r+b") as fh:  # 88 % of the voxel bytes zeroed, the file size unchanged
        fh.seek(offset)
        fh.write(bytes(int((size - offset) * 0.88)))
    with caplog.at_level(logging.WARNING, logger="medvox"):
        again = prepare(cfg, progress=False)
    damaged = int(np.ceil(12 * 0.88))  # every row the zeroed bytes reach
    assert not again.cache_hit and again.n_built == damaged
    assert again.repaired == (f"{damaged} of 12 rows differ from the checksums written when they were built; "
                              f"rebuilt {damaged} row(s)")
    assert f"cache: {store} is damaged: {damaged} of 12 rows differ" in caplog.text
    np.testing.assert_array_equal(again.images, ref)
    assert again.images_digest == first.images_digest  # the same bytes as before the damage
    assert prepare(cfg, progress=False).cache_hit  # and the next run is a plain hit again


def test_a_truncated_store_is_rebuilt_whole(built, caplog):
    cfg, first, ref = built
    store = _store(first)
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 3])
    with caplog.at_level(logging.WARNING, logger="medvox"):
        again = prepare(cfg, progress=False)
    assert again.n_built == 12 and again.repaired.endswith("(truncated or overwritten); rebuilt the whole store")
    assert "mmap length" not in caplog.text
    np.testing.assert_array_equal(again.images, ref)


def test_a_store_whose_header_disagrees_with_its_index_is_rebuilt(built):
    cfg, first, ref = built
    store = _store(first)
    np.save(store, np.zeros((12, 1, 4, 4, 4), np.float16))  # a valid .npy, but not this plan's store
    again = prepare(cfg, progress=False)
    assert again.n_built == 12 and "index.json says" in again.repaired
    np.testing.assert_array_equal(again.images, ref)


def test_a_store_from_before_row_checksums_gets_them_without_a_rebuild(built):
    cfg, first, _ = built
    digest_file = first.cache_dir / "digest.json"
    digest_file.write_text(json.dumps({"blake2b": first.images_digest}))
    again = prepare(cfg, progress=False)
    assert again.cache_hit and json.loads(digest_file.read_text())["rows"] == cache.row_checksums(
        np.asarray(again.images))


def test_the_cli_says_what_it_repaired_without_a_traceback(small_dataset, tmp_path):
    argv = [sys.executable, "-m", "medvox.cli", "prepare", str(small_dataset), "--cache-dir", str(tmp_path / "c"),
            "--workers", "1"]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).returncode == 0
    (store,) = (tmp_path / "c").glob("*/*/images.npy")
    store.write_bytes(store.read_bytes()[:-100])
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "is damaged: images.npy is" in out.stdout + out.stderr
    assert "(built 12 case(s); repaired: images.npy is" in out.stdout
