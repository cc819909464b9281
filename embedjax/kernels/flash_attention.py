"""Flash attention in Pallas with attention dropout drawn inside the kernel.

Why: BERT-family training keeps attention dropout (0.1), and cuDNN's fused attention behind
`jax.nn.dot_product_attention` has none, so under dropout the other paths either materialise
the [L, L] scores and a stored mask (``explicit``) or recompute them with a mask drawn per key
block by XLA (``chunked``). PyTorch's SDPA drops inside its fused kernel; on an H200 the MiniLM
training step ran at 0.67-0.72x PyTorch's with those paths (BENCHMARKS.md, issue 17). Here the
mask is a pure function of (seed, batch row, head, query index, key index), so the forward and
both backward kernels regenerate any tile of it from a counter-based hash in registers; no
[L, L] array of scores, probabilities or mask ever reaches memory.

Kernels (the layout is Triton's: each program holds one block of rows and walks the whole other
operand with ``pl.ds`` slices; blocks are powers of two, at least 16, the caller pads):

* forward, grid (B, H, query blocks): the online softmax over key blocks (running max, sum of
  exponentials, and the value sum of the kept probabilities), then the output and the rows'
  log-sum-exp, saved for the backward pass;
* key side, grid (B, H, key blocks): walks the query blocks, recomputes each tile's
  probabilities from the saved log-sum-exp, and accumulates dK and dV per query head (a GQA
  group's heads are summed afterwards, outside: no program adds into another's output);
* query side, grid (B, H, query blocks): walks the key blocks and accumulates dQ.

With P the softmax, Z the kept mask over (1 - rate) and dO the output's cotangent, the output is
(P * Z) V, so dV = (P * Z)^T dO, dP = (dO V^T) * Z, and dS = P * (dP - delta) with
delta = rowsum(dO * O) (the rows' dot of the cotangent with the dropped output, computed once in
XLA), as in FlashAttention-2's backward pass.

Which keys a query reads: those whose id equals the query's (a key-padding mask is query ids 1
and key ids 1/0; packed texts pass their segment ids, 0 for padding, for both; the kernel pads
keys with id 0 and queries never carry 0 outside padding), and with ``causal``
keys at or before the query (within ``window`` positions of it for a sliding window). Key
blocks wholly after a causal query block are not visited. Masked scores take float32's most
negative finite value, as in `embedjax.models.attention`; rows that see no key at all are not
defined (callers mask them out of pooling).

The dropout hash: ``lowbias32`` (a 32-bit integer finaliser: xor-shift, multiply, xor-shift,
multiply, xor-shift; a bijection with full avalanche) of the seed and the flattened (batch, head),
of that with the query index, then of that with the key index, all in wrapping int32 arithmetic
(Triton's integer ops). A pair is kept when the top 24 bits of its hash are at least
``rate * 2**24``. `dropout_keep` evaluates the same function on whole arrays: the twin the tests
compare the kernels with. The stream differs from `jax.random`'s, so the mask differs from the
explicit and chunked paths' masks (same distribution). `tests/kernels/test_flash_attention.py` compares the kernels with a dense float64
attention that applies that mask, and `tests/kernels/test_gpu_lowering.py` lowers them for CUDA.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels import dispatch
from embedjax.kernels.pallas_topk import next_pow2, pad_axis

DEFAULT_BLOCK = 64
MIN_BLOCK = 16  # Triton's dots need at least 16 rows and columns per operand
_NEG = float(jnp.finfo(jnp.float32).min)
_KEEP_BITS = 24  # the kept test compares the hash's top 24 bits (non-negative as int32)


def _int32(value: int) -> int:
    """A 32-bit constant as the signed int32 with the same bits."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


_MUL_1, _MUL_2 = _int32(0x7FEB352D), _int32(0x846CA68B)  # lowbias32's multipliers
_ROW_SPREAD, _COL_SPREAD = _int32(0x9E3779B9), _int32(0x85EBCA6B)  # odd: index -> distinct words


def mix32(x):
    """lowbias32 of int32 words (the bits read as unsigned; multiplications wrap)."""
    x = x ^ lax.shift_right_logical(x, jnp.int32(16))
    x = x * jnp.int32(_MUL_1)
    x = x ^ lax.shift_right_logical(x, jnp.int32(15))
    x = x * jnp.int32(_MUL_2)
    return x ^ lax.shift_right_logical(x, jnp.int32(16))


