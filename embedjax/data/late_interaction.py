"""Token framing of late-interaction (ColBERT) models, as PyLate frames them.

* A marker token right after the leading special tokens: ``[Q]`` on queries, ``[D]`` on documents
  (BERT vocabularies hold them as ``[unused0]`` / ``[unused1]``).
* Queries are cut or padded to ``query_length`` with ``[MASK]`` tokens ("query expansion"):
  expansion tokens are scored (``pool_mask`` 1) but not attended to (``attention_mask`` 0) unless
  ``attend_to_expansion``.
* Documents are cut to ``document_length``; punctuation tokens (the ``skiplist``) are attended to
  but not scored.

``frame`` returns the padded batch with ``pool_mask``: the tokens whose vectors are scored.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

from embedjax.data.tokenization import Tokenizer, bucket_length, validate_texts

SIDES = ("query", "document")


@dataclasses.dataclass(frozen=True)
class LateInteractionFraming:
    query_marker: str = "[unused0]"
    document_marker: str = "[unused1]"
    query_length: int = 32
    document_length: int = 180
    attend_to_expansion: bool = False
    skiplist: tuple[str, ...] = tuple(string.punctuation)

    def to_st(self) -> dict:
        """The keys PyLate keeps in ``config_sentence_transformers.json``."""
        return {"query_prefix": self.query_marker, "document_prefix": self.document_marker,
                "query_length": self.query_length, "document_length": self.document_length,
                "attend_to_expansion_tokens": self.attend_to_expansion, "skiplist_words": list(self.skiplist)}

    @classmethod
    def from_st(cls, config: dict) -> "LateInteractionFraming":
        defaults = cls()
        return cls(query_marker=config.get("query_prefix", defaults.query_marker),
                   document_marker=config.get("document_prefix", defaults.document_marker),
                   query_length=int(config.get("query_length", defaults.query_length)),
                   document_length=int(config.get("document_length", defaults.document_length)),
                   attend_to_expansion=bool(config.get("attend_to_expansion_tokens", defaults.attend_to_expansion)),
                   skiplist=tuple(config.get("skiplist_words", defaults.skiplist)))


def _token(tokenizer: Tokenizer, token: str, role: str) -> int:
    token_id = tokenizer.backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the {role} token {token!r} is not in the tokenizer's vocabulary; pick one that is "
                         "(BERT vocabularies: '[unused0]' / '[unused1]' for the markers)")
    return int(token_id)


def framed_ids(tokenizer: Tokenizer, texts: Sequence[str], side: str, framing: LateInteractionFraming) -> list[list[int]]:
    """prefix + marker + text (truncated) + suffix, per text (no padding)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}; got {side!r}")
    marker = _token(tokenizer, framing.query_marker if side == "query" else framing.document_marker, f"{side} marker")
    length = framing.query_length if side == "query" else framing.document_length
    if length > tokenizer.max_length:
        raise ValueError(f"{side}_length={length} exceeds the tokenizer's max_length={tokenizer.max_length}")
    budget = length - len(tokenizer.prefix) - 1 - len(tokenizer.suffix)
    if budget < 1:
        raise ValueError(f"{side}_length={length} leaves no room for text after the special tokens and the marker")
    encodings = tokenizer.backend.encode_batch(validate_texts(texts), add_special_tokens=False)
    return [tokenizer.prefix + [marker] + enc.ids[:budget] + tokenizer.suffix for enc in encodings]


def frame(tokenizer: Tokenizer, ids: Sequence[Sequence[int]], side: str, framing: LateInteractionFraming,
          rows: int | None = None, length: int | None = None) -> dict:
    """Pad framed ids into a batch with ``pool_mask`` (the scored tokens); see the module docstring.
    Queries always have ``query_length`` tokens; documents are padded to ``length`` (default: the
    length bucket of the longest)."""
    if side == "query":
        batch = tokenizer.pad(ids, length=framing.query_length, rows=rows)
        real = batch["attention_mask"].astype(bool)
        expansion = np.zeros_like(real)
        expansion[: len(ids)] = ~real[: len(ids)]  # extra padding rows stay empty
        batch["input_ids"] = np.where(expansion, _token(tokenizer, "[MASK]", "query expansion"), batch["input_ids"])
        if framing.attend_to_expansion:
            batch["attention_mask"] = (real | expansion).astype(np.int32)
        batch["pool_mask"] = (real | expansion).astype(np.int32)
        return batch
    longest = max((len(x) for x in ids), default=1)
    batch = tokenizer.pad(ids, length=length or bucket_length(longest, tokenizer.buckets), rows=rows)
    scored = batch["attention_mask"].astype(bool) & ~np.isin(batch["input_ids"], _skip_ids(tokenizer, framing))
    batch["pool_mask"] = scored.astype(np.int32)
    return batch


def score_packed_documents(tokenizer: Tokenizer, framing: LateInteractionFraming, batch: dict) -> dict:
    """A packed batch of framed documents (`embedjax.data.packing`) with the skiplist's tokens left
    out of its ``pool_mask`` [N, P], as `frame` leaves them out of a padded batch's."""
    ids_np = batch["input_ids"].reshape(-1)[batch["unpack_index"]]  # each text's tokens, from its row
    scored = batch["pool_mask"].astype(bool) & ~np.isin(ids_np, _skip_ids(tokenizer, framing))
    return {**batch, "pool_mask": scored.astype(np.int32)}


def _skip_ids(tokenizer: Tokenizer, framing: LateInteractionFraming) -> list[int]:
    return [i for i in (tokenizer.backend.token_to_id(w) for w in framing.skiplist) if i is not None]
