"""The MaxSim re-ranking kernel (Pallas, interpret mode on CPU) against its jnp twin and a
float64 NumPy MaxSim, on awkward sizes with ties, missing candidates and int8 token storage."""
import numpy as np
import pytest

import jax.numpy as jnp

from embedjax.kernels.maxsim import maxsim_rerank, quantize_tokens_int8

Q, LQ, C, N, LD, D = 3, 5, 7, 20, 9, 12


def _inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(Q, LQ, D)).astype(np.float32)
    qm = rng.random((Q, LQ)) < 0.8
    qm[:, 0] = True
    x = rng.normal(size=(N, LD, D)).astype(np.float32)
    xm = rng.random((N, LD)) < 0.7
    xm[:, 0] = True
    x[11], xm[11] = x[4], xm[4]  # documents 4 and 11 are identical: a tie, 4 must come first
    cand = np.stack([rng.choice(N, C, replace=False) for _ in range(Q)]).astype(np.int32)
    cand[:, 0], cand[:, 1] = 11, 4
    cand[2, 3] = -1  # a missing candidate is never returned
    return q, qm, cand, x, xm


def _np_scores(q, qm, cand, x, xm, scales=None):
    xf = x.astype(np.float64) * (1.0 if scales is None else scales[..., None])
    out = np.full(cand.shape, -np.inf)
    for i in range(cand.shape[0]):
        for j, c in enumerate(cand[i]):
            if c < 0:
                continue
            sims = q[i].astype(np.float64) @ xf[c].T
            sims[:, ~xm[c]] = -np.inf
            out[i, j] = sims.max(1)[qm[i]].sum()
    return out


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_kernel_equals_twin_and_float64(storage):
    q, qm, cand, x, xm = _inputs(0)
    scales = None
    if storage == "int8":
        x, scales = (np.asarray(a) for a in quantize_tokens_int8(x))
    k = 5
    s_p, i_p = maxsim_rerank(q, qm, cand, x, xm, k, impl="pallas", doc_scales=scales)
    s_x, i_x = maxsim_rerank(q, qm, cand, x, xm, k, impl="xla", doc_scales=scales)
    np.testing.assert_array_equal(np.asarray(i_p), np.asarray(i_x))
    np.testing.assert_allclose(np.asarray(s_p), np.asarray(s_x), rtol=1e-5, atol=1e-5)
    want = _np_scores(q, qm, cand, x, xm, scales)
    order = [sorted(range(C), key=lambda j: (-want[i, j], cand[i, j]))[:k] for i in range(Q)]
    np.testing.assert_array_equal(np.asarray(i_x), np.take_along_axis(cand, np.asarray(order), 1))
    np.testing.assert_allclose(np.asarray(s_x), np.take_along_axis(want, np.asarray(order), 1), rtol=1e-5, atol=1e-5)
    assert -1 not in np.asarray(i_x)
    for row in np.asarray(i_x):  # the tie: 4 before 11 wherever both are kept
        if 4 in row and 11 in row:
            assert list(row).index(4) < list(row).index(11)


def test_int8_tokens_stay_close_to_float():
    q, qm, cand, x, xm = _inputs(1)
    codes, scales = quantize_tokens_int8(x)
    s_f, _ = maxsim_rerank(q, qm, cand, x, xm, C - 1, impl="xla")
    s_q, _ = maxsim_rerank(q, qm, cand, codes, xm, C - 1, impl="xla", doc_scales=scales)
    assert float(jnp.max(jnp.abs(s_f - s_q))) < 0.05 * float(jnp.max(jnp.abs(s_f)))


def test_more_k_than_real_candidates_gives_missing_ids():
    q, qm, cand, x, xm = _inputs(2)
    cand[0, 2:] = -1
    s, i = maxsim_rerank(q, qm, cand, x, xm, 4, impl="pallas")
    assert np.asarray(i)[0, 2:].tolist() == [-1, -1] and np.isneginf(np.asarray(s)[0, 2:]).all()


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(qm=a["qm"][:, :2]), "q_mask must have shape"),
    (lambda a: a.update(xm=a["xm"][:, :2]), "doc_mask must have shape"),
    (lambda a: a.update(x=a["x"][..., :4]), "doc_tokens must be"),
    (lambda a: a.update(x=a["x"].astype(np.int8)), "int8 doc_tokens need doc_scales"),
])
def test_bad_rerank_inputs_are_named(change, match):
    q, qm, cand, x, xm = _inputs(3)
    a = dict(q=q, qm=qm, cand=cand, x=x, xm=xm)
    change(a)
    with pytest.raises(ValueError, match=match):
        maxsim_rerank(a["q"], a["qm"], a["cand"], a["x"], a["xm"], 3, impl="xla")
