"""``Encoder``: tokenizer + BERT + pooler + optional normalisation, jitted, with batching that
keeps compiled shapes few and padding small.

``encode`` sorts texts by token count (longest first, as sentence-transformers does),
cuts them into batches, pads each batch to its length bucket and its row count to a power
of two (at most ``batch_size``), dispatches every batch before reading any result back
(so host-side padding overlaps device compute) and returns rows in input order.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.convert import hf
from embedjax.data.tokenization import Tokenizer, validate_texts
from embedjax.models.bert import BertConfig, BertModel, parse_dtype
from embedjax.models.poolers import get_pooler, l2_normalize, select_layers
from embedjax.models.pretrained import resolve_model_dir


def embed_batch(model: BertModel, params, batch: dict, *, pooling: str, normalize: bool, layers=None,
                deterministic: bool = True, rngs=None):
    """Pure embedding function: token batch -> float32 [B, D] sentence embeddings."""
    pooler = get_pooler(pooling)
    need_all = layers is not None
    last_bld, hidden = model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
        deterministic=deterministic, output_hidden_states=need_all, rngs=rngs)
    states_bld = select_layers(hidden, layers) if need_all else last_bld
    emb_bd = pooler(states_bld, batch["attention_mask"]).astype(jnp.float32)
    return l2_normalize(emb_bd) if normalize else emb_bd


def _row_bucket(rows: int, batch_size: int) -> int:
    return min(batch_size, 1 << max(rows - 1, 0).bit_length())


class Encoder:
    """A sentence encoder: ``Encoder.from_pretrained(folder).encode(texts) -> [N, D] float32``."""

    def __init__(self, model: BertModel, params, tokenizer: Tokenizer, *, pooling: str = "mean",
                 normalize: bool = True, layers=None, source: str | None = None):
        get_pooler(pooling)  # fail early on an unknown name
        self.model = model
        self.config: BertConfig = model.config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.layers = layers
        self.source = source
        self._jitted = jax.jit(functools.partial(self.embed_fn, deterministic=True))

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike, pooling: str | None = None,
                        normalize: bool | None = None, max_length: int | None = None, dtype: Any = "float32",
                        layers=None) -> "Encoder":
        """Load a transformers / sentence-transformers folder.

        Pooling, normalisation and max length default to what the folder declares
        (``1_Pooling/config.json``, ``modules.json``, ``sentence_bert_config.json``).
        """
        folder = resolve_model_dir(path_or_dir)
        config, params = hf.load_pretrained(folder)
        settings = hf.read_pooling_settings(folder)
        max_length = max_length or settings.max_length or config.max_position_embeddings
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        model = BertModel(config, dtype=parse_dtype(dtype))
        tokenizer = Tokenizer.from_folder(folder, max_length)
        return cls(model, params, tokenizer,
                   pooling=pooling or settings.pooling,
                   normalize=settings.normalize if normalize is None else normalize,
                   layers=layers, source=str(folder))

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def embed_fn(self, params, batch: dict, deterministic: bool = True, rngs=None):
        """Pure, jittable: params + token batch -> float32 [B, D] (for training and GradCache)."""
        return embed_batch(self.model, params, batch, pooling=self.pooling, normalize=self.normalize,
                           layers=self.layers, deterministic=deterministic, rngs=rngs)

    def encode(self, texts: Sequence[str], batch_size: int = 64, prompt: str | None = None,
               show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` -> float32 [N, D], rows in input order.

        ``prompt`` is prepended to every text (e.g. ``"query: "`` for E5-style models).
        """
        texts = validate_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            texts = [prompt + t for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenizer.token_ids(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pending = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.pad([ids[i] for i in rows], rows=_row_bucket(len(rows), batch_size))
            pending.append((rows, self._jitted(self.params, batch)))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        progress = _progress(len(texts), show_progress)
        for rows, emb in pending:
            out[rows] = np.asarray(emb)[: len(rows)]
            progress.update(len(rows))
        progress.close()
        return out

    def __repr__(self) -> str:
        return (f"Encoder(source={self.source!r}, dim={self.dim}, layers={self.config.num_layers}, "
                f"pooling={self.pooling!r}, normalize={self.normalize}, max_length={self.max_length})")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="encode", unit="text")
