"""DLRM pieces and CTR metrics against NumPy / scikit-learn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from embedjax.ctr import metrics
from embedjax.ctr.model import DLRM, pairwise_dots


def test_pairwise_dots_are_the_upper_triangle_of_the_gram_matrix():
    v = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
    got = np.asarray(pairwise_dots(jnp.asarray(v)))
    expected = [[v[b, i] @ v[b, j] for i in range(5) for j in range(i + 1, 5)] for b in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dlrm_reads_dense_features_through_the_bottom_mlp():
    model = DLRM(top_mlp=(8,), bottom_mlp=(4,))
    emb = jnp.ones((2, 3, 6))
    params = model.init(jax.random.PRNGKey(0), emb, jnp.ones((2, 13)))["params"]
    assert params["bottom_out"]["kernel"].shape == (4, 6)
    # 4 vectors of 6: 24 flattened values + 6 dots
    assert params["top_0"]["kernel"].shape == (24 + 6, 8)
    out = model.apply({"params": params}, emb, jnp.arange(26.0).reshape(2, 13))
    assert out.shape == (2,) and float(out[0]) != float(out[1])
    no_dense = DLRM(top_mlp=(8,)).init(jax.random.PRNGKey(0), emb, jnp.ones((2, 0)))["params"]
    assert "bottom_out" not in no_dense and no_dense["top_0"]["kernel"].shape == (18 + 3, 8)


def test_auc_and_log_loss_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = (rng.random(301) < 0.3).astype(int)
    p = np.round(rng.random(301), 2)  # ties
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert metrics.log_loss(y, p) == pytest.approx(sk_log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-9)
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auc(np.asarray([0, 2]), np.ones(2))
