"""Row filters inside the top-k kernels: which corpus rows each query may return.

Every top-k kernel takes ``filter=`` in one of three forms:

* a boolean mask [N]: one mask shared by every query;
* a boolean mask [Q, N]: one mask per query;
* ``RowPredicates(attrs_an, lo_qa, hi_qa)``: row n passes for query q when
  ``lo_qa[q, a] <= attrs_an[a, n] <= hi_qa[q, a]`` for every attribute a (a
  conjunction of closed ranges over float32 attribute columns; equality on a
  categorical code c is the range [c, c], an unconstrained attribute is
  [-inf, inf]). It needs O(A N + Q A) memory instead of the Q N of a per-query
  mask and is evaluated tile by tile inside the kernel. ``lo_qa``/``hi_qa`` may
  also have one row, shared by every query. ``embedjax.index.attributes`` builds
  these from named attributes and predicates.

Masking is applied to the scores before any selection: a row that fails scores
-inf and can never enter a top-k list. The selection itself is untouched, so any
selection design (the running top-k here, or a threshold + compaction pass)
composes with it.

When fewer than k rows pass, the missing results are reported as id ``MISSING_ID``
(-1) with the worst score (-inf; for Hamming distances, ``MISSING_DISTANCE`` =
int32 max), after every real result. Scores of real rows must be finite.

Kernels also take ``row_ids=`` (int32 [N], each below 2^24): the id reported for, and
breaking ties by, each corpus row (default: the row index). Rows with a negative id
never match.
An inverted-file scan uses it to keep "ties -> smaller corpus id" while it scans
rows in list order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MISSING_ID = -1
MISSING_DISTANCE = int(np.iinfo(np.int32).max)
NEG_INF = float("-inf")


class RowPredicates(NamedTuple):
    """Per-query conjunctions of closed ranges over attribute columns (see the module docstring).

    attrs_an float32 [A, N]; lo_qa, hi_qa float32 [Q or 1, A].
    """

    attrs_an: jax.Array
    lo_qa: jax.Array
    hi_qa: jax.Array


class RowFilter(NamedTuple):
    """The kernel-side form of a filter: exactly one of ``mask_mn`` / ``predicates`` is set.

    mask_mn: bool [M, N] with M = 1 (shared) or Q (per query).
    """

    mask_mn: Optional[jax.Array] = None
    predicates: Optional[RowPredicates] = None

    @property
    def per_query(self) -> bool:
        rows = self.mask_mn.shape[0] if self.mask_mn is not None else self.predicates.lo_qa.shape[0]
        return rows > 1


def as_row_filter(filter, num_queries: int, num_rows: int, name: str = "filter") -> Optional[RowFilter]:
    """Validate a ``filter=`` argument (mask [N], mask [Q, N], ``RowPredicates`` or ``RowFilter``)."""
    if filter is None:
        return None
    if isinstance(filter, RowFilter):
        if filter.mask_mn is not None:
            return as_row_filter(filter.mask_mn, num_queries, num_rows, name)
        return as_row_filter(filter.predicates, num_queries, num_rows, name)
    if isinstance(filter, RowPredicates):
        return RowFilter(predicates=_check_predicates(filter, num_queries, num_rows, name))
    mask = filter if isinstance(filter, jax.Array) else np.asarray(filter)
    if mask.dtype != bool:
        raise TypeError(f"{name} must be a boolean mask ([N] or [Q, N]) or RowPredicates; got dtype {mask.dtype}. "
                        "Build masks with comparisons (e.g. attrs == 3), not 0/1 integers")
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a mask [N] or [Q, N]; got shape {tuple(mask.shape)}")
    if mask.shape[1] != num_rows:
        raise ValueError(f"{name} has {mask.shape[1]} entries per query but the corpus has {num_rows} rows: "
                         f"pass one boolean per corpus row ([{num_rows}]) or per query and row "
                         f"([{num_queries}, {num_rows}])")
    if mask.shape[0] not in (1, num_queries):
        raise ValueError(f"{name} has {mask.shape[0]} rows of masks for {num_queries} queries: pass one shared "
                         f"mask [{num_rows}] or one per query [{num_queries}, {num_rows}]")
    return RowFilter(mask_mn=jnp.asarray(mask))


def _check_predicates(p: RowPredicates, num_queries, num_rows, name) -> RowPredicates:
    attrs, lo, hi = (jnp.asarray(a) for a in p)
    if attrs.ndim != 2 or attrs.shape[1] != num_rows:
        raise ValueError(f"{name}.attrs_an must be [A, N] with N = {num_rows} corpus rows; got {tuple(attrs.shape)}")
    for bound, label in ((lo, "lo_qa"), (hi, "hi_qa")):
        if bound.ndim != 2 or bound.shape[1] != attrs.shape[0] or bound.shape[0] not in (1, num_queries):
            raise ValueError(f"{name}.{label} must be [Q={num_queries} or 1, A={attrs.shape[0]}]; "
                             f"got {tuple(bound.shape)}")
    if lo.shape[0] != hi.shape[0]:
        raise ValueError(f"{name}.lo_qa has {lo.shape[0]} rows but hi_qa has {hi.shape[0]}")
    for a, label in ((attrs, "attrs_an"), (lo, "lo_qa"), (hi, "hi_qa")):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}.{label} must be float32; got {a.dtype}")
    return RowPredicates(attrs.astype(jnp.float32), lo.astype(jnp.float32), hi.astype(jnp.float32))


def check_row_ids(row_ids, num_rows: int):
    if row_ids is None:
        return None
    row_ids = jnp.asarray(row_ids)
    if row_ids.shape != (num_rows,) or row_ids.dtype != jnp.int32:
        raise ValueError(f"row_ids must be int32 [{num_rows}] (one id per corpus row); "
                         f"got {row_ids.dtype} {tuple(row_ids.shape)}")
    return row_ids


# ------------------------------------------------------------------ jnp evaluation


def predicates_pass(attrs_ac, lo_qa, hi_qa):
    """bool [Q, C]: every attribute of the C rows within the query's closed range."""
    inside = (lo_qa[:, :, None] <= attrs_ac[None, :, :]) & (attrs_ac[None, :, :] <= hi_qa[:, :, None])
    return jnp.all(inside, axis=1)


