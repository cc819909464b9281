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
    x, _ = _separated(rng, b=1)
    mask = np.ones(x.shape[:2], bool)
    w = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)

    def unnormalised_sum(x_):
        # Undo the normalisation's effect by reading the centroid directions only through w.
        c, _ = cluster_tokens(x_, mask, 3, iters=3)
        return jnp.sum(c * w)

    g = np.asarray(jax.grad(unnormalised_sum)(jnp.asarray(x)))
    # Finite differences agree (assignments are stable under tiny moves; the means are smooth).
    eps = 1e-3
    for idx in [(0, 0, 1), (0, 5, 2), (0, 7, 0)]:
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (float(unnormalised_sum(jnp.asarray(plus))) - float(unnormalised_sum(jnp.asarray(minus)))) / (2 * eps)
        assert g[idx] == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert np.abs(g).sum() > 0


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
