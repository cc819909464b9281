"""MaxSim (late-interaction) InfoNCE: ring = dense = a float64 NumPy formula, in value and
gradients, with hard negatives and token masks on 8 fake devices; GradCache composes with it.

Awkward sizes: global batch 24 on 8 devices (3 rows each) with tile 2 (padding rows are
exercised), query / document / hard-negative token counts 5 / 7 / 6, dim 12, 2 hard negatives.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax as ej
from embedjax.losses import gradcache

B, LQ, LD, LH, D, K, TILE = 24, 5, 7, 6, 12, 2, 2
RTOL = 1e-5  # float32 sums in a different order (tiles, online log-sum-exp): a few ulp


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _mask(rng, shape):
    m = rng.random(shape) < 0.7
    m[..., 0] = True  # every row keeps a token
    return m


def make_inputs(seed):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(B, LQ, D)))
    d = _unit(q[:, rng.integers(0, LQ, LD)] + 0.7 * rng.normal(size=(B, LD, D)))
    h = _unit(q[:, None, rng.integers(0, LQ, LH)] + 1.2 * rng.normal(size=(B, K, LH, D)))
    arrays = dict(q_bd=q.astype(np.float32), d_bd=d.astype(np.float32), hard_negatives_bkd=h.astype(np.float32))
    masks = dict(q_mask_bl=_mask(rng, (B, LQ)), d_mask_bl=_mask(rng, (B, LD)),
                 hard_negatives_mask_bkl=_mask(rng, (B, K, LH)))
    return arrays, masks


def np_maxsim(q, qm, d, dm):
    sims = np.einsum("iad,jbd->ijab", np.asarray(q, np.float64), np.asarray(d, np.float64))
    sims = np.where(dm[None, :, None, :], sims, -np.inf)
    best = sims.max(-1)
    return np.where(qm[:, None, :], best, 0.0).sum(-1)


def np_lse(x):
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def np_infonce(a, m, temperature, bidirectional=False):
    s_qd = np_maxsim(a["q_bd"], m["q_mask_bl"], a["d_bd"], m["d_mask_bl"])
    h = a["hard_negatives_bkd"].reshape(-1, LH, D)
    s_qh = np_maxsim(a["q_bd"], m["q_mask_bl"], h, m["hard_negatives_mask_bkl"].reshape(-1, LH))
    diag = np.diag(s_qd)
    loss = np.mean(np_lse(np.concatenate([s_qd, s_qh], 1) / temperature) - diag / temperature)
    if bidirectional:
        loss = 0.5 * (loss + np.mean(np_lse(s_qd.T / temperature) - diag / temperature))
    return loss


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def _value_and_grads(loss_fn, arrays, masks, **options):
    def f(a, t):
        return loss_fn(**a, **masks, temperature=t, similarity="maxsim", **options)

    # Under jit: one compile of the whole loss (eagerly, every op of the tiled loops compiles on its own).
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))({k: jnp.asarray(v) for k, v in arrays.items()},
                                                          jnp.float32(0.1))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_ring_equals_dense_equals_float64(mesh, bidirectional):
    arrays, masks = make_inputs(0)
    expected = np_infonce(arrays, masks, 0.1, bidirectional)
    dense_v, (dense_g, dense_t) = _value_and_grads(ej.losses.infonce, arrays, masks, bidirectional=bidirectional)
    ring_v, (ring_g, ring_t) = _value_and_grads(
        lambda **kw: ej.losses.ring_infonce(**kw, mesh=mesh, tile=TILE), arrays, masks, bidirectional=bidirectional)
    assert abs(float(dense_v) - expected) <= RTOL * abs(expected)
    assert abs(float(ring_v) - expected) <= RTOL * abs(expected)
    for name in arrays:
        scale = float(jnp.max(jnp.abs(dense_g[name])))
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(ring_g[name]), np.asarray(dense_g[name]), rtol=0, atol=RTOL * scale,
                                   err_msg=name)
    np.testing.assert_allclose(float(ring_t), float(dense_t), rtol=RTOL, atol=RTOL * abs(expected) / 0.1)


def test_dense_gradients_match_float64_finite_differences():
    arrays, masks = make_inputs(1)
    _, (grads, _) = _value_and_grads(ej.losses.infonce, arrays, masks)
    rng = np.random.default_rng(2)
    eps = 1e-6
    for name in arrays:
        scale = float(jnp.max(jnp.abs(grads[name])))
        for flat in rng.choice(arrays[name].size, 25, replace=False):
            index = np.unravel_index(flat, arrays[name].shape)
            plus = {k: v.astype(np.float64).copy() for k, v in arrays.items()}
            minus = {k: v.copy() for k, v in plus.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric = (np_infonce(plus, masks, 0.1) - np_infonce(minus, masks, 0.1)) / (2 * eps)
            assert abs(float(grads[name][index]) - numeric) <= 1e-4 * scale, (name, index)


def test_masked_document_tokens_never_win_even_when_every_similarity_is_negative():
    """-inf for masked document tokens: the score is MaxSim over the real tokens alone.
    PyLate's 0 would score this pair 0 instead of the (negative) best real similarity."""
    q = np.array([[[1.0, 0.0]]], np.float32)
    d = np.array([[[-1.0, 0.0], [-0.6, 0.8], [0.0, 0.0]]], np.float32)  # all real sims < 0, padding last
    dm = np.array([[True, True, False]])
    score = float(ej.multivector.maxsim(q, np.ones((1, 1), bool), d, dm)[0, 0])
    assert score == pytest.approx(-0.6)
    only_real = float(ej.multivector.maxsim(q, np.ones((1, 1), bool), d[:, :2], dm[:, :2])[0, 0])
    assert score == only_real