def rows_pass(row_filter: Optional[RowFilter], start, size: int):
    """bool [M, size] (M = 1 or Q) for corpus rows ``start .. start + size`` (``start`` may be traced)."""
    if row_filter is None:
        return jnp.ones((1, size), bool)
    if row_filter.mask_mn is not None:
        return lax.dynamic_slice_in_dim(row_filter.mask_mn, start, size, axis=1)
    attrs, lo, hi = row_filter.predicates
    return predicates_pass(lax.dynamic_slice_in_dim(attrs, start, size, axis=1), lo, hi)


def slice_rows(row_filter: Optional[RowFilter], start: int, size: int) -> Optional[RowFilter]:
    """The filter of corpus rows ``start .. start + size`` (static bounds), padded with failing rows."""
    if row_filter is None:
        return None
    if row_filter.mask_mn is not None:
        part = row_filter.mask_mn[:, start:start + size]
        return RowFilter(mask_mn=jnp.pad(part, ((0, 0), (0, size - part.shape[1]))))
    attrs, lo, hi = row_filter.predicates
    part = attrs[:, start:start + size]
    # Padding rows carry NaN attributes: NaN fails every comparison, so they never pass.
    part = jnp.pad(part, ((0, 0), (0, size - part.shape[1])), constant_values=jnp.nan)
    return RowFilter(predicates=RowPredicates(part, lo, hi))


def gathered_pass(row_filter: Optional[RowFilter], ids_qm):
    """bool [Q, M]: whether each query's candidate corpus rows ``ids_qm`` pass (ids < 0 never pass)."""
    valid = ids_qm >= 0
    if row_filter is None:
        return valid
    safe = jnp.where(valid, ids_qm, 0)
    if row_filter.mask_mn is not None:
        mask = row_filter.mask_mn
        rows = jnp.broadcast_to(mask, (ids_qm.shape[0], mask.shape[1])) if mask.shape[0] == 1 else mask
        return valid & jnp.take_along_axis(rows, safe, axis=1)
    attrs, lo, hi = row_filter.predicates
    values = jnp.take(attrs, safe, axis=1)  # [A, Q, M]
    inside = (lo.T[:, :, None] <= values) & (values <= hi.T[:, :, None])
    return valid & jnp.all(inside, axis=0)


def select_queries(row_filter: Optional[RowFilter], query_rows) -> Optional[RowFilter]:
    """The filter of a subset of the queries (shared filters are returned as is)."""
    if row_filter is None or not row_filter.per_query:
        return row_filter
    query_rows = np.asarray(query_rows)
    if row_filter.mask_mn is not None:
        return RowFilter(mask_mn=row_filter.mask_mn[query_rows])
    attrs, lo, hi = row_filter.predicates
    return RowFilter(predicates=RowPredicates(attrs, lo[query_rows], hi[query_rows]))


def corpus_slice(row_filter: Optional[RowFilter], start: int, stop: int) -> Optional[RowFilter]:
    """The filter of corpus rows [start, stop) (masks and attribute columns sliced; bounds kept)."""
    if row_filter is None:
        return None
    if row_filter.mask_mn is not None:
        return RowFilter(mask_mn=row_filter.mask_mn[:, start:stop])
    p = row_filter.predicates
    return RowFilter(predicates=RowPredicates(p.attrs_an[:, start:stop], p.lo_qa, p.hi_qa))


def mark_missing(scores_qk, ids_qk):
    """Ids of -inf results become ``MISSING_ID`` (they are filtered, padded or absent rows)."""
    return scores_qk, jnp.where(scores_qk == NEG_INF, MISSING_ID, ids_qk)


def scores_or_missing(scores_qk, ids_qk):
    """float32 scores with -inf wherever the id is missing (for score transforms of distances)."""
    return jnp.where(ids_qk >= 0, scores_qk, NEG_INF)


def distances_from_scores(scores_qk):
    """Hamming distances int32 from negated-distance scores; missing results get ``MISSING_DISTANCE``."""
    return jnp.where(scores_qk == NEG_INF, MISSING_DISTANCE, (-scores_qk).astype(jnp.int32))
