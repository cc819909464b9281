"""The Pallas flash attention kernel (`embedjax.kernels.flash_attention`), in interpret mode.

Outputs and gradients against a dense float64 NumPy attention written here (its own masks: key
padding or packed segments, causal order, a sliding window) that applies the kernel's dropout mask
(`dropout_keep`). Awkward sizes: length 37 in blocks of 16 (the last block padded), head size 24
(padded to 32 inside), GQA (4 query heads over 2 key/value heads), a right-padded row. Tolerance
2e-5 absolute on values of scale 1-7: float32 against float64, measured errors up to 1.2e-6, and
the kept probabilities' 1 / (1 - rate) amplifies rounding. Rows that see no key are not defined
(callers mask them out of pooling): their outputs are not compared and their cotangents are 0.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.kernels import dispatch
from embedjax.kernels import flash_attention as flash
from embedjax.models import attention as kernels
from embedjax.models import layers

B, L, H, G, K, BLOCK = 2, 37, 4, 2, 24, 16


def _inputs(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, L, n, K)).astype(dtype) for n in (H, G, G))
    return q, k, v, rng


def _reads(query_ids, key_ids, causal, window):
    """bool [B, L, L]: the keys each query reads (nonzero, same id; causal order and window)."""
    reads = (key_ids[:, None, :] != 0) & (query_ids[:, :, None] == key_ids[:, None, :])
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    if causal:
        reads = reads & (j <= i) & ((j > i - window) if window else True)
    return reads


def _dense_attention(q, k, v, reads, keep_bhqc, rate):
    """[B, L, H, K] in the inputs' dtype (float64 here): all scores at once, softmax over the keys
    a query reads (rows that read none give 0), kept probabilities / (1 - rate)."""
    k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    scores = jnp.einsum("bqhk,bchk->bhqc", q, k) / np.sqrt(K)
    p = jax.nn.softmax(jnp.where(reads[:, None], scores, -1e300), axis=-1) * reads.any(-1)[:, None, :, None]
    if keep_bhqc is not None:
        p = p * keep_bhqc / (1 - rate)
    return jnp.einsum("bhqc,bchk->bqhk", p, v)


PADDING = np.arange(L)[None, :] < np.array([[L], [30]]).T.reshape(B, 1)  # row 1 padded after 30 tokens
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 16 + [2] * 14 + [0] * 7])  # packed texts, row 1 padded
CASES = {  # name: (query ids, key ids, causal, window, dropout rate, seed)
    "padding mask": (np.ones((B, L), int), PADDING.astype(int), False, None, 0.0, None),
    "padding mask, dropout": (np.ones((B, L), int), PADDING.astype(int), False, None, 0.2, 11),
    # window 18 = 2 mod 16: row 32 (query block 2) still reads key 15 (key block 0), the blocks' edges
    "causal window, dropout": (np.ones((B, L), int), PADDING.astype(int), True, 18, 0.1, -7),
    "packed causal, dropout": (SEGMENTS, SEGMENTS, True, None, 0.3, 5),
}


def _flash_and_float64(name, q, k, v, rng):
    """(defined rows bool [B, L], (out, grads) of the kernel, (out, grads) of the float64 dense
    attention with the same mask) for case ``name``, under a random cotangent on the defined rows."""
    query_ids, key_ids, causal, window, rate, seed = CASES[name]
    keep = np.asarray(flash.dropout_keep(seed, B, H, L, L, rate)) if rate else None
    reads = _reads(query_ids, key_ids, causal, window)
    defined = reads.any(-1)
    cotangent = rng.normal(size=(B, L, H, K)).astype(np.float32) * defined[:, :, None, None]

    def loss(q_, k_, v_):
        out = flash.flash_attention(q_, k_, v_, jnp.asarray(query_ids), jnp.asarray(key_ids), causal=causal,
                                    window=window, dropout_rate=rate, seed=seed, block=BLOCK)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    def dense_loss(q_, k_, v_):
        out = _dense_attention(q_, k_, v_, reads, keep, rate)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with jax.enable_x64(True):
        (_, want), want_grads = jax.value_and_grad(dense_loss, argnums=(0, 1, 2), has_aux=True)(
            *(np.asarray(x, np.float64) for x in (q, k, v)))
        want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
    return defined, (out, grads), (want, want_grads)


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_and_gradients_equal_a_float64_attention_with_the_same_dropout_mask(name):
    q, k, v, rng = _inputs(len(name))
    defined, (out, grads), (expected, expected_grads) = _flash_and_float64(name, q, k, v, rng)
    np.testing.assert_allclose(np.asarray(out)[defined], expected[defined], atol=2e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    if CASES[name][4]:  # the mask matters: the same attention without dropout is far from these values
        query_ids, key_ids, causal, window = CASES[name][:4]
        with jax.enable_x64(True):
            plain = np.asarray(_dense_attention(*(np.float64(x) for x in (q, k, v)),
                                                _reads(query_ids, key_ids, causal, window), None, 0.0))
        assert np.abs(plain - expected)[defined].max() > 0.1


def test_bfloat16_inputs_stay_within_bfloat16_rounding_of_float64():
    """bf16 q, k, v (training's dtype): outputs and gradients come back in bf16, the probabilities
    and score cotangents rounded to bf16 before their products as on a GPU, within 2e-2 of float64
    on the same (rounded) inputs (values up to ~2.5; bf16 keeps 8 bits: 1e-2 there; measured
    3.2e-3 on outputs, 8.4e-3 on gradients)."""
    q, k, v, rng = _inputs(3)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    defined, (out, grads), (expected, expected_grads) = _flash_and_float64("padding mask, dropout", q, k, v, rng)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float32)[defined], expected[defined], atol=2e-2)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_the_dropout_mask_keeps_one_minus_rate_independently_per_pair():
    """Over 4 x 6 x 128 x 128 pairs: the kept fraction within 5 standard deviations of 1 - rate for
    each rate, and no correlation (|r| < 5 / sqrt(n)) between neighbouring queries, keys, heads,
    batch rows or seeds. A hash that ignored an index would correlate those neighbours fully."""
    shape = (4, 6, 128, 128)
    n = np.prod(shape)
    for rate in (0.1, 0.5):
        keep = np.asarray(flash.dropout_keep(123, *shape, rate), np.float64)
        assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    keep = np.asarray(flash.dropout_keep(123, *shape, 0.5), np.float64)
    other_seed = np.asarray(flash.dropout_keep(124, *shape, 0.5), np.float64)
    pairs = [(keep[:, :, 1:], keep[:, :, :-1]), (keep[..., 1:], keep[..., :-1]), (keep[:, 1:], keep[:, :-1]),
             (keep[1:], keep[:-1]), (keep, other_seed)]
    for a, b in pairs:
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.size), r


def test_attend_runs_the_flash_kernel_with_the_dropout_keys_bits():
    """`layers.attend(impl="flash")`: without dropout the explicit attention's values (key padding,
    and packed segments), with dropout the kernel's mask of the 32 bits drawn from the dropout key."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 20, 2, 16)).astype(np.float32)
    k, v = (rng.normal(size=(2, 20, 1, 16)).astype(np.float32) for _ in range(2))
    mask = np.arange(20)[None, :] < np.array([[20], [13]])
    segments = kernels.Segments(jnp.asarray(np.array([[1] * 8 + [2] * 12, [1] * 13 + [0] * 7])))
    for key_mask in (jnp.asarray(mask), segments):
        got = layers.attend(q, k, v, key_mask, causal=False, impl="flash")
        want = layers.attend(q, k, v, key_mask, causal=False, impl="explicit")
        np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=1e-5)
    key = jax.random.key(7)
    dropped = layers.attend(q, k, v, jnp.asarray(mask), causal=False, dropout_rate=0.3, dropout_rng=key, impl="flash")
    seed = jax.lax.bitcast_convert_type(jax.random.bits(key, (), jnp.uint32), jnp.int32)
    direct = flash.flash_attention(q, k, v, jnp.ones((2, 20), jnp.int32), jnp.asarray(mask, jnp.int32),
                                   dropout_rate=0.3, seed=seed)
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(direct))
    plain = layers.attend(q, k, v, jnp.asarray(mask), causal=False, impl="flash")
    assert np.abs(np.asarray(dropped) - np.asarray(plain))[mask].max() > 0.1  # it does drop


