"""Multi-vector (late-interaction) retrieval: MaxSim scores, MUVERA fixed-dimensional encodings with a
quantized first stage and exact re-ranking, CRISP clustering and pruning baselines."""
from embedjax.multivector.muvera import fde, fde_dim
from embedjax.multivector.crisp import cluster_tokens, k_spacing, tail_prune
from embedjax.multivector.index import MultiVectorIndex, check_fde_fits
from embedjax.multivector.maxsim import maxsim, maxsim_paired

__all__ = ["fde", "fde_dim", "maxsim", "maxsim_paired", "MultiVectorIndex", "check_fde_fits",
           "cluster_tokens", "tail_prune", "k_spacing"]