def row_keys(seed, stream, rows):
    """int32 hash state per query row: ``seed`` scalar, ``stream`` the flattened (batch, head)
    index (scalar), ``rows`` int32 query indices (any shape)."""
    return mix32(mix32(seed ^ mix32(stream + jnp.int32(1))) ^ (rows * jnp.int32(_ROW_SPREAD)))


def keep_threshold(rate: float) -> int:
    """Pairs whose hash's top 24 bits are at least this are kept (probability ~1 - rate)."""
    return int(round(rate * (1 << _KEEP_BITS)))


def kept(row_key, cols, threshold: int):
    """bool: pair (row, col) survives dropout; ``row_key`` from `row_keys`, broadcast against ``cols``."""
    bits = mix32(row_key ^ (cols * jnp.int32(_COL_SPREAD)))
    return lax.shift_right_logical(bits, jnp.int32(32 - _KEEP_BITS)) >= threshold


def dropout_keep(seed, batch: int, heads: int, q_len: int, k_len: int, rate: float):
    """bool [batch, heads, q_len, k_len]: the kernels' dropout mask, evaluated in plain jnp."""
    seed = jnp.asarray(seed, jnp.int32)
    stream = jnp.arange(batch * heads, dtype=jnp.int32).reshape(batch, heads, 1, 1)
    rows = jnp.arange(q_len, dtype=jnp.int32).reshape(1, 1, q_len, 1)
    cols = jnp.arange(k_len, dtype=jnp.int32).reshape(1, 1, 1, k_len)
    return kept(row_keys(seed, stream, rows), cols, keep_threshold(rate))


class _Config(NamedTuple):
    """The static settings of one attention call (hashable: the custom VJP's non-array argument)."""

    scale: float
    causal: bool
    window: int | None
    rate: float
    block: int
    heads: int
    groups: int  # key/value heads
    interpret: bool


def _allowed(q_ids, k_ids, rows, cols, cfg: _Config):
    """bool [rows, cols] of one tile: the same id, and causal order / window."""
    allowed = q_ids == k_ids
    if cfg.causal:
        allowed &= cols <= rows
        if cfg.window is not None:
            allowed &= cols > rows - cfg.window
    return allowed


