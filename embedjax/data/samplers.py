"""Batch samplers: seeded epoch orders cut into global batches of example indices.

Every process computes the same global batches from the same seed (the order is a
pure function of ``(seed, epoch)``), so a run with 1 process and a run with N
processes see the same global batch at every step; each process then keeps its
own rows (see `embedjax.data.pipeline`).
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``num_examples`` indices in ``epoch`` (int64 [N])."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def sequential_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut ``order`` into full batches; the incomplete remainder is dropped (every step has one shape)."""
    num_batches = len(order) // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def no_duplicate_batches(order: np.ndarray, keys: Sequence[frozenset], batch_size: int) -> list[np.ndarray]:
    """Batches in which no two examples share a key (a text), so none is its neighbour's false negative.

    Examples are taken in ``order``; one that collides with the batch being filled
    is deferred and offered first to the following batches (so it is delayed, not
    lost). The tail that cannot fill a batch is dropped. ``keys[i]`` is the set of
    texts of example ``i``.
    """
    batches: list[np.ndarray] = []
    deferred: list[int] = []
    stream = iter(order.tolist())
    exhausted = False
    while not exhausted or deferred:
        batch: list[int] = []
        seen: set = set()
        still_deferred: list[int] = []

        def offer(index: int) -> None:
            if len(batch) < batch_size and seen.isdisjoint(keys[index]):
                batch.append(index)
                seen.update(keys[index])
            else:
                still_deferred.append(index)

        for index in deferred:
            offer(index)
        while len(batch) < batch_size:
            index = next(stream, None)
            if index is None:
                exhausted = True
                break
            offer(index)
        if len(batch) < batch_size:
            break
        batches.append(np.asarray(batch, dtype=np.int64))
        deferred = still_deferred
    return batches


class EpochBatches:
    """Global batches of one dataset, epoch by epoch (computed once per epoch, thread-safe).

    Args:
      num_examples: dataset size.
      batch_size: global batch size.
      seed: shuffling seed; ``shuffle=False`` keeps the stored order.
      keys: per-example text sets for the no-duplicates sampler (None: plain batches).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, shuffle: bool = True, keys=None):
        if num_examples < batch_size:
            raise ValueError(
                f"the dataset holds {num_examples} examples, fewer than one global batch of {batch_size}: "
                "lower the batch size or add data"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.keys = keys
        self._cache: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def batches(self, epoch: int) -> list[np.ndarray]:
        with self._lock:
            if epoch not in self._cache:
                order = (
                    epoch_permutation(self.num_examples, self.seed, epoch)
                    if self.shuffle
                    else np.arange(self.num_examples)
                )
                if self.keys is None:
                    self._cache[epoch] = sequential_batches(order, self.batch_size)
                else:
                    self._cache[epoch] = no_duplicate_batches(order, self.keys, self.batch_size)
                if not self._cache[epoch]:
                    raise ValueError(
                        f"epoch {epoch} yields no full batch of {self.batch_size} distinct examples: "
                        "lower the batch size or turn off no_duplicates"
                    )
            return self._cache[epoch]

    def steps_in_epochs(self, num_epochs: int) -> int:
        return sum(len(self.batches(e)) for e in range(num_epochs))

    def batch(self, ordinal: int) -> np.ndarray:
        """The ``ordinal``-th batch of this dataset counting across epochs."""
        epoch = 0
        while ordinal >= len(self.batches(epoch)):
            ordinal -= len(self.batches(epoch))
            epoch += 1
        return self.batches(epoch)[ordinal]
