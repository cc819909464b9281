"""Models: the family registry, shared layers, towers (one module per family) and poolers.

The application object, ``Encoder``, lives in `embedjax.encoder`.
"""
from embedjax.models.poolers import POOLERS, pool, select_layers
from embedjax.models.registry import Family, TokenizerNeeds, families, get_family

__all__ = ["Family", "TokenizerNeeds", "families", "get_family", "POOLERS", "pool", "select_layers"]
