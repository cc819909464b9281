"""GGUF (llama.cpp) checkpoints -> transformers folders that embedjax (and transformers) load.

    python -m embedjax convert gguf --input model.gguf --output DIR

The weights are dequantized with the ``gguf`` package into float32, renamed from llama.cpp's
names to transformers' (one table, below) and written as ``model.safetensors`` with a
``config.json`` built from the file's metadata. llama.cpp stores Llama-architecture q/k projection
rows interleaved for its rotary kernel; they are put back in transformers' half-split order.
The tokenizer (``tokenizer.json``, ``tokenizer_config.json``) is rebuilt from the file's
metadata by transformers' GGUF tokenizer reader, which needs torch installed (the ``[dev]``
extra). The folder is assembled in a temporary sibling and renamed into place.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

# Quantization types the gguf package dequantizes; anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF general.architecture -> transformers model_type (llama.cpp writes Mistral as "llama").
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp tensor names -> transformers names ({i}: layer index).
_NAMES = [
    (r"token_embd\.weight", "embed_tokens.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "layers.{}.self_attn.q_proj.{}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "layers.{}.self_attn.k_proj.{}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "layers.{}.self_attn.v_proj.{}"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", "layers.{}.self_attn.o_proj.{}"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "layers.{}.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "layers.{}.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{}.mlp.down_proj.weight"),
]


def hf_tensor_name(gguf_name: str, where: str = "GGUF file") -> str:
    for pattern, template in _NAMES:
        match = re.fullmatch(pattern, gguf_name)
        if match:
            return template.format(*match.groups())
    raise ValueError(f"{where} holds tensor {gguf_name!r}, which embedjax's GGUF table does not map")


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k projection rows: per head, rows stored as
    (pairs, 2) go back to transformers' (2, pairs) half-split order. Works for biases too."""
    rows = weight.shape[0]
    pairs = rows // heads // 2
    return weight.reshape(heads, pairs, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaving (the inverse of `unpermute_rotary_rows`), for writing test files."""
    rows = weight.shape[0]
    pairs = rows // heads // 2
    return weight.reshape(heads, 2, pairs, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def hf_config_from_metadata(reader, where: str = "GGUF file") -> dict:
    """A transformers config.json dict from a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where} has architecture {arch!r}; embedjax converts {sorted(ARCHITECTURES)}")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{where} lacks the metadata key {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_act": "silu",
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0)),
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama" and "blk.0.attn_q.bias" in tensor_names:
        config["attention_bias"] = True
    return config


def hf_tensors_from_reader(reader, config: dict, where: str = "GGUF file") -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its transformers name, q/k rows un-interleaved
    for the Llama architecture. An unsupported quantization type is an error naming the tensor."""
    from gguf import dequantize

    bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    if bad:
        raise ValueError(f"{where} stores {len(bad)} tensors in quantization types embedjax cannot dequantize: "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; supported: {list(SUPPORTED_TYPES)}")
    permute = config["model_type"] == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, where)
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGML lists dimensions innermost first
        array = array.reshape(shape)
        proj = name.split(".")[-2] if ".self_attn." in name else ""
        if permute and proj in heads:
            array = unpermute_rotary_rows(array, heads[proj])
        out[name] = np.ascontiguousarray(array)
    return out


def _write_tokenizer(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as err:
        raise ImportError(f"rebuilding the tokenizer of {gguf_path} needs transformers' GGUF reader, which needs "
                          f"torch: pip install -e .[dev] ({err})") from err
    tokenizer.save_pretrained(str(out))


def convert_gguf(input_path: str | os.PathLike, output_dir: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write a transformers folder (config.json, model.safetensors, tokenizer files) for a GGUF file.

    The result loads with ``ej.Encoder.from_pretrained(output_dir)`` and ``transformers.AutoModel``.
    An existing non-empty ``output_dir`` is an error unless ``overwrite``.
    """
    from gguf import GGUFReader

    from embedjax.convert import safetensors_io
    from embedjax.convert.hf import replace_folder

    path = pathlib.Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    out = pathlib.Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the gguf package raises ValueError/struct errors on bad files
        raise ValueError(f"{path} could not be read as GGUF ({err}); the file is corrupt or not GGUF") from err
    config = hf_config_from_metadata(reader, str(path))
    tensors = hf_tensors_from_reader(reader, config, str(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        safetensors_io.write_folder(tmp, tensors)
        _write_tokenizer(path, tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
