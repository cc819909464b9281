"""Tiny random decoder checkpoints (Llama, Mistral, Qwen2, Qwen3) saved with transformers'
``save_pretrained``, a word-level tokenizer for them, and the transformers reference forward pass."""
from __future__ import annotations

import json
import pathlib

import numpy as np

WORDS = ["the", "a", "man", "dog", "plays", "flute", "runs", "fast", "slow", "park", "in", "on", "green", "sky",
         "blue", "is", "and", "with", "cat", "sleeps", "query", "instruct", ":", "find", "passage"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS))]

# GQA everywhere; head_dim != hidden / heads; llama3 rope scaling; biases; q/k norms; a window
# smaller than the test sequences.
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  attention_bias=True, mlp_bias=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8}),
    "qwen2": dict(model_type="qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(model_type="mistral", hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def write_word_tokenizer(folder: pathlib.Path) -> None:
    """A whitespace word-level tokenizer over VOCAB with <s>/</s>/<pad> specials (no template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}))


def save_tiny_decoder(folder: pathlib.Path, family: str, seed: int = 0, dtype=None, max_shard_size=None,
                      **overrides) -> pathlib.Path:
    """Save a tiny random ``family`` model (norm weights perturbed away from 1) with a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    spec = dict(CONFIGS[family])
    model_type = spec.pop("model_type")
    spec.update(vocab_size=len(VOCAB), intermediate_size=40, num_hidden_layers=3, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    spec.update(overrides)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    write_word_tokenizer(folder)
    return folder


def random_batch(rng, rows: int, length: int, vocab: int, *, side: str = "right"):
    """Token ids [rows, length] with varied real lengths (>= 2) padded on ``side``; pad id 0."""
    lengths = rng.integers(2, length + 1, size=rows)
    lengths[0] = length
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, n in enumerate(lengths):
        where = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, where] = rng.integers(4, vocab, size=n)
        mask[i, where] = 1
    return {"input_ids": ids, "attention_mask": mask}


def hf_last_hidden(folder: pathlib.Path, batch: dict, *, bidirectional: bool = False, dtype=None) -> np.ndarray:
    """transformers' last hidden state [B, L, D] as float32 (computed in ``dtype``, float32 by default)
    with explicit position ids counting real tokens; bidirectional runs get a 4D padding-only boolean mask."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), dtype=dtype or torch.float32).eval()
    mask = torch.tensor(batch["attention_mask"]).long()
    positions = torch.clamp(torch.cumsum(mask, 1) - 1, min=0)
    attention = mask
    if bidirectional:
        length = mask.shape[1]
        attention = mask.bool()[:, None, None, :].expand(-1, 1, length, length)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"]).long(), attention_mask=attention,
                    position_ids=positions)
    return out.last_hidden_state.float().numpy()


def token_relative_errors(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """||ours - ref|| / ||ref|| of every real token's state."""
    keep = mask.astype(bool)
    diff = np.linalg.norm(ours[keep] - ref[keep], axis=-1)
    return diff / np.linalg.norm(ref[keep], axis=-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
