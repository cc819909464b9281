"""Top-k by low-bit inner products: int8, int4 (packed two per byte) and float8 codes.

Every kernel scores ``q_scale[i] * x_scale[j] * <q_i, x_j> + q_offset[i]`` with
the dot product accumulated in int32 (int8, int4) or float32 (fp8), then keeps a
running top-k (larger is better, ties -> smaller index).

* Symmetric per-vector codes: ``q_scale``/``x_scale`` are the vectors' scales, no offset.
* Per-dimension calibrated codes (``embedjax.quant.scalar``): fold the ranges into
  the query with ``affine_query_transform`` (x_scale = 1, q_offset = the
  query's constant term), so the ranking equals the dequantised inner product.

``select=`` (Pallas only): "running" (a running top-k inside the scan) or "two_pass" (tile
maxima, then the best tiles rescored by the jnp twin; ``kernels.two_pass_topk``); both exact.

The Pallas scan reads the corpus codes row-major, as they are stored: a corpus of
`two_pass_topk.scan_rows` (N) rows (the rows past N searched away with ``n_valid=N``) whose depth
is whole depth blocks (a multiple of 128 code columns, or a power of two from 16) reaches the
kernel without a copy; any other is padded into that shape on every search.

``filter=`` (mask [N] / [Q, N] or ``RowPredicates``, see ``kernels.row_filter``)
removes rows inside the scan; when fewer than k rows pass, the missing results are
id -1 with score -inf. ``row_ids=`` int32 [N] replaces the row index as reported
id and tie-breaker.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import device_array, resolve_impl
from embedjax.kernels.pallas_topk import (addressable_pieces, next_pow2, pad_axis, running_topk_call, scan_fits,
                                          search_in_pieces)
from embedjax.kernels.row_filter import as_row_filter, check_row_ids
from embedjax.kernels.topk import check_k, chunked_topk, resolve_n_valid
from embedjax.kernels.two_pass_topk import DEFAULT_SPLITS, check_selection, two_pass_topk
from embedjax.quant.scalar import unpack_int4

FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)


# ---------------------------------------------------------------- validation


def _check_2d(a, name):
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array; got shape {getattr(a, 'shape', None)}")


def _check_vec(a, n, name):
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of length {n}; got shape {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got {a.dtype}")


def _prepare(q, q_scale, x, x_scale, q_offset, k, n_valid, *, q_dtypes, x_dtypes, q_width, kind):
    q, x = device_array(q), device_array(x)
    _check_2d(q, "q")
    _check_2d(x, "x")
    if q.dtype not in q_dtypes:
        raise TypeError(f"{kind}: q must have dtype in {[jnp.dtype(d).name for d in q_dtypes]}; got {q.dtype}")
    if x.dtype not in x_dtypes:
        raise TypeError(f"{kind}: x must have dtype in {[jnp.dtype(d).name for d in x_dtypes]}; got {x.dtype}")
    if q_width(q.shape[1]) != x.shape[1]:
        raise ValueError(
            f"{kind}: q has {q.shape[1]} dims, which needs {q_width(q.shape[1])} corpus columns, but x has {x.shape[1]}; "
            "quantise queries and corpus from embeddings of the same dimension"
        )
    n_valid = resolve_n_valid(n_valid, x.shape[0])
    check_k(k, n_valid)
    if q.shape[0] == 0:
        raise ValueError("q is empty (0 queries)")
    q_scale = jnp.ones((q.shape[0],), jnp.float32) if q_scale is None else jnp.asarray(q_scale)
    x_scale = jnp.ones((x.shape[0],), jnp.float32) if x_scale is None else jnp.asarray(x_scale)
    q_offset = jnp.zeros((q.shape[0],), jnp.float32) if q_offset is None else jnp.asarray(q_offset)
    _check_vec(q_scale, q.shape[0], "q_scale")
    _check_vec(x_scale, x.shape[0], "x_scale")
    _check_vec(q_offset, q.shape[0], "q_offset")
    return q, q_scale.astype(jnp.float32), x, x_scale.astype(jnp.float32), q_offset.astype(jnp.float32), n_valid


# ---------------------------------------------------------------- jnp twins


def _dot_rows(q_tile, x_tile, acc_dtype):
    """q [bq, d] . x [bn, d] -> [bq, bn]: both operands contracted on their last axis."""
    return lax.dot_general(q_tile, x_tile, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)


def _int_dot(q, x):
    return _dot_rows(q, x, jnp.int32).astype(jnp.float32)


def _float_dot(q, x):
    return lax.dot_general(
        q.astype(jnp.float32), x.astype(jnp.float32), (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )


def _epilogue(dot_qc, q_scale, x_scale_c, q_offset):
    return dot_qc * q_scale[:, None] * x_scale_c[None, :] + q_offset[:, None]


def _int8_chunk(q_args, x_args):
    q, q_scale, q_offset = q_args
    x, x_scale = x_args
    return _epilogue(_int_dot(q, x), q_scale, x_scale, q_offset)


def _int4_chunk(q_args, x_args):
    q, q_scale, q_offset = q_args
    x, x_scale = x_args
    return _epilogue(_int_dot(q, unpack_int4(x, q.shape[1])), q_scale, x_scale, q_offset)


def _fp8_chunk(q_args, x_args):
    q, q_scale, q_offset = q_args
    x, x_scale = x_args
    return _epilogue(_float_dot(q, x), q_scale, x_scale, q_offset)


CHUNK_SCORERS = {"int8": _int8_chunk, "int4": _int4_chunk, "fp8": _fp8_chunk}


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "kind"))
def _lowbit_xla(q, q_scale, x, x_scale, q_offset, k, n_valid, *, kind, chunk_size=32768, row_filter=None,
                row_ids=None):
    return chunked_topk(CHUNK_SCORERS[kind], (q, q_scale, q_offset), (x, x_scale), k, n_valid=n_valid,
                        chunk_size=chunk_size, row_filter=row_filter, row_ids=row_ids)


# ---------------------------------------------------------------- Pallas


def _depth_block(width: int) -> int:
    """Contraction tile: a power of two, at most 128 (Triton dots need >= 16)."""
    return max(16, min(128, next_pow2(width)))


def _dot_tile(decode, depth_block, acc_dtype):
    """Tile scorer for ``sum_chunks dot(q_chunk, decode(x_chunk))`` with the scale epilogue.

    q_refs: (q [bq, Dp] (int8 or float), q_scale [bq, 1], q_offset [bq, 1], *extra q operands)
    x_refs: (x [N, Dp'] row-major, as the caller stores it, x_scale [1, N]); each chunk's tile is
    [block_n, depth_block] and the dots contract both operands' last axis (q x^T), so no transposed
    copy of the corpus is made
    """

    def tile(q_refs, x_refs, offset, block_n):
        q_ref, qs_ref, qo_ref = q_refs[:3]
        x_ref, xs_ref = x_refs
        chunks = x_ref.shape[1] // depth_block

        def body(c, acc):
            start = pl.multiple_of(c * depth_block, depth_block)
            x_tile = x_ref[pl.ds(offset, block_n), pl.ds(start, depth_block)]
            return acc + decode(q_refs, start, x_tile, depth_block)

        acc = lax.fori_loop(0, chunks, body, jnp.zeros((q_ref.shape[0], block_n), acc_dtype))
        xs = xs_ref[pl.ds(0, 1), pl.ds(offset, block_n)]
        return acc.astype(jnp.float32) * qs_ref[...] * xs + qo_ref[...]

    return tile


def _decode_int8(q_refs, start, x_tile, depth_block):
    q_tile = q_refs[0][:, pl.ds(start, depth_block)]
    return _dot_rows(q_tile, x_tile, jnp.int32)


def _decode_fp8(q_refs, start, x_tile, depth_block):
    # fp8 values are exact in bfloat16, so a bf16 dot with float32 accumulation
    # gives exact products (fp8 tensor cores would take x_tile as is).
    q_tile = q_refs[0][:, pl.ds(start, depth_block)]
    compute = jnp.float32 if q_tile.dtype == jnp.float32 else jnp.bfloat16
    return _dot_rows(q_tile.astype(compute), x_tile.astype(compute), jnp.float32)


def _sign_extend_nibble(v):
    return (((v.astype(jnp.int32)) ^ 8) - 8).astype(jnp.int8)


def _decode_int4(q_refs, start, x_tile, depth_block):
    # q_refs[0] holds the even dimensions, q_refs[3] the odd ones; byte b of a
    # corpus vector carries dim 2b in its low nibble and dim 2b+1 in its high nibble.
    q_even = q_refs[0][:, pl.ds(start, depth_block)]
    q_odd = q_refs[3][:, pl.ds(start, depth_block)]
    low = _sign_extend_nibble(x_tile & jnp.uint8(0xF))
    high = _sign_extend_nibble(x_tile >> jnp.uint8(4))
    return _dot_rows(q_even, low, jnp.int32) + _dot_rows(q_odd, high, jnp.int32)


def _scan_depth(kind, q, x) -> tuple[int, int]:
    """``(depth block, padded depth)`` of the Pallas scan: the padded depth is the words per corpus
    row in its operand (int4 packs two codes per byte, so its depth is the packed width)."""
    depth = x.shape[1] if kind == "int4" else q.shape[1]
    db = _depth_block(depth)
    return db, -(-depth // db) * db


@functools.partial(jax.jit, static_argnames=("k", "kind", "block_q", "block_n", "target_splits", "interpret", "select"))
def _lowbit_pallas(q, q_scale, x, x_scale, q_offset, k, n_valid, *, kind, block_q=16, block_n=128,
                   target_splits=None, interpret=False, row_filter=None, row_ids=None, select="running"):
    if kind == "int4":
        q2 = pad_axis(q, 1, 2 * x.shape[1])
        q_main, q_extra = q2[:, 0::2], (q2[:, 1::2],)
        decode, acc = _decode_int4, jnp.int32
    else:
        q_main, q_extra = q, ()
        decode, acc = (_decode_int8, jnp.int32) if kind == "int8" else (_decode_fp8, jnp.float32)
    db, padded = _scan_depth(kind, q, x)
    q_ops = (pad_axis(q_main, 1, padded), q_scale[:, None], q_offset[:, None]) + tuple(pad_axis(e, 1, padded) for e in q_extra)
    # the codes row-major as given (a depth that is whole depth blocks, e.g. 384, is not copied)
    x_ops = (pad_axis(x, 1, padded), x_scale[None, :])
    options = dict(block_q=block_q, block_n=block_n, target_splits=target_splits or DEFAULT_SPLITS[select],
                   interpret=interpret, row_filter=row_filter, row_ids=row_ids, x_axes=(0, 1))
    if select == "two_pass":
        return two_pass_topk(_dot_tile(decode, db, acc), CHUNK_SCORERS[kind], q_ops, x_ops, (q, q_scale, q_offset),
                             (x, x_scale), n_valid, k, **options)
    return running_topk_call(_dot_tile(decode, db, acc), q_ops, x_ops, n_valid, k, **options)


def lowbit_topk_pallas(q, q_scale, x, x_scale, q_offset, k, n_valid, *, kind, block_q=16, block_n=128,
                       target_splits=None, interpret=False, row_filter=None, row_ids=None, select="running"):
    """The Pallas scan of prepared operands (`_prepare`) -> (scores float32 [Q, k], ids int32 [Q, k]).
    A corpus past the kernels' 32-bit offsets (`pallas_topk.MAX_SCAN_ELEMENTS`) is scanned in
    consecutive pieces that fit, merged exactly (`pallas_topk.search_in_pieces`)."""
    target_splits = target_splits or DEFAULT_SPLITS[select]
    pieces = addressable_pieces(x.shape[0], _scan_depth(kind, q, x)[1], block_n=block_n, target_splits=target_splits)

    def search(start, stop, k, n_valid, row_filter, row_ids):
        return _lowbit_pallas(q, q_scale, x[start:stop], x_scale[start:stop], q_offset, k, n_valid, kind=kind,
                              block_q=block_q, block_n=block_n, target_splits=target_splits, interpret=interpret,
                              row_filter=row_filter, row_ids=row_ids, select=select)

    return search_in_pieces(search, x.shape[0], pieces, k, n_valid, row_filter, row_ids)


# ---------------------------------------------------------------- public


def _run(kind, q, q_scale, x, x_scale, k, impl, q_offset, n_valid, chunk_size, filter, row_ids, select):
    check_selection(select)
    row_filter = as_row_filter(filter, q.shape[0], x.shape[0])
    row_ids = check_row_ids(row_ids, x.shape[0])
    fits = scan_fits(x.shape[0], _scan_depth(kind, q, x)[1], target_splits=DEFAULT_SPLITS[select])
    # Beyond the kernel's 32-bit offsets "auto" takes the twin, measured exact there (pieces are not timed).
    impl, interpret = resolve_impl(impl, pallas_fits=fits)
    if impl == "pallas":
        return lowbit_topk_pallas(q, q_scale, x, x_scale, q_offset, k, n_valid, kind=kind, interpret=interpret,
                                  row_filter=row_filter, row_ids=row_ids, select=select)
    return _lowbit_xla(q, q_scale, x, x_scale, q_offset, k, n_valid, kind=kind, chunk_size=chunk_size,
                       row_filter=row_filter, row_ids=row_ids)


def int8_topk(q, q_scale, x, x_scale, k, impl="auto", *, q_offset=None, n_valid=None, chunk_size=32768,
              filter=None, row_ids=None, select="running"):
    """int8 codes q [Q, D], x [N, D]; scales float32 [Q], [N] (None = 1) -> (scores f32 [Q, k], ids int32 [Q, k])."""
    args = _prepare(q, q_scale, x, x_scale, q_offset, k, n_valid, q_dtypes=(jnp.int8,), x_dtypes=(jnp.int8,),
                    q_width=lambda d: d, kind="int8_topk")
    q, q_scale, x, x_scale, q_offset, n_valid = args
    return _run("int8", q, q_scale, x, x_scale, k, impl, q_offset, n_valid, chunk_size, filter, row_ids, select)


def int4_topk(q, q_scale, x, x_scale, k, impl="auto", *, q_offset=None, n_valid=None, chunk_size=32768,
              filter=None, row_ids=None, select="running"):
    """int8 query codes q [Q, D] against packed int4 corpus codes x uint8 [N, ceil(D/2)]."""
    args = _prepare(q, q_scale, x, x_scale, q_offset, k, n_valid, q_dtypes=(jnp.int8,), x_dtypes=(jnp.uint8,),
                    q_width=lambda d: -(-d // 2), kind="int4_topk")
    q, q_scale, x, x_scale, q_offset, n_valid = args
    return _run("int4", q, q_scale, x, x_scale, k, impl, q_offset, n_valid, chunk_size, filter, row_ids, select)


def fp8_topk(q, q_scale, x, x_scale, k, impl="auto", *, q_offset=None, n_valid=None, chunk_size=32768,
             filter=None, row_ids=None, select="running"):
    """fp8 (e4m3 / e5m2) corpus codes x [N, D]; q fp8 or float32 [Q, D]; float32 accumulation."""
    args = _prepare(q, q_scale, x, x_scale, q_offset, k, n_valid,
                    q_dtypes=FP8_DTYPES + (jnp.float32, jnp.bfloat16), x_dtypes=FP8_DTYPES,
                    q_width=lambda d: d, kind="fp8_topk")
    q, q_scale, x, x_scale, q_offset, n_valid = args
    return _run("fp8", q, q_scale, x, x_scale, k, impl, q_offset, n_valid, chunk_size, filter, row_ids, select)
