"""An inverted-file (IVF) index in JAX: k-means lists of float32, int8, int4, fp8 or binary codes.

    index = IVFIndex.build(corpus_nd, nlist=128, kind="binary", rescore="float32", mesh=mesh)
    scores, ids = index.search(queries_qd, k=10, nprobe=8)
    scores, ids = index.search(queries_qd, k=10, nprobe=8, filter=AttributeFilter(attrs, Eq("lang", "en")))
    index.save("ivf.npz"); IVFIndex.load("ivf.npz", kind="binary")

Build: spherical k-means (``index.kmeans``, jitted and sharded over ``mesh``) trains
``nlist`` centroids on at most ``train_points_per_list * nlist`` points; every corpus
vector goes to the list of its nearest centroid (largest inner product). Each list is
stored as a run of padded, static-shape blocks of ``block_rows`` rows (members in
ascending corpus id; the last block of a list is padded with id -1), so padding costs
less than one block per list however unequal the lists are. ``block_ids`` [blocks,
block_rows] holds each slot's corpus id and ``block_list`` [blocks] its list. The
first-stage codes live in that block order (the ``lists`` ``CodeIndex``); the
rescoring copy (float32 or int8) stays in corpus order.

Search: each query probes the ``nprobe`` lists with the largest <q, centroid> (ties ->
smaller list). The queries probing a list are cut into chunks of ``query_block`` (16),
and every (block of the list, chunk of its queries) pair is one work item: the existing
top-k kernel of the code kind (``first_stage_topk``: Hamming, int8/int4/fp8 and
float32; ``impl`` picks Pallas or the jnp twin) scores the chunk against the block,
all items at once under ``jax.vmap``. Padding slots (id -1) and filtered rows are masked
inside the kernel (attribute predicates are evaluated there per tile), and the slots'
corpus ids break ties, so with ``nprobe == nlist`` the result equals exhaustive search
of the same codes. Each query then merges the per-block top-k lists of its probed
lists exactly. With ``rescore``, ``k * rescore_multiplier`` candidates are rescored.

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
QUERY_BLOCK = 16  # queries per work item (the Pallas kernels' query tile)
_FORMAT_VERSION = 2


@dataclasses.dataclass
class IVFIndex:
    centroids: np.ndarray  # float32 [nlist, D]
    lists: CodeIndex  # first-stage codes in block order: blocks * block_rows rows (no rescoring copy)
    block_ids: np.ndarray  # int32 [blocks, block_rows]: corpus id of each slot, -1 = padding
    block_list: np.ndarray  # int32 [blocks]: the list each block belongs to (a list's blocks are contiguous)
    num_rows: int
    rescore: str | None = None
    rescore_store: np.ndarray | None = None  # corpus order
    rescore_ranges: tuple | None = None

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, corpus_nd, nlist: int, kind: str = "float32", *, rescore: str | None = None, iters: int = 20,
              seed: int = 0, mesh=None, axis: str = "data", train_points_per_list: int = 256, block_rows: int = 32,
              calibration_nd=None) -> "IVFIndex":
        """Train the coarse quantizer on ``corpus_nd`` [N, D], fill the lists and quantise them (``kind``).

        ``block_rows``: rows per list block (32 suits the CPU twin; the Pallas kernels scan
        tiles of 128 columns, so use 128 on a GPU).
        """
        x = np.asarray(corpus_nd)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or x.shape[0] == 0:
            raise ValueError(f"corpus_nd must be a non-empty 2-D float array [N, D]; got {x.dtype} {x.shape}")
        x = x.astype(np.float32)
        if not isinstance(nlist, int) or not 1 <= nlist <= x.shape[0]:
            raise ValueError(f"nlist={nlist} must be an int between 1 and the corpus size {x.shape[0]}")
        if x.shape[0] > MAX_EXACT_ID:
            raise ValueError(f"IVFIndex holds at most {MAX_EXACT_ID} vectors (ids break ties exactly in float32 "
                             f"below 2^24); got {x.shape[0]}: shard the corpus into several indexes")
        if not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be an int >= 1; got {block_rows}")
        flat = CodeIndex.build(x, kind, rescore=rescore, calibration_nd=calibration_nd)  # validates kind/rescore
        centroids, _ = kmeans(x, nlist, iters=iters, seed=seed, mesh=mesh, axis=axis,
                              max_points=train_points_per_list * nlist)
        owner = assign(x, centroids)
        sizes = np.bincount(owner, minlength=nlist)
        blocks = -(-sizes // block_rows)
        first_block = np.cumsum(blocks) - blocks
        order = np.argsort(owner, kind="stable")  # by list, then ascending corpus id
        rank = np.arange(x.shape[0]) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        block_ids = np.full((int(blocks.sum()), block_rows), -1, np.int32)
        block_ids[first_block[owner[order]] + rank // block_rows, rank % block_rows] = order
        lists = dataclasses.replace(flat.subset(np.maximum(block_ids.reshape(-1), 0)), rescore=None,
                                    rescore_store=None, rescore_ranges=None)
        block_list = np.repeat(np.arange(nlist), blocks).astype(np.int32)
        return cls(centroids, lists, block_ids, block_list, x.shape[0], flat.rescore, flat.rescore_store,
                   flat.rescore_ranges)

    @property
    def kind(self) -> str:
        return self.lists.kind

    @property
    def dim(self) -> int:
        return self.lists.dim

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def block_rows(self) -> int:
        return self.block_ids.shape[1]

    def list_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first block, number of blocks)`` of every list, int [nlist] each."""
        count = np.bincount(self.block_list, minlength=self.nlist)
        return np.cumsum(count) - count, count

    def list_members(self, list_index: int) -> np.ndarray:
        """The corpus ids in a list, ascending."""
        ids = self.block_ids[self.block_list == list_index].reshape(-1)
        return ids[ids >= 0]

    def list_sizes(self) -> np.ndarray:
        return np.bincount(self.block_list, weights=(self.block_ids >= 0).sum(axis=1), minlength=self.nlist).astype(int)

    def padding_fraction(self) -> float:
        """Share of block slots that are padding (the cost of static-shape blocks)."""
        return 1.0 - self.num_rows / self.block_ids.size

    # ------------------------------------------------------------ search

    def search(self, queries_qd, k: int, *, nprobe: int, rescore_multiplier: int = 4, impl: str = "auto",
               selection: str = "exact", recall_target: float = 0.95, filter=None, filter_strategy: str = "auto",
               post_multiplier: float = 2.0, chunk_size: int = 4096, query_batch: int | None = None):
        """``(scores float32 [Q, k], ids int32 [Q, k])`` numpy, best first, ties -> smaller id.

        ``nprobe`` lists per query (1 <= nprobe <= nlist). Results the probed lists
        cannot fill (too few rows, or too few passing the filter) are id -1, score -inf.
        Queries go ``query_batch`` at a time (default: about 2,048 work items per batch);
        memory holds the batch's items: query_block queries and block_rows code rows each.
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
            blocks_per_list = self.block_ids.shape[0] / self.nlist
            query_batch = int(np.clip(2048 * QUERY_BLOCK / (nprobe * blocks_per_list), QUERY_BLOCK, 4096))
        if not isinstance(query_batch, int) or query_batch < 1:
            raise ValueError(f"query_batch must be an int >= 1; got {query_batch!r}")
        options = dict(nprobe=nprobe, rescore_multiplier=rescore_multiplier, impl=impl, selection=selection,
                       recall_target=recall_target, chunk_size=chunk_size, query_batch=query_batch)
        backend = Backend(search=lambda qq, kk, rf: self._search(qq, kk, rf, **options),
                          subset=lambda rows: self.flat_subset(rows).backend(
                              rescore_multiplier=rescore_multiplier, impl=impl, chunk_size=chunk_size))
        return filtered_search(backend, q, k, row_filter, self.num_rows, strategy=filter_strategy,
                               post_multiplier=post_multiplier)

    def _device(self):
        cache = self.lists._device  # lives and dies with the list codes
        if "block_ids" not in cache:
            cache["block_ids"] = jnp.asarray(self.block_ids)
            cache["centroids"] = jnp.asarray(self.centroids)
        return cache

    def probe(self, queries_qd, nprobe: int, selection: str = "exact", recall_target: float = 0.95) -> np.ndarray:
        """int32 [Q, nprobe]: the lists each query scans (largest <q, centroid> first)."""
        return np.asarray(_probe(jnp.asarray(queries_qd, jnp.float32), self._device()["centroids"], nprobe,
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
        """An exhaustive ``CodeIndex`` of the corpus rows ``rows`` (codes gathered from the blocks)."""
        rows = np.asarray(rows)
        slot_of_row = np.empty(self.num_rows, np.int64)
        valid = self.block_ids.reshape(-1) >= 0
        slot_of_row[self.block_ids.reshape(-1)[valid]] = np.flatnonzero(valid)
        sub = self.lists.subset(slot_of_row[rows])
        store = None if self.rescore_store is None else np.asarray(self.rescore_store)[rows]
        return dataclasses.replace(sub, rescore=self.rescore, rescore_store=store, rescore_ranges=self.rescore_ranges)

    def _search(self, q, k, row_filter, *, nprobe, rescore_multiplier, impl, selection, recall_target, chunk_size,
                query_batch):
        first_k = k if self.rescore is None else min(self.num_rows, k * rescore_multiplier)
        per_block = min(first_k, self.block_rows)
        probes = self.probe(q, nprobe, selection, recall_target)
        q_args = tuple(jnp.asarray(a) for a in self.lists._query_args(q))
        x_blocks = tuple(a.reshape(-1, self.block_rows, *a.shape[1:]) for a in self.lists._x_args())
        block_ids = self._device()["block_ids"]
        first_block, num_blocks = self.list_blocks()
        scores, ids = [], []
        for start in range(0, q.shape[0], query_batch):
            rows = np.arange(start, min(start + query_batch, q.shape[0]))
            plan = _plan(probes[rows], first_block, num_blocks)
            s, i = _scan(self.kind, tuple(a[rows] for a in q_args), x_blocks, block_ids,
                         *(jnp.asarray(a) for a in plan), select_queries(row_filter, rows), per_block=per_block,
                         kept=first_k, impl=impl, selection=selection, recall_target=recall_target,
                         chunk_size=chunk_size)
            scores.append(np.asarray(s))
            ids.append(np.asarray(i))
        scores, ids = np.concatenate(scores), np.concatenate(ids)
        if self.rescore is None:
            return scores, ids
        s, i = self._rescorer()._rescore(q, jnp.asarray(ids), k, impl)
        return np.asarray(s), np.asarray(i)

    # ------------------------------------------------------------ persistence

    def save(self, path) -> None:
        """One ``.npz`` file (atomic): centroids, block ids and lists, block-order codes, rescoring copy."""
        arrays, header = self.lists.to_arrays(prefix="lists_")
        arrays.update(centroids=self.centroids, block_ids=self.block_ids, block_list=self.block_list)
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
            return cls(z["centroids"], lists, z["block_ids"], z["block_list"], int(header["num_rows"]),
                       header["rescore"], store, ranges)


@functools.partial(jax.jit, static_argnames=("nprobe", "selection", "recall_target"))
def _probe(q_qd, centroids_kd, nprobe, selection, recall_target):
    sims = jnp.dot(q_qd, centroids_kd.T, precision=lax.Precision.HIGHEST)
    if selection == "approx":
        _, lists = lax.approx_max_k(sims, nprobe, recall_target=recall_target)
    else:
        _, lists = lax.top_k(sims, nprobe)
    return lists.astype(jnp.int32)


def _bucket(n: int) -> int:
    """``n`` rounded up to one of 8 sizes per power of two (compiled shapes repeat; padding <= 12.5 %)."""
    step = max(1, next_pow2(n) // 8)
    return -(-max(n, 1) // step) * step


def _plan(probes_qp: np.ndarray, first_block: np.ndarray, num_blocks: np.ndarray):
    """The work items of a query batch (host-side bookkeeping, numpy).

    The queries probing each list are cut into chunks of ``QUERY_BLOCK``; an item is one
    (block of a list, chunk of its queries) pair. Returns ``chunk_q`` int32 [C, QUERY_BLOCK]
    (queries of each chunk, -1 = padding), ``item_chunk`` / ``item_block`` int32 [I], and
    ``gather_item`` / ``gather_slot`` int32 [Q, S]: where each query finds its per-block
    results (S = the most blocks any query probes; -1 = nothing). C, I and S are rounded up
    by ``_bucket``; padding items score block 0 against chunk 0 and are never read.
    """
    q, nprobe = probes_qp.shape
    lists = probes_qp.reshape(-1)
    order = np.argsort(lists, kind="stable")
    counts = np.bincount(lists, minlength=len(first_block))
    rank = np.empty(lists.size, np.int64)
    rank[order] = np.arange(lists.size) - np.repeat(np.cumsum(counts) - counts, counts)
    chunks_per_list = -(-counts // QUERY_BLOCK)
    pair_chunk = (np.cumsum(chunks_per_list) - chunks_per_list)[lists] + rank // QUERY_BLOCK
    pair_slot = rank % QUERY_BLOCK
    num_chunks = int(chunks_per_list.sum())
    chunk_q = np.full((_bucket(num_chunks), QUERY_BLOCK), -1, np.int32)
    chunk_q[pair_chunk, pair_slot] = np.arange(lists.size) // nprobe
    chunk_list = np.repeat(np.arange(len(first_block)), chunks_per_list)
    blocks_of_chunk = num_blocks[chunk_list]
    item_base = np.cumsum(blocks_of_chunk) - blocks_of_chunk
    num_items = int(blocks_of_chunk.sum())
    item_chunk = np.zeros(_bucket(num_items), np.int32)
    item_block = np.zeros(_bucket(num_items), np.int32)
    item_chunk[:num_items] = np.repeat(np.arange(num_chunks), blocks_of_chunk)
    item_block[:num_items] = first_block[chunk_list[item_chunk[:num_items]]] + (
        np.arange(num_items) - item_base[item_chunk[:num_items]])
    # Every (query, probed list) pair reads one result row per block of the list.
    pair_blocks = num_blocks[lists]
    entries = int(pair_blocks.sum())
    entry_pair = np.repeat(np.arange(lists.size), pair_blocks)
    entry_item = item_base[pair_chunk[entry_pair]] + (np.arange(entries) - np.repeat(np.cumsum(pair_blocks) -
                                                                                      pair_blocks, pair_blocks))
    per_query = pair_blocks.reshape(q, nprobe).sum(axis=1)
    entry_pos = np.arange(entries) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    width = _bucket(int(per_query.max()))
    gather_item = np.full((q, width), -1, np.int32)
    gather_slot = np.zeros((q, width), np.int32)
    gather_item[entry_pair // nprobe, entry_pos] = entry_item
    gather_slot[entry_pair // nprobe, entry_pos] = pair_slot[entry_pair]
    return chunk_q, item_chunk, item_block, gather_item, gather_slot


def _item_filter(row_filter, item_q, item_ids):
    """Per work item, the kernel filter of its query chunk over its block's slots."""
    if row_filter is None:
        return None
    safe_q, safe_ids = jnp.maximum(item_q, 0), jnp.maximum(item_ids, 0)
    if row_filter.mask_mn is not None:
        mask = row_filter.mask_mn
        if mask.shape[0] == 1:  # shared: [I, 1, R]
            return RowFilter(mask_mn=jnp.take(mask[0], safe_ids)[:, None, :])
        return RowFilter(mask_mn=mask[safe_q[:, :, None], safe_ids[:, None, :]])  # [I, query block, R]
    attrs, lo, hi = row_filter.predicates
    item_attrs = jnp.moveaxis(jnp.take(attrs, safe_ids, axis=1), 1, 0)  # [I, A, R]
    if lo.shape[0] == 1:
        shape = (item_q.shape[0], 1, lo.shape[1])
        return RowFilter(predicates=RowPredicates(item_attrs, jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)))
    return RowFilter(predicates=RowPredicates(item_attrs, lo[safe_q], hi[safe_q]))  # bounds [I, query block, A]


