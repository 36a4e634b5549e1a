"""The preprocessing cache: hit without decoding, partial rebuilds, new plan folders, one build for two ranks."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import medvox.data.io as image_io
from medvox.config import DataConfig
from medvox.data import prepare
from tests.data.conftest import lesion_volume, write_nifti


@pytest.fixture
def count_reads(monkeypatch):
    """Count every image decode (check and preprocessing both go through ``io.open_image``)."""
    calls = []
    real = image_io.open_image

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(image_io, "open_image", counting)
    return calls


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_second_run_decodes_nothing_and_rewrites_nothing(small_dataset, data_cfg, monkeypatch):
    first = prepare(data_cfg(small_dataset), progress=False)
    assert not first.cache_hit and first.n_built == 12
    root = first.cache_dir.parents[1]
    before = _mtimes(root)

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"decoded {path} on a cache hit")

    monkeypatch.setattr(image_io, "open_image", refuse)
    second = prepare(data_cfg(small_dataset), progress=False)
    assert second.cache_hit and second.n_built == 0 and second.cache_dir == first.cache_dir
    np.testing.assert_array_equal(second.images, first.images)
    assert _mtimes(root) == before  # a hit writes nothing (the lock file is only opened)
    assert isinstance(second.images, np.memmap) and second.images.dtype == np.float16


def test_touched_file_rebuilds_only_that_case(small_dataset, data_cfg, count_reads):
    first = prepare(data_cfg(small_dataset), progress=False)
    old = np.array(first.images)
    count_reads.clear()
    target = small_dataset.parent / "images/c05.nii.gz"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    again = prepare(data_cfg(small_dataset), progress=False)
    assert count_reads == ["c05.nii.gz", "c05.nii.gz"]  # inspected once, preprocessed once, nothing else
    assert again.n_built == 1 and again.cache_dir == first.cache_dir
    np.testing.assert_array_equal(again.images, old)  # same content -> same arrays


def test_rewritten_file_changes_only_its_row(small_dataset, data_cfg, count_reads):
    cfg = data_cfg(small_dataset, normalization="zscore")  # per-image statistics: the plan stays the same
    first = prepare(cfg, progress=False)
    old = np.array(first.images)
    count_reads.clear()
    write_nifti(small_dataset.parent / "images/c03.nii.gz", lesion_volume(np.random.default_rng(9), 0),
                np.diag([0.8, 0.8, 2.5, 1.0]))
    again = prepare(cfg, progress=False)
    assert again.n_built == 1 and again.cache_dir == first.cache_dir and set(count_reads) == {"c03.nii.gz"}
    changed = [i for i in range(12) if not np.array_equal(again.images[i], old[i])]
    assert changed == [3]


def test_config_change_gets_a_new_plan_folder_and_the_split_stays(small_dataset, data_cfg):
    first = prepare(data_cfg(small_dataset), progress=False)
    other = prepare(data_cfg(small_dataset, target_shape=[16, 16, 16]), progress=False)
    assert other.cache_dir != first.cache_dir and other.cache_dir.parent == first.cache_dir.parent
    assert other.n_built == 12 and other.images.shape == (12, 1, 16, 16, 16)
    assert other.splits == first.splits  # the split lives in the dataset folder, not the plan folder
    back = prepare(data_cfg(small_dataset), progress=False)  # the old plan folder is still there
    assert back.cache_hit and back.cache_dir == first.cache_dir


def test_parallel_build_matches_the_serial_build(small_dataset, data_cfg, tmp_path, monkeypatch, count_reads):
    monkeypatch.setattr("medvox.data.preprocess.MIN_FILES_FOR_PROCESSES", 0)  # spawn workers even for 12 files
    serial = prepare(data_cfg(small_dataset), progress=False)
    count_reads.clear()
    parallel = prepare(data_cfg(small_dataset, workers=2, cache_dir=str(tmp_path / "c2")), progress=False)
    assert len(count_reads) == 12  # this process only checked; the spawned workers preprocessed
    np.testing.assert_array_equal(parallel.images, serial.images)


def _prepare_in_child(path: str, cache_dir: str) -> tuple[int, str]:
    data = prepare(DataConfig(path=path, cache_dir=cache_dir, workers=1), progress=False)
    return data.n_built, str(data.cache_dir)


def test_two_processes_starting_together_build_once(small_dataset, tmp_path):
    """Two DDP-like ranks: the file lock lets one build while the other waits, then reads."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        futures = [pool.submit(_prepare_in_child, str(small_dataset), str(tmp_path / "shared")) for _ in range(2)]
        results = [f.result() for f in futures]
    assert sorted(n for n, _ in results) == [0, 12]
    assert results[0][1] == results[1][1]


def test_rewritten_npz_is_rebuilt_and_an_untouched_one_is_not_read(medmnist_28, tmp_path, data_cfg):
    """An npz row's cache key names the file (path, size, mtime) like a NIfTI case's: a rewritten npz is
    preprocessed again with its new content; an untouched one is not even decompressed."""
    path = tmp_path / "mini.npz"
    with np.load(medmnist_28) as npz:
        images, labels = npz["train_images"][:12], npz["train_labels"][:12]
    np.savez(path, train_images=images, train_labels=labels)
    first = prepare(data_cfg(path, folds=2), progress=False)
    np.testing.assert_allclose(first.images[3, 0], images[3] / 255.0, atol=1e-3)
    again = prepare(data_cfg(path, folds=2), progress=False)
    assert again.cache_hit and all(c.array.images._array is None for c in again.cases)

    flipped = images[:, ::-1].copy()
    np.savez(path, train_images=flipped, train_labels=labels)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new modification time, as a rewrite has
    rebuilt = prepare(data_cfg(path, folds=2), progress=False)
    assert not rebuilt.cache_hit and rebuilt.n_built == 12
    np.testing.assert_allclose(rebuilt.images[3, 0], flipped[3] / 255.0, atol=1e-3)
