"""Compiled memory of loss + gradient: ring vs all-gather, at the issue's size (compile only)."""
import jax
import jax.numpy as jnp
import numpy as np

from embedjax.losses import allgather, contrastive, ring


def _temp_bytes(loss_fn, batch, dim):
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_temp_memory_is_at_most_one_sixteenth_of_allgather_at_65536x768():
    mesh = jax.make_mesh((8,), ("data",))
    batch, dim = 65_536, 768
    ring_bytes = _temp_bytes(lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.05), batch, dim)
    gather_bytes = _temp_bytes(lambda q, d: allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.05),
                               batch, dim)
    # The all-gather version holds [8192, 65536] float32 logits per device (2 GiB) at least.
    assert gather_bytes >= 8192 * 65536 * 4
    assert ring_bytes * 16 <= gather_bytes, (ring_bytes, gather_bytes)


def test_allgather_baseline_equals_dense():
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    h = rng.normal(size=(16, 3, 8)).astype(np.float32)
    expected = contrastive.infonce(q, d, temperature=0.7, hard_negatives_bkd=h)
    actual = allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.7, hard_negatives_bkd=h)
    np.testing.assert_allclose(float(actual), float(expected), rtol=1e-5)
