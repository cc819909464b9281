"""Embeddings cached on disk for experiment scripts that encode the same texts more than once.

``cached_encode(encoder, texts, cache_dir, name=...)`` returns ``encoder.encode(texts)``, reading
it from ``cache_dir`` when an earlier call stored the same thing. The key covers everything that
can change an embedding: the texts and prompt, the encoder's settings and a hash of its weights,
the library versions that compute it, and the source of the whole ``embedjax`` package (any code
change invalidates the cache rather than risk a stale figure).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import sys
import time
from typing import Sequence

import numpy as np

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _code_and_versions() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    for package in ("jax", "jaxlib", "flax", "numpy", "tokenizers"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=absent".encode())
    return digest.hexdigest()


def hash_params(digest, params) -> None:
    """Feed every parameter (path, dtype, shape, raw bytes) of a pytree into a hashlib digest."""
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))  # raw bytes without a copy, any dtype (bfloat16 too)


def cache_key(encoder, texts: Sequence[str], prompt: str | None = None) -> str:
    """16 hex digits naming one (encoder, texts, prompt, code, versions) combination."""
    digest = hashlib.sha256()
    digest.update(_code_and_versions().encode())
    hash_params(digest, encoder.params)
    digest.update(repr(encoder).encode())
    digest.update(repr(prompt).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_encode(encoder, texts: Sequence[str], cache_dir, *, name: str, batch_size: int = 64,
                  prompt: str | None = None) -> np.ndarray:
    """``encoder.encode(texts)`` float32 [N, D], stored as ``cache_dir/NAME-KEY.npy`` (written atomically)."""
    if not texts:
        raise ValueError(f"no texts to encode for {name!r}")
    cache = pathlib.Path(cache_dir)
    path = cache / f"{name}-{cache_key(encoder, texts, prompt)}.npy"
    if path.exists():
        return np.load(path)
    start = time.perf_counter()
    emb = encoder.encode(list(texts), batch_size=batch_size, prompt=prompt)
    print(f"encoded {len(texts)} {name} texts in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb
