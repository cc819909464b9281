"""The analysis metrics of ``embedjax.eval.analysis`` applied to one retrieval dataset.

``notebooks/embedding_analysis.ipynb`` is a thin layer over this module: pick a
(possibly capped) slice of a BEIR dataset (``subset``), cache its embeddings
(``save_embeddings`` / ``load_embeddings``), then ``space_metrics`` gives the geometry
of the space (RankMe, alignment on the judged pairs, uniformity, isotropy, hubness)
and ``inverted_softmax_retrieval`` the metrics after query-bank normalisation.

Shapes use the suffix convention: ``q_qd`` queries, ``d_nd`` corpus, ``bank_bd``
reference queries, ``scores_qn`` query x corpus similarities.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.eval import analysis
from embedjax.eval.metrics import retrieval_metrics, tie_order
from embedjax.eval.querybank import bank_log_partition

__all__ = [
    "subset",
    "relevance_mask",
    "positive_pairs",
    "save_embeddings",
    "load_embeddings",
    "cosine_scores",
    "corpus_neighbour_scores",
    "corpus_k_occurrence",
    "leave_one_out_log_partition",
    "inverted_softmax_retrieval",
    "space_metrics",
]


# ------------------------------------------------------------------- the slice


def _judged(qrels, qid) -> set[str]:
    return {d for d, g in qrels.get(qid, {}).items() if g > 0}


def _positive_cap(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    return value


def subset(query_ids: Sequence[str], doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]],
           max_queries: int | None = None, max_docs: int | None = None):
    """A small, still meaningful slice of a retrieval dataset.

    Keeps the first ``max_queries`` queries that have a relevant document, then fills
    the corpus with the documents relevant to those queries first (corpus order) and
    the other documents after them (corpus order), up to ``max_docs``: a random slice
    of a big corpus would hold almost no relevant document. Queries left with no
    relevant document are dropped, and qrels are cut to the kept queries and documents
    (so nDCG's ideal ranking is the best one possible inside the slice).

    Returns ``(query_ids, doc_ids, qrels)``, the ids in their original order.
    """
    max_queries = _positive_cap(max_queries, "max_queries")
    max_docs = _positive_cap(max_docs, "max_docs")
    judged = [q for q in query_ids if _judged(qrels, q)][:max_queries]
    if not judged:
        raise ValueError("no query in query_ids has a relevant (grade > 0) document in qrels; check the ids match")
    in_corpus = set(doc_ids)
    wanted = set().union(*(_judged(qrels, q) for q in judged)) & in_corpus
    ordered = [d for d in doc_ids if d in wanted] + [d for d in doc_ids if d not in wanted]
    kept = set(ordered[:max_docs])
    kept_docs = [d for d in doc_ids if d in kept]
    kept_queries = [q for q in judged if _judged(qrels, q) & kept]
    kept_qrels = {q: {d: g for d, g in qrels[q].items() if d in kept} for q in kept_queries}
    return kept_queries, kept_docs, kept_qrels


def relevance_mask(query_ids: Sequence[str], doc_ids: Sequence[str], qrels) -> np.ndarray:
    """bool [Q, N]: True where qrels grade the (query, document) pair > 0."""
    column = {d: j for j, d in enumerate(doc_ids)}
    mask = np.zeros((len(query_ids), len(doc_ids)), bool)
    for i, q in enumerate(query_ids):
        mask[i, [column[d] for d in _judged(qrels, q) if d in column]] = True
    return mask


def positive_pairs(query_ids: Sequence[str], doc_ids: Sequence[str], qrels) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (query int [P], document int [P]) of every relevant pair, query-major."""
    q_idx, d_idx = np.nonzero(relevance_mask(query_ids, doc_ids, qrels))
    return q_idx, d_idx


# ---------------------------------------------------------------- embeddings


def save_embeddings(path, q_qd, d_nd, query_ids: Sequence[str], doc_ids: Sequence[str]) -> pathlib.Path:
    """Write ``q_emb``, ``d_emb`` and their ids to an .npz (atomically: a crash leaves no half file).

    The layout is the one the test suite's msmarco cache uses: ``ids`` holds the JSON
    of ``[query_ids, doc_ids]``.
    """
    path = pathlib.Path(path)
    if len(query_ids) != len(q_qd) or len(doc_ids) != len(d_nd):
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids do not match embeddings "
                         f"{np.shape(q_qd)} / {np.shape(d_nd)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, q_emb=np.asarray(q_qd, np.float32), d_emb=np.asarray(d_nd, np.float32),
             ids=json.dumps([list(query_ids), list(doc_ids)]))
    os.replace(tmp, path)
    return path


