"""Sequence packing (issue 17): the packer's layout and the attention kernels' segment masks.

The packer is checked by rebuilding every text from the packed rows through its unpacking index;
the kernels by a float64 NumPy attention that sees each segment alone (tolerance 1e-5 absolute on
outputs of norm ~1, as the other kernel tests: the same terms summed in another order).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.data import packing
from embedjax.models import attention as kernels


def _random_texts(rng, n, longest):
    return [list(rng.integers(5, 1000, rng.integers(1, longest + 1))) for _ in range(n)]


@pytest.mark.parametrize("n,shards,row_length", [(13, 1, 16), (12, 4, 9), (40, 2, 64), (1, 1, 3)])
def test_pack_rebuilds_every_text_and_keeps_shards_apart(n, shards, row_length):
    rng = np.random.default_rng(n * 7 + shards)
    texts = _random_texts(rng, n, min(row_length, 11))
    batch = packing.pack(texts, row_length=row_length, pad_id=0, shards=shards, token_type_ids=True, pool_skip=1)
    rows, p = batch["input_ids"].shape
    assert p == row_length and rows % shards == 0
    assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(np.int32) for k in batch}
    flat_ids, flat_seg, flat_pos = (batch[k].reshape(-1) for k in ("input_ids", "segment_ids", "position_ids"))
    per_shard_rows, per_shard_texts = rows // shards, n // shards
    for i, text in enumerate(texts):
        index = batch["unpack_index"][i, :len(text)]
        assert list(flat_ids[index]) == text
        assert (flat_seg[index] == i + 1).all() and list(flat_pos[index]) == list(range(len(text)))
        assert (index // row_length // per_shard_rows == i // per_shard_texts).all()  # in its own shard's rows
        assert (index // row_length == index[0] // row_length).all()  # one row
        assert list(batch["pool_mask"][i]) == [int(1 <= j < len(text)) for j in range(row_length)]
    assert (flat_seg > 0).sum() == sum(map(len, texts))  # nothing else is marked
    assert (batch["attention_mask"] == (batch["segment_ids"] > 0)).all()
    assert (batch["input_ids"][batch["segment_ids"] == 0] == 0).all()


def test_first_fit_decreasing_fills_rows_and_the_row_ladder_bounds_waste():
    assert packing.first_fit_rows([5, 3, 4, 4, 2], 8) == [[0, 1], [2, 3], [4]]
    assert [packing.row_bucket(r) for r in (0, 1, 7, 8, 9, 11, 13, 17, 33, 100)] == [1, 1, 7, 8, 10, 12, 14, 20, 40, 112]
    for rows in range(1, 300):
        assert rows <= packing.row_bucket(rows) <= max(rows, 1.25 * rows)


def test_pack_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="row_length=4"):
        packing.pack([[1, 2, 3, 4, 5]], row_length=4, pad_id=0)
    with pytest.raises(ValueError, match="no tokens"):
        packing.pack([[1], []], row_length=4, pad_id=0)
    with pytest.raises(ValueError, match="3 texts cannot be packed into 2"):
        packing.pack([[1], [2], [3]], row_length=4, pad_id=0, shards=2)


def test_pack_rows_keeps_the_planned_layout_and_fills_the_text_count():
    texts = [[7, 8, 9], [4], [5, 6], [3, 3, 3, 3]]
    rows = [[2, 0], [], [3, 1]]  # texts 2 then 0; a padding row; texts 3 then 1
    batch = packing.pack_rows(texts, rows, row_length=6, pad_id=0, num_texts=6, pool_skip=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [0] * 6, [3, 3, 3, 3, 4, 0]]
    assert batch["segment_ids"].tolist() == [[3, 3, 1, 1, 1, 0], [0] * 6, [4, 4, 4, 4, 2, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0], [0] * 6, [0, 1, 2, 3, 0, 0]]
    assert batch["unpack_index"][:4, :4].tolist() == [[2, 3, 4, 0], [16, 0, 0, 0], [0, 1, 0, 0], [12, 13, 14, 15]]
    # Texts 4 and 5 are fillers: no tokens, pooling reads flat position 0 only (finite for any pooler).
    assert batch["unpack_index"][4:].tolist() == [[0] * 6] * 2
    assert batch["pool_mask"].tolist() == [[0, 1, 1, 0, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0],
                                           [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_pack_rows_refuses_a_layout_that_loses_or_overflows_texts():
    texts = [[1, 2], [3], [4, 5, 6]]
    with pytest.raises(ValueError, match="exactly once; they hold 3 indices, 2 of them distinct"):
        packing.pack_rows(texts, [[0, 1], [1]], row_length=4, pad_id=0)
    with pytest.raises(ValueError, match="row 0 holds 5 tokens, more than row_length=4"):
        packing.pack_rows(texts, [[0, 2], [1]], row_length=4, pad_id=0)
    with pytest.raises(ValueError, match="num_texts=2 is fewer than the 3 texts"):
        packing.pack_rows(texts, [[0, 1], [2]], row_length=4, pad_id=0, num_texts=2)


def test_shard_slice_takes_a_process_rows_and_texts():
    texts = _random_texts(np.random.default_rng(0), 8, 5)
    batch = packing.pack(texts, row_length=8, pad_id=0, shards=4)
    part = packing.shard_slice(batch, 4, 2, 2)
    rows = batch["input_ids"].shape[0]
    assert (part["input_ids"] == batch["input_ids"][rows // 2:]).all()
    assert (part["unpack_index"] == batch["unpack_index"][4:]).all()  # still global flat positions


def _segment_inputs(rng, length, h, g, k):
    """Two rows of awkward segment layouts (a 1-token segment, trailing and inner-less padding)."""
    layouts = [[5, 11, 1, 13], [length]]
    segments = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    next_id = 1
    for row, sizes in enumerate(layouts):
        start = 0
        for size in sizes:
            segments[row, start:start + size] = next_id
            positions[row, start:start + size] = np.arange(size)
            start, next_id = start + size, next_id + 1
    q = jnp.asarray(rng.normal(size=(2, length, h, k)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(2, length, g, k)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, length, g, k)), jnp.float32)
    return q, kk, v, segments, positions


def _numpy_segment_attention(q, k, v, segments, causal, window):
    """float64: every segment attends alone (row order for causal and the window)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    i, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    if causal:
        allowed &= j <= i
        if window is not None:
            allowed &= j > i - window
    allowed = np.broadcast_to(allowed[:, None], scores.shape)
    p = np.where(allowed, np.exp(scores - np.where(allowed, scores, -np.inf).max(-1, keepdims=True)), 0)
    return np.einsum("bhqk,bkhd->bqhd", p / np.maximum(p.sum(-1, keepdims=True), 1e-300), v)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 4)])
