"""CoSENT on binary in-batch relevance (`pairwise.cosent_in_batch`) against a brute-force
float64 NumPy double sum over (positive, negative) pairs, and the (layer, dim) list builders.

Tolerance: float32 cosines are exact to a few 1e-7; the scale (13 here) turns that into
~1e-5 in the exponents scale * (s_n - s_p), which is also the loss's absolute error (a
log-sum-exp passes exponent errors through at most 1:1), and the loss (~5-30) has a
float32 ulp of ~2e-6. atol 5e-5 covers that; a wrongly kept or dropped pair changes the
loss by far more (checked: masking off moves it by > 0.01).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses import matryoshka, pairwise

SCALE = 13.0
ATOL = 5e-5


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(q, d, h, group, doc, hnid, scale, dims, weights):
    """log(1 + sum over every (positive cell, negative cell) pair of exp(scale (s_n - s_p))), float64."""
    total = 0.0
    for dim, weight in zip(dims, weights):
        qn, dn = _unit(q[:, :dim].astype(np.float64)), _unit(d[:, :dim].astype(np.float64))
        positives, negatives = [], []
        for i, j in itertools.product(range(len(q)), range(len(d))):
            if group[i] == group[j]:
                positives.append(qn[i] @ dn[j])
            elif doc[i] != doc[j]:
                negatives.append(qn[i] @ dn[j])
        if h is not None:
            hn = _unit(h[..., :dim].astype(np.float64)).reshape(-1, dim)
            for i, j in itertools.product(range(len(q)), range(len(hn))):
                if hnid.reshape(-1)[j] != doc[i]:
                    negatives.append(qn[i] @ hn[j])
        pair_sum = sum(np.exp(scale * (s_n - s_p)) for s_p in positives for s_n in negatives)
        total += weight * np.log1p(pair_sum)
    return total


def _inputs(seed, batch, dim, k):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim)).astype(np.float32)
    d = (0.6 * q + rng.normal(size=(batch, dim))).astype(np.float32)  # related pairs: positives rank high
    h = None if k is None else rng.normal(size=(batch, k, dim)).astype(np.float32)
    return q, d, h


# (batch, dim, hard negatives per query, metadata, Matryoshka dims and weights): odd sizes.
CASES = [
    (5, 7, 3, True, None, None),
    (6, 9, None, False, (4, 9), (0.25, 1.0)),
    (7, 5, 1, True, (2, 5), (1.0, 0.5)),
]


@pytest.mark.parametrize("batch,dim,k,metadata,dims,weights", CASES)
def test_cosent_in_batch_matches_the_float64_double_sum(batch, dim, k, metadata, dims, weights):
    q, d, h = _inputs(batch * 10 + dim, batch, dim, k)
    rng = np.random.default_rng(batch)
    if metadata:  # repeated queries (several positives) and duplicated documents (false negatives)
        group = np.array([0, 1, 0, 2, 3, 4, 1][:batch], np.int32)
        doc = np.array([10, 11, 12, 10, 13, 14, 11][:batch], np.int32)
        hnid = None if k is None else rng.choice([10, 11, 12, 99], size=(batch, k)).astype(np.int32)
        kwargs = dict(group_ids_b=group, doc_ids_b=doc, hard_negative_ids_bk=hnid)
    else:  # the defaults: positive j == i, document ids = group ids, no id on hard negatives
        group = doc = np.arange(batch)
        hnid = None if k is None else np.full((batch, k), -1)
        kwargs = {}
    # jit: one compile instead of one per eager op (the eager path is slower on 2 cores).
    got = jax.jit(lambda a, b, n: pairwise.cosent_in_batch(
        a, b, scale=SCALE, hard_negatives_bkd=n, matryoshka_dims=dims, matryoshka_weights=weights, **kwargs))(q, d, h)
    expected = brute_force(q, d, h, group, doc, hnid, SCALE, dims or (dim,), weights or (1.0,))
    np.testing.assert_allclose(float(got), expected, rtol=0, atol=ATOL)
    if metadata:
        unmasked = brute_force(q, d, h, np.arange(batch), np.arange(batch), np.full((batch, k or 1), -1), SCALE,
                               dims or (dim,), weights or (1.0,))
        assert abs(unmasked - expected) > 0.01


def _naive(q, d, scale):
    """The same loss by materialising every (positive, negative) pair difference (float32, diagonal positives)."""
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    s = q @ d.T
    eye = jnp.eye(len(q), dtype=bool)
    diff = scale * (s.reshape(1, -1) - s.reshape(-1, 1))  # [p, n] = scale * (s_n - s_p)
    pairs = eye.reshape(-1, 1) & ~eye.reshape(1, -1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros(1), jnp.where(pairs, diff, -jnp.inf).reshape(-1)]))


def test_cosent_in_batch_gradients_equal_the_materialised_pairs():
    q, d, _ = _inputs(3, 6, 5, None)
    value, (gq, gd) = jax.jit(jax.value_and_grad(lambda a, b: pairwise.cosent_in_batch(a, b, scale=SCALE),
                                                 (0, 1)))(q, d)
    ref_value, (rq, rd) = jax.jit(jax.value_and_grad(lambda a, b: _naive(a, b, SCALE), (0, 1)))(q, d)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=0, atol=ATOL)
    for got, ref in ((gq, rq), (gd, rd)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


def test_cosent_in_batch_without_negatives_is_zero_with_zero_gradient():
    q, d, _ = _inputs(4, 3, 4, None)
    # One pair: a positive and nothing to rank below it.
    value, grad = jax.jit(jax.value_and_grad(lambda a: pairwise.cosent_in_batch(a, d[:1])))(q[:1])
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    # Every other document shares the positive's document id: all negatives are false ones.
    value, grad = jax.jit(jax.value_and_grad(
        lambda a: pairwise.cosent_in_batch(a, d, doc_ids_b=np.zeros(3, np.int32))))(q)
    assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad) == 0.0)


def test_layer_dim_pair_builders():
    assert matryoshka.two_d_matryoshka_pairs((3, 6), (64, 384)) == ((3, 64), (3, 384), (6, 64), (6, 384))
    assert matryoshka.starbucks_pairs((2, 4, 6), (32, 64, 128)) == ((2, 32), (4, 64), (6, 128))
    with pytest.raises(ValueError, match="equal length"):
        matryoshka.starbucks_pairs((2, 4), (32,))
    with pytest.raises(ValueError, match="dims must be a non-empty, strictly increasing"):
        matryoshka.two_d_matryoshka_pairs((2,), (64, 32))
    with pytest.raises(ValueError, match="layers must be"):
        matryoshka.starbucks_pairs((), ())