def test_flash_attention_refuses_bad_arguments(monkeypatch):
    q, k, v, _ = _inputs(0)
    ids = jnp.ones((B, L), jnp.int32)
    with pytest.raises(ValueError, match="needs a seed"):
        flash.flash_attention(q, k, v, ids, ids, dropout_rate=0.1)
    with pytest.raises(ValueError, match="power of two"):
        flash.flash_attention(q, k, v, ids, ids, block=24)
    with pytest.raises(ValueError, match="query heads a multiple"):
        flash.flash_attention(q, q[:, :, :3], q[:, :, :3], ids, ids)
    with pytest.raises(ValueError, match="query_ids must be integer"):
        flash.flash_attention(q, k, v, jnp.ones((B, L), jnp.float32), ids)
    monkeypatch.setattr(dispatch, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="on a TPU"):
        flash.flash_attention(q, k, v, ids, ids)


def test_minilm_embeddings_through_the_flash_kernel_equal_the_default_ones(data_dir, minilm_dir, minilm_encoder):
    """The pretrained MiniLM encodes real STS-B test sentences with attention_impl="flash" (padded
    batches, and packed rows whose segments the kernel keeps apart) to the default path's
    embeddings: within 1e-5 (float32, unit vectors; measured 1.3e-7)."""
    import embedjax as ej

    sentences = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")[0][:24]
    flash_encoder = ej.Encoder.from_pretrained(minilm_dir, attention_impl="flash")
    for pack in (False, True):
        got = flash_encoder.encode(sentences, batch_size=8, pack=pack)
        want = minilm_encoder.encode(sentences, batch_size=8, pack=pack)
        np.testing.assert_allclose(got, want, atol=1e-5)
