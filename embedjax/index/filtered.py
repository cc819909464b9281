"""Filtered search strategies: pre-filter, in-filter, post-filter and an automatic choice.

``filter=`` of ``search_embeddings``, ``CodeIndex.search`` and ``IVFIndex.search`` is
one of: a boolean mask [N] (shared by every query), a boolean mask [Q, N] (one per
query), an ``index.attributes.AttributeFilter`` (named-attribute predicates, shared or
per query), or the kernels' ``RowPredicates``. Masked rows are never returned; when
fewer than k rows pass, the missing results are id -1 with the worst score (-inf),
after every real result.

Strategies (``filter_strategy=``):

* ``"in"``: the kernels skip failing rows while they scan (scores -> -inf before
  selection). Exact for exhaustive search; costs one scan of the whole corpus.
* ``"pre"``: gather the passing rows into a compact corpus, then search it. Queries
  that share a filter share one compact corpus; its size is rounded up to a power of
  two (padding rows masked) so sizes reuse compiled kernels. Exact; costs O(pass * N)
  per distinct filter, so it wins when few rows pass. On an IVF index the compact
  corpus is scanned exhaustively (no partitioning left to exploit).
* ``"post"``: search without the filter for ``depth = k * post_multiplier /
  selectivity`` results (rounded up to a power of two, at most N), then drop failing
  rows. Exact whenever at least k of those pass (a passing row outside the depth
  ranks below all of them); otherwise the rows it finds are returned and the rest
  are -1, which loses recall when the filter is anti-correlated with the query.
* ``"auto"``: per query, from the measured selectivity s (passing rows / N):
  ``"pre"`` when s <= ``pre_max_selectivity``, ``"post"`` when s >=
  ``post_min_selectivity``, else ``"in"``. The defaults come from
  ``experiments/filtered_search`` (queries/s of each strategy per selectivity).

A backend supplies ``search(q_qd, k, row_filter)`` (global ids, -1 for missing) and
``subset(rows)`` (a backend over those corpus rows, ids local to ``rows``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.index.attributes import AttributeFilter
from embedjax.kernels.pallas_topk import next_pow2
from embedjax.kernels.row_filter import (
    MISSING_ID, RowFilter, as_row_filter, gathered_pass, predicates_pass, select_queries,
)

STRATEGIES = ("auto", "in", "pre", "post")
# From experiments/filtered_search (exact float32 search, 13,816 MiniLM vectors, 2-core CPU):
# pre-filtering beats scanning with a mask below ~2 % selectivity; post-filtering never won
# there (a deeper top-k costs more than the mask), so auto does not pick it by default.
PRE_MAX_SELECTIVITY = 0.02
POST_MIN_SELECTIVITY = 1.01
# Post-filtering searches each query `depth` deep; a rescoring backend then gathers depth x its
# rescore multiplier float32 rows per query. Queries go in chunks of at most this many
# (query, result) slots so that gather stays bounded (666 queries at depth 2048 with binary codes
# and 4x rescoring would gather 8 GB at once; 2**16 slots keep it near 0.4 GB at D = 384).
POST_FILTER_SLOTS = 2**16


class Backend(NamedTuple):
    search: Callable  # (q_qd, k, row_filter | None) -> (scores [Q, k], ids [Q, k]) numpy
    subset: Callable  # (rows int [M]) -> Backend over those rows


def resolve_filter(filter, num_queries: int, num_rows: int) -> RowFilter | None:
    """Any accepted ``filter=`` form -> the kernels' ``RowFilter`` (validated against the sizes)."""
    if isinstance(filter, AttributeFilter):
        filter = filter.row_predicates(num_queries, num_rows)
    return as_row_filter(filter, num_queries, num_rows)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"filter_strategy must be one of {STRATEGIES}; got {strategy!r}")


# ------------------------------------------------------------------ selectivity


@jax.jit
def _predicate_counts(attrs_an, lo_ua, hi_ua):
    return jnp.sum(predicates_pass(attrs_an, lo_ua, hi_ua), axis=1)


