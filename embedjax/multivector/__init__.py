"""Multi-vector (late-interaction) retrieval: MaxSim scores and MUVERA fixed-dimensional encodings."""
from embedjax.multivector.muvera import fde, fde_dim
from embedjax.multivector.index import MultiVectorIndex, check_fde_fits
from embedjax.multivector.maxsim import maxsim, maxsim_paired

__all__ = ["fde", "fde_dim", "maxsim", "maxsim_paired", "MultiVectorIndex", "check_fde_fits"]
