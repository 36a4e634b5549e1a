"""The array loader: order fixed by (seed, epoch), every sample once per epoch, DDP shards disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from medvox.data.loader import ArrayLoader


@pytest.fixture
def store():
    images = np.arange(20 * 1 * 2 * 2 * 2, dtype=np.float16).reshape(20, 1, 2, 2, 2)
    labels = np.arange(20) % 3
    return images, labels


def _epoch(loader):
    return [(x.numpy(), y.numpy(), i.numpy()) for x, y, i in loader]


def test_batches_match_the_store_and_cover_every_index(store):
    images, labels = store
    idx = np.array([3, 7, 1, 12, 19, 0, 5])
    loader = ArrayLoader(images, labels, idx, batch_size=3, shuffle=True, seed=1)
    seen = []
    for x, y, i in _epoch(loader):
        np.testing.assert_array_equal(x, images[i])  # rows come back in the batch's own order
        np.testing.assert_array_equal(y, labels[i])
        seen += i.tolist()
    assert sorted(seen) == sorted(idx.tolist())
    assert [len(b[2]) for b in _epoch(loader)] == [3, 3, 1]


def test_order_depends_only_on_seed_and_epoch(store):
    images, labels = store
    a = ArrayLoader(images, labels, np.arange(20), 4, shuffle=True, seed=7)
    b = ArrayLoader(images, labels, np.arange(20), 4, shuffle=True, seed=7, prefetch=0)
    a.set_epoch(3)
    b.set_epoch(3)
    order_a = np.concatenate([i for _, _, i in _epoch(a)])
    assert np.array_equal(order_a, np.concatenate([i for _, _, i in _epoch(b)]))
    a.set_epoch(4)
    assert not np.array_equal(order_a, np.concatenate([i for _, _, i in _epoch(a)]))


def test_drop_last_and_ddp_shards(store):
    images, labels = store
    loader = ArrayLoader(images, labels, np.arange(10), 4, drop_last=True)
    assert [len(b[2]) for b in _epoch(loader)] == [4, 4]
    shards = [ArrayLoader(images, labels, np.arange(11), 2, rank=r, world_size=2) for r in range(2)]
    parts = [np.concatenate([i for _, _, i in _epoch(s)]) for s in shards]
    assert len(parts[0]) == len(parts[1]) == 6  # padded to the same length on every rank
    assert set(parts[0]) | set(parts[1]) == set(range(11))
    unpadded = [ArrayLoader(images, labels, np.arange(11), 2, rank=r, world_size=2, pad=False) for r in range(2)]
    parts = [np.concatenate([i for _, _, i in _epoch(s)]) for s in unpadded]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))


def test_reader_errors_reach_the_caller(store):
    class Broken:
        shape = (5, 1, 2, 2, 2)

        def __getitem__(self, item):
            raise OSError("disk gone")

    loader = ArrayLoader(Broken(), np.zeros(5), np.arange(5), 2)
    with pytest.raises(OSError, match="disk gone"):
        _epoch(loader)
    with pytest.raises(ValueError, match="batch_size"):
        ArrayLoader(*store, np.arange(3), 0)
