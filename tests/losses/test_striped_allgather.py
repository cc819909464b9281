"""All-gather InfoNCE in row stripes with the gradients formed in the forward pass (``row_block``).

The stripes' own VJP (softmax less the positive's one-hot, pulled back to the queries, to every
gathered key and to the scale, then the key gradients summed over the devices and scattered back)
must equal autodiff of the dense loss: value and gradients for queries, documents, hard negatives
and the temperature, on 8 devices and on 1, with stripes that do not divide the local rows.
float32 sums of at most ~100 terms: 2e-5 relative, 1e-6 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses import allgather, contrastive

TOL = dict(rtol=2e-5, atol=1e-6)


def _inputs(batch, dim, k, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim)).astype(np.float32)
    d = rng.normal(size=(batch, dim)).astype(np.float32)
    h = rng.normal(size=(batch, k, dim)).astype(np.float32) if k else None
    return q, d, h


def _value_and_grads(loss, q, d, h, temperature):
    """Loss and d/d(q, d, h, temperature) of ``loss(q, d, h, temperature)``, jitted."""
    argnums = (0, 1, 2, 3) if h is not None else (0, 1, 3)
    fn = (lambda q, d, h, t: loss(q, d, h, t)) if h is not None else (lambda q, d, t: loss(q, d, None, t))
    args = (q, d, h, temperature) if h is not None else (q, d, temperature)
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("devices,batch,k,row_block", [(8, 24, 3, 2), (1, 13, 0, 4), (8, 40, 1, 64), (1, 7, 2, 1)])
def test_striped_value_and_gradients_equal_the_dense_loss(devices, batch, k, row_block):
    mesh = jax.make_mesh((devices,), ("data",))
    q, d, h = _inputs(batch, 5, k, seed=batch + k)
    temperature = jnp.float32(0.3)

    def dense(q, d, h, t):
        return contrastive.infonce(q, d, temperature=t, hard_negatives_bkd=h)

    def striped(q, d, h, t):
        return allgather.allgather_infonce(q, d, mesh=mesh, temperature=t, hard_negatives_bkd=h, row_block=row_block)

    want_loss, want = _value_and_grads(dense, q, d, h, temperature)
    loss, grads = _value_and_grads(striped, q, d, h, temperature)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, **TOL)
    # Without a gradient each stripe is scored once: the same value.
    np.testing.assert_allclose(jax.jit(striped)(q, d, h, temperature), want_loss, **TOL)


def test_stripes_hold_a_fraction_of_the_all_gather_logits_at_65536x768():
    mesh = jax.make_mesh((8,), ("data",))
    spec = jax.ShapeDtypeStruct((65_536, 768), jnp.float32)

    def temp_bytes(row_block):
        loss = lambda q, d: allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.05, row_block=row_block)  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, striped = temp_bytes(None), temp_bytes(512)
    # Whole: [8192, 65536] float32 logits per device (2 GiB) at least; stripes: [512, 65536] (128 MiB),
    # plus the gathered keys and their gradient (192 MiB each).
    assert whole >= 8192 * 65536 * 4
    assert striped * 4 <= whole, (striped, whole)


@pytest.mark.parametrize("row_block", [0, -3, 2.5, True])
def test_a_bad_row_block_is_refused(row_block):
    mesh = jax.make_mesh((1,), ("data",))
    q, d, _ = _inputs(4, 3, 0, seed=0)
    with pytest.raises(ValueError, match="row_block must be a positive int"):
        allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.1, row_block=row_block)
