"""Search with compressed embeddings: one function for every quantization setting.

``search_embeddings(q_qd, d_nd, k, quantization=..., dims=...)`` is what
``embedjax.eval.retrieval(..., quantization=..., dims=...)`` calls, so one
evaluation gives nDCG for float32, fp8, int8, int4, binary, binary + rescoring,
residual multi-bit codes and Matryoshka-truncated dims side by side.

Settings (``quantization``):

=====================  =================================================================
None / "float32"       exact inner product (``index.exact.exact_search``)
"float16", "bfloat16"  corpus rounded to 16-bit floats, exact search
"fp8", "fp8_e4m3"      corpus float8 e4m3 with a per-vector scale, float32 query
"fp8_e5m2"             the same with e5m2
"int8"                 per-dimension calibrated int8 corpus; the query, with the ranges
                       folded in, quantised to symmetric int8; int32 dot products
"int4"                 the same with 4-bit corpus codes (two per byte)
"binary"               1 bit per dimension (``x > 0``), Hamming distance for both sides
"binary_asym"          float query against the corpus' +-1 codes
"binary+rescore"       Hamming candidates (k * rescore_multiplier), rescored with the
                       float32 corpus
"binary+int8rescore"   the same candidates rescored with the int8 corpus
"residualP"            P bit-planes per dimension, greedy residual signs with calibrated
                       per-plane weights; float query against the codes (e.g. residual2)
"residualP+sym"        the same codes, both sides binarised (weighted Hamming terms)
"residualP+trained"    codes from the trained residual binarisation head
                       (``quant.residual_head``), fitted embedding-to-embedding on the
                       calibration embeddings
"pcaK"                 projection on the top-K principal directions, exact search
"lshB"                 plain sign binarisation at a chosen bit budget: signs of B fixed
                       random orthogonal projections (seed 0), Hamming distance
"lshB+asym"            the same codes scored against the float projected query
=====================  =================================================================

Calibration (int8/int4 ranges, residual weights, PCA, the trained head) uses
``calibration_nd`` when given, else the corpus itself. ``dims`` truncates
queries, corpus and calibration to the first ``dims`` dimensions and
re-normalises them (Matryoshka) before quantisation.

``filter=`` restricts each query to corpus rows (a mask, per-query masks or attribute
predicates; see ``embedjax.index.filtered`` for the forms and the pre / in / post /
auto strategies). Every setting filters inside its kernels; "+rescore" settings
filter the first stage. Fewer than k passing rows: the missing results are id -1
with score -inf.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from embedjax.index.filtered import Backend, check_strategy, filtered_search, resolve_filter
from embedjax.kernels.hamming import hamming_topk
from embedjax.kernels.lowbit import fp8_topk, int4_topk, int8_topk
from embedjax.kernels.rescore import rescore_topk
from embedjax.kernels.residual import residual_topk
from embedjax.kernels.row_filter import scores_or_missing
from embedjax.quant.binary import pack_bits
from embedjax.quant.fp8 import quantize_fp8
from embedjax.quant.pca import apply_pca, fit_pca
from embedjax.quant.residual import fit_residual_weights, residual_binarize
from embedjax.quant.scalar import (
    affine_query_transform,
    calibrate_ranges,
    quantize_int4,
    quantize_int8,
    quantize_symmetric_int8,
)

FIXED_SETTINGS = (
    "float32", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8", "int4",
    "binary", "binary_asym", "binary+rescore", "binary+int8rescore",
)
_RESIDUAL = re.compile(r"^residual([1-8])(\+sym|\+trained)?$")
_PCA = re.compile(r"^pca([1-9][0-9]*)$")
_LSH = re.compile(r"^lsh([1-9][0-9]*)(\+asym)?$")


def describe_settings() -> str:
    return ", ".join(FIXED_SETTINGS) + ", residualP[+sym|+trained] (P in 1..8), pcaK, lshB[+asym]"


def depth_dependent(quantization) -> bool:
    """Whether the top-k of a setting can differ from the first k of its top-k' (k' > k).

    Two-stage settings shortlist k * rescore_multiplier candidates, so a deeper search rescores
    more of them; every other setting is one exact top-k under one total order.
    """
    return quantization in ("binary+rescore", "binary+int8rescore")


def check_quantization(quantization) -> None:
    if quantization is None or quantization in FIXED_SETTINGS:
        return
    if isinstance(quantization, str) and any(p.match(quantization) for p in (_RESIDUAL, _PCA, _LSH)):
        return
    raise ValueError(f"unknown quantization {quantization!r}; use None or one of: {describe_settings()}")


def matryoshka(x_nd: np.ndarray, dims: int | None) -> np.ndarray:
    """First ``dims`` dimensions, re-normalised to unit length (no-op for dims=None)."""
    if dims is None:
        return x_nd
    x = x_nd[:, :dims]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _as_float_matrix(x, name):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be float embeddings; got dtype {x.dtype}")
    return x.astype(np.float32)


def search_embeddings(q_qd, d_nd, k: int, *, quantization: str | None = None, dims: int | None = None,
                      calibration_nd=None, rescore_multiplier: int = 4, filter=None, filter_strategy: str = "auto",
                      post_multiplier: float = 2.0):
    """Top-k corpus rows per query under a quantization setting, optionally filtered.

    Args:
        q_qd: float queries [Q, D]; d_nd: float corpus [N, D] (typically unit-norm).
        k: results per query (1 <= k <= N).
        quantization: a setting from the module docstring (None = float32).
        dims: Matryoshka truncation (1 <= dims <= D), applied before quantisation.
        calibration_nd: float embeddings [M, D] for ranges/weights (default: the corpus).
        rescore_multiplier: candidates per query for "+rescore" settings = k * multiplier.
        filter: None; a boolean mask [N] (every query) or [Q, N] (per query); an
            ``index.attributes.AttributeFilter``; or ``kernels.row_filter.RowPredicates``.
            Masked rows are never returned.
        filter_strategy: "auto", "in", "pre" or "post" (``embedjax.index.filtered``).
        post_multiplier: how much deeper than k / selectivity "post" searches.

    Returns:
        ``(scores float32 [Q, k], ids int32 [Q, k])`` (numpy), best first, ties -> smaller id.
        Scores are the setting's own similarity (e.g. +-1 inner product for "binary").
        When fewer than k rows pass the filter, the missing results are id -1 with
        score -inf (after every real result).
    """
    check_quantization(quantization)
    check_strategy(filter_strategy)
    q = _as_float_matrix(q_qd, "q_qd")
    d = _as_float_matrix(d_nd, "d_nd")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dims but the corpus has {d.shape[1]}")
    if d.shape[0] == 0:
        raise ValueError("the corpus d_nd is empty (0 vectors)")
    if not isinstance(k, int) or not 1 <= k <= d.shape[0]:
        raise ValueError(f"k={k} must be an int between 1 and the corpus size {d.shape[0]}")
    if dims is not None and not (isinstance(dims, int) and 1 <= dims <= d.shape[1]):
        raise ValueError(f"dims={dims} must be an int in [1, {d.shape[1]}] (the embedding dimension)")
    if not isinstance(rescore_multiplier, int) or rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be an int >= 1; got {rescore_multiplier}")
    calib = d if calibration_nd is None else _as_float_matrix(calibration_nd, "calibration_nd")
    if calib.shape[1] != d.shape[1]:
        raise ValueError(f"calibration_nd has {calib.shape[1]} dims but the corpus has {d.shape[1]}")
    row_filter = resolve_filter(filter, q.shape[0], d.shape[0])
    q, d, calib = matryoshka(q, dims), matryoshka(d, dims), matryoshka(calib, dims)
    rows, search = _prepare(d, calib, quantization or "float32", rescore_multiplier)
    scores, ids = filtered_search(_backend(rows, search), q, k, row_filter, d.shape[0], strategy=filter_strategy,
                                  post_multiplier=post_multiplier)
    return np.asarray(scores, np.float32), np.asarray(ids, np.int32)


def _backend(rows, search) -> Backend:
    """Search over row-indexed encoded arrays; a subset gathers the same rows of every array."""
    return Backend(search=lambda q, k, row_filter: search(q, rows, k, row_filter),
                   subset=lambda idx: _backend(tuple(np.asarray(a)[idx] for a in rows), search))


def _prepare(d, calib, setting, multiplier):
    """Encode the corpus once: ``(row-indexed arrays, search(q, arrays, k, row_filter))``."""
    dim = d.shape[1]
    if setting in ("float32", "float16", "bfloat16"):
        from embedjax.index.exact import exact_search

        stored = d if setting == "float32" else np.asarray(jnp.asarray(d).astype(setting).astype(jnp.float32))
        return (stored,), lambda q, rows, k, f: exact_search(q, rows[0], k, filter=f)
    if setting.startswith("fp8"):
        codes, scale = quantize_fp8(d, "e5m2" if setting == "fp8_e5m2" else "e4m3")
        return (codes, scale), lambda q, rows, k, f: fp8_topk(jnp.asarray(q), None, rows[0], rows[1], k, filter=f)
    if setting in ("int8", "int4"):
        return _scalar_prepare(d, calib, setting)
    if setting.startswith("binary"):
        return _binary_prepare(d, calib, setting, multiplier)
    match = _PCA.match(setting)
    if match:
        from embedjax.index.exact import exact_search

        mean, comps = fit_pca(calib, min(int(match.group(1)), dim))
        # Uncentred projections: <P q, P d> approximates <q, d> without a per-document shift.
        project = lambda x: np.asarray(apply_pca(x, mean, comps, center=False))
        return (project(d),), lambda q, rows, k, f: exact_search(project(q), rows[0], k, filter=f)
    match = _LSH.match(setting)
    if match:
        proj = random_projection(dim, int(match.group(1)))
        bits = proj.shape[0]
        codes = pack_bits(d @ proj.T)
        if match.group(2):
            return (codes,), lambda q, rows, k, f: residual_topk(
                jnp.asarray(q @ proj.T)[:, None, :], rows[0][:, None, :], k, dim=bits, filter=f)

        def lsh(q, rows, k, f):
            dist, ids = hamming_topk(pack_bits(q @ proj.T), rows[0], k, filter=f)
            return scores_or_missing((bits - 2 * dist).astype(jnp.float32), ids), ids

        return (codes,), lsh
    match = _RESIDUAL.match(setting)
    planes, variant = int(match.group(1)), match.group(2)
    if variant == "+trained":
        from embedjax.quant.residual_head import encode_codes, project_queries, train_residual_binarizer

        params = train_residual_binarizer(calib, planes)
        return (encode_codes(params, d),), lambda q, rows, k, f: residual_topk(
            project_queries(params, q), rows[0], k, dim=dim, filter=f)
    weights = fit_residual_weights(calib, planes)
    x_codes = residual_binarize(d, weights)
    if variant == "+sym":
        return (x_codes,), lambda q, rows, k, f: residual_topk(
            residual_binarize(q, weights), rows[0], k, dim=dim, weights=np.asarray(weights), filter=f)
    return (x_codes,), lambda q, rows, k, f: residual_topk(
        jnp.asarray(q)[:, None, :] * weights[None, :, None], rows[0], k, dim=dim, filter=f)


def random_projection(dim: int, bits: int, seed: int = 0) -> np.ndarray:
    """[bits, dim] rows of stacked random orthonormal bases (each block of dim rows orthonormal)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, bits, dim):
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        blocks.append(basis[: min(dim, bits - start)])
    return np.concatenate(blocks).astype(np.float32)


