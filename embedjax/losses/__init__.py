"""Embedding losses as pure functions of arrays.

Dense references (`contrastive`, `pairwise`, `distill`), the exact memory-tiled ring
losses over a device mesh (`ring`), InfoNCE in row stripes at the dense loss's FLOPs (`stripes`), image-text losses with a learned scale and bias (`two_tower`), Matryoshka wrappers (`matryoshka`) and GradCache
(`gradcache`). See DESIGN.md for the public signatures.
"""
from embedjax.losses.allgather import allgather_infonce
from embedjax.losses.contrastive import infonce, learnable_temperature, siglip
from embedjax.losses.distill import embedding_alignment, margin_mse, score_kl
from embedjax.losses.matryoshka import matryoshka_loss, starbucks_loss, starbucks_pairs, two_d_matryoshka_pairs
from embedjax.losses.pairwise import angle, cosent, cosent_in_batch, triplet
from embedjax.losses.ring import ring_infonce, ring_siglip
from embedjax.losses.stripes import striped_infonce
from embedjax.losses.two_tower import clip_loss, siglip_loss

__all__ = [
    "infonce", "siglip", "learnable_temperature", "ring_infonce", "ring_siglip", "allgather_infonce",
    "striped_infonce",
    "cosent", "cosent_in_batch", "angle", "triplet", "embedding_alignment", "score_kl", "margin_mse",
    "matryoshka_loss", "starbucks_loss", "two_d_matryoshka_pairs", "starbucks_pairs", "clip_loss", "siglip_loss",
]