def test_every_attention_kernel_keeps_packed_segments_apart(causal, window):
    rng = np.random.default_rng(3 + int(causal) + (window or 0))
    length = 37  # 30 packed tokens + 7 padding in row 0
    q, k, v, segments, positions = _segment_inputs(rng, length, 6, 2, 8)
    masking = kernels.Masking(causal, window, segments=True)
    ref = _numpy_segment_attention(q, k, v, segments, causal, window)
    outs = {
        "explicit": kernels.explicit_attention((q,), (k,), v, segments, positions, masking),
        "chunked": kernels.chunked_attention((q,), (k,), v, segments, positions, masking, chunk_size=8),
        "xla": kernels.xla_attention(q, k, v, segments, masking),
        "blocked": kernels.blocked_attention((q,), (k,), v, segments, positions, masking, block=1),
    }
    real = segments > 0
    for name, out in outs.items():
        err = np.abs(np.asarray(out, np.float64) - ref)[real].max()
        assert err <= 1e-5, (name, err)
    # Without the segment mask the first row's texts would read each other: the test can fail.
    plain = kernels.explicit_attention((q,), (k,), v, real, positions, kernels.Masking(causal, window))
    assert np.abs(np.asarray(plain, np.float64) - ref)[real].max() > 1e-2


def test_chunked_gradients_with_segments_equal_the_dense_ones():
    rng = np.random.default_rng(5)
    q, k, v, segments, positions = _segment_inputs(rng, 37, 4, 2, 8)
    masking = kernels.Masking(True, None, segments=True)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * (segments > 0)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn((q,), (k,), v, segments, positions, masking) * weights)

    dense = jax.grad(loss(kernels.explicit_attention), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(lambda *a: kernels.chunked_attention(*a, chunk_size=8)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", dense, chunked):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(a).max()), 1.0), name