def _rows(stored_ids, wanted, kind, path):
    row = {x: i for i, x in enumerate(stored_ids)}
    missing = [x for x in wanted if x not in row]
    if missing:
        raise ValueError(f"{path} has no embedding for {len(missing)} {kind} ids (e.g. {missing[:3]}): "
                         "it was made for another dataset or slice; delete it to re-encode")
    return np.array([row[x] for x in wanted], dtype=np.int64)


def load_embeddings(path, query_ids: Sequence[str], doc_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a ``save_embeddings`` file for the given ids, in their order: (q [Q, D], d [N, D])."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    with np.load(path) as stored:
        if not {"q_emb", "d_emb", "ids"} <= set(stored.files):
            raise ValueError(f"{path} must hold q_emb, d_emb and ids (as save_embeddings writes); got {stored.files}")
        stored_q, stored_d = json.loads(str(stored["ids"]))
        q_rows = _rows(stored_q, query_ids, "query", path)
        d_rows = _rows(stored_d, doc_ids, "document", path)
        return stored["q_emb"][q_rows], stored["d_emb"][d_rows]


# ------------------------------------------------------------------- hubness


def _unit_rows(x_nd):
    x_nd = np.asarray(x_nd, np.float32)
    return x_nd / np.maximum(np.linalg.norm(x_nd, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def _sample_rows(x_nd, size, seed):
    if size is None or x_nd.shape[0] <= size:
        return x_nd
    rows = np.sort(np.random.default_rng(seed).choice(x_nd.shape[0], size, replace=False))
    return x_nd[rows]


def cosine_scores(q_qd, d_nd) -> np.ndarray:
    """Cosine similarity of every query to every document, float32 [Q, N] (whatever the models' norms)."""
    return _unit_rows(q_qd) @ _unit_rows(d_nd).T


def corpus_neighbour_scores(d_nd) -> jax.Array:
    """Corpus x corpus similarities with the diagonal at -inf, float32 [N, N].

    Each document acts as a query for the others (never for itself): the classic
    k-nearest-neighbour graph on which hubness is measured (Radovanovic et al., 2010).
    """
    d_nd = jnp.asarray(d_nd, jnp.float32)
    if d_nd.ndim != 2 or d_nd.shape[0] < 2:
        raise ValueError(f"d_nd must be [N, D] with N >= 2; got shape {d_nd.shape}")
    scores_nn = d_nd @ d_nd.T
    return jnp.where(jnp.eye(d_nd.shape[0], dtype=bool), -jnp.inf, scores_nn)


def corpus_k_occurrence(d_nd, k: int = 10, *, sample: int | None = 5000, seed: int = 0) -> np.ndarray:
    """N_k of each document in the corpus k-NN graph, int [N'] (N' = min(N, sample) sampled documents).

    The counts whose skewness ``space_metrics`` reports as ``hubness_skewness`` (same
    sample for the same ``sample`` and ``seed``).
    """
    docs = _sample_rows(np.asarray(d_nd), sample, seed)
    return np.asarray(analysis.k_occurrence(corpus_neighbour_scores(docs), k))


def leave_one_out_log_partition(bank_scores_bn, temperature: float) -> np.ndarray:
    """log sum_{b' != b} exp(s_b'n / T) for every bank row b and item n, float64 [B, N].

    The query-bank partition function of item n as seen by bank query b when b
    itself is left out: using the test queries as their own bank without each
    query normalising against itself. O(B N) and stable: for the row holding the
    column maximum the sum is taken without it directly; for every other row the
    remaining sum still contains exp(0) = 1, so subtracting one term cannot cancel.
    """
    logits = np.asarray(bank_scores_bn, np.float64) / float(temperature)
    if logits.ndim != 2 or logits.shape[0] < 2:
        raise ValueError(f"bank_scores_bn must be [B, N] with B >= 2 (leave-one-out needs another row); "
                         f"got shape {logits.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    cols = np.arange(logits.shape[1])
    top_n = np.argmax(logits, axis=0)
    peak_n = logits[top_n, cols]
    shifted = np.exp(logits - peak_n)
    total_n = shifted.sum(axis=0)
    out = peak_n + np.log(np.maximum(total_n - shifted, np.finfo(np.float64).tiny))
    without_top = shifted.copy()
    without_top[top_n, cols] = 0.0
    out[top_n, cols] = peak_n + np.log(np.maximum(without_top.sum(axis=0), np.finfo(np.float64).tiny))
    return out


def inverted_softmax_retrieval(q_qd, d_nd, query_ids: Sequence[str], doc_ids: Sequence[str], qrels,
                               bank_bd=None, *, temperature: float = 0.05, k_values=(10,),
                               return_scores: bool = False):
    """Retrieval metrics x100 after query-bank normalisation (inverted softmax).

    Args:
      bank_bd: reference query embeddings [B, D]; None uses the test queries as their
        own bank, each query leaving itself out (transductive: it sees the other test
        queries, so it is an in-domain reference, not a deployable method).
      temperature: T of exp(s / T); 1/20 is QB-Norm's default for cosine scores.
      return_scores: also return the normalised scores float32 [Q, N] (for hubness).

    Returns ``retrieval_metrics``' dict, or ``(metrics, scores_qn)`` with return_scores.
    """
    q_qd, d_nd = np.asarray(q_qd, np.float32), np.asarray(d_nd, np.float32)
    if len(query_ids) != q_qd.shape[0] or len(doc_ids) != d_nd.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids do not match embeddings "
                         f"{q_qd.shape} / {d_nd.shape}")
    scores_qn = q_qd @ d_nd.T
    if bank_bd is None:
        log_z_qn = leave_one_out_log_partition(scores_qn, temperature)
    else:
        log_z_qn = np.asarray(bank_log_partition(bank_bd, d_nd, temperature), np.float64)[None, :]
    normalized_qn = (scores_qn / temperature - log_z_qn).astype(np.float32)
    k = min(max(k_values), len(doc_ids))
    # The library's tie order (score, then id descending; see eval.metrics): a stable sort of the
    # columns taken in descending-id order keeps that order within ties.
    order = tie_order(doc_ids)
    top_qk = order[np.argsort(-normalized_qn[:, order], axis=1, kind="stable")[:, :k]]
    run = {q: {doc_ids[j]: float(normalized_qn[i, j]) for j in top_qk[i]} for i, q in enumerate(query_ids)}
    metrics = retrieval_metrics(run, qrels, k_values)
    return (metrics, normalized_qn) if return_scores else metrics


# ------------------------------------------------------------------- summary


def space_metrics(q_qd, d_nd, query_ids: Sequence[str], doc_ids: Sequence[str], qrels, *, k: int = 10,
                  uniformity_sample: int | None = 2000, hubness_sample: int | None = 5000,
                  seed: int = 0) -> dict[str, float]:
    """Geometry of a retrieval embedding space, each value a Python float.

    - ``rankme_corpus``, ``rankme_queries``: effective rank (``analysis.rankme``).
    - ``alignment``: mean squared distance of the judged relevant (query, document)
      pairs on the unit sphere (``analysis.alignment``, alpha 2).
    - ``uniformity``: ``analysis.uniformity`` (t = 2) of at most ``uniformity_sample``
      documents (it builds an N x N matrix).
    - ``mean_cosine``, ``partition_isotropy``: of the corpus (isotropy of the
      L2-normalised rows).
    - ``hubness_skewness``: skewness of N_k in the corpus k-NN graph (each of at most
      ``hubness_sample`` documents queries the others, ``corpus_neighbour_scores``).
    - ``hubness_skewness_queries``: skewness of N_k over the corpus from the test queries
      (with few queries it mostly measures how many documents are never retrieved).
    Samples are drawn with ``seed``.
    """
    q_idx, d_idx = positive_pairs(query_ids, doc_ids, qrels)
    if q_idx.size == 0:
        raise ValueError("qrels judge no (query, document) pair of these ids relevant; alignment needs one")
    hub_docs = _sample_rows(np.asarray(d_nd), hubness_sample, seed)
    return {
        "rankme_corpus": float(analysis.rankme(d_nd)),
        "rankme_queries": float(analysis.rankme(q_qd)),
        "alignment": float(analysis.alignment(np.asarray(q_qd)[q_idx], np.asarray(d_nd)[d_idx])),
        "uniformity": float(analysis.uniformity(_sample_rows(np.asarray(d_nd), uniformity_sample, seed))),
        "mean_cosine": float(analysis.mean_cosine(d_nd)),
        # on unit vectors, so that models of different norm scale compare
        "partition_isotropy": float(analysis.partition_isotropy(_unit_rows(d_nd))),
        "hubness_skewness": float(analysis.hubness_skewness(corpus_neighbour_scores(hub_docs), k)),
        "hubness_skewness_queries": float(analysis.hubness_skewness(np.asarray(q_qd) @ np.asarray(d_nd).T, k)),
    }
