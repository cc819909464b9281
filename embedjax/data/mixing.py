"""Multi-dataset mixing with single-task batches: a random-access plan step -> batch.

Each global batch comes whole from one dataset (so in-batch negatives are never
mixed across tasks); which dataset feeds step ``t`` is drawn up front from
``weights`` with a seeded generator, and each dataset walks through its own epochs
independently. The plan is a pure function of the seed, so it is the same in every
process and a resumed run can jump straight to any step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from embedjax.data.samplers import EpochBatches


def draw_dataset_per_step(weights: Sequence[float], num_steps: int, seed: int) -> np.ndarray:
    """int32 [num_steps]: the dataset index of every step, drawn in proportion to ``weights``."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"mixing weights {weights.tolist()} must be non-negative with at least one > 0")
    if len(weights) == 1:
        return np.zeros(num_steps, dtype=np.int32)
    rng = np.random.default_rng([seed, 0x6D6978])  # a stream separate from the shuffling streams
    return rng.choice(len(weights), size=num_steps, p=weights / weights.sum()).astype(np.int32)


def ordinal_within_dataset(choices: np.ndarray) -> np.ndarray:
    """int64 [num_steps]: how many earlier steps drew the same dataset (its batch counter)."""
    ordinals = np.zeros(len(choices), dtype=np.int64)
    for d in np.unique(choices):
        where = np.nonzero(choices == d)[0]
        ordinals[where] = np.arange(len(where))
    return ordinals


class BatchPlan:
    """``plan[t] -> (dataset_index, global example indices int64 [B])`` for t in [0, num_steps)."""

    def __init__(self, datasets: Sequence[EpochBatches], weights: Sequence[float], num_steps: int, seed: int):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} mixing weights")
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.datasets = list(datasets)
        self.num_steps = num_steps
        self.choices = draw_dataset_per_step(weights, num_steps, seed)
        self.ordinals = ordinal_within_dataset(self.choices)

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> tuple[int, np.ndarray]:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside the plan's {self.num_steps} steps")
        d = int(self.choices[step])
        return d, self.datasets[d].batch(int(self.ordinals[step]))