def _scores(q, k, q_ids, k_ids, rows, cols, cfg: _Config):
    """float32 [bq, bk] scaled, masked scores of one tile."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * cfg.scale
    return jnp.where(_allowed(q_ids, k_ids, rows, cols, cfg), s, _NEG)


def _dropout_scale(row_key, cols, cfg: _Config):
    """Z float32 [rows, cols] of one tile: 1 / (1 - rate) where kept, 0 where dropped; None
    without dropout."""
    if cfg.rate == 0.0:
        return None
    return jnp.where(kept(row_key, cols, keep_threshold(cfg.rate)), 1.0 / (1.0 - cfg.rate), 0.0)


def _times(x, z):
    return x if z is None else x * z


def _block_index(i, size: int, axis: int):
    """int32 [size, 1] (axis 0) or [1, size] (axis 1): global indices of block ``i``."""
    shape = (size, 1) if axis == 0 else (1, size)
    return i * size + lax.broadcasted_iota(jnp.int32, shape, axis)


def _span(i, size: int):
    return pl.ds(pl.multiple_of(i * size, size), size)


def _key_block_range(i, n_blocks: int, cfg: _Config):
    """Key blocks a query block reads: all, or up to its causal diagonal (and from its window's start)."""
    if not cfg.causal:
        return 0, n_blocks
    stop = jnp.minimum(i + 1, n_blocks)  # square blocks: the query block's diagonal key block is the last
    start = 0 if cfg.window is None else jnp.maximum(0, (i * cfg.block - cfg.window + 1) // cfg.block)
    return start, stop


def _query_block_range(j, n_blocks: int, cfg: _Config):
    """Query blocks that read key block ``j`` (the transpose of `_key_block_range`)."""
    if not cfg.causal:
        return 0, n_blocks
    start = j
    stop = n_blocks if cfg.window is None else jnp.minimum(
        n_blocks, ((j + 1) * cfg.block - 1 + cfg.window - 1) // cfg.block + 1)
    return start, stop


def _stream(cfg: _Config):
    return pl.program_id(0) * cfg.heads + pl.program_id(1)


# ----------------------------------------------------------------------------------- kernels


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref, *, cfg: _Config, n_blocks: int):
    i = pl.program_id(2)
    q, q_ids = q_ref[...], qid_ref[...]
    rows = _block_index(i, cfg.block, 0)
    row_key = row_keys(seed_ref[0], _stream(cfg), rows) if cfg.rate > 0.0 else None

    def key_block(j, carry):
        acc, m, l = carry
        span = _span(j, cfg.block)
        cols = _block_index(j, cfg.block, 1)
        s = _scores(q, k_ref[span, :], q_ids, kid_ref[:, span], rows, cols, cfg)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        v = v_ref[span, :]
        pv = lax.dot_general(_times(p, _dropout_scale(row_key, cols, cfg)).astype(v.dtype), v,
                             (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True)

    start, stop = _key_block_range(i, n_blocks, cfg)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((cfg.block, 1), _NEG, jnp.float32),
            jnp.zeros((cfg.block, 1), jnp.float32))
    acc, m, l = lax.fori_loop(start, stop, key_block, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _tile_gradients(q, k, v, do, lse, delta, q_ids, k_ids, rows, cols, row_key, cfg: _Config):
    """(P * Z, dS) float32 [bq, bk] of one tile, recomputed from the saved log-sum-exp (the
    dropout mask drawn once for both)."""
    p = jnp.exp(_scores(q, k, q_ids, k_ids, rows, cols, cfg) - lse)
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    z = _dropout_scale(row_key, cols, cfg)
    return _times(p, z), p * (_times(dp, z) - delta)


def _key_side_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, dk_ref, dv_ref, *,
                     cfg: _Config, n_blocks: int):
    j = pl.program_id(2)
    k, v, k_ids = k_ref[...], v_ref[...], kid_ref[...]
    cols = _block_index(j, cfg.block, 1)
    stream = _stream(cfg)  # read outside the loop: interpret mode cannot lower program_id inside it

    def query_block(i, carry):
        dk, dv = carry
        span = _span(i, cfg.block)
        rows = _block_index(i, cfg.block, 0)
        row_key = row_keys(seed_ref[0], stream, rows) if cfg.rate > 0.0 else None
        q, do = q_ref[span, :], do_ref[span, :]
        pz, ds = _tile_gradients(q, k, v, do, lse_ref[span, :], delta_ref[span, :], qid_ref[span, :], k_ids, rows,
                                 cols, row_key, cfg)
        dv = dv + lax.dot_general(pz.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dk, dv

    start, stop = _query_block_range(j, n_blocks, cfg)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, query_block, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _query_side_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, dq_ref, *,
                       cfg: _Config, n_blocks: int):
    i = pl.program_id(2)
    q, do, lse, delta, q_ids = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], qid_ref[...]
    rows = _block_index(i, cfg.block, 0)
    row_key = row_keys(seed_ref[0], _stream(cfg), rows) if cfg.rate > 0.0 else None

    def key_block(j, dq):
        span = _span(j, cfg.block)
        k = k_ref[span, :]
        _, ds = _tile_gradients(q, k, v_ref[span, :], do, lse, delta, q_ids, kid_ref[:, span], rows,
                                _block_index(j, cfg.block, 1), row_key, cfg)
        return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    start, stop = _key_block_range(i, n_blocks, cfg)
    dq_ref[...] = lax.fori_loop(start, stop, key_block, jnp.zeros(q.shape, jnp.float32)) * cfg.scale


# ---------------------------------------------------------------------------------- launches

_SEED_SPEC = pl.BlockSpec((1,), lambda b, h, i: (0,))


def _row_block(cfg: _Config, width: int, kv: bool = False):
    """[B, H or G, Lp, width] -> this program's [block, width] rows (grid axis 2 walks row blocks;
    of its key/value head if ``kv``)."""
    per_group = cfg.heads // cfg.groups
    return pl.BlockSpec((pl.squeezed, pl.squeezed, cfg.block, width),
                        lambda b, h, i: (b, h // per_group if kv else h, i, 0))


def _whole(cfg: _Config, length: int, width: int, kv: bool = False):
    """[B, H or G, Lp, width] -> the program's head's whole [Lp, width] (its key/value head if ``kv``)."""
    per_group = cfg.heads // cfg.groups
    return pl.BlockSpec((pl.squeezed, pl.squeezed, length, width),
                        lambda b, h, i: (b, h // per_group if kv else h, 0, 0))


def _query_ids(cfg: _Config, length: int, blocked: bool):
    """Query ids [B, Lp, 1]: this program's block of rows (grid axis 2), or all of them."""
    if blocked:
        return pl.BlockSpec((pl.squeezed, cfg.block, 1), lambda b, h, i: (b, i, 0))
    return pl.BlockSpec((pl.squeezed, length, 1), lambda b, h, i: (b, 0, 0))


def _key_ids(cfg: _Config, length: int, blocked: bool):
    """Key ids [B, 1, Lp]: this program's block of keys (grid axis 2), or all of them."""
    if blocked:
        return pl.BlockSpec((pl.squeezed, 1, cfg.block), lambda b, h, j: (b, 0, j))
    return pl.BlockSpec((pl.squeezed, 1, length), lambda b, h, j: (b, 0, 0))


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret, compiler_params=dispatch.pallas_compiler_params(num_warps=4),
                          name=name)


def _forward(q, k, v, q_ids, k_ids, seed, cfg: _Config):
    """Head-major padded operands -> (out [B, H, Lp, Dp], lse [B, H, Lp, 1] float32)."""
    b, h, length, width = q.shape
    n_blocks = length // cfg.block
    in_specs = [_SEED_SPEC, _row_block(cfg, width), _whole(cfg, length, width, kv=True),
                _whole(cfg, length, width, kv=True), _query_ids(cfg, length, blocked=True),
                _key_ids(cfg, length, blocked=False)]
    out_specs = [_row_block(cfg, width), _row_block(cfg, 1)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length, 1), jnp.float32)]
    kernel = functools.partial(_forward_kernel, cfg=cfg, n_blocks=n_blocks)
    return _call(kernel, cfg, (b, h, n_blocks), in_specs, out_specs, out_shape, "flash_attention_forward")(
        seed, q, k, v, q_ids, k_ids)


def _backward(q, k, v, q_ids, k_ids, seed, out, lse, dout, cfg: _Config):
    """(dq, dk, dv) of the padded head-major operands; dk/dv summed over each GQA group."""
    b, h, length, width = q.shape
    n_blocks = length // cfg.block
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    q_whole, row_stat_whole = _whole(cfg, length, width), _whole(cfg, length, 1)
    key_kernel = functools.partial(_key_side_kernel, cfg=cfg, n_blocks=n_blocks)
    per_head = jax.ShapeDtypeStruct((b, h, length, width), jnp.float32)
    dk_h, dv_h = _call(
        key_kernel, cfg, (b, h, n_blocks),
        [_SEED_SPEC, q_whole, _row_block(cfg, width, kv=True), _row_block(cfg, width, kv=True), q_whole,
         row_stat_whole, row_stat_whole, _query_ids(cfg, length, blocked=False), _key_ids(cfg, length, blocked=True)],
        [_row_block(cfg, width)] * 2, [per_head] * 2, "flash_attention_key_side")(
        seed, q, k, v, dout, lse, delta, q_ids, k_ids)
    query_kernel = functools.partial(_query_side_kernel, cfg=cfg, n_blocks=n_blocks)
    dq = _call(
        query_kernel, cfg, (b, h, n_blocks),
        [_SEED_SPEC, _row_block(cfg, width), _whole(cfg, length, width, kv=True), _whole(cfg, length, width, kv=True),
         _row_block(cfg, width), _row_block(cfg, 1), _row_block(cfg, 1), _query_ids(cfg, length, blocked=True),
         _key_ids(cfg, length, blocked=False)],
        _row_block(cfg, width), per_head, "flash_attention_query_side")(
        seed, q, k, v, dout, lse, delta, q_ids, k_ids)

    def per_group(x):  # [B, H, Lp, Dp] -> [B, G, Lp, Dp]: a key/value head's query heads summed
        return x.reshape(b, cfg.groups, h // cfg.groups, length, width).sum(axis=2)

    return dq.astype(q.dtype), per_group(dk_h).astype(k.dtype), per_group(dv_h).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_ids, k_ids, seed, cfg: _Config):
    return _forward(q, k, v, q_ids, k_ids, seed, cfg)[0]


def _attention_fwd(q, k, v, q_ids, k_ids, seed, cfg: _Config):
    out, lse = _forward(q, k, v, q_ids, k_ids, seed, cfg)
    return out, (q, k, v, q_ids, k_ids, seed, out, lse)


def _attention_bwd(cfg: _Config, residuals, dout):
    q, k, v, q_ids, k_ids, seed, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_ids, k_ids, seed, out, lse, dout, cfg)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------- public API


def _check(q, k, v, query_ids, key_ids, window, dropout_rate, block):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, L, H, K] and k, v the same [B, L, G, K]; got {q.shape}, {k.shape}, {v.shape}")
    b, length, heads, width = q.shape
    if k.shape[0] != b or k.shape[1] != length or k.shape[3] != width or heads % k.shape[2]:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape}: same batch, length and head size, and the "
                         f"query heads a multiple of the key/value heads")
    for name, ids in (("query_ids", query_ids), ("key_ids", key_ids)):
        integral = jnp.issubdtype(ids.dtype, jnp.integer) or ids.dtype == jnp.bool_
        if ids.shape != (b, length) or not integral:
            raise ValueError(f"{name} must be integer [B, L] = {(b, length)}; got {ids.dtype} {ids.shape}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1)")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be at least 1")
    if block is not None and (block < MIN_BLOCK or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= {MIN_BLOCK} (Triton's dot sizes); got {block}")


def _interpret() -> bool:
    """Interpret mode off the GPU (`dispatch.resolve_impl`); a TPU is refused."""
    if dispatch.default_backend() == "tpu":
        raise ValueError("the flash attention kernel is laid out for Triton (whole keys per program); on a TPU "
                         "use attention_impl='chunked' or 'xla'")
    return dispatch.resolve_impl("pallas")[1]


def flash_attention(q_blhk, k_blgk, v_blgk, query_ids_bl, key_ids_bl, *, causal: bool = False,
                    window: int | None = None, dropout_rate: float = 0.0, seed=None, block: int | None = None):
    """Softmax attention with GQA and in-kernel dropout -> [B, L, H, K] in q's dtype.

    ``q_blhk`` [B, L, H, K]; ``k_blgk``, ``v_blgk`` [B, L, G, K] (G divides H); a query reads the
    keys whose id (``key_ids_bl`` int [B, L]) equals its own (``query_ids_bl``; id 0 is padding:
    only padding queries, whose rows are not defined, read such keys),
    at or before it if ``causal`` (and within ``window`` positions). Scores are scaled by
    K ** -0.5 and computed in float32. ``dropout_rate`` > 0 needs ``seed`` (an int32 scalar; the
    mask is `dropout_keep` of it). Differentiable in q, k and v. Runs compiled on a GPU (Triton)
    and in interpret mode on CPU (slow: tests only); ``block`` rows per program (default 64, less
    for short inputs)."""
    _check(q_blhk, k_blgk, v_blgk, query_ids_bl, key_ids_bl, window, dropout_rate, block)
    if dropout_rate > 0.0 and seed is None:
        raise ValueError("dropout_rate > 0 needs a seed (an int32 scalar)")
    b, length, heads, width = q_blhk.shape
    block = block or min(DEFAULT_BLOCK, next_pow2(max(length, MIN_BLOCK)))
    padded_len, padded_width = -(-length // block) * block, next_pow2(max(width, MIN_BLOCK))
    cfg = _Config(scale=width ** -0.5, causal=causal, window=window, rate=float(dropout_rate), block=block,
                  heads=heads, groups=k_blgk.shape[2], interpret=_interpret())

    def head_major(x):  # [B, L, H, K] -> [B, H, Lp, Kp], zeros appended (they add nothing to any product)
        return pad_axis(pad_axis(jnp.swapaxes(x, 1, 2), 2, padded_len), 3, padded_width)

    q_ids = pad_axis(query_ids_bl.astype(jnp.int32), 1, padded_len)[:, :, None]
    k_ids = pad_axis(key_ids_bl.astype(jnp.int32), 1, padded_len)[:, None, :]  # padding keys: id 0, never read
    seed_1 = jnp.reshape(jnp.asarray(0 if seed is None else seed, jnp.int32), (1,))
    out = _attention(head_major(q_blhk), head_major(k_blgk), head_major(v_blgk), q_ids, k_ids, seed_1, cfg)
    return jnp.swapaxes(out[:, :, :length, :width], 1, 2)