@functools.partial(jax.jit, static_argnames=("kind", "per_block", "kept", "impl", "selection", "recall_target",
                                             "chunk_size"))
def _scan(kind, q_args, x_blocks, block_ids, chunk_q, item_chunk, item_block, gather_item, gather_slot, row_filter,
          *, per_block, kept, impl, selection, recall_target, chunk_size):
    """Top-``kept`` (scores [Q, kept], corpus ids [Q, kept]) of each query over its probed lists' blocks."""
    item_q = jnp.take(chunk_q, item_chunk, axis=0)  # [I, query block]
    q_items = tuple(jnp.take(a, jnp.maximum(item_q, 0), axis=0) for a in q_args)  # [I, query block, ...]
    x_items = tuple(jnp.take(a, item_block, axis=0) for a in x_blocks)  # [I, R, ...]
    ids = jnp.take(block_ids, item_block, axis=0)  # [I, R]
    item_filter = _item_filter(row_filter, item_q, ids)
    if selection == "approx":
        def scores_of(qa, xa, row_ids, flt):
            s = score_chunk_fn(kind)(qa, xa)
            keep = (row_ids >= 0)[None, :]
            if flt is not None:
                keep = keep & rows_pass(flt, 0, row_ids.shape[0])
            return jnp.where(keep, s, NEG_INF)

        s = jax.vmap(scores_of)(q_items, x_items, ids, item_filter)  # [I, query block, R]
        top, pos = lax.approx_max_k(s, per_block, recall_target=recall_target)
        top_ids = jnp.take_along_axis(jnp.broadcast_to(ids[:, None, :], s.shape), pos, axis=2)
    else:
        def one_item(qa, xa, row_ids, flt):
            return first_stage_topk(kind, qa, xa, per_block, impl, chunk_size, flt, row_ids)

        top, top_ids = jax.vmap(one_item)(q_items, x_items, ids, item_filter)  # [I, query block, per_block]
    found = (gather_item >= 0)[:, :, None]
    safe = jnp.maximum(gather_item, 0)
    mine_s = jnp.where(found, top[safe, gather_slot], NEG_INF).reshape(gather_item.shape[0], -1)
    mine_i = jnp.where(found, top_ids[safe, gather_slot], -1).reshape(gather_item.shape[0], -1)
    if mine_s.shape[1] < kept:  # fewer candidate slots than results: the rest is missing
        extra = kept - mine_s.shape[1]
        mine_s = jnp.pad(mine_s, ((0, 0), (0, extra)), constant_values=NEG_INF)
        mine_i = jnp.pad(mine_i, ((0, 0), (0, extra)), constant_values=-1)
    if selection == "approx":
        mine_s, pos = lax.approx_max_k(mine_s, kept, recall_target=recall_target)
        return mark_missing(*sort_by_score_then_id(mine_s, jnp.take_along_axis(mine_i, pos, axis=1), kept))
    return mark_missing(*top_k_by_score_then_id(mine_s, mine_i, kept))