def _scalar_prepare(d, calib, setting):
    lo, hi = calibrate_ranges(calib)
    levels = 256 if setting == "int8" else 16
    codes = quantize_int8(d, lo, hi) if setting == "int8" else quantize_int4(d, lo, hi)
    topk = int8_topk if setting == "int8" else int4_topk

    def search(q, rows, k, f):
        q_scaled, q_offset = affine_query_transform(q, lo, hi, levels)
        q_codes, q_scale = quantize_symmetric_int8(q_scaled)
        return topk(q_codes, q_scale, rows[0], None, k, q_offset=q_offset, filter=f)

    return (codes,), search


def _binary_prepare(d, calib, setting, multiplier):
    dim = d.shape[1]
    x_codes = pack_bits(d)
    if setting == "binary_asym":
        return (x_codes,), lambda q, rows, k, f: residual_topk(
            jnp.asarray(q)[:, None, :], rows[0][:, None, :], k, dim=dim, filter=f)
    if setting == "binary":
        def binary(q, rows, k, f):
            dist, ids = hamming_topk(pack_bits(q), rows[0], k, filter=f)
            return scores_or_missing((dim - 2 * dist).astype(jnp.float32), ids), ids

        return (x_codes,), binary
    if setting == "binary+rescore":
        def rescore(q, rows, k, f):
            _, cand = hamming_topk(pack_bits(q), rows[0], min(rows[0].shape[0], k * multiplier), filter=f)
            return rescore_topk(jnp.asarray(q), cand, jnp.asarray(rows[1]), k)

        return (x_codes, d), rescore
    lo, hi = calibrate_ranges(calib)

    def int8_rescore(q, rows, k, f):
        _, cand = hamming_topk(pack_bits(q), rows[0], min(rows[0].shape[0], k * multiplier), filter=f)
        q_scaled, q_offset = affine_query_transform(q, lo, hi, 256)
        return rescore_topk(q_scaled, cand, rows[1], k, q_offset=q_offset)

    return (x_codes, quantize_int8(d, lo, hi)), int8_rescore
