"""MUVERA FDE: the reference implementation's semantics, the paper's properties, bad input."""
import numpy as np
import pytest

import jax.numpy as jnp

import embedjax as ej
from embedjax.multivector import muvera as fde_mod
from multivector_data import clustered as _clustered  # sibling helper


def _tokens(rng, b, l, d, p_mask=0.3):
    x = rng.standard_normal((b, l, d)).astype(np.float32)
    mask = rng.random((b, l)) > p_mask
    mask[:, 0] = True
    return x, mask


def _reference(points_ld, kind, *, seed, reps, k_sim, d_proj, fill_empty, final_dim=None):
    """Line-by-line NumPy transcription of graph-mining's fixed_dimensional_encoding.cc loops
    (Gray-code partition append, DistanceToSimHashPartition via num ^ (num >> 1), strict < scan),
    with this library's random matrices."""
    dim = points_ld.shape[1]
    proj_dim = dim if d_proj is None else d_proj
    parts = 2 ** k_sim
    out = np.zeros(reps * parts * proj_dim, np.float64)
    for rep in range(reps):
        g_dk, s_dp = (np.asarray(m, np.float64) if m is not None else None
                      for m in fde_mod.repetition_matrices(seed, rep, dim, k_sim, d_proj))
        sketch = points_ld.astype(np.float64) @ g_dk
        projected = points_ld.astype(np.float64) if s_dp is None else points_ld.astype(np.float64) @ s_dp
        sizes = np.zeros(parts)
        for i in range(len(points_ld)):
            g = 0
            for j in range(k_sim):
                g = (g << 1) + (int(sketch[i, j] > 0) ^ (g & 1))
            base = rep * parts * proj_dim + g * proj_dim
            out[base:base + proj_dim] += projected[i]
            sizes[g] += 1
        if kind == "query":
            continue
        for p in range(parts):
            base = rep * parts * proj_dim + p * proj_dim
            if sizes[p] == 0 and k_sim > 0:
                if fill_empty:
                    best, best_dist = -1, np.iinfo(np.uint32).max
                    for i in range(len(points_ld)):
                        binary, dist = p ^ (p >> 1), 0
                        for j in range(k_sim - 1, -1, -1):
                            dist += int(int(sketch[i, j] > 0) != (binary & 1))
                            binary >>= 1
                        if dist < best_dist:
                            best, best_dist = i, dist
                    out[base:base + proj_dim] = projected[best]
                continue
            out[base:base + proj_dim] /= sizes[p]
    if final_dim is not None:
        cols, signs = (np.asarray(a) for a in fde_mod.final_projection(seed, len(out), final_dim))
        folded = np.zeros(final_dim)
        np.add.at(folded, cols, signs * out)
        out = folded
    return out


@pytest.mark.parametrize("kind", ["query", "document"])
@pytest.mark.parametrize("k_sim,d_proj,final_dim", [(3, None, None), (4, 5, None), (2, 7, 50)])
def test_fde_matches_a_transcription_of_the_reference_loops(kind, k_sim, d_proj, final_dim):
    rng = np.random.default_rng(k_sim)
    x, mask = _tokens(rng, 5, 9, 6)  # few tokens, many partitions: several empty ones to fill
    got = np.asarray(ej.multivector.fde(x, mask, kind=kind, reps=3, k_sim=k_sim, d_proj=d_proj,
                                        final_dim=final_dim, seed=7))
    assert got.shape == (5, ej.multivector.fde_dim(6, reps=3, k_sim=k_sim, d_proj=d_proj, final_dim=final_dim))
    for b in range(5):
        want = _reference(x[b][mask[b]], kind, seed=7, reps=3, k_sim=k_sim, d_proj=d_proj, fill_empty=True,
                          final_dim=final_dim)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)  # float32 sums of <= 9 terms


def test_partition_ids_are_the_reference_gray_code():
    # bits (projection 0 first) -> id: 00->0, 01->1, 11->2, 10->3 (reflected Gray code order).
    bits = jnp.asarray([[[0, 0], [0, 1], [1, 1], [1, 0]]], bool)
    assert fde_mod.gray_partition(bits).tolist() == [[0, 1, 2, 3]]
    np.testing.assert_array_equal(np.asarray(fde_mod.partition_bits(2)), [[0, 0], [0, 1], [1, 1], [1, 0]])


