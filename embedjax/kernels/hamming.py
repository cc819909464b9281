"""Hamming top-k search over packed binary codes (uint32 words, see ``embedjax.quant.binary``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import device_array, resolve_impl
from embedjax.kernels.pallas_topk import (addressable_pieces, next_pow2, pad_axis, running_topk_call, scan_fits,
                                          search_in_pieces)
from embedjax.kernels.row_filter import as_row_filter, check_row_ids, distances_from_scores
from embedjax.kernels.topk import check_k, chunked_topk, resolve_n_valid
from embedjax.kernels.two_pass_topk import DEFAULT_SPLITS, check_selection, two_pass_topk, xla_two_pass_topk


LAYOUTS = ("rows", "words")


def check_codes(q_codes, x_codes, *, q_name="q_codes", x_name="x_codes", layout="rows"):
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a corpus layout; choose 'rows' (codes [N, W]) or 'words' "
                         "(word-major [W, N], embedjax.kernels.hamming.word_major)")
    for a, name in ((q_codes, q_name), (x_codes, x_name)):
        if getattr(a, "ndim", None) != 2:
            shape = "[words, rows]" if (name == x_name and layout == "words") else "[rows, words]"
            raise ValueError(f"{name} must be a 2-D array {shape}; got shape {getattr(a, 'shape', None)}")
        if a.dtype != jnp.uint32:
            raise TypeError(f"{name} must be uint32 packed codes (embedjax.quant.pack_bits); got dtype {a.dtype}")
    x_words = x_codes.shape[1] if layout == "rows" else x_codes.shape[0]
    if q_codes.shape[1] != x_words:
        raise ValueError(
            f"code widths differ: {q_name} has {q_codes.shape[1]} words per vector, {x_name} {x_words}"
            f"{' (word-major: axis 0)' if layout == 'words' else ''}; "
            "pack queries and corpus from embeddings of the same dimension"
        )


def word_major(x_codes, rows: int | None = None):
    """Codes [N, W] -> the word-major corpus [W, N] (a transposed copy, made once per index); with
    ``rows`` (>= N) all-zero codes are appended up to ``rows`` columns (search it with ``n_valid=N``).

    The XLA scan over a word-major corpus XORs one word of every row at a time, a contiguous
    vector over rows, and vectorises the popcounts across rows: measured ~2x the row-major scan
    on an AMD EPYC with AVX-512 VPOPCNTDQ (64 queries over 262,144 x 1024-bit codes, 50 vs 105 ms,
    under load); `bench search` times both layouts against FAISS.

    The Pallas scan reads a word-major corpus of `two_pass_topk.scan_rows` (N) rows where it lies;
    any other corpus it first copies into that layout, on every call (a transpose for row-major
    codes, a pad to whole splits for either): a full extra pass over the corpus, ~2x its bytes."""
    x_codes = device_array(x_codes)
    if rows is not None and rows < x_codes.shape[0]:
        raise ValueError(f"rows={rows} is fewer than the corpus's {x_codes.shape[0]} codes")
    words = jnp.transpose(x_codes)
    return words if rows is None else pad_axis(words, 1, rows)


def hamming_scores_chunk(q_args, x_args):
    """Negated Hamming distances float32 [Q, C] of codes [Q, W] vs a chunk [C, W]."""
    (q,), (x,) = q_args, x_args
    d = jnp.sum(lax.population_count(q[:, None, :] ^ x[None, :, :]).astype(jnp.int32), axis=-1)
    return -d.astype(jnp.float32)


def hamming_scores_rows_cq(q_args, x_args):
    """Negated Hamming distances float32 [C, Q] (corpus-major) of word-major query codes [W, Q] vs a
    chunk [C, W].

    Vectorised over queries: each corpus word is XORed with one contiguous vector of every query's
    word, so a row-major corpus scans as fast as a word-major one once there are a few dozen
    queries, without a second copy of the corpus. The queries come transposed once, outside the
    scan: a transpose inside it fuses into the scoring loop as strided loads (3-4x slower on CPU)."""
    (q_t,), (x,) = q_args, x_args
    d = lax.population_count(x[:, :1] ^ q_t[None, 0]).astype(jnp.int32)
    for w in range(1, q_t.shape[0]):
        d = d + lax.population_count(x[:, w:w + 1] ^ q_t[None, w]).astype(jnp.int32)
    return -d.astype(jnp.float32)


def hamming_scores_words_chunk(q_args, x_args):
    """Negated Hamming distances float32 [Q, C] of codes [Q, W] vs a word-major chunk [W, C]:
    one XOR + popcount per word, each over a contiguous row vector (unrolled over the W words)."""
    (q,), (x_t,) = q_args, x_args
    d = lax.population_count(q[:, :1] ^ x_t[None, 0]).astype(jnp.int32)
    for w in range(1, q.shape[1]):
        d = d + lax.population_count(q[:, w:w + 1] ^ x_t[None, w]).astype(jnp.int32)
    return -d.astype(jnp.float32)


# Per corpus layout: the axis that indexes rows, and the jnp scorer returning [Q, C] (the rescore twin).
CORPUS_AXIS = {"rows": 0, "words": 1}
TWIN_SCORERS = {"rows": hamming_scores_chunk, "words": hamming_scores_words_chunk}


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "layout", "select"))
def hamming_topk_xla(q_codes, x_codes, k, n_valid, chunk_size=32768, row_filter=None, row_ids=None, layout="rows",
                     select="two_pass"):
    rescore = TWIN_SCORERS[layout]
    if layout == "rows" and q_codes.shape[0] >= 2:  # scores [C, Q], vectorised over the queries
        scan = dict(score_chunk=hamming_scores_rows_cq, q_args=(q_codes.T,), corpus_axis=0, scores_layout="cq")
    else:  # one query over rows ([1, C], vectorised over each row's words: 1.6x the above, EPYC), or words
        scan = dict(score_chunk=rescore, q_args=(q_codes,), corpus_axis=CORPUS_AXIS[layout], scores_layout="qc")
    if select == "two_pass":
        if row_ids is not None:
            raise ValueError("the XLA two-pass Hamming search does not take row_ids; pass select='running'")
        # Hamming scores are integers: the rescore agrees with the scan to the bit, as two_pass needs.
        s, i = xla_two_pass_topk(x_args=(x_codes,), rescore_chunk=rescore, rescore_q_args=(q_codes,), n_valid=n_valid,
                                 k=k, chunk_size=chunk_size, row_filter=row_filter, **scan)
    else:
        s, i = chunked_topk(x_args=(x_codes,), k=k, n_valid=n_valid, chunk_size=chunk_size, row_filter=row_filter,
                            row_ids=row_ids, **scan)
    return distances_from_scores(s), i


def _hamming_tile(q_refs, x_refs, offset, block_n):
    (q_ref,), (x_ref,) = q_refs, x_refs
    words = q_ref.shape[1]

    def word(w, acc):
        qw = q_ref[:, pl.ds(w, 1)]  # [block_q, 1]
        xw = x_ref[pl.ds(w, 1), pl.ds(offset, block_n)]  # [1, block_n]
        return acc + lax.population_count(qw ^ xw).astype(jnp.int32)

    acc = lax.fori_loop(0, words, word, jnp.zeros((q_ref.shape[0], block_n), jnp.int32))
    return -acc.astype(jnp.float32)


def _hamming_pallas_scores(q_codes, x_codes, k, n_valid, *, block_q, block_n, target_splits, interpret, row_filter,
                           row_ids, select, layout):
    """One Pallas scan of the whole corpus: (scores float32 [Q, k] = -distance, ids int32 [Q, k])."""
    words = next_pow2(q_codes.shape[1])
    # Zero words XOR to zero, so padding the width adds nothing to a distance. The kernel sees
    # the bits as int32: XOR and popcount ignore signedness, and Triton compiles popcount of
    # signed words (uint32 words failed to compile on an H200, jax 0.11.2).
    q = lax.bitcast_convert_type(pad_axis(q_codes, 1, words), jnp.int32)
    # The kernel reads the corpus word-major (corpus axis last: tiles [words, block_n]).
    x_t = x_codes.T if layout == "rows" else x_codes
    x_t = lax.bitcast_convert_type(pad_axis(x_t, 0, words), jnp.int32)
    options = dict(block_q=block_q, block_n=block_n, target_splits=target_splits, interpret=interpret,
                   row_filter=row_filter, row_ids=row_ids)
    if select == "two_pass":  # the rescore gathers rows from the corpus as given, with its layout's twin
        return two_pass_topk(_hamming_tile, TWIN_SCORERS[layout], (q,), (x_t,), (q_codes,), (x_codes,), n_valid, k,
                             corpus_axis=CORPUS_AXIS[layout], **options)
    return running_topk_call(_hamming_tile, (q,), (x_t,), n_valid, k, **options)


def query_block(block_q: int, queries: int) -> int:
    """The query rows per program the Pallas scan runs with: ``block_q`` cut to the queries
    rounded up to a power of two (`hamming_topk_pallas`)."""
    return min(block_q, next_pow2(queries))


def hamming_topk_pallas(q_codes, x_codes, k, n_valid, *, block_q=16, block_n=128, target_splits=None, interpret=False,
                        row_filter=None, row_ids=None, select="running", layout="rows"):
    """The Pallas Hamming scan -> (distances int32 [Q, k], ids int32 [Q, k]). A corpus past the
    kernels' 32-bit offsets (`pallas_topk.MAX_SCAN_ELEMENTS`) is scanned in consecutive pieces that
    fit, merged exactly (`pallas_topk.search_in_pieces`).

    ``block_q`` query rows per program, cut to the queries rounded up to a power of two: a padded
    query row costs the same popcounts as a real one, and they bound the scan (one XOR, popcount
    and add per query, corpus word), so one query scans with a block of 1, not 16."""
    target_splits = target_splits or DEFAULT_SPLITS[select]
    block_q = query_block(block_q, q_codes.shape[0])
    pieces = addressable_pieces(x_codes.shape[CORPUS_AXIS[layout]], next_pow2(q_codes.shape[1]), block_n=block_n,
                                target_splits=target_splits)
    return _hamming_pallas(q_codes, x_codes, k, n_valid, pieces=pieces, block_q=block_q, block_n=block_n,
                           target_splits=target_splits, interpret=interpret, row_filter=row_filter, row_ids=row_ids,
                           select=select, layout=layout)


@functools.partial(jax.jit, static_argnames=("k", "pieces", "block_q", "block_n", "target_splits", "interpret",
                                             "select", "layout"))
def _hamming_pallas(q_codes, x_codes, k, n_valid, *, pieces, row_filter, row_ids, layout, **options):
    def search(start, stop, k, n_valid, row_filter, row_ids):
        x_piece = x_codes[start:stop] if layout == "rows" else x_codes[:, start:stop]
        return _hamming_pallas_scores(q_codes, x_piece, k, n_valid, row_filter=row_filter, row_ids=row_ids,
                                      layout=layout, **options)

    s, i = search_in_pieces(search, x_codes.shape[CORPUS_AXIS[layout]], pieces, k, n_valid, row_filter, row_ids)
    return distances_from_scores(s), i


def _selection(select: str, impl: str, row_ids) -> str:
    """``select`` with "auto" resolved: two-pass won on an H200 (Pallas) and on CPU (XLA, whose
    two-pass form takes no row_ids)."""
    if select != "auto":
        return select
    return "two_pass" if impl == "pallas" or row_ids is None else "running"


def hamming_topk(q_codes, x_codes, k, impl="auto", *, n_valid=None, chunk_size=32768, filter=None, row_ids=None,
                 select="auto", layout="rows"):
    """Nearest codes by Hamming distance.

    q_codes uint32 [Q, W], x_codes uint32 [N, W] -> (distances int32 [Q, k],
    indices int32 [Q, k]); rows sorted by distance, ties -> smaller index. Only
    the first ``n_valid`` corpus rows are searched (the rest is padding).
    ``filter``: a boolean mask [N] or [Q, N], or ``RowPredicates`` (see
    ``kernels.row_filter``); masked rows are never returned, and when fewer than k
    rows pass the missing results are index -1 with distance int32 max.
    ``row_ids`` int32 [N]: ids reported for (and breaking ties by) the rows.
    ``impl``: "xla" (chunked jnp scan, memory O(Q * chunk_size)), "pallas" (the
    Pallas kernel; interpret mode on CPU; a corpus past its 32-bit offsets in exact pieces) or
    "auto" (the XLA twin for such a corpus). ``select``: "running" (a running top-k
    merged chunk by chunk, or tile by tile in the Pallas scan), "two_pass" (tile maxima, then each
    query's k best tiles rescored; ``kernels.two_pass_topk``; the XLA form keeps Q * N / 32 maxima
    and takes no ``row_ids``) or "auto" (two_pass, except running on XLA with row_ids). All are
    exact. ``layout``: "rows" (x_codes [N, W]; the XLA scan vectorises over queries when there are
    two or more, over each row's words for one) or "words"
    (the word-major corpus [W, N] of `word_major`; the scan vectorises over rows, faster for a
    handful of queries; same results). The Pallas scan reads a word-major corpus of
    `two_pass_topk.scan_rows` (N) columns where it lies (``word_major(codes, rows=scan_rows(N))``,
    searched with ``n_valid=N``); any other corpus is copied into that layout on every call.
    """
    if select != "auto":
        check_selection(select)
    q_codes, x_codes = device_array(q_codes), device_array(x_codes)
    check_codes(q_codes, x_codes, layout=layout)
    num_rows = x_codes.shape[CORPUS_AXIS[layout]]
    n_valid = resolve_n_valid(n_valid, num_rows)
    check_k(k, n_valid)
    if q_codes.shape[0] == 0:
        raise ValueError("q_codes is empty (0 queries)")
    row_filter = as_row_filter(filter, q_codes.shape[0], num_rows)
    row_ids = check_row_ids(row_ids, num_rows)
    # Beyond the kernel's 32-bit offsets "auto" takes the XLA twin.
    fits = scan_fits(num_rows, next_pow2(q_codes.shape[1]),
                     target_splits=DEFAULT_SPLITS[_selection(select, "pallas", row_ids)])
    impl, interpret = resolve_impl(impl, pallas_fits=fits)
    select = _selection(select, impl, row_ids)
    if impl == "pallas":
        return hamming_topk_pallas(q_codes, x_codes, k, n_valid, interpret=interpret, row_filter=row_filter,
                                   row_ids=row_ids, select=select, layout=layout)
    return hamming_topk_xla(q_codes, x_codes, k, n_valid, chunk_size=chunk_size, row_filter=row_filter,
                            row_ids=row_ids, layout=layout, select=select)
