"""CoSENT / AnglE / triplet, distillation losses and the Matryoshka wrappers against
float64 NumPy formulas (and sentence-transformers' AnglE similarity)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses import contrastive, distill, matryoshka, pairwise

RNG = np.random.default_rng(0)
A = RNG.normal(size=(7, 10)).astype(np.float32)
Bv = (A + RNG.normal(size=(7, 10))).astype(np.float32)
SCORES = np.array([0.1, 0.9, 0.5, 0.5, 0.3, 1.0, 0.0], np.float32)  # includes a tie (not an ordered pair)


def _np_ranked(sims, scores, scale):
    terms = [scale * (sims[j] - sims[i]) for i in range(len(sims)) for j in range(len(sims)) if scores[i] > scores[j]]
    return np.log1p(np.sum(np.exp(terms)))


def test_cosent_matches_formula():
    a, b = A.astype(np.float64), Bv.astype(np.float64)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(float(pairwise.cosent(A, Bv, SCORES)), _np_ranked(cos, SCORES, 20.0), rtol=1e-5)


def test_angle_similarity_matches_sentence_transformers():
    import torch
    from sentence_transformers import util

    expected = util.pairwise_angle_sim(torch.tensor(A, dtype=torch.float64), torch.tensor(Bv, dtype=torch.float64))
    np.testing.assert_allclose(np.asarray(pairwise.angle_similarity(A, Bv)), expected.numpy(), rtol=1e-4)
    np.testing.assert_allclose(float(pairwise.angle(A, Bv, SCORES)),
                               _np_ranked(expected.numpy(), SCORES, 20.0), rtol=1e-4)
    with pytest.raises(ValueError, match="even embedding dim"):
        pairwise.angle(A[:, :9], Bv[:, :9], SCORES)


def test_triplet_matches_formula():
    n = (A + np.random.default_rng(5).normal(size=A.shape)).astype(np.float32)
    dist = lambda x, y: np.linalg.norm(x.astype(np.float64) - y, axis=1)  # noqa: E731
    hinge = dist(A, Bv) - dist(A, n) + 0.1
    assert np.any(hinge > 0) and np.any(hinge < 0)   # some triplets active, some not
    np.testing.assert_allclose(float(pairwise.triplet(A, Bv, n, margin=0.1)), np.mean(np.maximum(hinge, 0)), rtol=1e-5)


def test_distillation_losses_match_formulas():
    a, b = A.astype(np.float64), Bv.astype(np.float64)
    np.testing.assert_allclose(float(distill.embedding_alignment(A, Bv)), np.mean((a - b) ** 2), rtol=1e-5)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(float(distill.embedding_alignment(A, Bv, metric="cosine")), np.mean(1 - cos), rtol=1e-5)
    s, t = a @ b.T, (a + 0.3) @ b.T
    log_softmax = lambda x: x - np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1, keepdims=True)) - x.max(1, keepdims=True)  # noqa: E731
    p_t = np.exp(log_softmax(t / 2.0))
    expected_kl = np.mean(np.sum(p_t * (log_softmax(t / 2.0) - log_softmax(s)), 1))
    np.testing.assert_allclose(float(distill.score_kl(s.astype(np.float32), t.astype(np.float32), teacher_temperature=2.0)),
                               expected_kl, rtol=1e-4)
    neg = RNG.normal(size=A.shape).astype(np.float32)
    margin = RNG.normal(size=7).astype(np.float32)
    expected = np.mean((np.sum(a * b, 1) - np.sum(a * neg, 1) - margin) ** 2)
    np.testing.assert_allclose(float(distill.margin_mse(A, Bv, neg, margin)), expected, rtol=1e-5)
    # The teacher side carries no gradient.
    assert float(jnp.abs(jax.grad(lambda t: distill.embedding_alignment(A, t))(Bv)).sum()) == 0.0


def test_matryoshka_wrapper_equals_fused_prefixes():
    h = RNG.normal(size=(7, 2, 10)).astype(np.float32)
    fused = contrastive.infonce(A, Bv, temperature=0.1, hard_negatives_bkd=h, similarity="cos",
                                matryoshka_dims=(3, 6, 10), matryoshka_weights=(1.0, 0.5, 0.25))
    wrapped = matryoshka.matryoshka_loss(contrastive.infonce, (3, 6, 10), (1.0, 0.5, 0.25), normalize=True)
    np.testing.assert_allclose(float(wrapped(A, Bv, temperature=0.1, hard_negatives_bkd=h)), float(fused), rtol=1e-5)
    manual = sum(w * float(contrastive.infonce(A[:, :k], Bv[:, :k], temperature=0.1, hard_negatives_bkd=h[..., :k],
                                               similarity="cos")) for k, w in ((3, 1.0), (6, 0.5), (10, 0.25)))
    np.testing.assert_allclose(float(fused), manual, rtol=1e-5)


def test_starbucks_sums_every_layer_dim_pair():
    layers = [(RNG.normal(size=(7, 10)).astype(np.float32), RNG.normal(size=(7, 10)).astype(np.float32))
              for _ in range(3)]
    pairs = [(0, 2), (1, 4), (2, 10)]
    loss = matryoshka.starbucks_loss(pairwise.cosent, pairs)(layers, scores_b=SCORES)
    manual = sum(float(pairwise.cosent(layers[l][0][:, :k], layers[l][1][:, :k], SCORES)) for l, k in pairs)
    np.testing.assert_allclose(float(loss), manual, rtol=1e-5)
    with pytest.raises(ValueError, match="layer out of range"):
        matryoshka.starbucks_loss(pairwise.cosent, [(5, 2)])(layers, scores_b=SCORES)
