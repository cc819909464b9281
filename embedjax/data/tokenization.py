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
    """A folder's fast tokenizer: special-token framing, truncation at ``max_length``, optional
    prompts, and bucketed padding on the model's side.

    A text becomes ``prefix + prompt + text + suffix``: the tokenizer's own special tokens
    (``[CLS]``/``[SEP]``, a BOS, a template EOS) found once by probing it, the prompt and the text
    tokenized separately without special tokens (so the prompt's boundary is exact), the text
    truncated so the whole fits ``max_length``, and an EOS appended when the model family wants one
    and the tokenizer does not add it. ``pad`` returns numpy int32 ``input_ids`` and
    ``attention_mask`` [B, bucket] (plus ``token_type_ids`` for families that read them, and a
    ``pool_mask`` that leaves the prefix and prompt out of pooling when asked).
    """

    def __init__(self, backend, max_length: int, pad_id: int, buckets: Sequence[int] | None = None, *,
                 padding_side: str = "right", eos_id: int | None = None, append_eos: bool = False,
                 token_type_ids: bool = True):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        self.backend = backend
        self.mask_token = None  # the folder's mask token (tokenizer_config.json), set by from_folder
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.padding_side = padding_side
        self.token_type_ids = token_type_ids
        self.buckets = tuple(buckets) if buckets is not None else length_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} is shorter than max_length={self.max_length}")
        self.prefix, self.suffix = special_framing(backend)
        if append_eos:
            if eos_id is None:
                raise ValueError("this model family appends an EOS token but the tokenizer names none; set "
                                 "eos_token in tokenizer_config.json or eos_token_id in config.json")
            if self.suffix[-1:] != [eos_id]:
                self.suffix = self.suffix + [int(eos_id)]
        if len(self.prefix) + len(self.suffix) >= self.max_length:
            raise ValueError(f"max_length={self.max_length} leaves no room for text between the special tokens "
                             f"{self.prefix} and {self.suffix}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int, buckets: Sequence[int] | None = None, *,
                    needs=None):
        """The folder's tokenizer; ``needs`` (a family's `TokenizerNeeds`) defaults to the family
        its ``config.json`` names (BERT-style when the folder has no config)."""
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
        backend.no_truncation()  # truncation happens here, after the prompt and the special tokens
        settings = _tokenizer_settings(folder)
        model_config = _read_json(folder / "config.json")
        needs = needs or _family_needs(model_config)
        eos_id = _token_id(backend, settings.get("eos_token"))
        if eos_id is None:
            eos_id = _first(model_config.get("eos_token_id"))
        pad_id = _token_id(backend, settings.get("pad_token", "[PAD]"))
        if pad_id is None:
            pad_id = eos_id if eos_id is not None else 0
        if needs.pad_to_max_length:
            buckets = (max_length,)
        tokenizer = cls(backend, max_length, pad_id, buckets,
                        padding_side=settings.get("padding_side") or needs.padding_side, eos_id=eos_id,
                        append_eos=needs.append_eos, token_type_ids=needs.token_type_ids)
        tokenizer.mask_token = settings.get("mask_token") if isinstance(settings.get("mask_token"), str) else None
        return tokenizer

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """The prompt's tokens (no special tokens); [] for None or ""."""
        if not prompt:
            return []
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def pool_skip(self, prompt: str | None) -> int:
        """How many leading tokens of every sequence precede the text (prefix + prompt)."""
        return len(self.prefix) + len(self.prompt_ids(prompt))

    def token_ids(self, texts: Sequence[str], prompt: str | None = None) -> list[list[int]]:
        """Framed, truncated token ids of each text (special tokens and prompt included, no padding)."""
        texts = validate_texts(texts)
        if not texts:
            return []
        head = self.prefix + self.prompt_ids(prompt)
        budget = self.max_length - len(head) - len(self.suffix)
        if budget < 1:
            raise ValueError(f"the prompt {prompt!r} takes {len(head) - len(self.prefix)} tokens and leaves no "
                             f"room for text within max_length={self.max_length}; shorten it or raise max_length")
        return [head + enc.ids[:budget] + self.suffix
                for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None, rows: int | None = None,
            pool_skip: int = 0):
        """Pad id lists into a [rows, length] batch on the tokenizer's padding side; ``length``
        defaults to the bucket of the longest. Extra rows (``rows`` > len(ids)) are all padding.
        ``pool_skip`` > 0 adds ``pool_mask``: the attention mask without each row's first
        ``pool_skip`` tokens (the prefix and prompt that ``include_prompt=False`` leaves out)."""
        longest = max((len(x) for x in ids), default=1)
        length = length or bucket_length(longest, self.buckets)
        rows = rows or len(ids)
        input_ids = np.full((rows, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((rows, length), dtype=np.int32)
        for i, seq in enumerate(ids):
            where = slice(length - len(seq), length) if self.padding_side == "left" else slice(0, len(seq))
            input_ids[i, where] = seq
            mask[i, where] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.token_type_ids:
            batch["token_type_ids"] = np.zeros_like(input_ids)
        if pool_skip:
            batch["pool_mask"] = mask * (np.cumsum(mask, axis=1) > pool_skip)
        return batch

    def __call__(self, texts: Sequence[str]):
        return self.pad(self.token_ids(texts))


def special_framing(backend) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text: (prefix, suffix).

    Found by encoding a probe with and without special tokens and locating the plain ids inside
    the framed ones (``[CLS] ... [SEP]`` for BERT, ``<s> ...`` for Llama, nothing for GPT-2 style).
    """
    probe = "hello world"
    framed = backend.encode(probe, add_special_tokens=True).ids
    plain = backend.encode(probe, add_special_tokens=False).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    raise ValueError("the tokenizer's special-token template changes the text's own tokens; embedjax cannot "
                     "frame prompts and texts with it")


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer_settings(folder: pathlib.Path) -> dict:
    """tokenizer_config.json merged over special_tokens_map.json (token entries as plain strings)."""
    settings = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    return {k: (v["content"] if isinstance(v, dict) and "content" in v else v) for k, v in settings.items()}


def _token_id(backend, token) -> int | None:
    return backend.token_to_id(token) if isinstance(token, str) and token else None


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _family_needs(model_config: dict):
    from embedjax.models.registry import TokenizerNeeds, family_for_hf_config

    if "model_type" not in model_config:
        return TokenizerNeeds(token_type_ids=True)
    return family_for_hf_config(model_config).tokenizer


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
