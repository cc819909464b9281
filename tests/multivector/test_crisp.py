"""CRISP clustering (static shapes, stop-gradient assignments, gradients through the means) and
the post-hoc pruning baselines."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.multivector.crisp import cluster_tokens, k_spacing, tail_prune


def _separated(rng, b=3, per=4, k=3, d=8, noise=0.01):
    centres = np.eye(d)[:k] * 1.0
    x = np.concatenate([centres[j] + noise * rng.normal(size=(b, per, d)) for j in range(k)], axis=1)
    perm = rng.permutation(x.shape[1])
    return x[:, perm].astype(np.float32), centres


def test_recovers_well_separated_cluster_means():
    rng = np.random.default_rng(0)
    x, centres = _separated(rng)
    mask = np.ones(x.shape[:2], bool)
    c, keep = cluster_tokens(x, mask, 3, iters=4)
    assert np.asarray(keep).all()
    for b in range(x.shape[0]):
        # Each centroid is the normalised mean of one true cluster (order free).
        assign = np.argmax(x[b] @ centres.T, axis=1)
        want = np.stack([x[b][assign == j].mean(0) for j in range(3)])
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        got = np.asarray(c[b])
        match = np.argmax(got @ want.T, axis=1)
        assert sorted(match) == [0, 1, 2]
        np.testing.assert_allclose(got, want[match], atol=1e-5)


def test_short_texts_get_padded_centroids_and_masked_tokens_join_nothing():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    x[0, 2:] = 100.0  # masked tokens far away: they would dominate any mean they joined
    c, keep = cluster_tokens(x, mask, 4, iters=2)
    assert c.shape == (2, 4, 5)
    assert np.asarray(keep)[0].tolist() == [True, True, False, False]
    assert (np.asarray(c)[0, 2:] == 0).all() and np.abs(np.asarray(c)).max() <= 1.0 + 1e-6


def test_gradient_flows_through_the_means_not_the_assignments():
    rng = np.random.default_rng(2)
    x, centres = _separated(rng, b=1)
    mask = np.ones(x.shape[:2], bool)
    w_kd = rng.normal(size=(3, 8))

    def weighted_sum(x_):
        c, _ = cluster_tokens(x_, mask, 3, iters=3)
        return jnp.sum(c[0] * jnp.asarray(w_kd, jnp.float32))

    g_ld = np.asarray(jax.grad(weighted_sum)(jnp.asarray(x)))[0]
    c_kd = np.asarray(cluster_tokens(x, mask, 3, iters=3)[0])[0]
    # Closed form in float64: with the assignments held (each token with its true centre), centroid
    # c = m / |m| for m the mean of its n tokens, so each of them gets (w - c (c . w)) / (n |m|).
    # (A float32 finite difference is too noisy here: its step must stay below ~1e-3, or moving
    # one token changes the initial centroids.)
    x_ld = x[0].astype(np.float64)
    cluster_l = np.argmax(x_ld @ centres.T, axis=1)
    want_ld = np.zeros_like(x_ld)
    for j in range(3):
        members = cluster_l == j
        m = x_ld[members].mean(axis=0)
        c = m / np.linalg.norm(m)
        w = w_kd[np.argmax(c_kd @ c)]  # the output slot that holds this cluster
        want_ld[members] = (w - c * (c @ w)) / (members.sum() * np.linalg.norm(m))
    # float32 rounding of means and norms of unit-scale tokens: ~1e-7 relative; gradients are O(1).
    np.testing.assert_allclose(g_ld, want_ld, rtol=0, atol=1e-5)
    assert np.abs(want_ld).max() > 0.1


def test_post_hoc_baselines_keep_the_right_tokens():
    mask = np.array([[1, 1, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
    assert np.asarray(tail_prune(mask, 3)).astype(int).tolist() == [[1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert np.asarray(k_spacing(mask, 2)).astype(int).tolist() == [[1, 0, 0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]]


@pytest.mark.parametrize("call,match", [
    (lambda: cluster_tokens(np.zeros((2, 3, 4)), np.ones((2, 4), bool), 2), "mask_bl"),
    (lambda: cluster_tokens(np.zeros((2, 3, 4)), np.ones((2, 3), bool), 0), "k=0"),
    (lambda: cluster_tokens(np.zeros((2, 3, 4)), np.ones((2, 3), bool), 2, iters=0), "iters=0"),
    (lambda: tail_prune(np.ones((2, 3), bool), 0), "keep=0"),
    (lambda: k_spacing(np.ones((2, 3), bool), 0), "every=0"),
])
def test_bad_crisp_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
