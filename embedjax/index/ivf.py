"""An inverted-file (IVF) index in JAX: k-means lists of float32, int8, int4, fp8 or binary codes.

    index = IVFIndex.build(corpus_nd, nlist=128, kind="binary", rescore="float32", mesh=mesh)
    scores, ids = index.search(queries_qd, k=10, nprobe=8)
    scores, ids = index.search(queries_qd, k=10, nprobe=8, filter=AttributeFilter(attrs, Eq("lang", "en")))
    index.save("ivf.npz"); IVFIndex.load("ivf.npz", kind="binary")

Build: spherical k-means (``index.kmeans``, jitted and sharded over ``mesh``) trains
``nlist`` centroids on at most ``train_points_per_list * nlist`` points; every corpus
vector goes to the list of its nearest centroid (largest inner product). The lists
are stored as one padded, static-shape block: slot ``l * list_len + j`` holds the
j-th member of list l (members in ascending corpus id), ``list_len`` is the longest
list rounded up to ``list_block``, and ``list_ids`` [nlist, list_len] holds each
slot's corpus id (-1 = padding). First-stage codes live in that list-major order
(the ``lists`` ``CodeIndex``); the rescoring copy (float32 or int8) stays in corpus
order.

Search: each query probes the ``nprobe`` lists with the largest <q, centroid> (ties ->
smaller list). The queries are then grouped by list, and every list is scanned once,
against the group of queries that probe it, by the existing top-k kernel of the code
kind (``first_stage_topk``: Hamming, int8/int4/fp8 and float32; ``impl`` picks Pallas or
the jnp twin) under ``jax.vmap`` over lists: no list's codes are copied per query, and
each scan is a [queries, list_len] matrix problem. Padding slots (id -1) and filtered
rows are masked inside the kernel (attribute predicates are evaluated there per tile),
and the slots' corpus ids break ties, so with ``nprobe == nlist`` the result equals
exhaustive search of the same codes. Each query merges its nprobe per-list top-k lists
exactly. With ``rescore``, ``k * rescore_multiplier`` candidates are rescored exactly.

``selection="approx"`` picks the probed lists and the candidates with
``jax.lax.approx_max_k`` (``recall_target``), the TPU's partial-reduction top-k
(on CPU and GPU it falls back to an exact sort).

Filters (``filter=``, ``filter_strategy=``; see ``index.filtered``): "in" masks
rows inside the probed lists (a selective filter can leave fewer than k passing
rows there: the missing results are id -1); "post" probes the same lists for
deeper results and drops failing rows; "pre" searches the passing rows
exhaustively (exact); "auto" picks by measured selectivity.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from embedjax.index.code_index import (
    CodeIndex, RESCORE, first_stage_topk, read_index_header, score_chunk_fn, write_index_file,
)
from embedjax.index.filtered import Backend, check_strategy, filtered_search, resolve_filter
from embedjax.index.kmeans import assign, kmeans
from embedjax.kernels.pallas_topk import next_pow2
from embedjax.kernels.row_filter import NEG_INF, RowFilter, RowPredicates, mark_missing, rows_pass, select_queries
from embedjax.kernels.topk import MAX_EXACT_ID, check_k, sort_by_score_then_id, top_k_by_score_then_id

SELECTIONS = ("exact", "approx")
_FORMAT_VERSION = 1


@dataclasses.dataclass
class IVFIndex:
    centroids: np.ndarray  # float32 [nlist, D]
    lists: CodeIndex  # first-stage codes, list-major: nlist * list_len rows (no rescoring copy)
    list_ids: np.ndarray  # int32 [nlist, list_len]: corpus id of each slot, -1 = padding
    num_rows: int
    rescore: str | None = None
    rescore_store: np.ndarray | None = None  # corpus order
    rescore_ranges: tuple | None = None

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, corpus_nd, nlist: int, kind: str = "float32", *, rescore: str | None = None, iters: int = 20,
              seed: int = 0, mesh=None, axis: str = "data", train_points_per_list: int = 256, list_block: int = 8,
              calibration_nd=None) -> "IVFIndex":
        """Train the coarse quantizer on ``corpus_nd`` [N, D], fill the lists and quantise them (``kind``)."""
        x = np.asarray(corpus_nd)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or x.shape[0] == 0:
            raise ValueError(f"corpus_nd must be a non-empty 2-D float array [N, D]; got {x.dtype} {x.shape}")
        x = x.astype(np.float32)
        if not isinstance(nlist, int) or not 1 <= nlist <= x.shape[0]:
            raise ValueError(f"nlist={nlist} must be an int between 1 and the corpus size {x.shape[0]}")
        if x.shape[0] > MAX_EXACT_ID:
            raise ValueError(f"IVFIndex holds at most {MAX_EXACT_ID} vectors (ids break ties exactly in float32 "
                             f"below 2^24); got {x.shape[0]}: shard the corpus into several indexes")
        if not isinstance(list_block, int) or list_block < 1:
            raise ValueError(f"list_block must be an int >= 1; got {list_block}")
        flat = CodeIndex.build(x, kind, rescore=rescore, calibration_nd=calibration_nd)  # validates kind/rescore
        centroids, _ = kmeans(x, nlist, iters=iters, seed=seed, mesh=mesh, axis=axis,
                              max_points=train_points_per_list * nlist)
        owner = assign(x, centroids)
        sizes = np.bincount(owner, minlength=nlist)
        list_len = max(list_block, -(-int(sizes.max()) // list_block) * list_block)
        list_ids = np.full((nlist, list_len), -1, np.int32)
        order = np.argsort(owner, kind="stable")  # by list, then ascending corpus id
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        slot = np.arange(x.shape[0]) - np.repeat(starts, sizes)
        list_ids[owner[order], slot] = order
        lists = dataclasses.replace(flat.subset(np.maximum(list_ids.reshape(-1), 0)), rescore=None,
                                    rescore_store=None, rescore_ranges=None)
        return cls(centroids, lists, list_ids, x.shape[0], flat.rescore, flat.rescore_store, flat.rescore_ranges)

    @property
    def kind(self) -> str:
        return self.lists.kind

    @property
    def dim(self) -> int:
        return self.lists.dim

    @property
    def nlist(self) -> int:
        return self.list_ids.shape[0]

    @property
    def list_len(self) -> int:
        return self.list_ids.shape[1]

    def list_sizes(self) -> np.ndarray:
        return (self.list_ids >= 0).sum(axis=1)

    def padding_fraction(self) -> float:
        """Share of list slots that are padding (the cost of static-shape lists)."""
        return 1.0 - self.num_rows / self.list_ids.size

    # ------------------------------------------------------------ search

    def search(self, queries_qd, k: int, *, nprobe: int, rescore_multiplier: int = 4, impl: str = "auto",
               selection: str = "exact", recall_target: float = 0.95, filter=None, filter_strategy: str = "auto",
               post_multiplier: float = 2.0, chunk_size: int = 4096, query_batch: int | None = None):
        """``(scores float32 [Q, k], ids int32 [Q, k])`` numpy, best first, ties -> smaller id.

        ``nprobe`` lists per query (1 <= nprobe <= nlist). Results the probed lists
        cannot fill (too few rows, or too few passing the filter) are id -1, score -inf.
        Queries go ``query_batch`` at a time (default ``8192 // nprobe``, between 64 and
        1024): a list is scanned against up to that many queries at once, so memory holds
        [nlist, queries per list] query operands and scores.
        """
        q = self.lists._check_queries(queries_qd)
        check_k(k, self.num_rows, what="index")
        check_strategy(filter_strategy)
        if not isinstance(nprobe, int) or isinstance(nprobe, bool) or not 1 <= nprobe <= self.nlist:
            raise ValueError(f"nprobe={nprobe} is out of range: probe between 1 and nlist={self.nlist} lists")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
        if not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1]; got {recall_target}")
        if not isinstance(rescore_multiplier, int) or rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be an int >= 1; got {rescore_multiplier}")
        row_filter = resolve_filter(filter, q.shape[0], self.num_rows)
        if query_batch is None:
            query_batch = max(64, min(1024, 8192 // nprobe))
        if not isinstance(query_batch, int) or query_batch < 1:
            raise ValueError(f"query_batch must be an int >= 1; got {query_batch!r}")
        options = dict(nprobe=nprobe, rescore_multiplier=rescore_multiplier, impl=impl, selection=selection,
                       recall_target=recall_target, chunk_size=chunk_size, query_batch=query_batch)
        backend = Backend(search=lambda qq, kk, rf: self._search(qq, kk, rf, **options),
                          subset=lambda rows: self.flat_subset(rows).backend(
                              rescore_multiplier=rescore_multiplier, impl=impl, chunk_size=chunk_size))
        return filtered_search(backend, q, k, row_filter, self.num_rows, strategy=filter_strategy,
                               post_multiplier=post_multiplier)

    def _device_list_ids(self):
        cache = self.lists._device  # lives and dies with the list codes
        if "list_ids" not in cache:
            cache["list_ids"] = jnp.asarray(self.list_ids)
            cache["centroids"] = jnp.asarray(self.centroids)
        return cache["list_ids"]

    def probe(self, queries_qd, nprobe: int, selection: str = "exact", recall_target: float = 0.95) -> np.ndarray:
        """int32 [Q, nprobe]: the lists each query scans (largest <q, centroid> first)."""
        self._device_list_ids()
        return np.asarray(_probe(jnp.asarray(queries_qd, jnp.float32), self.lists._device["centroids"], nprobe,
                                 selection, recall_target))

    def _rescorer(self) -> CodeIndex:
        """A CodeIndex view that rescores corpus ids (its device cache is kept on the lists)."""
        cache = self.lists._device
        if "rescorer" not in cache:
            cache["rescorer"] = dataclasses.replace(self.lists, rescore=self.rescore,
                                                    rescore_store=self.rescore_store,
                                                    rescore_ranges=self.rescore_ranges)
        return cache["rescorer"]

    def flat_subset(self, rows) -> CodeIndex:
        """An exhaustive ``CodeIndex`` of the corpus rows ``rows`` (codes gathered from the lists)."""
        rows = np.asarray(rows)
        slot_of_row = np.empty(self.num_rows, np.int64)
        valid = self.list_ids.reshape(-1) >= 0
        slot_of_row[self.list_ids.reshape(-1)[valid]] = np.flatnonzero(valid)
        sub = self.lists.subset(slot_of_row[rows])
        store = None if self.rescore_store is None else np.asarray(self.rescore_store)[rows]
        return dataclasses.replace(sub, rescore=self.rescore, rescore_store=store, rescore_ranges=self.rescore_ranges)

    def _search(self, q, k, row_filter, *, nprobe, rescore_multiplier, impl, selection, recall_target, chunk_size,
                query_batch):
        first_k = k if self.rescore is None else min(self.num_rows, k * rescore_multiplier)
        per_list = min(first_k, self.list_len)
        kept = min(first_k, nprobe * per_list)
        probes = self.probe(q, nprobe, selection, recall_target)
        q_args = tuple(jnp.asarray(a) for a in self.lists._query_args(q))
        x_lists = tuple(a.reshape(self.nlist, self.list_len, *a.shape[1:]) for a in self.lists._x_args())
        list_ids = self._device_list_ids()
        scores, ids = [], []
        for start in range(0, q.shape[0], query_batch):
            rows = np.arange(start, min(start + query_batch, q.shape[0]))
            group_q, rank = _group_by_list(probes[rows], self.nlist)
            s, i = _scan(self.kind, tuple(a[rows] for a in q_args), x_lists, list_ids, jnp.asarray(group_q),
                         jnp.asarray(probes[rows]), jnp.asarray(rank), select_queries(row_filter, rows),
                         per_list=per_list, kept=kept, impl=impl, selection=selection, recall_target=recall_target,
                         chunk_size=chunk_size)
            scores.append(np.asarray(s))
            ids.append(np.asarray(i))
        scores, ids = np.concatenate(scores), np.concatenate(ids)
        if kept < first_k:  # the probed lists hold fewer slots than results: the rest is missing
            scores = np.pad(scores, ((0, 0), (0, first_k - kept)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, first_k - kept)), constant_values=-1)
        if self.rescore is None:
            return scores[:, :k], ids[:, :k]
        s, i = self._rescorer()._rescore(q, jnp.asarray(ids), k, impl)
        return np.asarray(s), np.asarray(i)

    # ------------------------------------------------------------ persistence

    def save(self, path) -> None:
        """One ``.npz`` file (atomic): centroids, list ids, list-major codes, rescoring copy."""
        arrays, header = self.lists.to_arrays(prefix="lists_")
        arrays.update(centroids=self.centroids, list_ids=self.list_ids)
        if self.rescore_store is not None:
            arrays["rescore_store"] = self.rescore_store
        if self.rescore_ranges is not None:
            arrays["rescore_ranges_lo"], arrays["rescore_ranges_hi"] = self.rescore_ranges
        header.update(type="IVFIndex", ivf_version=_FORMAT_VERSION, num_rows=self.num_rows, rescore=self.rescore)
        write_index_file(path, header, arrays)

    @classmethod
    def load(cls, path, kind: str | None = None) -> "IVFIndex":
        """Read a ``save``d index; ``kind`` (optional) asserts the code type it was built with."""
        with np.load(path, allow_pickle=False) as z:
            header = read_index_header(z, path, "IVFIndex", kind)
            if header.get("ivf_version") != _FORMAT_VERSION or header.get("rescore") not in RESCORE:
                raise ValueError(f"{path}: unsupported IVFIndex header {header}")
            lists = CodeIndex.from_arrays(z, {**header, "rescore": None}, prefix="lists_")
            ranges = (z["rescore_ranges_lo"], z["rescore_ranges_hi"]) if "rescore_ranges_lo" in z else None
            store = z["rescore_store"] if "rescore_store" in z else None
            return cls(z["centroids"], lists, z["list_ids"], int(header["num_rows"]), header["rescore"], store, ranges)


@functools.partial(jax.jit, static_argnames=("nprobe", "selection", "recall_target"))
def _probe(q_qd, centroids_kd, nprobe, selection, recall_target):
    sims = jnp.dot(q_qd, centroids_kd.T, precision=lax.Precision.HIGHEST)
    if selection == "approx":
        _, lists = lax.approx_max_k(sims, nprobe, recall_target=recall_target)
    else:
        _, lists = lax.top_k(sims, nprobe)
    return lists.astype(jnp.int32)


def _group_by_list(probes_qp: np.ndarray, nlist: int):
    """Queries grouped by the lists they probe.

    Returns ``group_q`` int32 [nlist, P'] (the queries probing each list, -1 = padding;
    P' = the busiest list's count rounded up to a power of two, so batches reuse compiled
    shapes) and ``rank`` int32 [Q, nprobe]: the slot of query q within the group of the list
    it probes j-th.
    """
    q, nprobe = probes_qp.shape
    lists = probes_qp.reshape(-1)
    order = np.argsort(lists, kind="stable")
    counts = np.bincount(lists, minlength=nlist)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_sorted = np.arange(lists.size) - starts[lists[order]]
    width = next_pow2(int(counts.max()))
    group_q = np.full((nlist, width), -1, np.int32)
    group_q[lists[order], rank_sorted] = order // nprobe
    rank = np.empty(lists.size, np.int32)
    rank[order] = rank_sorted
    return group_q, rank.reshape(q, nprobe)


def _list_filter(row_filter, group_q, list_ids):
    """Per list, the kernel filter of its query group over its slots (vmapped over lists)."""
    if row_filter is None:
        return None
    safe_q, safe_ids = jnp.maximum(group_q, 0), jnp.maximum(list_ids, 0)
    if row_filter.mask_mn is not None:
        mask = row_filter.mask_mn
        if mask.shape[0] == 1:  # shared: [nlist, 1, L]
            return RowFilter(mask_mn=jnp.take(mask[0], safe_ids)[:, None, :])
        return RowFilter(mask_mn=mask[safe_q[:, :, None], safe_ids[:, None, :]])  # [nlist, P', L]
    attrs, lo, hi = row_filter.predicates
    list_attrs = jnp.moveaxis(jnp.take(attrs, safe_ids, axis=1), 1, 0)  # [nlist, A, L]
    if lo.shape[0] == 1:
        bounds = (jnp.broadcast_to(lo, (group_q.shape[0], 1, lo.shape[1])),
                  jnp.broadcast_to(hi, (group_q.shape[0], 1, hi.shape[1])))
    else:
        bounds = (lo[safe_q], hi[safe_q])  # [nlist, P', A]
    return RowFilter(predicates=RowPredicates(list_attrs, *bounds))


@functools.partial(jax.jit, static_argnames=("kind", "per_list", "kept", "impl", "selection", "recall_target",
                                             "chunk_size"))
def _scan(kind, q_args, x_lists, list_ids, group_q, probes_qp, rank_qp, row_filter, *, per_list, kept, impl,
          selection, recall_target, chunk_size):
    """Top-``kept`` (scores [Q, kept], corpus ids [Q, kept]) of each query over its probed lists.

    Every list is scanned once, by the existing top-k kernel of the code kind, against the
    group of queries that probe it (``jax.vmap`` over lists); each query then merges its
    nprobe per-list lists exactly (score desc, corpus id asc).
    """
    q_groups = tuple(jnp.take(a, jnp.maximum(group_q, 0), axis=0) for a in q_args)  # [nlist, P', ...]
    list_filter = _list_filter(row_filter, group_q, list_ids)
    if selection == "approx":
        def scores_of(qa, xa, ids, flt):
            s = score_chunk_fn(kind)(qa, xa)
            keep = (ids >= 0)[None, :]
            if flt is not None:
                keep = keep & rows_pass(flt, 0, ids.shape[0])
            return jnp.where(keep, s, NEG_INF)

        s = jax.vmap(scores_of)(q_groups, x_lists, list_ids, list_filter)  # [nlist, P', L]
        top, pos = lax.approx_max_k(s, per_list, recall_target=recall_target)
        top_ids = jnp.take_along_axis(jnp.broadcast_to(list_ids[:, None, :], s.shape), pos, axis=2)
    else:
        def one_list(qa, xa, ids, flt):
            return first_stage_topk(kind, qa, xa, per_list, impl, chunk_size, flt, ids)

        top, top_ids = jax.vmap(one_list)(q_groups, x_lists, list_ids, list_filter)  # [nlist, P', per_list]
    q = probes_qp.shape[0]
    mine_s = top[probes_qp, rank_qp].reshape(q, -1)  # [Q, nprobe * per_list]
    mine_i = top_ids[probes_qp, rank_qp].reshape(q, -1)
    if selection == "approx":
        mine_s, pos = lax.approx_max_k(mine_s, kept, recall_target=recall_target)
        return mark_missing(*sort_by_score_then_id(mine_s, jnp.take_along_axis(mine_i, pos, axis=1), kept))
    return mark_missing(*top_k_by_score_then_id(mine_s, mine_i, kept))
