"""Multi-vector search: MUVERA FDEs in a quantized single-vector index, then exact MaxSim
re-ranking of the top candidates.

    index = MultiVectorIndex.build(doc_tokens_nld, doc_mask_nl, reps=20, k_sim=5, d_proj=16,
                                   quantization="int8", token_storage="int8")
    scores, ids = index.search(q_tokens_qld, q_mask_ql, k=10, candidates=100)

The first stage searches document FDEs (``CodeIndex``: "float32", "int8", "binary" with
float rescoring) with query FDEs; the second re-ranks its ``candidates`` by exact MaxSim
against the stored token vectors (float32, or int8 with per-token scales).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from embedjax.index.code_index import CodeIndex
from embedjax.kernels.topk import check_k
from embedjax.multivector.muvera import fde, fde_dim

QUANTIZATIONS = ("float32", "int8", "binary")
TOKEN_STORAGE = ("float32", "int8")
# int8 first-stage scores accumulate int8 x int8 products in int32: the width must keep
# width * 127 * 128 below 2**31.
INT8_MAX_WIDTH = (2**31 - 1) // (127 * 128)


def check_fde_fits(width: int, quantization: str) -> None:
    """Raise when an FDE of ``width`` dims cannot be searched with ``quantization``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}")
    if quantization == "int8" and width > INT8_MAX_WIDTH:
        raise ValueError(f"an FDE of {width} dims does not fit int8 search (int32 accumulators hold at most "
                         f"{INT8_MAX_WIDTH} dims); lower reps / k_sim / d_proj or set final_dim <= {INT8_MAX_WIDTH}")


@dataclasses.dataclass
class MultiVectorIndex:
    first_stage: CodeIndex
    tokens: np.ndarray            # float32 or int8 [N, Ld, D]
    mask: np.ndarray              # bool [N, Ld]
    scales: np.ndarray | None     # float32 [N, Ld] for int8 tokens
    fde_args: dict

    @classmethod
    def build(cls, doc_tokens_nld, doc_mask_nl, *, reps: int = 20, k_sim: int = 5, d_proj: int | None = 16,
              final_dim: int | None = None, seed: int = 0, quantization: str = "int8",
              token_storage: str = "float32", batch_size: int = 256):
        """Encode documents as FDEs (in batches of ``batch_size``) and keep their tokens for re-ranking."""
        tokens = np.asarray(doc_tokens_nld)
        mask = np.asarray(doc_mask_nl, bool)
        if tokens.ndim != 3 or mask.shape != tokens.shape[:2]:
            raise ValueError(f"doc_tokens_nld must be [N, L, D] and doc_mask_nl [N, L]; got {tokens.shape}, {mask.shape}")
        if not mask.any(axis=1).all():
            raise ValueError(f"document {int(np.argmin(mask.any(axis=1)))} has no unmasked token; drop it or keep one")
        if token_storage not in TOKEN_STORAGE:
            raise ValueError(f"token_storage must be one of {TOKEN_STORAGE}; got {token_storage!r}")
        args = dict(reps=reps, k_sim=k_sim, d_proj=d_proj, final_dim=final_dim, seed=seed)
        check_fde_fits(fde_dim(tokens.shape[2], **{k: v for k, v in args.items() if k != "seed"}), quantization)
        doc_fdes = np.concatenate([
            np.asarray(fde(tokens[i:i + batch_size], mask[i:i + batch_size], kind="document", **args))
            for i in range(0, len(tokens), batch_size)])
        kind, rescore = ("binary", "float32") if quantization == "binary" else (quantization, None)
        first = CodeIndex.build(doc_fdes, kind, rescore=rescore)
        scales = None
        if token_storage == "int8":
            from embedjax.kernels.maxsim import quantize_tokens_int8  # here: kernels.maxsim imports this package

            codes, scales = quantize_tokens_int8(tokens)
            tokens, scales = np.asarray(codes), np.asarray(scales)
        else:
            tokens = tokens.astype(np.float32)
        return cls(first, tokens, mask, scales, args)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def nbytes_per_document(self) -> dict:
        """Bytes per document of the first-stage codes and of the stored tokens (real tokens only)."""
        fde_bytes = self.first_stage.nbytes() / self.size
        per_token = self.tokens.shape[2] * self.tokens.dtype.itemsize + (4 if self.scales is not None else 0)
        return {"fde": fde_bytes, "tokens": float(self.mask.sum(1).mean() * per_token)}

    def search(self, q_tokens_qld, q_mask_ql, k: int, *, candidates: int = 100, impl: str = "auto"):
        """``(scores float32 [Q, k], ids int32 [Q, k])``: MaxSim of the re-ranked FDE candidates."""
        q = np.asarray(q_tokens_qld, np.float32)
        q_mask = np.asarray(q_mask_ql, bool)
        if q.ndim != 3 or q_mask.shape != q.shape[:2] or q.shape[2] != self.tokens.shape[2]:
            raise ValueError(f"q_tokens_qld must be [Q, L, {self.tokens.shape[2]}] with q_mask_ql [Q, L]; "
                             f"got {q.shape}, {q_mask.shape}")
        if not q_mask.any(axis=1).all():
            raise ValueError("a query has no unmasked token; MaxSim of an empty query is undefined")
        check_k(candidates, self.size, what="index")
        check_k(k, candidates, what="candidate list")
        from embedjax.kernels.maxsim import maxsim_rerank

        _, cand = self.first_stage.search(np.asarray(fde(q, q_mask, kind="query", **self.fde_args)), candidates)
        scores, ids = maxsim_rerank(q, q_mask, cand, self.tokens, self.mask, k, impl, doc_scales=self.scales)
        return np.asarray(scores), np.asarray(ids)

    def candidates(self, q_tokens_qld, q_mask_ql, count: int) -> np.ndarray:
        """The first stage's ``count`` candidate ids [Q, count] (for recall-vs-candidates curves)."""
        q_fde = np.asarray(fde(np.asarray(q_tokens_qld, np.float32), np.asarray(q_mask_ql, bool), kind="query",
                               **self.fde_args))
        return np.asarray(self.first_stage.search(q_fde, count)[1])
