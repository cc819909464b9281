"""Residual (recurrent) binarisation: greedy planes and the trained Flax head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.kernels import residual_bits_score
from embedjax.quant import fit_residual_weights, residual_binarize, residual_decode
from embedjax.quant.residual_head import (
    decode_codes_reconstruction, encode_codes, project_queries, ste_sign, train_residual_binarizer,
)


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 48)).astype(np.float32) * rng.uniform(0.2, 1.5, 48).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_greedy_planes_match_numpy(emb):
    w = np.asarray(fit_residual_weights(emb, 3))
    r, ref_w, ref_signs = emb.astype(np.float64), [], []
    for _ in range(3):
        s = np.where(r > 0, 1.0, -1.0)
        ref_w.append(np.abs(r).mean())
        ref_signs.append(s)
        r = r - ref_w[-1] * s
    np.testing.assert_allclose(w, ref_w, rtol=1e-4)
    codes = residual_binarize(emb, w)
    assert codes.shape == (600, 3, 2) and codes.dtype == jnp.uint32
    recon = np.asarray(residual_decode(codes, w, 48))
    np.testing.assert_allclose(recon, sum(wi * s for wi, s in zip(w, ref_signs)), atol=1e-5)


def test_more_planes_reconstruct_better(emb):
    errors = []
    for planes in (1, 2, 4):
        w = fit_residual_weights(emb, planes)
        errors.append(float(np.mean((np.asarray(residual_decode(residual_binarize(emb, w), w, 48)) - emb) ** 2)))
    assert errors[0] > errors[1] > errors[2]


def test_ste_sign_forward_and_gradient():
    x = jnp.array([-2.0, -0.5, 0.0, 0.3, 4.0])
    np.testing.assert_array_equal(ste_sign(x), [-1, -1, -1, 1, 1])
    np.testing.assert_array_equal(jax.grad(lambda v: ste_sign(v).sum())(x), [0, 1, 1, 1, 0])


def test_trained_head_codes_score_as_their_reconstruction(emb):
    trained = train_residual_binarizer(emb, 2, steps=30, batch_size=128)
    q = emb[:5] + 0.1
    codes = encode_codes(trained, emb)
    assert codes.shape == (600, 2, 2) and codes.dtype == jnp.uint32
    # <q, x_hat> computed from the packed codes with projected queries equals the
    # inner product with the head's own reconstruction.
    scores = np.asarray(residual_bits_score(project_queries(trained, q), codes, dim=48))
    recon = np.asarray(decode_codes_reconstruction(trained, emb))
    np.testing.assert_allclose(scores, q @ recon.T, atol=1e-4)


def test_training_improves_reconstruction_of_neighbours(emb):
    init = train_residual_binarizer(emb, 2, steps=0)
    trained = train_residual_binarizer(emb, 2, steps=150, batch_size=256, learning_rate=3e-5, kl_weight=0.0)
    err = lambda t: float(np.mean(np.sum((np.asarray(decode_codes_reconstruction(t, emb)) - emb) ** 2, 1)))
    assert err(trained) < 0.95 * err(init)


def test_bad_inputs(emb):
    with pytest.raises(ValueError, match="planes"):
        fit_residual_weights(emb, 0)
    with pytest.raises(ValueError, match="N >= 4"):
        train_residual_binarizer(emb[:2], 2)
