"""InfoNCE in row stripes (`embedjax.losses.stripes`): gradients formed in the scoring pass.

The stripes' own VJP (each row's softmax over its candidates less its softmax over its positives,
pulled back to the queries, every gathered key and the scale; the key gradients summed over the
devices and scattered back) must equal autodiff of the dense `contrastive.infonce`: value and
gradients for queries, documents, hard negatives and the temperature, on 8 devices and on 1, with
stripes that do not divide the local rows, several positives per query (shared group ids),
duplicate documents and hard negatives that are a query's own document (left out), cosine
Matryoshka prefixes. float32 sums of at most ~100 terms: 2e-5 relative, 1e-6 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses import contrastive, stripes

TOL = dict(rtol=2e-5, atol=1e-6)


def _inputs(batch, dim, k, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim)).astype(np.float32)
    d = rng.normal(size=(batch, dim)).astype(np.float32)
    h = rng.normal(size=(batch, k, dim)).astype(np.float32) if k else None
    return q, d, h


def _ids(batch, k, seed):
    """Groups of 1-3 pairs (several positives), a few duplicate documents across groups, and hard
    negatives some of which are their own query's document."""
    rng = np.random.default_rng(seed)
    group = np.sort(rng.integers(0, max(2, batch * 2 // 3), batch)).astype(np.int32)
    doc = np.arange(batch, dtype=np.int32)
    doc[rng.choice(batch, size=batch // 5, replace=False)] = 0  # duplicates of document 0
    hnid = rng.integers(batch, 2 * batch, (batch, k)).astype(np.int32) if k else None
    if k:
        hnid[::3, 0] = doc[::3]  # a hard negative that is the query's own document: left out
    return dict(group_ids_b=group, doc_ids_b=doc, hard_negative_ids_bk=hnid)


def _value_and_grads(loss, q, d, h, temperature):
    """Loss and d/d(q, d, [h,] temperature) of ``loss(q, d, h, temperature)``, jitted."""
    if h is None:
        return jax.jit(jax.value_and_grad(lambda q, d, t: loss(q, d, None, t), argnums=(0, 1, 2)))(q, d, temperature)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, d, h, temperature)


CASES = [  # devices, batch, hard negatives per pair, row block, ids, similarity, Matryoshka prefixes
    (8, 24, 3, 2, False, "dot", None),
    (1, 13, 0, 4, False, "dot", None),
    (8, 40, 2, 3, True, "cos", (3, 5)),
    (1, 17, 1, 5, True, "cos", None),
    (8, 16, 0, 64, True, "dot", (2, 5)),
    (8, 24, 2, 5, False, "cos", (3, 5)),
]


@pytest.mark.parametrize("devices,batch,k,row_block,with_ids,similarity,dims", CASES)
def test_stripes_equal_the_dense_loss_in_value_and_gradients(devices, batch, k, row_block, with_ids, similarity,
                                                             dims):
    mesh = jax.make_mesh((devices,), ("data",))
    q, d, h = _inputs(batch, 5, k, seed=batch + k)
    ids = _ids(batch, k, seed=batch) if with_ids else {}
    options = dict(similarity=similarity, matryoshka_dims=dims,
                   matryoshka_weights=None if dims is None else (0.3, 1.0), **ids)
    temperature = jnp.float32(0.3)

    def reference(q, d, h, t):
        return contrastive.infonce(q, d, temperature=t, hard_negatives_bkd=h, **options)

    def striped(q, d, h, t):
        return stripes.striped_infonce(q, d, mesh=mesh, temperature=t, hard_negatives_bkd=h, row_block=row_block,
                                       **options)

    want_loss, want = _value_and_grads(reference, q, d, h, temperature)
    loss, grads = _value_and_grads(striped, q, d, h, temperature)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, **TOL)
    assert float(jnp.abs(grads[-1])) > 0  # the temperature's gradient is checked, not vacuous
    # Without a gradient each stripe is scored once: the same value.
    np.testing.assert_allclose(jax.jit(striped)(q, d, h, temperature), want_loss, **TOL)


def test_stripes_hold_a_fraction_of_the_all_gather_logits_at_65536x768():
    from embedjax.losses import allgather

    mesh = jax.make_mesh((8,), ("data",))
    spec = jax.ShapeDtypeStruct((65_536, 768), jnp.float32)

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda q, d: allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.05))
    striped = temp_bytes(lambda q, d: stripes.striped_infonce(q, d, mesh=mesh, temperature=0.05, row_block=512))
    # Whole: [8192, 65536] float32 logits per device (2 GiB) at least; stripes: [512, 65536] (128 MiB),
    # plus the gathered keys and their gradient (192 MiB each).
    assert whole >= 8192 * 65536 * 4
    assert striped * 4 <= whole, (striped, whole)


@pytest.mark.parametrize("row_block", [0, -3, 2.5, True])
def test_a_bad_row_block_is_refused(row_block):
    mesh = jax.make_mesh((1,), ("data",))
    q, d, _ = _inputs(4, 3, 0, seed=0)
    with pytest.raises(ValueError, match="row_block must be a positive int"):
        stripes.striped_infonce(q, d, mesh=mesh, temperature=0.1, row_block=row_block)


def test_maxsim_is_refused_with_the_losses_that_take_it():
    mesh = jax.make_mesh((1,), ("data",))
    q, d, _ = _inputs(4, 3, 0, seed=0)
    with pytest.raises(ValueError, match="similarity must be one of"):
        stripes.striped_infonce(q, d, mesh=mesh, temperature=0.1, similarity="maxsim")


def test_bfloat16_inputs_get_bfloat16_gradients_equal_to_the_dense_ones():
    """Scores in float32 either way; the cotangents come back in the inputs' dtype (one bfloat16
    rounding of the same float32 gradient: equal up to one bfloat16 ulp)."""
    mesh = jax.make_mesh((8,), ("data",))
    q, d, h = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(16, 8, 2, seed=5))
    loss = lambda fn: jax.grad(fn, argnums=(0, 1, 2))(q, d, h)  # noqa: E731
    got = loss(lambda q, d, h: stripes.striped_infonce(q, d, mesh=mesh, temperature=0.5, hard_negatives_bkd=h,
                                                         row_block=3))
    want = loss(lambda q, d, h: contrastive.infonce(q, d, temperature=0.5, hard_negatives_bkd=h))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-2, atol=1e-3)
