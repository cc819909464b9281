"""Scaled dot-product attention kernels that `embedjax.models.layers.attend` chooses between.

Five implementations of the same function (GQA, key-padding mask, optional causal mask with a
sliding window, optional SelfExtend score selection), named by ``ATTENTION_IMPLS``:

- ``"xla"``: `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs for bfloat16/float16
  inputs; elsewhere XLA's dense attention, which materialises [L, L] scores per head).
- ``"chunked"``: online-softmax attention over key blocks of ``chunk_size`` (a ``lax.scan``), with
  a hand-written backward pass that recomputes each block from the saved log-sum-exp (the flash
  attention recurrence). Memory grows linearly in L: one [L, chunk_size] block of scores per head
  lives at a time, forward and backward. Runs on every backend. Attention dropout draws each key
  block's mask from the dropout key folded with the block index (`chunk_dropout_keep`), so the
  backward pass regenerates it and no [L, L] mask is stored.
- ``"explicit"``: the dense float32 reference (all scores at once), also the path that applies
  attention dropout when the chosen kernel is not ``chunked``. It is the slow twin the chunked
  kernel is tested against.
- ``"blocked"``: the dense computation of ``explicit``, a few batch rows at a time (a ``lax.map``
  over batch blocks sized so one block's scores stay in cache, `batch_block`). On CPU, XLA's dense
  attention over a whole batch writes every [L, L] score matrix to memory and reads it back for the
  softmax and again for the value product; a cache-sized block avoids those round trips (measured
  1.7-1.8x faster than ``xla`` at 64 x 128 and 64 x 256 tokens, MiniLM's 12 heads, idle; BENCHMARKS.md).
  In programs compiled for oneDNN (`embedjax.xla_cpu`, CPU inference on x86-64) the blocks are
  head-major and normalised late, with pairwise row reductions (`_head_major_attention`).
- ``"flash"``: the Pallas flash attention kernel (`embedjax.kernels.flash_attention`): forward and
  backward in three Triton kernels on a GPU, attention dropout drawn inside them from a
  counter-based hash of the dropout key's bits (no [L, L] scores or mask in memory, as PyTorch's
  SDPA drops inside its fused kernel). No SelfExtend; interpret mode on CPU (tests only), refused
  on a TPU. Chosen by name only: ``auto`` does not take it until a GPU has timed it.

``"auto"`` picks per call (`resolve_impl`): on a GPU, ``xla`` for half-precision inputs without
SelfExtend or attention dropout (cuDNN's fused kernel), else ``chunked``; on TPU, ``xla`` for sequences up to
``chunk_size`` (one block: nothing to save) and ``chunked`` beyond; on CPU, ``blocked`` up to
``chunk_size`` and ``chunked`` beyond.

The dense paths spell the score product so that XLA:CPU gives the query the dot's left operand, as
`jax.nn.dot_product_attention` does: with the operands the other way round its GEMM rounds ~1.5x
further from float64 (mean error, measured on random inputs), and the three dense
implementations would not agree to the bit.

SelfExtend (``self_extend_window`` w): each query/key pair closer than w positions uses the normally
rotated q and k; farther pairs use the grouped rotations (a key before the query pairs the
``query_before`` rotation with ``key_grouped``; a key after it, ``query_after`` with
``key_grouped``). Which score a pair gets depends only on the two positions, so the chunked kernel
selects per block exactly as the dense reference selects over [L, L].

Packed sequences (several texts per row, `embedjax.data.packing`): the key-padding mask is then
a `Segments` of segment ids (0: padding, one id per text) and ``Masking.segments`` is set; a
query reads only the keys of its own segment, in every implementation, so each text attends as
if it were alone in its row (masked scores' exponentials are exactly 0).

Scores and softmax are float32 whatever the compute dtype. Masked scores take float32's most
negative finite value, so a query with no visible key (a padding row) stays finite; such rows are
not defined beyond that (the implementations may average different keys there), and callers mask
them out of pooling.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from embedjax import xla_cpu
from embedjax.kernels import flash_attention as flash_kernel

ATTENTION_IMPLS = ("auto", "xla", "chunked", "explicit", "blocked", "flash")
DEFAULT_CHUNK = 512
# Scores one batch block of `blocked_attention` may hold (float32 [rows, H, L, L]). Tuned on the
# 2-core CPU at 64 rows x 12 heads (BENCHMARKS.md): the best block held 3-6 MiB at L = 128 and 256;
# 6 MiB picks 64 rows at L = 32, 32 at 64, 8 at 128, 2 at 256, 1 at 512.
BLOCK_SCORE_BYTES = 6 << 20
_NEG = float(jnp.finfo(jnp.float32).min)


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not an attention implementation; choose one of {ATTENTION_IMPLS}")
    return impl


def resolve_impl(impl: str, *, length: int, dtype, self_extend: bool, backend: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK, dropout: bool = False) -> str:
    """The implementation ``impl`` means for one call (see the module docstring for ``auto``);
    ``dropout``: attention dropout is active in this call."""
    check_impl(impl)
    if impl in ("xla", "flash") and self_extend:
        raise ValueError(f"attention_impl={impl!r} cannot select SelfExtend's scores; use 'chunked', 'explicit' or "
                         "'auto'")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "gpu":
        # cuDNN's fused attention has no dropout; under dropout the chunked kernel (masks per key
        # block, scores recomputed in the backward pass) beat the explicit softmax on an H200: the
        # MiniLM training step (bf16, 256 pairs x 128 tokens) took 47.2 ms against 50.3
        # (benchmarks/train_step.jsonl rows 3 and 0, 2026-12-04).
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "xla" if half and not self_extend and not dropout else "chunked"
    if self_extend or length > chunk_size:
        return "chunked"
    return "blocked" if backend == "cpu" else "xla"


class Masking(NamedTuple):
    """Which keys a query may read, as static settings (the key-padding mask comes with the call)."""

    causal: bool = False
    window: int | None = None  # causal sliding window: query i sees keys i - window < j <= i
    self_extend_window: int | None = None  # SelfExtend's neighbour window (None: plain attention)
    segments: bool = False  # the key mask holds segment ids of packed texts (see `Segments`)


class Segments(NamedTuple):
    """Segment ids [B, L] of packed texts (0: padding; the tokens of one text share an id),
    passed where the key-padding mask goes: attention then stays within each segment."""

    ids: jax.Array


def _allowed(key_mask_bc, q_index, k_index, masking: Masking, query_segments_bl=None):
    """bool [B, 1, 1, Lq, C]: key padding, causal order and the sliding window, for keys ``k_index``;
    with ``masking.segments`` the key mask holds segment ids and a key must share the query's
    (``query_segments_bl``)."""
    allowed = key_mask_bc.astype(bool)[:, None, None, None, :]
    if masking.segments:
        allowed = allowed & (query_segments_bl[:, None, None, :, None] == key_mask_bc[:, None, None, None, :])
    if masking.causal:
        visible = k_index[None, :] <= q_index[:, None]
        if masking.window is not None:
            visible &= k_index[None, :] > q_index[:, None] - masking.window
        allowed = allowed & visible[None, None, None]
    return allowed


def _regions(pos_q_bl, pos_k_bc, window: int):
    """(near, before) bool [B, 1, 1, Lq, C]: pairs closer than ``window``; far pairs whose key comes first."""
    distance = (pos_q_bl[:, :, None] - pos_k_bc[:, None, :])[:, None, None]
    return jnp.abs(distance) < window, distance >= window


def _scores(qs, ks, pos_q, pos_k, masking: Masking, scale: float):
    """float32 [B, G, R, Lq, C] scaled scores before masking. ``qs`` [B, Lq, G, R, K] each: the
    normal query (and, with SelfExtend, the before/after grouped ones); ``ks`` [B, C, G, K] each:
    the normal key (and the grouped one)."""
    def dot(q, k):
        # [b, g, q, r, c], then r moved before q: with (q, r) adjacent XLA:CPU keeps q as the dot's
        # left operand (module docstring: ~1.5x closer to float64 than the k-first product).
        s = jnp.einsum("bqgrk,bcgk->bgqrc", q, k, preferred_element_type=jnp.float32)
        return jnp.swapaxes(s, 2, 3)

    if masking.self_extend_window is None:
        return dot(qs[0], ks[0]) * jnp.float32(scale)
    near, before = _regions(pos_q, pos_k, masking.self_extend_window)
    s = jnp.where(near, dot(qs[0], ks[0]), jnp.where(before, dot(qs[1], ks[1]), dot(qs[2], ks[1])))
    return s * jnp.float32(scale)


def _score_cotangents(ds, pos_q, pos_k, masking: Masking):
    """Split d(scores) over the score sources: one entry per (query, key) pair of `_scores`."""
    if masking.self_extend_window is None:
        return ((0, 0, ds),)
    near, before = _regions(pos_q, pos_k, masking.self_extend_window)
    far_after = ~near & ~before
    return ((0, 0, jnp.where(near, ds, 0.0)), (1, 1, jnp.where(before & ~near, ds, 0.0)),
            (2, 1, jnp.where(far_after, ds, 0.0)))


# ---- dense reference -------------------------------------------------------------------------

def explicit_attention(qs, ks, v, key_mask_bl, positions_bl, masking: Masking, *, dropout_rate: float = 0.0,
                       dropout_rng=None):
    """Dense reference -> [B, L, H, K] in the query's dtype. ``qs``: tuple of [B, L, H, K] (one, or
    three with SelfExtend), ``ks``: tuple of [B, L, G, K] (one, or two), ``v`` [B, L, G, K]."""
    b, length, h, d = qs[0].shape
    g = v.shape[2]
    qs5 = tuple(q.reshape(b, length, g, h // g, d) for q in qs)
    index = jnp.arange(length)
    scores = _scores(qs5, ks, positions_bl, positions_bl, masking, d ** -0.5)
    scores = jnp.where(_allowed(key_mask_bl, index, index, masking, key_mask_bl), scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    ctx = jnp.einsum("bgrqc,bcgk->bqgrk", probs.astype(v.dtype), v)
    return ctx.reshape(b, length, h, d).astype(qs[0].dtype)


def _head_major_attention(qs, ks, v, key_mask_bl, positions_bl, masking: Masking, score_scale: float = 1.0):
    """Attention without dropout on head-major operands -> [B, G, R, L, K] float32: softmax over
    ``score_scale`` q.k (1.0 for queries the caller has scaled). ``qs``: tuple of [B, G, R, L, K];
    ``ks``: tuple of [B, G, L, K]; ``v`` [B, G, L, K]; ``key_mask_bl`` / ``positions_bl`` [B, L]
    as in `explicit_attention`.

    The function of `explicit_attention`, arranged for oneDNN programs on the CPU (the blocks of
    `blocked_attention` there): head-major operands are what a batched GEMM reads without a copy
    per block; the scale rides on the [L, K] query instead of the [L, L] scores; the softmax is
    normalised after the value product, dividing the [L, K] context by each row's sum of
    exponentials instead of dividing the [L, L] probabilities; and the row max and sum are
    pairwise (`row_reduce`). A query with no visible key sees every score at the mask value,
    exponentials of 1, and averages the values, as `jax.nn.softmax` would."""
    length = v.shape[2]

    def dot(q, k):
        return jnp.einsum("bgrqk,bgck->bgrqc", q, k, preferred_element_type=jnp.float32)

    if masking.self_extend_window is None:
        scores = dot(qs[0], ks[0])
    else:
        near, before = _regions(positions_bl, positions_bl, masking.self_extend_window)
        scores = jnp.where(near, dot(qs[0], ks[0]), jnp.where(before, dot(qs[1], ks[1]), dot(qs[2], ks[1])))
    if score_scale != 1.0:
        scores = scores * jnp.float32(score_scale)
    index = jnp.arange(length)
    scores = jnp.where(_allowed(key_mask_bl, index, index, masking, key_mask_bl), scores, _NEG)
    weights = jnp.exp(scores - row_reduce(jnp.maximum, scores)[..., None])
    ctx = jnp.einsum("bgrqc,bgck->bgrqk", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return ctx / row_reduce(jnp.add, weights)[..., None]


def row_reduce(combine, x):
    """Max (``combine`` = jnp.maximum) or sum (jnp.add) over the last axis: [..., C] -> [...], by
    halving the axis while its length is even (``combine`` of the two halves), then reducing what
    is left as usual. In oneDNN programs XLA:CPU's own emitter runs the reductions, and it turns a
    long row reduction into a reduce-window 3-4x slower than the same work as fused elementwise
    passes (a row max over 256 keys: 1.3 ms against 0.4 ms for [2, 12, 256, 256] scores); the
    halving tree is those passes, and for sums it is the pairwise summation, no less accurate than
    a sequential one. Those timings are the MLIR fusion emitters'; under the loop emitter that
    oneDNN inference programs now ask for (`embedjax.xla_cpu.LOOP_EMITTER`) the halving still
    encoded 1,000 msmarco passages 4-16 % faster than plain reductions (two scratch runs each)."""
    while x.shape[-1] > 1 and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        x = combine(x[..., :half], x[..., half:])
    return x.max(axis=-1) if combine is jnp.maximum else x.sum(axis=-1)


def batch_block(batch: int, heads: int, length: int, budget_bytes: int = BLOCK_SCORE_BYTES, shards: int = 1) -> int:
    """Batch rows per block of `blocked_attention`: as many as keep float32 [rows, H, L, L] scores
    within ``budget_bytes`` per shard (at least one per shard), times ``shards``, at most the batch."""
    rows = max(1, budget_bytes // (4 * heads * length * length))
    return max(1, min(batch, rows * shards))


def _head_major(x, groups: int):
    """[B, L, H, K] -> [B, G, H // G, L, K]."""
    b, length, h, d = x.shape
    return jnp.moveaxis(x.reshape(b, length, groups, h // groups, d), 1, 3)


def blocked_attention(qs, ks, v, key_mask_bl, positions_bl, masking: Masking, *, block: int | None = None,
                      shards: int | None = None):
    """`explicit_attention` (no dropout) over batch blocks of ``block`` rows -> [B, L, H, K]; same
    arguments. ``shards``: devices the batch is split over (default: every device); ``block``
    defaults to `batch_block` with one share per shard.

    On one shard the blocks are contiguous rows: a ``lax.map`` over the first B // block * block
    rows (a reshape, no copy) and one direct call for the remaining rows. Over several shards row r
    of the (padded) batch goes to block r // n, step r % n of the map over n steps: each step takes
    every n-th row, so a batch sharded in contiguous pieces stays sharded along the block axis
    (each device maps over its own rows; no all-gather) when the block is a multiple of the shard
    count; the batch is then padded to a multiple of the block with masked rows, whose outputs are
    dropped. Differentiable: the backward pass maps over the same blocks.

    Each block is `explicit_attention` itself, which rounds as `jax.nn.dot_product_attention`
    does, except in programs compiled for oneDNN (`embedjax.xla_cpu.tracing_library`): there the
    operands are transposed head-major once and each block is `_head_major_attention`, the same
    function in fewer passes over the scores, whose float32 rounding differs by a few ulps. There
    XLA's own emitter runs the reductions, and the reference blocks ran 190-290 ms per layer at
    64 x 256 tokens (MiniLM's 12 heads, scratch timings) where these run 180 ms, as fast as the
    reference blocks in a YNNPACK program (188 ms; `bench attention --cpu-gemm`, BENCHMARKS.md)."""
    b, length, h, d = qs[0].shape
    g = v.shape[2]
    shards = jax.device_count() if shards is None else shards
    block = batch_block(b, h, length, shards=shards) if block is None else block
    if block < 1 or shards < 1:
        raise ValueError(f"block={block} and shards={shards} must be at least 1")
    if xla_cpu.tracing_library() == "onednn":
        # The scale rides on a float32 query; a half-precision one would round twice, so there the
        # float32 scores take it.
        scale = d ** -0.5
        pre_scale = qs[0].dtype == jnp.float32
        operands = (tuple(_head_major(q * jnp.float32(scale) if pre_scale else q, g) for q in qs),
                    tuple(_head_major(k, g)[:, :, 0] for k in ks), _head_major(v, g)[:, :, 0], key_mask_bl,
                    positions_bl)

        def attend(args):
            return _head_major_attention(*args, masking, score_scale=1.0 if pre_scale else scale)

        def finish(out):  # [B, G, R, L, K] -> [B, L, H, K]
            return jnp.moveaxis(out, 3, 1).reshape(b, length, h, d).astype(qs[0].dtype)
    else:
        operands = (tuple(qs), tuple(ks), v, key_mask_bl, positions_bl)

        def attend(args):
            return explicit_attention(*args, masking)

        def finish(out):
            return out
    n = b // block if shards == 1 else -(-b // block)
    if n <= 1:
        return finish(attend(operands))
    if shards == 1:
        main = jax.tree.map(lambda x: x[:n * block].reshape(n, block, *x.shape[1:]), operands)
        out = jax.lax.map(attend, main)
        out = out.reshape(n * block, *out.shape[2:])
        if n * block < b:
            out = jnp.concatenate([out, attend(jax.tree.map(lambda x: x[n * block:], operands))])
        return finish(out)

    def split(x):  # [B, ...] -> [n, block, ...], row r at [r % n, r // n]
        x = jnp.pad(x, [(0, n * block - b)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape(block, n, *x.shape[1:]), 0, 1)

    out = jax.lax.map(attend, jax.tree.map(split, operands))
    return finish(jnp.swapaxes(out, 0, 1).reshape(n * block, *out.shape[2:])[:b])


# ---- chunked online softmax ------------------------------------------------------------------

def _blocks(x, chunk: int, fill=0):
    """[B, L, ...] -> [n, B, chunk, ...], the length padded with ``fill`` to a multiple of ``chunk``."""
    b, length = x.shape[:2]
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _unblock(x, length: int):
    """[n, B, chunk, ...] -> [B, length, ...]."""
    n, b, chunk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])[:, :length]


def chunk_dropout_keep(key_data, block_index, shape, rate: float, impl: str | None = None):
    """bool [B, G, R, Lq, C]: which attention probabilities of key block ``block_index`` survive
    dropout (Bernoulli(1 - rate)), drawn from the dropout key folded with the block index, so the
    backward pass regenerates the forward's mask one block at a time. ``key_data``: uint32 key data
    of a key of PRNG implementation ``impl`` (None: JAX's default)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=impl), block_index)
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def _dropout_scale(key_data, k_index, chunk: int, rate: float, impl, shape):
    """float32 [B, G, R, Lq, C] multiplier of the block's probabilities: 1 / (1 - rate) where kept,
    0 where dropped; None at rate 0 (no dropout)."""
    if rate == 0.0:
        return None
    keep = chunk_dropout_keep(key_data, k_index[0] // chunk, shape, rate, impl)
    return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def _times(x, scale):
    return x if scale is None else x * scale


def _forward(qs, ks, v, key_mask, positions, masking: Masking, chunk: int, rate: float, impl, key_data):
    """-> (out f32 [B, G, R, Lq, K], lse f32 [B, G, R, Lq]); qs [B, Lq, G, R, K]. With dropout the
    normaliser sums the undropped probabilities and the value product reads the dropped ones."""
    b, length, g, r, d = qs[0].shape
    scale = d ** -0.5
    q_index = jnp.arange(length)
    xs = (tuple(_blocks(k, chunk) for k in ks), _blocks(v, chunk), _blocks(key_mask, chunk, False),
          _blocks(positions, chunk), jnp.arange(-(-length // chunk))[:, None] * chunk + jnp.arange(chunk))

    def step(carry, block):
        m, l, acc = carry
        ks_c, v_c, mask_c, pos_c, k_index = block
        s = _scores(qs, ks_c, positions, pos_c, masking, scale)
        s = jnp.where(_allowed(mask_c, q_index, k_index, masking, key_mask), s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        z = _dropout_scale(key_data, k_index, chunk, rate, impl, p.shape)
        pv = jnp.einsum("bgrqc,bcgk->bgrqk", _times(p, z).astype(v.dtype), v_c, preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    init = (jnp.full((b, g, r, length), _NEG, jnp.float32), jnp.zeros((b, g, r, length), jnp.float32),
            jnp.zeros((b, g, r, length, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    return acc / l[..., None], m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked(qs, ks, v, key_mask, positions, masking: Masking, chunk: int, rate: float, impl, key_data):
    out, _ = _forward(qs, ks, v, key_mask, positions, masking, chunk, rate, impl, key_data)
    return out


def _chunked_fwd(qs, ks, v, key_mask, positions, masking, chunk, rate, impl, key_data):
    out, lse = _forward(qs, ks, v, key_mask, positions, masking, chunk, rate, impl, key_data)
    return out, (qs, ks, v, key_mask, positions, key_data, out, lse)


def _chunked_bwd(masking, chunk, rate, impl, residuals, dout):
    """The flash-attention backward pass: per key block, recompute p = exp(s - lse), then
    dv = p^T dout, ds = p * (dout v^T - rowsum(dout * out)), dq += ds k, dk = ds^T q. With
    dropout (z = keep / (1 - rate)): dv = (p z)^T dout and ds = p * (z dout v^T - rowsum(dout * out)),
    ``out`` being the dropped output (its rowsum with dout equals sum_c p z dout v^T)."""
    qs, ks, v, key_mask, positions, key_data, out, lse = residuals
    length, d = qs[0].shape[1], qs[0].shape[-1]
    scale = d ** -0.5
    q_index = jnp.arange(length)
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out, axis=-1)  # [B, G, R, Lq]
    xs = (tuple(_blocks(k, chunk) for k in ks), _blocks(v, chunk), _blocks(key_mask, chunk, False),
          _blocks(positions, chunk), jnp.arange(-(-length // chunk))[:, None] * chunk + jnp.arange(chunk))

    def step(dqs, block):
        ks_c, v_c, mask_c, pos_c, k_index = block
        allowed = _allowed(mask_c, q_index, k_index, masking, key_mask)
        s = jnp.where(allowed, _scores(qs, ks_c, positions, pos_c, masking, scale), _NEG)
        p = jnp.exp(s - lse[..., None])
        z = _dropout_scale(key_data, k_index, chunk, rate, impl, p.shape)  # drawn once, used by dv and dp
        dv_c = jnp.einsum("bgrqc,bgrqk->bcgk", _times(p, z), dout)
        dp = _times(jnp.einsum("bgrqk,bcgk->bgrqc", dout, v_c.astype(jnp.float32)), z)
        ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0) * jnp.float32(scale)
        dks_c = [jnp.zeros(k.shape, jnp.float32) for k in ks_c]
        dqs = list(dqs)
        for qi, ki, ds_t in _score_cotangents(ds, positions, pos_c, masking):
            dqs[qi] = dqs[qi] + jnp.einsum("bgrqc,bcgk->bqgrk", ds_t, ks_c[ki].astype(jnp.float32))
            dks_c[ki] = dks_c[ki] + jnp.einsum("bgrqc,bqgrk->bcgk", ds_t, qs[qi].astype(jnp.float32))
        return tuple(dqs), (tuple(dks_c), dv_c)

    init = tuple(jnp.zeros(q.shape, jnp.float32) for q in qs)
    dqs, (dks, dv) = jax.lax.scan(step, init, xs)
    dqs = tuple(dq.astype(q.dtype) for dq, q in zip(dqs, qs))
    dks = tuple(_unblock(dk, length).astype(k.dtype) for dk, k in zip(dks, ks))
    return dqs, dks, _unblock(dv, length).astype(v.dtype), None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(qs, ks, v, key_mask_bl, positions_bl, masking: Masking, *, chunk_size: int = DEFAULT_CHUNK,
                      dropout_rate: float = 0.0, dropout_rng=None):
    """Online-softmax attention over key blocks -> [B, L, H, K] in the query's dtype; same
    arguments as `explicit_attention`. Differentiable with linear memory, dropout included: each
    key block's mask comes from ``dropout_rng`` folded with the block index (`chunk_dropout_keep`),
    so no [L, L] mask is stored either (a different random stream from `explicit_attention`'s)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1)")
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    key_data = dropout_key_data(dropout_rng) if rate > 0.0 else jnp.zeros((2,), jnp.uint32)
    impl = dropout_key_impl(dropout_rng) if rate > 0.0 else None
    b, length, h, d = qs[0].shape
    g = v.shape[2]
    chunk = min(chunk_size, length)
    qs5 = tuple(q.reshape(b, length, g, h // g, d) for q in qs)
    key_mask = key_mask_bl.astype(jnp.int32 if masking.segments else bool)
    out = _chunked(qs5, tuple(ks), v, key_mask, positions_bl.astype(jnp.int32), masking, chunk, rate, impl,
                   key_data)
    return jnp.moveaxis(out, 3, 1).reshape(b, length, h, d).astype(qs[0].dtype)


def dropout_key_impl(rng) -> str | None:
    """The PRNG implementation of a typed dropout key (``"rbg"``, ...); None for raw key data,
    which JAX reads with its default implementation."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(rng))
    return None


def dropout_key_data(rng):
    """uint32 key data of a dropout key, typed (`jax.random.key`) or raw (`jax.random.PRNGKey`)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def flash_attention(qs, ks, v, key_mask_bl, positions_bl, masking: Masking, *, dropout_rate: float = 0.0,
                    dropout_rng=None):
    """The Pallas flash kernel -> [B, L, H, K]; arguments as in `explicit_attention` (one query and
    one key: no SelfExtend; ``positions_bl`` unused). Its dropout mask is the kernel's hash of 32
    bits drawn from ``dropout_rng`` (a different stream from the explicit and chunked paths')."""
    del positions_bl
    if masking.self_extend_window is not None:
        raise ValueError("the flash kernel has no SelfExtend; use attention_impl='chunked' or 'explicit'")
    key_ids = key_mask_bl.astype(jnp.int32)  # segment ids, or 1 / 0 for a key-padding mask
    query_ids = key_ids if masking.segments else jnp.ones_like(key_ids)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    seed = None
    if rate > 0.0:
        seed = jax.lax.bitcast_convert_type(jax.random.bits(dropout_rng, (), jnp.uint32), jnp.int32)
    return flash_kernel.flash_attention(qs[0], ks[0], v, query_ids, key_ids, causal=masking.causal,
                                        window=masking.window, dropout_rate=rate, seed=seed)


def xla_attention(q, k, v, key_mask_bl, masking: Masking):
    """`jax.nn.dot_product_attention` (fused where the backend has a kernel); no SelfExtend."""
    window = masking.window
    mask = key_mask_bl.astype(bool)[:, None, None, :]
    if masking.segments:  # [B, 1, Lq, Lk]: the same nonzero segment
        mask = mask & (key_mask_bl[:, None, :, None] == key_mask_bl[:, None, None, :])
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=masking.causal,
        local_window_size=(window - 1, 0) if window is not None else None)
