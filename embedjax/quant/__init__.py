"""Quantizers with documented layouts: binary, int8/uint8/int4, fp8, PCA, residual binarisation."""
from embedjax.quant.binary import (
    bits_to_signs,
    from_faiss_bytes,
    from_numpy_packbits,
    from_st_binary,
    hamming_distances,
    pack_bits,
    to_faiss_bytes,
    to_numpy_packbits,
    to_st_binary,
    unpack_bits,
)
from embedjax.quant.fp8 import dequantize_fp8, quantize_fp8
from embedjax.quant.pca import apply_pca, fit_pca
from embedjax.quant.residual import fit_residual_weights, residual_binarize, residual_decode
from embedjax.quant.scalar import (
    affine_query_transform,
    calibrate_ranges,
    dequantize_int4,
    dequantize_int8,
    dequantize_uint8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_symmetric_int8,
    quantize_uint8,
    unpack_int4,
)

__all__ = [name for name in dir() if not name.startswith("_")]
