"""Attention dropout inside the chunked kernel (issue 17: attention without an [L, L] score or mask
array during training): output and gradients equal a dense float64 NumPy attention that applies the
same keep-mask, assembled here from `chunk_dropout_keep` block by block; rate 0 is the plain kernel.

Awkward sizes: length 37 in blocks of 8 (the last one padded), GQA (4 heads over 2 groups), right
padding, a causal case. Tolerance 2e-5 absolute on outputs and gradients of scale ~1-10 (float32
against float64; the kept probabilities are scaled by 1 / (1 - rate), which amplifies rounding).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.models import attention as kernels

B, L, H, G, K, CHUNK, RATE = 2, 37, 4, 2, 8, 8, 0.3


def _inputs(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, L, n, K)).astype(np.float32) for n in (H, G, G))
    mask = np.ones((B, L), bool)
    mask[1, 30:] = False
    weights = rng.normal(size=(B, L, H, K)).astype(np.float32) * mask[:, :, None, None]
    return q, k, v, mask, weights


def _full_keep(key_data, impl=None):
    """bool [B, G, R, L, L]: the kernel's per-block masks side by side, cropped to the length."""
    blocks = [kernels.chunk_dropout_keep(key_data, i, (B, G, H // G, L, CHUNK), RATE, impl)
              for i in range(-(-L // CHUNK))]
    return np.concatenate([np.asarray(b) for b in blocks], axis=-1)[..., :L]


def _numpy_dropout_attention(q, k, v, mask, causal, keep_bgrqc):
    """float64 [B, L, H, K]: softmax over the allowed keys, then kept probabilities / (1 - rate)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q5 = q.reshape(B, L, G, H // G, K)
    scores = np.einsum("bqgrk,bcgk->bgrqc", q5, k) / np.sqrt(K)
    allowed = np.broadcast_to(mask[:, None, None, None, :], scores.shape)
    if causal:
        allowed = allowed & (np.arange(L)[None, :] <= np.arange(L)[:, None])
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * keep_bgrqc / (1 - RATE)
    return np.einsum("bgrqc,bcgk->bqgrk", p, v).reshape(B, L, H, K)


# An rbg key (train.dropout_rng) reaches the kernel as its own implementation: read as threefry its
# four words would not even wrap (threefry keys hold two).
@pytest.mark.parametrize("causal,impl", [(False, "threefry2x32"), (True, "threefry2x32"), (False, "rbg")])
def test_chunked_dropout_equals_a_dense_attention_with_the_same_mask(causal, impl):
    q, k, v, mask, weights = _inputs(11 + causal)
    rng = jax.random.key(5, impl=impl)
    masking = kernels.Masking(causal=causal)
    positions = jnp.zeros((B, L), jnp.int32)

    def loss(q_, k_, v_):
        out = kernels.chunked_attention((q_,), (k_,), v_, mask, positions, masking, chunk_size=CHUNK,
                                        dropout_rate=RATE, dropout_rng=rng)
        return jnp.sum(out * weights), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert kernels.dropout_key_impl(rng) == impl
    keep = _full_keep(kernels.dropout_key_data(rng), impl)
    assert 0.6 < keep.mean() < 0.8  # Bernoulli(0.7)
    want = _numpy_dropout_attention(q, k, v, mask, causal, keep)
    np.testing.assert_allclose(np.asarray(out)[mask], want[mask], rtol=0, atol=2e-5)
    # Gradients against float64 central differences of the same masked attention, on sampled entries.
    f64_loss = lambda q_, k_, v_: float(np.sum(_numpy_dropout_attention(q_, k_, v_, mask, causal, keep) * weights))
    assert float(value) == pytest.approx(f64_loss(q, k, v), abs=2e-4)
    picker = np.random.default_rng(3)
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    for which, grad in enumerate(grads):
        scale = float(np.abs(grad).max())
        for flat in picker.choice(args[which].size, 12, replace=False):
            index = np.unravel_index(flat, args[which].shape)
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][index] += 1e-6
            minus[which][index] -= 1e-6
            numeric = (f64_loss(*plus) - f64_loss(*minus)) / 2e-6
            assert abs(float(grad[index]) - numeric) <= 2e-5 * max(scale, 1.0), ("qkv"[which], index)


def test_rate_zero_or_no_key_is_the_plain_kernel_and_bad_rates_are_refused():
    q, k, v, mask, _ = _inputs(2)
    positions = jnp.zeros((B, L), jnp.int32)
    call = lambda **kw: np.asarray(kernels.chunked_attention((q,), (k,), v, mask, positions, kernels.Masking(),
                                                             chunk_size=CHUNK, **kw))
    plain = call()
    np.testing.assert_array_equal(call(dropout_rate=0.0, dropout_rng=jax.random.key(1)), plain)
    np.testing.assert_array_equal(call(dropout_rate=0.5), plain)  # no key: deterministic (evaluation)
    legacy = call(dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(1))  # raw uint32 keys work too
    assert np.abs(legacy - plain)[mask].max() > 0.1
    assert kernels.dropout_key_impl(jax.random.PRNGKey(1)) is None  # read with JAX's default
    # The same seed under another implementation draws other masks.
    assert np.abs(call(dropout_rate=0.5, dropout_rng=jax.random.key(1, impl="rbg")) - legacy)[mask].max() > 0.1
    with pytest.raises(ValueError, match="dropout_rate=1.0 must be in"):
        call(dropout_rate=1.0, dropout_rng=jax.random.key(1))
