"""Each pooler against a hand computation on a padded batch; padding must never leak."""
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.models import poolers

# Batch of 2, length 4, dim 2. Row 0 has 3 real tokens (right padding); row 1 has 2 real
# tokens (left padding). Padding states are huge so any leak changes the result visibly.
H = np.array([
    [[1.0, 2.0], [3.0, -4.0], [5.0, 0.0], [1e6, 1e6]],
    [[1e6, -1e6], [1e6, 1e6], [2.0, 8.0], [-6.0, 4.0]],
], dtype=np.float32)
M = np.array([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=np.int32)


@pytest.mark.parametrize("method,expected", [
    ("cls", [[1.0, 2.0], [1e6, -1e6]]),                               # position 0, whatever the mask
    ("mean", [[3.0, -2.0 / 3.0], [-2.0, 6.0]]),                       # (1+3+5)/3, (2-4+0)/3 ; (2-6)/2, (8+4)/2
    ("max", [[5.0, 2.0], [2.0, 8.0]]),
    ("lasttoken", [[5.0, 0.0], [-6.0, 4.0]]),
    ("weightedmean", [[(1 + 6 + 15) / 6, (2 - 8 + 0) / 6], [(2 - 12) / 3, (8 + 8) / 3]]),  # weights 1,2,3 ; 1,2
    ("mean_sqrt_len", [[9 / np.sqrt(3), -2 / np.sqrt(3)], [-4 / np.sqrt(2), 12 / np.sqrt(2)]]),
])
def test_pooler_matches_hand_computation(method, expected):
    got = np.asarray(poolers.pool(jnp.asarray(H), jnp.asarray(M), method))
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-6)


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pooling 'avg'.*mean"):
        poolers.pool(jnp.asarray(H), jnp.asarray(M), "avg")


def test_select_layers_last_one_and_mean():
    states = tuple(jnp.full((1, 2, 3), float(i)) for i in range(4))
    assert float(poolers.select_layers(states, None)[0, 0, 0]) == 3.0
    assert float(poolers.select_layers(states, 1)[0, 0, 0]) == 1.0
    assert float(poolers.select_layers(states, -2)[0, 0, 0]) == 2.0
    assert float(poolers.select_layers(states, [1, 3])[0, 0, 0]) == 2.0
    with pytest.raises(ValueError, match="empty"):
        poolers.select_layers(states, [])


def test_l2_normalize_keeps_zero_rows_finite():
    out = np.asarray(poolers.l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