def test_empty_partition_fill_ties_go_to_the_lowest_token_index():
    # Two identical tokens: every partition's nearest token is a tie; the first one must win.
    rng = np.random.default_rng(0)
    t = rng.standard_normal((1, 1, 8)).astype(np.float32)
    x = np.concatenate([t, t, 2 * t], axis=1)  # token 2 has the same signs, a different value
    mask = np.ones((1, 3), bool)
    doc = np.asarray(ej.multivector.fde(x, mask, kind="document", reps=1, k_sim=3, seed=1)).reshape(8, 8)
    filled = ~np.isclose(doc, np.mean(x[0], axis=0)).all(axis=1)
    assert filled.sum() == 7  # one partition holds all three tokens (their mean), seven are filled
    np.testing.assert_allclose(doc[filled], np.broadcast_to(x[0, 0], (7, 8)))


def test_k_sim_zero_query_is_the_token_sum_and_document_the_mean():
    rng = np.random.default_rng(1)
    x, mask = _tokens(rng, 4, 11, 10)
    m = mask[..., None]
    q = ej.multivector.fde(x, mask, kind="query", reps=1, k_sim=0)
    d = ej.multivector.fde(x, mask, kind="document", reps=1, k_sim=0)
    np.testing.assert_allclose(q, (x * m).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, (x * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)
    # With an inner projection, the same holds for the projected tokens (projection is linear).
    _, s_dp = fde_mod.repetition_matrices(0, 0, 10, 0, 4)
    qp = ej.multivector.fde(x, mask, kind="query", reps=1, k_sim=0, d_proj=4)
    np.testing.assert_allclose(qp, (x * m).sum(1) @ np.asarray(s_dp), rtol=1e-5, atol=1e-5)


def test_query_fde_is_additive_over_disjoint_token_sets():
    rng = np.random.default_rng(2)
    x, mask = _tokens(rng, 3, 13, 16, p_mask=0.0)
    part_a = rng.random((3, 13)) < 0.5
    kw = dict(kind="query", reps=4, k_sim=3, d_proj=8, final_dim=100, seed=3)
    whole = np.asarray(ej.multivector.fde(x, mask, **kw))
    split = np.asarray(ej.multivector.fde(x, part_a, **kw)) + np.asarray(ej.multivector.fde(x, ~part_a, **kw))
    np.testing.assert_allclose(whole, split, rtol=1e-5, atol=1e-5)


def test_fde_top10_holds_the_chamfer_top1_on_clustered_data():
    """MUVERA's property at (reps, k_sim, d_proj) = (20, 5, 16): 1,000 documents, 100 queries."""
    rng = np.random.default_rng(3)
    q, d = _clustered(rng, 1000, 100)
    qm, dm = np.ones(q.shape[:2], bool), np.ones(d.shape[:2], bool)
    chamfer = np.asarray(ej.multivector.maxsim(q, qm, d, dm))  # [100, 1000]
    kw = dict(reps=20, k_sim=5, d_proj=16, seed=0)
    fq = np.asarray(ej.multivector.fde(q, qm, kind="query", **kw))
    fd = np.asarray(ej.multivector.fde(d, dm, kind="document", **kw))
    approx = fq @ fd.T / kw["reps"]  # one Chamfer estimate per repetition: compare FDE / reps
    top10 = np.argsort(-approx, axis=1)[:, :10]
    hit = np.mean([chamfer[i].argmax() in top10[i] for i in range(len(q))])
    assert hit >= 0.95, hit
    # FDE / reps is on Chamfer's scale and tracks it over all pairs; the raw score is reps times off.
    corr = np.corrcoef(approx.ravel(), chamfer.ravel())[0, 1]
    ratio = np.median(approx[np.arange(100), chamfer.argmax(1)] / chamfer.max(1))
    # Measured at seed 3: corr 0.76, ratio 0.46 (a partition's centroid scores below its best
    # token, so FDE / reps underestimates Chamfer); without the / reps the ratio would be ~9.
    assert corr > 0.7, corr
    assert 0.3 < ratio < 1.1, ratio


@pytest.mark.parametrize("bad,match", [
    (dict(mask_bl=np.ones((2, 4), bool)), "mask_bl must have shape"),
    (dict(k_sim=31), "k_sim=31"),
    (dict(kind="passage"), "kind must be one of"),
    (dict(reps=0), "reps=0"),
    (dict(d_proj=0), "d_proj=0"),
])
def test_bad_fde_arguments_are_named(bad, match):
    args = dict(tokens_bld=np.zeros((2, 5, 4), np.float32), mask_bl=np.ones((2, 5), bool), kind="query",
                reps=1, k_sim=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ej.multivector.fde(args.pop("tokens_bld"), args.pop("mask_bl"), **args)
