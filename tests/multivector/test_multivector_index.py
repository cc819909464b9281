"""FDE first stage + exact MaxSim re-ranking: exact when every document is a candidate, high
recall from few candidates on clustered data, int8 storage, the int8 width limit."""
import numpy as np
import pytest

import embedjax as ej
from multivector_data import clustered  # sibling helper


@pytest.fixture(scope="module")
def data():
    q, d = clustered(np.random.default_rng(0), 300, 20)
    qm, dm = np.ones(q.shape[:2], bool), np.ones(d.shape[:2], bool)
    dm[::7, -5:] = False  # some shorter documents
    return q, qm, d, dm, np.asarray(ej.multivector.maxsim(q, qm, d, dm))


def test_all_candidates_gives_the_exact_maxsim_ranking(data):
    q, qm, d, dm, exact = data
    index = ej.multivector.MultiVectorIndex.build(d, dm, reps=4, k_sim=3, d_proj=8, quantization="float32")
    scores, ids = index.search(q, qm, 10, candidates=len(d))
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), rtol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "binary"])
def test_few_fde_candidates_recover_the_maxsim_top1(data, quantization):
    q, qm, d, dm, exact = data
    index = ej.multivector.MultiVectorIndex.build(d, dm, reps=20, k_sim=5, d_proj=16, quantization=quantization,
                                                  token_storage="int8")
    _, ids = index.search(q, qm, 1, candidates=20)
    assert np.mean(ids[:, 0] == exact.argmax(1)) >= 0.9
    sizes = index.nbytes_per_document()
    assert sizes["tokens"] < 0.3 * (dm.sum(1).mean() * d.shape[2] * 4)  # int8 tokens: ~1/4 of float32


def test_fde_too_wide_for_int8_is_an_error(data):
    _, _, d, dm, _ = data
    with pytest.raises(ValueError, match="does not fit int8 search"):
        ej.multivector.MultiVectorIndex.build(d[:4], dm[:4], reps=70, k_sim=8, d_proj=8, quantization="int8")
    ej.multivector.check_fde_fits(70 * 2**8 * 8, "float32")  # float search has no such limit


def test_empty_documents_and_queries_are_named(data):
    q, qm, d, dm, _ = data
    dm = dm.copy()
    dm[3] = False
    with pytest.raises(ValueError, match="document 3 has no unmasked token"):
        ej.multivector.MultiVectorIndex.build(d, dm, reps=2, k_sim=2, d_proj=8)
