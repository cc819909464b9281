"""Retention tables: a retrieval metric under Matryoshka truncation or compression, as a share of float32.

"Retention" is the metric of a cheaper setting divided by the metric of exact
float32 search at full dimension on the same queries and corpus, so 1.0 means
nothing was lost. All functions take precomputed embeddings (rows aligned with
the id lists) and return plain rows that a notebook or a README table can print:

    rows = compression_retention(q_qd, d_nd, query_ids, doc_ids, qrels)
    [(r["setting"], round(r["retention"], 3)) for r in rows]
    # all-MiniLM-L6-v2 on the msmarco subset: [('float32', 1.0), ('int8', 1.0), ('int4', 0.992),
    #  ('fp8', 0.997), ('binary', 0.988), ('binary+rescore', 1.0)]
"""
from __future__ import annotations

import re
from typing import Sequence

from embedjax.eval.retrieval import retrieval_from_embeddings

__all__ = ["DEFAULT_QUANTIZATIONS", "DEFAULT_DIMS", "retention_table", "matryoshka_retention", "compression_retention"]

DEFAULT_QUANTIZATIONS = (None, "int8", "int4", "fp8", "binary", "binary+rescore")
DEFAULT_DIMS = (32, 64, 128, 256, None)  # None: the full dimension

_METRIC = re.compile(r"^[a-z_]+@([1-9][0-9]*)$")


def _cutoff(metric: str) -> int:
    match = _METRIC.match(metric) if isinstance(metric, str) else None
    if not match:
        raise ValueError(f"metric={metric!r} must look like 'ndcg@10' (a retrieval_metrics name with its cutoff)")
    return int(match.group(1))


def _label(quantization: str | None, dims: int | None) -> str:
    name = quantization or "float32"
    return name if dims is None else f"{name}@{dims}d"


def retention_table(q_qd, d_nd, query_ids: Sequence[str], doc_ids: Sequence[str], qrels,
                    settings: Sequence[tuple[str | None, int | None]], *, metric: str = "ndcg@10") -> list[dict]:
    """One row per ``(quantization, dims)`` setting: the metric and its share of full-dim float32.

    Args:
      q_qd, d_nd: float embeddings [Q, D] and [N, D] (rows aligned with query_ids / doc_ids).
      qrels: ``{query_id: {doc_id: grade}}``; it decides which queries count (see
        ``retrieval_metrics``), so restrict it to the queries and documents evaluated.
      settings: pairs ``(quantization, dims)`` as ``retrieval_from_embeddings`` takes them;
        ``dims=None`` or ``dims=D`` is the full dimension.
      metric: a ``retrieval_metrics`` name with its cutoff, x100 (e.g. ``"ndcg@10"``).

    Returns:
      rows ``{"setting", "quantization", "dims", metric, "retention"}`` in the order of
      ``settings``; ``dims`` is the dimension searched (D when not truncated) and
      ``retention = value / (float32 full-dim value)``.

    Raises:
      ValueError: an unknown quantization, dims outside [1, D], a malformed metric name,
        or a float32 baseline of 0 (retention would divide by zero: no query finds a
        relevant document in the top ``k``).
    """
    k = _cutoff(metric)
    full_dim = int(d_nd.shape[1])
    settings = list(settings)
    if not settings:
        raise ValueError("settings is empty; pass (quantization, dims) pairs such as [(None, None), ('int8', None)]")

    def score(quantization, dims):
        # dims == D searches the untruncated embeddings, so it must equal the baseline exactly.
        dims = None if dims == full_dim else dims
        return retrieval_from_embeddings(q_qd, d_nd, query_ids, doc_ids, qrels, (k,), quantization=quantization,
                                         dims=dims)[metric]

    baseline = score(None, None)
    if baseline == 0:
        raise ValueError(f"float32 {metric} is 0 on these inputs, so retention is undefined; check that qrels match "
                         "the query and document ids")
    rows = []
    for quantization, dims in settings:
        value = baseline if quantization in (None, "float32") and dims in (None, full_dim) else score(quantization, dims)
        rows.append({"setting": _label(quantization, None if dims == full_dim else dims),
                     "quantization": quantization or "float32", "dims": full_dim if dims is None else int(dims),
                     metric: value, "retention": value / baseline})
    return rows


def matryoshka_retention(q_qd, d_nd, query_ids, doc_ids, qrels, dims: Sequence[int | None] = DEFAULT_DIMS, *,
                         quantization: str | None = None, metric: str = "ndcg@10") -> list[dict]:
    """Retention when queries and corpus keep only their first ``dims`` dimensions (re-normalised).

    Dimensions larger than D are an error (there is nothing to truncate to); ``None``
    is the full dimension. See ``retention_table`` for the rows.
    """
    return retention_table(q_qd, d_nd, query_ids, doc_ids, qrels, [(quantization, d) for d in dims], metric=metric)


def compression_retention(q_qd, d_nd, query_ids, doc_ids, qrels,
                          quantizations: Sequence[str | None] = DEFAULT_QUANTIZATIONS, *, dims: int | None = None,
                          metric: str = "ndcg@10") -> list[dict]:
    """Retention of each corpus compression (``"int8"``, ``"binary+rescore"``, ...; None = float32).

    Always relative to float32 at full dimension, also when ``dims`` truncates every setting.
    See ``retention_table`` for the rows.
    """
    return retention_table(q_qd, d_nd, query_ids, doc_ids, qrels, [(q, dims) for q in quantizations], metric=metric)
