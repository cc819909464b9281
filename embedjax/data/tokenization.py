"""Tokenization into a bounded set of padded shapes.

jit compiles one program per input shape, so free-length padding would compile
anew for nearly every batch. Sequences are padded up to the next *length
bucket* instead: a short geometric ladder (about 1.5x apart) that bounds both the
number of compiled shapes and the padding waste.

The ladder steps by 8 tokens up to 64 (where most sentences live and relative waste
would be largest), then by 16 up to 128, by 32 up to 256, and by about 1.5x beyond.
"""
from __future__ import annotations

import bisect
import json
import os
import pathlib
from typing import Sequence

import numpy as np

DEFAULT_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 384, 512, 768, 1024,
                   1536, 2048)


def length_buckets(max_length: int, ladder: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Bucket lengths up to and including ``max_length``."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for the special tokens; use at least 2")
    return tuple(b for b in ladder if b < max_length) + (max_length,)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` tokens."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"length {n} is longer than the largest bucket {buckets[-1]}")
    return buckets[i]


def validate_texts(texts) -> list[str]:
    """A list of str, or a clear TypeError naming the first bad item."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string: wrap it as [text]")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"texts[{i}] is {type(item).__name__}, not str; every item must be a string")
    return items


class Tokenizer:
    """A folder's fast tokenizer with truncation at ``max_length`` and bucketed padding.

    ``tok(texts)`` returns numpy int32 arrays ``input_ids``, ``attention_mask``,
    ``token_type_ids`` of shape [B, bucket] with right padding.
    """

    def __init__(self, backend, max_length: int, pad_id: int, buckets: Sequence[int] | None = None):
        self.backend = backend
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.buckets = tuple(buckets) if buckets is not None else length_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} is shorter than max_length={self.max_length}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int, buckets: Sequence[int] | None = None):
        from tokenizers import Tokenizer as FastTokenizer

        folder = pathlib.Path(folder)
        path = folder / "tokenizer.json"
        if path.is_file():
            backend = FastTokenizer.from_file(str(path))
        elif (folder / "vocab.txt").is_file():
            backend = _wordpiece_from_vocab(folder)
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt; a tokenizer is required")
        backend.no_padding()
        backend.enable_truncation(max_length=int(max_length))
        pad_id = _pad_id(folder, backend)
        return cls(backend, max_length, pad_id, buckets)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Truncated token ids of each text, special tokens included, no padding."""
        texts = validate_texts(texts)
        return [enc.ids for enc in self.backend.encode_batch(texts)] if texts else []

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None, rows: int | None = None):
        """Right-pad id lists into a [rows, length] batch; ``length`` defaults to the bucket of the longest.

        Extra rows (``rows`` > len(ids)) are all padding with mask 0.
        """
        longest = max((len(x) for x in ids), default=1)
        length = length or bucket_length(longest, self.buckets)
        rows = rows or len(ids)
        input_ids = np.full((rows, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((rows, length), dtype=np.int32)
        for i, seq in enumerate(ids):
            input_ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}

    def __call__(self, texts: Sequence[str]):
        return self.pad(self.token_ids(texts))


def _pad_id(folder: pathlib.Path, backend) -> int:
    cfg_path = folder / "tokenizer_config.json"
    pad_token = "[PAD]"
    if cfg_path.is_file():
        pad = json.loads(cfg_path.read_text()).get("pad_token", pad_token)
        pad_token = pad["content"] if isinstance(pad, dict) else (pad or pad_token)
    pad_id = backend.token_to_id(pad_token)
    return 0 if pad_id is None else pad_id


def _wordpiece_from_vocab(folder: pathlib.Path):
    """A BERT WordPiece tokenizer from vocab.txt (folders that predate tokenizer.json)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    cfg_path = folder / "tokenizer_config.json"
    lowercase = True
    if cfg_path.is_file():
        lowercase = bool(json.loads(cfg_path.read_text()).get("do_lower_case", True))
    vocab = {}
    for i, line in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line, i)
    tok = FastTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece()
    return tok