def test_masked_query_tokens_and_padded_document_tokens_change_nothing(mesh):
    """Appending masked tokens (any values) to queries and documents leaves value and gradients."""
    arrays, masks = make_inputs(3)
    rng = np.random.default_rng(4)
    padded = dict(arrays)
    padded["q_bd"] = np.concatenate([arrays["q_bd"], rng.normal(size=(B, 3, D)).astype(np.float32)], 1)
    padded["d_bd"] = np.concatenate([arrays["d_bd"], 5 * rng.normal(size=(B, 2, D)).astype(np.float32)], 1)
    padded_masks = dict(masks, q_mask_bl=np.concatenate([masks["q_mask_bl"], np.zeros((B, 3), bool)], 1),
                        d_mask_bl=np.concatenate([masks["d_mask_bl"], np.zeros((B, 2), bool)], 1))
    v, (g, _) = _value_and_grads(ej.losses.infonce, arrays, masks)
    pv, (pg, _) = _value_and_grads(lambda **kw: ej.losses.ring_infonce(**kw, mesh=mesh, tile=TILE), padded,
                                   padded_masks)
    assert float(pv) == pytest.approx(float(v), rel=RTOL)
    np.testing.assert_allclose(np.asarray(pg["q_bd"][:, :LQ]), np.asarray(g["q_bd"]), atol=RTOL)
    assert float(jnp.max(jnp.abs(pg["q_bd"][:, LQ:]))) == 0.0
    assert float(jnp.max(jnp.abs(pg["d_bd"][:, LD:]))) == 0.0


def test_gradcache_composes_with_maxsim():
    """A token-level "encoder" (a linear map of token features): GradCache over sub-batches gives
    the loss and parameter gradients of plain autodiff over the whole batch."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(6, D)), jnp.float32)}
    batch = {"q": jnp.asarray(rng.normal(size=(B, LQ, 6)), jnp.float32),
             "d": jnp.asarray(rng.normal(size=(B, LD, 6)), jnp.float32)}
    q_mask, d_mask = _mask(rng, (B, LQ)), _mask(rng, (B, LD))

    def embed(p, chunk, _rng):
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return {"q": unit(chunk["q"] @ p["w"]), "d": unit(chunk["d"] @ p["w"])}

    def loss(e):
        return ej.losses.infonce(e["q"], e["d"], temperature=0.1, similarity="maxsim", q_mask_bl=q_mask,
                                 d_mask_bl=d_mask)

    got_v, got_g = gradcache.gradcache_value_and_grad(embed, loss, params, batch, sub_batch_size=8)
    want_v, want_g = gradcache.reference_value_and_grad(embed, loss, params, batch, sub_batch_size=8)
    assert float(got_v) == pytest.approx(float(want_v), rel=RTOL)
    np.testing.assert_allclose(np.asarray(got_g["w"]), np.asarray(want_g["w"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (lambda a, m: m.update(q_mask_bl=np.ones((B, LQ + 1), bool)), "q_mask_bl must have shape"),
    (lambda a, m: m["q_mask_bl"].__setitem__(4, False), "q_mask_bl has rows with no unmasked token"),
    (lambda a, m: m["d_mask_bl"].__setitem__(2, False), "d_mask_bl has rows with no unmasked token"),
    (lambda a, m: a.update(q_bd=a["q_bd"][:, 0]), "q_bd must have 3 dimensions"),
    (lambda a, m: a.update(hard_negatives_bkd=a["hard_negatives_bkd"][:, :, 0]), "hard_negatives_bkd must have 4"),
])
def test_bad_maxsim_inputs_are_named(mesh, change, match):
    arrays, masks = make_inputs(6)
    change(arrays, masks)
    for fn in (ej.losses.infonce, lambda **kw: ej.losses.ring_infonce(**kw, mesh=mesh)):
        with pytest.raises(ValueError, match=match):
            fn(**arrays, **masks, temperature=0.1, similarity="maxsim")


def test_token_masks_need_maxsim():
    arrays, masks = make_inputs(7)
    with pytest.raises(ValueError, match="need similarity='maxsim'"):
        ej.losses.infonce(arrays["q_bd"][:, 0], arrays["d_bd"][:, 0], temperature=0.1,
                          q_mask_bl=masks["q_mask_bl"])
