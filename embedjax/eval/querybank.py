"""Retrieval with query-bank normalisation (inverted softmax) against hubness.

A few corpus items ("hubs") sit close to very many queries and crowd the top of
every ranking. Query-bank normalisation (Bogolin et al., CVPR 2022, after the
inverted softmax of Smith et al., ICLR 2017) divides each item's score by how
strongly the item attracts a bank of reference queries:

    score(q, n) = exp(s_qn / T) / sum_{b in bank} exp(s_bn / T)

This module is the memory-bounded twin of
``embedjax.eval.analysis.inverted_softmax_scores``: the bank enters only through
one number per corpus item (its log partition function), accumulated over bank
chunks, so a bank of any size never materialises a [B, N] matrix. Rankings use
the log of the ratio, ``s_qn / T - log_partition_n``.

Bank choice matters: use queries that are not the test queries (training
queries, or another query set of the same style); normalising with the test
queries themselves leaks the test set.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.eval.metrics import retrieval_metrics, tie_order
from embedjax.eval.retrieval import document_text

__all__ = [
    "bank_log_partition",
    "activation_mask",
    "querybank_scores",
    "querybank_retrieval_from_embeddings",
    "querybank_retrieval",
]


def _matrix(x, name: str) -> jax.Array:
    x = jnp.asarray(x, dtype=jnp.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [rows, dim]; got shape {x.shape}")
    return x


def _check_same_dim(a, b, name_a: str, name_b: str):
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same embedding dimension; got {a.shape[1]} and {b.shape[1]}")


@functools.partial(jax.jit, static_argnames=("inv_temperature",))
def _chunk_log_partition(bank_cd, d_nd, inv_temperature):
    return jax.nn.logsumexp((bank_cd @ d_nd.T) * inv_temperature, axis=0)


def bank_log_partition(bank_bd, d_nd, temperature: float, *, chunk_size: int = 1024) -> jax.Array:
    """log sum_b exp(bank_b . d_n / T) for every corpus item, float32 [N]; bank in chunks."""
    bank_bd, d_nd = _matrix(bank_bd, "bank_bd"), _matrix(d_nd, "d_nd")
    _check_same_dim(bank_bd, d_nd, "bank_bd", "d_nd")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    inv_t = 1.0 / float(temperature)
    total = None
    for start in range(0, bank_bd.shape[0], chunk_size):
        part = _chunk_log_partition(bank_bd[start : start + chunk_size], d_nd, inv_t)
        total = part if total is None else jnp.logaddexp(total, part)
    return total


def activation_mask(bank_bd, d_nd, activation_k: int = 1, *, chunk_size: int = 1024) -> jax.Array:
    """Items in the top-activation_k of at least one bank query, bool [N] (QB-Norm's activation set)."""
    bank_bd, d_nd = _matrix(bank_bd, "bank_bd"), _matrix(d_nd, "d_nd")
    _check_same_dim(bank_bd, d_nd, "bank_bd", "d_nd")
    if not 1 <= activation_k <= d_nd.shape[0]:
        raise ValueError(f"activation_k must be in [1, {d_nd.shape[0]}]; got {activation_k}")
    active = jnp.zeros((d_nd.shape[0],), bool)
    for start in range(0, bank_bd.shape[0], chunk_size):
        _, top = jax.lax.top_k(bank_bd[start : start + chunk_size] @ d_nd.T, activation_k)
        active = active.at[top.reshape(-1)].set(True)
    return active


def querybank_scores(q_qd, d_nd, log_partition_n, temperature: float, active_n=None) -> jax.Array:
    """Normalised scores s_qn / T - log_partition_n, float32 [Q, N].

    With active_n (dynamic inverted softmax) a query whose top-1 item is not active
    keeps its raw scores s_qn.
    """
    q_qd, d_nd = _matrix(q_qd, "q_qd"), _matrix(d_nd, "d_nd")
    _check_same_dim(q_qd, d_nd, "q_qd", "d_nd")
    log_partition_n = jnp.asarray(log_partition_n, jnp.float32)
    if log_partition_n.shape != (d_nd.shape[0],):
        raise ValueError(f"log_partition_n must have shape ({d_nd.shape[0]},); got {log_partition_n.shape}")
    scores_qn = q_qd @ d_nd.T
    normalized_qn = scores_qn / temperature - log_partition_n[None, :]
    if active_n is None:
        return normalized_qn
    use_q = jnp.asarray(active_n)[jnp.argmax(scores_qn, axis=1)]
    return jnp.where(use_q[:, None], normalized_qn, scores_qn)


def querybank_retrieval_from_embeddings(
    q_emb,
    d_emb,
    bank_emb,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels,
    k_values: Iterable[int] = (1, 10, 100),
    *,
    temperature: float = 0.05,
    dynamic: bool = False,
    activation_k: int = 1,
    per_query: bool = False,
    query_chunk_size: int = 256,
    log_partition_n=None,
) -> dict:
    """Retrieval metrics x100 after query-bank normalisation (same output as retrieval_from_embeddings).

    Args:
      q_emb, d_emb, bank_emb: [Q, D], [N, D], [B, D] embeddings (bank = reference
        queries, not the test queries).
      temperature: T of the inverted softmax (QB-Norm uses 1/20 for cosine scores).
      dynamic, activation_k: QB-Norm's dynamic inverted softmax (see querybank_scores).
      log_partition_n: a precomputed bank log partition [N] at this temperature (e.g.
        one that leaves out bank entries derived from the item itself); replaces
        the one computed from bank_emb, which is then only used for `dynamic`.
    """
    k_values = tuple(k_values)
    d_nd = _matrix(d_emb, "d_emb")
    q_qd = _matrix(q_emb, "q_emb")
    if len(query_ids) != q_qd.shape[0] or len(doc_ids) != d_nd.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids do not match embeddings "
                         f"{q_qd.shape} / {d_nd.shape}")
    # The library's tie order (score, then id descending; see eval.metrics): top_k keeps the
    # smaller index on ties, so search the corpus in descending-id order.
    order = tie_order(doc_ids)
    d_nd, doc_ids = d_nd[order], [doc_ids[j] for j in order]
    if log_partition_n is not None:
        log_partition_n = jnp.asarray(log_partition_n)[order]
    log_z = bank_log_partition(bank_emb, d_nd, temperature) if log_partition_n is None else log_partition_n
    active = activation_mask(bank_emb, d_nd, activation_k) if dynamic else None
    k = min(max(k_values), d_nd.shape[0])
    run = {}
    for start in range(0, q_qd.shape[0], query_chunk_size):
        scores = querybank_scores(q_qd[start : start + query_chunk_size], d_nd, log_z, temperature, active)
        top_scores, top_idx = jax.lax.top_k(scores, k)
        for row, (s_row, i_row) in enumerate(zip(np.asarray(top_scores), np.asarray(top_idx))):
            run[query_ids[start + row]] = {doc_ids[j]: float(s) for s, j in zip(s_row, i_row)}
    return retrieval_metrics(run, qrels, k_values, per_query=per_query)


def querybank_retrieval(
    encoder,
    corpus,
    queries,
    qrels,
    bank_queries: Sequence[str],
    k_values: Iterable[int] = (1, 10, 100),
    *,
    temperature: float = 0.05,
    dynamic: bool = False,
    activation_k: int = 1,
    batch_size: int = 64,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    per_query: bool = False,
) -> dict:
    """Like ``embedjax.eval.retrieval`` with query-bank normalisation; bank_queries are texts."""
    if not bank_queries:
        raise ValueError("bank_queries is empty: pass reference query texts (e.g. training queries)")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no query in `queries` has a relevant document in `qrels`: check the ids match")
    doc_ids = list(corpus)
    q_emb = encoder.encode([queries[q] for q in judged], batch_size=batch_size, prompt=query_prompt)
    d_emb = encoder.encode([document_text(corpus[d]) for d in doc_ids], batch_size=batch_size, prompt=document_prompt)
    bank_emb = encoder.encode(list(bank_queries), batch_size=batch_size, prompt=query_prompt)
    return querybank_retrieval_from_embeddings(
        q_emb, d_emb, bank_emb, judged, doc_ids, qrels, k_values, temperature=temperature, dynamic=dynamic,
        activation_k=activation_k, per_query=per_query,
    )
