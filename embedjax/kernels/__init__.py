"""Similarity kernels: Pallas kernels with plain-jnp twins (``impl="auto" | "pallas" | "xla"``)."""
from embedjax.kernels.hamming import hamming_topk
from embedjax.kernels.lowbit import fp8_topk, int4_topk, int8_topk
from embedjax.kernels.rescore import rescore_topk
from embedjax.kernels.residual import residual_bits_score, residual_topk
from embedjax.kernels.row_filter import RowPredicates
from embedjax.kernels.topk import merge_topk

__all__ = ["hamming_topk", "int8_topk", "int4_topk", "fp8_topk", "rescore_topk", "residual_bits_score",
           "residual_topk", "merge_topk", "RowPredicates"]
