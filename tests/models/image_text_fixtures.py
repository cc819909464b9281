"""Tiny random transformers ViT / CLIP / SigLIP models saved with save_pretrained, and inputs for them."""
from __future__ import annotations

import math

import numpy as np

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=12)
VISION = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, image_size=20,
              patch_size=5)


def save_vit(folder, image_size=(16, 24), patch_size=8, seed=0):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=56,
                                   image_size=list(image_size), patch_size=patch_size))
    _randomize_norms(model)
    model.save_pretrained(folder)
    return model.eval()


def save_clip(folder, eos_token_id=98, seed=0):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id, "bos_token_id": 0, "pad_token_id": 1},
                          vision_config=VISION, projection_dim=16)
    model = T.CLIPModel(config)
    _randomize_norms(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model.save_pretrained(folder)
    return model.eval()


def save_siglip(folder, seed=0):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.SiglipConfig(text_config={**TEXT, "projection_size": 24, "eos_token_id": 98, "pad_token_id": 1},
                            vision_config=VISION)
    model = T.SiglipModel(config)
    _randomize_norms(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-3.0)
        model.vision_model.head.probe.normal_()
    model.save_pretrained(folder)
    return model.eval()


def _randomize_norms(model):
    """LayerNorms away from their (1, 0) init, so a mis-mapped norm changes the outputs."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)


def pixels(rng, n, height, width):
    """Preprocessed-looking pixel values [N, H, W, 3] float32."""
    return rng.normal(size=(n, height, width, 3)).astype(np.float32)


def text_batch(rng, lengths, max_len, eos_id, vocab=99, pad_id=1):
    """Right-padded ids ending in ``eos_id``; body ids in [3, vocab - 1) so the EOS id is the largest."""
    ids = np.full((len(lengths), max_len), pad_id, np.int64)
    mask = np.zeros((len(lengths), max_len), np.int64)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = rng.integers(3, vocab - 1, n - 1)
        ids[i, n - 1] = eos_id
        mask[i, :n] = 1
    return ids, mask


WORDS = ["a", "photo", "of", "the", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine", "cat", "dog", "blurry", "small", "big"]


def save_word_tokenizer(folder, *, bos: bool, eos_id: int = 98, vocab: int = 99):
    """A word-level tokenizer.json over `WORDS` (ids 3...), pad id 1, EOS ``eos_id`` appended (and a
    BOS id 0 in front when ``bos``), with tokenizer_config.json naming the special tokens."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    ids = {"<bos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, "<eos>": eos_id}
    assert max(ids.values()) < vocab
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = ("<bos> $A <eos>" if bos else "$A <eos>")
    special = [("<eos>", eos_id)] + ([("<bos>", 0)] if bos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
