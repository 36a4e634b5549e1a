"""Batches straight from the memory-mapped cache: no decoding, one copy per batch, no worker processes.

On a 2-core machine, DataLoader worker processes compete with the compute threads; the cached arrays
need no decoding, so one background thread that slices the memmap (NumPy releases the GIL while it
copies) keeps the next batch ready. Augmentation happens later, batched, on the training device.

Example:
    >>> loader = ArrayLoader(images, labels, train_idx, batch_size=6, shuffle=True, seed=0)
    >>> loader.set_epoch(3)
    >>> for x, y, idx in loader:  # x: (B, C, D, H, W) in the store's dtype, y: (B,) int64
    ...     ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch


class ArrayLoader:
    """Iterate over ``images[indices]`` in batches, optionally shuffled and sharded across DDP ranks.

    The order depends only on ``(seed, epoch)``, so a resumed run sees exactly the batches an
    uninterrupted run would have seen.

    Args:
        images: array-like of shape (N, C, D, H, W) (a NumPy memmap).
        labels: int array of shape (N,).
        indices: which rows of ``images`` this loader serves.
        batch_size: samples per batch (per rank).
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffle.
        drop_last: drop a trailing batch smaller than ``batch_size`` (training: a batch of one breaks
            BatchNorm, and uneven batches change the gradient scale).
        rank, world_size: DDP sharding; every rank gets the same number of batches (the order is padded
            by repeating samples, as ``DistributedSampler`` does, except when ``pad`` is False).
        prefetch: batches read ahead by the background thread (0 reads in the caller's thread).
        pad: pad the shard so every rank has the same length (training); evaluation sets it False and
            gathers by index instead.
    """

    def __init__(self, images, labels, indices, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, prefetch: int = 2,
                 pad: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = order[rng.permutation(len(order))]
        if self.world_size > 1:
            if self.pad and len(order) % self.world_size:
                extra = self.world_size - len(order) % self.world_size
                order = np.concatenate([order, order[:extra]])
            order = order[self.rank :: self.world_size]
        return order

    def _batches(self) -> list[np.ndarray]:
        order = self._order()
        n_full = len(order) // self.batch_size
        cut = n_full * self.batch_size if (self.drop_last and n_full > 0) else len(order)
        return [order[i : i + self.batch_size] for i in range(0, cut, self.batch_size)]

    def __len__(self) -> int:
        return len(self._batches())

    def _read(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Reading rows in ascending order is far kinder to a memmap; put the batch back in order after.
        sort = np.argsort(batch, kind="stable")
        rows = np.empty_like(sort)
        rows[sort] = np.arange(len(sort))
        x = np.asarray(self.images[batch[sort]])[rows]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[batch]), torch.from_numpy(batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if self.prefetch <= 0:
            for b in batches:
                yield self._read(b)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def _worker():
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(self._read(b))
            except BaseException as exc:  # surface reader errors in the training thread
                q.put(exc)
                return
            q.put(None)

        thread = threading.Thread(target=_worker, daemon=True, name="medvox-loader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # drain so the worker is never stuck on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.01)