def filter_groups(row_filter: RowFilter, num_queries: int):
    """``(group of each query int [Q], representative query of each group int [G])``: queries with identical
    filters share a group (a shared filter is one group)."""
    if not row_filter.per_query:
        return np.zeros(num_queries, np.int64), np.zeros(1, np.int64)
    if row_filter.mask_mn is not None:
        keys = np.packbits(np.asarray(row_filter.mask_mn), axis=1)
    else:
        _, lo, hi = row_filter.predicates
        keys = np.concatenate([np.asarray(lo), np.asarray(hi)], axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return group.reshape(-1), first


def group_masks(row_filter: RowFilter, representatives, num_rows: int, chunk: int = 1 << 16) -> np.ndarray:
    """bool [G, N]: the rows each group's filter passes."""
    if row_filter.mask_mn is not None:
        return np.asarray(row_filter.mask_mn)[np.asarray(representatives)]
    attrs, lo, hi = row_filter.predicates
    lo, hi = np.asarray(lo)[representatives], np.asarray(hi)[representatives]
    attrs = np.asarray(attrs)
    return np.concatenate([np.asarray(predicates_pass(jnp.asarray(attrs[:, s:s + chunk]), lo, hi))
                           for s in range(0, num_rows, chunk)], axis=1)


def selectivity(filter, num_queries: int, num_rows: int) -> np.ndarray:
    """float64 [Q]: the fraction of corpus rows each query's filter passes."""
    row_filter = resolve_filter(filter, num_queries, num_rows)
    if row_filter is None:
        return np.ones(num_queries)
    group, reps = filter_groups(row_filter, num_queries)
    if row_filter.mask_mn is not None:
        counts = np.asarray(row_filter.mask_mn)[reps].sum(axis=1)
    else:
        attrs, lo, hi = row_filter.predicates
        counts = np.asarray(_predicate_counts(attrs, jnp.asarray(lo)[reps], jnp.asarray(hi)[reps]))
    return counts[group] / num_rows


# ------------------------------------------------------------------ strategies


def filtered_search(backend: Backend, q_qd, k: int, row_filter: RowFilter | None, num_rows: int, *,
                    strategy: str = "auto", post_multiplier: float = 2.0,
                    pre_max_selectivity: float = PRE_MAX_SELECTIVITY,
                    post_min_selectivity: float = POST_MIN_SELECTIVITY):
    """Top-k under ``row_filter`` with a strategy (module docstring): numpy (scores [Q, k], ids [Q, k]).

    Results are always host arrays, so the call returns only once the search has finished.
    """
    check_strategy(strategy)
    if not (isinstance(post_multiplier, (int, float)) and post_multiplier >= 1):
        raise ValueError(f"post_multiplier must be a number >= 1; got {post_multiplier!r}")
    q = np.asarray(q_qd)
    if row_filter is None or strategy == "in":
        scores, ids = backend.search(q, k, row_filter)
        return np.asarray(scores), np.asarray(ids)
    sel = selectivity(row_filter, q.shape[0], num_rows)
    if strategy == "pre":
        return _pre_filter(backend, q, k, row_filter, num_rows)
    if strategy == "post":
        return _post_filter(backend, q, k, row_filter, num_rows, sel, post_multiplier)
    route = np.where(sel <= pre_max_selectivity, 0, np.where(sel >= post_min_selectivity, 2, 1))
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    ids = np.full((q.shape[0], k), MISSING_ID, np.int32)
    for code in np.unique(route):
        rows = np.flatnonzero(route == code)
        sub = select_queries(row_filter, rows)
        if code == 0:
            s, i = _pre_filter(backend, q[rows], k, sub, num_rows)
        elif code == 2:
            s, i = _post_filter(backend, q[rows], k, sub, num_rows, sel[rows], post_multiplier)
        else:
            s, i = backend.search(q[rows], k, sub)
        scores[rows], ids[rows] = s, i
    return scores, ids


def _pre_filter(backend: Backend, q, k, row_filter, num_rows):
    """Search the compacted passing rows of each distinct filter."""
    group, reps = filter_groups(row_filter, q.shape[0])
    masks = group_masks(row_filter, reps, num_rows)
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    ids = np.full((q.shape[0], k), MISSING_ID, np.int32)
    for g in range(len(reps)):
        rows = np.flatnonzero(masks[g])  # ascending ids: "ties -> smaller id" survives the compaction
        members = np.flatnonzero(group == g)
        if rows.size == 0:
            continue
        size = next_pow2(rows.size)
        padded = np.concatenate([rows, np.full(size - rows.size, rows[0])]).astype(np.int32)
        kk = min(k, rows.size)
        s, pos = backend.subset(padded).search(q[members], kk, RowFilter(mask_mn=jnp.arange(size)[None] < rows.size))
        pos = np.asarray(pos)
        scores[members, :kk] = np.asarray(s)
        ids[members, :kk] = np.where(pos >= 0, padded[np.maximum(pos, 0)], MISSING_ID)
    return scores, ids


def _post_filter(backend: Backend, q, k, row_filter, num_rows, sel, multiplier):
    """Search ``k * multiplier / selectivity`` deep without the filter, then keep the first k passing rows."""
    depth = np.minimum(num_rows, [next_pow2(int(np.ceil(k * multiplier / max(s, 1.0 / num_rows)))) for s in sel])
    depth = np.maximum(depth, min(k, num_rows))
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    ids = np.full((q.shape[0], k), MISSING_ID, np.int32)
    for d in np.unique(depth):
        same_depth = np.flatnonzero(depth == d)
        chunk = max(1, POST_FILTER_SLOTS // int(d))  # one fixed chunk size per depth: at most two compiled shapes
        for start in range(0, len(same_depth), chunk):
            rows = same_depth[start:start + chunk]
            _post_filter_rows(backend, q, k, row_filter, rows, int(d), scores, ids)
    return scores, ids


def _post_filter_rows(backend: Backend, q, k, row_filter, rows, d: int, scores, ids) -> None:
    """Post-filter the queries ``rows`` at depth ``d``, writing their first k passing results into ``scores``/``ids``."""
    s, i = backend.search(q[rows], d, None)
    s, i = np.asarray(s), np.asarray(i)
    ok = np.asarray(gathered_pass(select_queries(row_filter, rows), jnp.asarray(i)))
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # passing rows first, in rank order
    kept_ok = np.take_along_axis(ok, order, 1)
    width = order.shape[1]
    scores[rows, :width] = np.where(kept_ok, np.take_along_axis(s, order, 1), -np.inf)
    ids[rows, :width] = np.where(kept_ok, np.take_along_axis(i, order, 1), MISSING_ID)

