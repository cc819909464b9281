"""Samplers and mixing: seeded orders, the no-duplicates batch sampler, single-task mixing."""
import numpy as np
import pytest

from embedjax.data.mixing import BatchPlan, draw_dataset_per_step, ordinal_within_dataset
from embedjax.data.samplers import EpochBatches, epoch_permutation, no_duplicate_batches, sequential_batches


def test_epoch_permutation_is_seeded_and_changes_by_epoch():
    a = epoch_permutation(101, seed=3, epoch=0)
    assert np.array_equal(a, epoch_permutation(101, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_permutation(101, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_permutation(101, seed=4, epoch=0))
    assert sorted(a.tolist()) == list(range(101))


def test_sequential_batches_drop_the_remainder():
    batches = sequential_batches(np.arange(23), 5)
    assert [b.tolist() for b in batches] == [list(range(i, i + 5)) for i in range(0, 20, 5)]


def test_no_duplicates_defers_a_colliding_example_to_the_next_batch():
    keys = [frozenset({"a"}), frozenset({"a"}), frozenset({"b"}), frozenset({"c"})]
    batches = no_duplicate_batches(np.arange(4), keys, 2)
    assert [b.tolist() for b in batches] == [[0, 2], [1, 3]]


def test_no_duplicates_on_random_collisions():
    rng = np.random.default_rng(0)
    n, bs = 503, 16
    # 503 examples over 300 texts, two texts each: many collisions.
    keys = [frozenset(rng.choice(300, size=2, replace=False).tolist()) for _ in range(n)]
    batches = no_duplicate_batches(rng.permutation(n), keys, bs)
    used = np.concatenate(batches)
    assert all(len(b) == bs for b in batches)
    assert len(set(used.tolist())) == len(used)  # nobody twice
    for b in batches:
        texts = [t for i in b for t in keys[i]]
        assert len(texts) == len(set(texts)), "a text repeats inside a batch"
    # Only a tail shorter than a few batches may be dropped.
    assert len(used) >= n - 3 * bs


def test_epoch_batches_cycle_through_epochs_without_repeats():
    eb = EpochBatches(50, 8, seed=1)
    assert eb.steps_in_epochs(2) == 12
    first_epoch = np.concatenate([eb.batch(i) for i in range(6)])
    assert len(set(first_epoch.tolist())) == 48
    assert np.array_equal(eb.batch(6), eb.batches(1)[0])


def test_epoch_batches_refuse_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatches(5, 8, seed=0)


def test_mixing_follows_the_weights_and_keeps_each_batch_single_task():
    choices = draw_dataset_per_step([3.0, 1.0], 4000, seed=0)
    share = np.mean(choices == 0)
    # Binomial(4000, 0.75) has sd 0.007; 4 sd is 0.028.
    assert abs(share - 0.75) < 0.028
    ords = ordinal_within_dataset(np.array([0, 1, 0, 0, 1]))
    assert ords.tolist() == [0, 0, 1, 2, 1]
    a, b = EpochBatches(40, 4, seed=0), EpochBatches(1000, 4, seed=1)
    plan = BatchPlan([a, b], [1.0, 1.0], 30, seed=5)
    seen = {0: [], 1: []}
    for t in range(30):
        d, idx = plan[t]
        assert idx.shape == (4,) and idx.max() < (40, 1000)[d]
        seen[d].append(idx)
    # Each dataset's own batches come in its own epoch order.
    for d, eb in ((0, a), (1, b)):
        for i, idx in enumerate(seen[d]):
            assert np.array_equal(idx, eb.batch(i))


def test_mixing_weights_are_validated():
    with pytest.raises(ValueError, match="non-negative"):
        draw_dataset_per_step([1.0, -1.0], 5, seed=0)
