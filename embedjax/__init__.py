"""embedjax: train, compress and evaluate embedding models in JAX.

The public API is curated here. Submodules are imported on first use so that
``import embedjax`` stays cheap and a heavy optional dependency (torch, faiss)
is only touched by the code that needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SUBMODULES = (
    "bench",
    "convert",
    "data",
    "eval",
    "integrations",
    "index",
    "kernels",
    "losses",
    "merge",
    "models",
    "multivector",
    "quant",
    "sharding",
    "tables",
    "train",
)
_ATTRIBUTES = {
    "Encoder": "embedjax.encoder",
}

__all__ = ["Encoder", "__version__", *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from embedjax.encoder import Encoder  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"embedjax.{name}")
        globals()[name] = module
        return module
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedjax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
