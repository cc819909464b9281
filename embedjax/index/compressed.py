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
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from embedjax.kernels.hamming import hamming_topk
from embedjax.kernels.lowbit import fp8_topk, int4_topk, int8_topk
from embedjax.kernels.rescore import rescore_topk
from embedjax.kernels.residual import residual_topk
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
                      calibration_nd=None, rescore_multiplier: int = 4):
    """Top-k corpus rows per query under a quantization setting.

    Args:
        q_qd: float queries [Q, D]; d_nd: float corpus [N, D] (typically unit-norm).
        k: results per query (1 <= k <= N).
        quantization: a setting from the module docstring (None = float32).
        dims: Matryoshka truncation (1 <= dims <= D), applied before quantisation.
        calibration_nd: float embeddings [M, D] for ranges/weights (default: the corpus).
        rescore_multiplier: candidates per query for "+rescore" settings = k * multiplier.

    Returns:
        ``(scores float32 [Q, k], ids int32 [Q, k])`` (numpy), best first, ties -> smaller id.
        Scores are the setting's own similarity (e.g. +-1 inner product for "binary").
    """
    check_quantization(quantization)
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
    q, d, calib = matryoshka(q, dims), matryoshka(d, dims), matryoshka(calib, dims)
    scores, ids = _dispatch(q, d, calib, k, quantization or "float32", rescore_multiplier)
    return np.asarray(scores, np.float32), np.asarray(ids, np.int32)


def _dispatch(q, d, calib, k, setting, multiplier):
    if setting == "float32":
        from embedjax.index.exact import exact_search

        return exact_search(q, d, k)
    if setting in ("float16", "bfloat16"):
        from embedjax.index.exact import exact_search

        rounded = np.asarray(jnp.asarray(d).astype(setting).astype(jnp.float32))
        return exact_search(q, rounded, k)
    if setting.startswith("fp8"):
        fmt = "e5m2" if setting == "fp8_e5m2" else "e4m3"
        codes, scale = quantize_fp8(d, fmt)
        return fp8_topk(jnp.asarray(q), None, codes, scale, k)
    if setting in ("int8", "int4"):
        return _scalar_search(q, d, calib, k, setting)
    if setting.startswith("binary"):
        return _binary_search(q, d, calib, k, setting, multiplier)
    match = _PCA.match(setting)
    if match:
        from embedjax.index.exact import exact_search

        mean, comps = fit_pca(calib, min(int(match.group(1)), d.shape[1]))
        # Uncentred projections: <P q, P d> approximates <q, d> without a per-document shift.
        return exact_search(np.asarray(apply_pca(q, mean, comps, center=False)),
                            np.asarray(apply_pca(d, mean, comps, center=False)), k)
    match = _LSH.match(setting)
    if match:
        proj = random_projection(d.shape[1], int(match.group(1)))
        qp, dp = q @ proj.T, d @ proj.T
        if match.group(2):
            return residual_topk(jnp.asarray(qp)[:, None, :], pack_bits(dp)[:, None, :], k, dim=dp.shape[1])
        dist, ids = hamming_topk(pack_bits(qp), pack_bits(dp), k)
        return (dp.shape[1] - 2 * dist).astype(jnp.float32), ids
    match = _RESIDUAL.match(setting)
    planes, variant = int(match.group(1)), match.group(2)
    if variant == "+trained":
        from embedjax.quant.residual_head import encode_codes, project_queries, train_residual_binarizer

        params = train_residual_binarizer(calib, planes)
        return residual_topk(project_queries(params, q), encode_codes(params, d), k, dim=d.shape[1])
    weights = fit_residual_weights(calib, planes)
    x_codes = residual_binarize(d, weights)
    if variant == "+sym":
        return residual_topk(residual_binarize(q, weights), x_codes, k, dim=d.shape[1], weights=np.asarray(weights))
    q_proj = jnp.asarray(q)[:, None, :] * weights[None, :, None]
    return residual_topk(q_proj, x_codes, k, dim=d.shape[1])


def random_projection(dim: int, bits: int, seed: int = 0) -> np.ndarray:
    """[bits, dim] rows of stacked random orthonormal bases (each block of dim rows orthonormal)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, bits, dim):
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        blocks.append(basis[: min(dim, bits - start)])
    return np.concatenate(blocks).astype(np.float32)


def _int8_corpus(d, calib):
    lo, hi = calibrate_ranges(calib)
    return quantize_int8(d, lo, hi), lo, hi


def _scalar_search(q, d, calib, k, setting):
    lo, hi = calibrate_ranges(calib)
    levels = 256 if setting == "int8" else 16
    codes = quantize_int8(d, lo, hi) if setting == "int8" else quantize_int4(d, lo, hi)
    q_scaled, q_offset = affine_query_transform(q, lo, hi, levels)
    q_codes, q_scale = quantize_symmetric_int8(q_scaled)
    topk = int8_topk if setting == "int8" else int4_topk
    return topk(q_codes, q_scale, codes, None, k, q_offset=q_offset)


def _binary_search(q, d, calib, k, setting, multiplier):
    x_codes = pack_bits(d)
    if setting == "binary_asym":
        return residual_topk(jnp.asarray(q)[:, None, :], x_codes[:, None, :], k, dim=d.shape[1])
    n_cand = k if setting == "binary" else min(d.shape[0], k * multiplier)
    dist, cand = hamming_topk(pack_bits(q), x_codes, n_cand)
    if setting == "binary":
        return (d.shape[1] - 2 * dist).astype(jnp.float32), cand
    if setting == "binary+rescore":
        return rescore_topk(jnp.asarray(q), cand, jnp.asarray(d), k)
    codes, lo, hi = _int8_corpus(d, calib)
    q_scaled, q_offset = affine_query_transform(q, lo, hi, 256)
    return rescore_topk(q_scaled, cand, codes, k, q_offset=q_offset)
