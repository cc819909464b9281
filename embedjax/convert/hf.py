"""transformers / sentence-transformers folders <-> embedjax BERT params, without torch.

The mapping between the two naming schemes is one explicit table
(``bert_name_map``): each row names the safetensors tensor, the path in the
Flax params tree and the layout transform between them. Import checks the table
against the file and reports every missing, unexpected and mis-shaped tensor at
once; export walks the same table backwards, so the two can never disagree.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from embedjax.models.bert import BertConfig

# Tensors a checkpoint may carry that the encoder does not use: the position-id buffer
# and the next-sentence pooler head (not used by sentence embeddings).
IGNORED_TENSOR_PREFIXES = ("embeddings.position_ids", "pooler.")
# Checkpoints saved from task models (BertForMaskedLM, ...) prefix the encoder's names.
STRIPPED_PREFIXES = ("bert.", "model.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One row of the name map: hf tensor name, Flax path, and how the layout changes."""

    hf_name: str
    flax_path: tuple[str, ...]
    layout: str  # "copy" | "dense" | "qkv_kernel" | "qkv_bias" | "attn_out_kernel"


def bert_name_map(config: BertConfig) -> list[TensorRule]:
    """The full table for a BERT encoder of this config."""
    rules = [
        TensorRule("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings", "embedding"), "copy"),
        TensorRule("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings", "embedding"),
                   "copy"),
        TensorRule("embeddings.token_type_embeddings.weight", ("embeddings", "token_type_embeddings", "embedding"),
                   "copy"),
        TensorRule("embeddings.LayerNorm.weight", ("embeddings", "layer_norm", "norm", "scale"), "copy"),
        TensorRule("embeddings.LayerNorm.bias", ("embeddings", "layer_norm", "norm", "bias"), "copy"),
    ]
    for i in range(config.num_layers):
        hf, fx = f"encoder.layer.{i}.", f"layer_{i}"
        for proj in ("query", "key", "value"):
            rules.append(TensorRule(f"{hf}attention.self.{proj}.weight", (fx, "attention", proj, "kernel"),
                                    "qkv_kernel"))
            rules.append(TensorRule(f"{hf}attention.self.{proj}.bias", (fx, "attention", proj, "bias"), "qkv_bias"))
        rules += [
            TensorRule(f"{hf}attention.output.dense.weight", (fx, "attention", "out", "kernel"), "attn_out_kernel"),
            TensorRule(f"{hf}attention.output.dense.bias", (fx, "attention", "out", "bias"), "copy"),
            TensorRule(f"{hf}attention.output.LayerNorm.weight", (fx, "attention_norm", "norm", "scale"), "copy"),
            TensorRule(f"{hf}attention.output.LayerNorm.bias", (fx, "attention_norm", "norm", "bias"), "copy"),
            TensorRule(f"{hf}intermediate.dense.weight", (fx, "mlp_in", "kernel"), "dense"),
            TensorRule(f"{hf}intermediate.dense.bias", (fx, "mlp_in", "bias"), "copy"),
            TensorRule(f"{hf}output.dense.weight", (fx, "mlp_out", "kernel"), "dense"),
            TensorRule(f"{hf}output.dense.bias", (fx, "mlp_out", "bias"), "copy"),
            TensorRule(f"{hf}output.LayerNorm.weight", (fx, "output_norm", "norm", "scale"), "copy"),
            TensorRule(f"{hf}output.LayerNorm.bias", (fx, "output_norm", "norm", "bias"), "copy"),
        ]
    return rules


def _hf_shape(rule: TensorRule, config: BertConfig) -> tuple[int, ...]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    name = rule.hf_name
    if "word_embeddings" in name:
        return (v, d)
    if "position_embeddings" in name:
        return (config.max_position_embeddings, d)
    if "token_type_embeddings" in name:
        return (config.type_vocab_size, d)
    if name.endswith("intermediate.dense.weight"):
        return (f, d)
    if name.endswith("intermediate.dense.bias"):
        return (f,)
    if name.endswith("output.dense.weight") and "attention" not in name:
        return (d, f)
    if name.endswith(".weight") and "LayerNorm" not in name:
        return (d, d)
    return (d,)


def _to_flax(array: np.ndarray, layout: str, config: BertConfig) -> np.ndarray:
    h, k, d = config.num_heads, config.head_dim, config.hidden_size
    if layout == "copy":
        return array
    if layout == "dense":  # torch Linear stores [out, in]; Flax Dense wants [in, out]
        return array.T
    if layout == "qkv_kernel":
        return array.T.reshape(d, h, k)
    if layout == "qkv_bias":
        return array.reshape(h, k)
    if layout == "attn_out_kernel":
        return array.T.reshape(h, k, d)
    raise ValueError(f"unknown layout {layout!r}")


def _to_hf(array: np.ndarray, layout: str, config: BertConfig) -> np.ndarray:
    h, k, d = config.num_heads, config.head_dim, config.hidden_size
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "qkv_kernel":
        return array.reshape(d, h * k).T
    if layout == "qkv_bias":
        return array.reshape(h * k)
    if layout == "attn_out_kernel":
        return array.reshape(h * k, d).T
    raise ValueError(f"unknown layout {layout!r}")


def read_config(folder: str | os.PathLike) -> BertConfig:
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a model folder needs the transformers config.json")
    try:
        return BertConfig.from_hf_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path} is not a valid transformers BERT config: {err}") from err


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` as numpy arrays, with task-model prefixes stripped."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        hint = " (found pytorch_model.bin: convert it to safetensors first)" if (folder / "pytorch_model.bin").exists() \
            else ""
        raise FileNotFoundError(f"{path} is missing{hint}: embedjax reads weights from model.safetensors")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{path} could not be read as safetensors ({err}); the file is corrupt or truncated: "
                         "re-export or re-download it") from err
    out = {}
    for name, array in tensors.items():
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = array
    return out


def params_from_tensors(tensors: dict[str, np.ndarray], config: BertConfig, source: str = "checkpoint"):
    """Build the Flax params tree from HF-named tensors, reporting every problem at once."""
    rules = bert_name_map(config)
    expected = {r.hf_name for r in rules}
    missing = [r.hf_name for r in rules if r.hf_name not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected and not n.startswith(IGNORED_TENSOR_PREFIXES))
    misshaped = [
        f"{r.hf_name}: file {tuple(tensors[r.hf_name].shape)} vs config {_hf_shape(r, config)}"
        for r in rules
        if r.hf_name in tensors and tuple(tensors[r.hf_name].shape) != _hf_shape(r, config)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the BERT config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}): {'; '.join(misshaped)}")
        raise ValueError("\n".join(lines))
    params: dict[str, Any] = {}
    for r in rules:
        node = params
        for key in r.flax_path[:-1]:
            node = node.setdefault(key, {})
        node[r.flax_path[-1]] = np.asarray(_to_flax(tensors[r.hf_name], r.layout, config), dtype=np.float32)
    return params


def load_pretrained(folder: str | os.PathLike):
    """Read ``config.json`` + ``model.safetensors`` -> ``(BertConfig, params)`` (numpy float32 leaves)."""
    config = read_config(folder)
    tensors = read_safetensors(folder)
    return config, params_from_tensors(tensors, config, source=str(pathlib.Path(folder) / "model.safetensors"))


def tensors_from_params(params, config: BertConfig) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_tensors``: HF-named float32 tensors from a Flax params tree."""
    out = {}
    for r in bert_name_map(config):
        node = params
        for key in r.flax_path:
            node = node[key]
        array = np.asarray(node, dtype=np.float32)
        out[r.hf_name] = np.ascontiguousarray(_to_hf(array, r.layout, config))
    return out


@dataclasses.dataclass(frozen=True)
class PoolingSettings:
    """What ``1_Pooling/config.json``, ``modules.json`` and ``sentence_bert_config.json`` say."""

    pooling: str = "mean"
    normalize: bool = False
    max_length: int | None = None
    layers: Any = None


_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_pooling_settings(folder: str | os.PathLike) -> PoolingSettings:
    """Pooling, normalisation and max length as a sentence-transformers folder declares them.

    A plain transformers folder (no sentence-transformers files) defaults to mean pooling,
    no normalisation and the model's position limit.
    """
    folder = pathlib.Path(folder)
    pooling = "mean"
    pool_cfg = folder / "1_Pooling" / "config.json"
    modules = _read_modules(folder)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pool_cfg = folder / module.get("path", "1_Pooling") / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if "pooling_mode" in cfg:
            pooling = cfg["pooling_mode"]
        else:
            chosen = [name for key, name in _POOLING_KEYS.items() if cfg.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"{pool_cfg} enables {chosen or 'no'} pooling modes; embedjax needs exactly one")
            pooling = chosen[0]
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    max_length = None
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = json.loads(sbert.read_text()).get("max_seq_length")
    return PoolingSettings(pooling=pooling, normalize=normalize, max_length=max_length)


def _read_modules(folder: pathlib.Path) -> list[dict]:
    path = folder / "modules.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _pooling_config(pooling: str, dim: int) -> dict:
    config = {"word_embedding_dimension": dim}
    config.update({key: (name == pooling) for key, name in _POOLING_KEYS.items()})
    config["include_prompt"] = True
    return config


def export_pretrained(
    out_dir: str | os.PathLike,
    config: BertConfig,
    params,
    tokenizer_src: str | os.PathLike,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 256,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a folder that ``transformers.AutoModel`` and ``SentenceTransformer`` load unchanged.

    The folder is assembled in a temporary sibling and renamed into place, so a crash never
    leaves a half-written model; an existing non-empty ``out_dir`` is an error unless
    ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    from embedjax.models.poolers import POOLERS

    if pooling not in POOLERS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLERS)}")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True")
    src = pathlib.Path(tokenizer_src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        save_file(tensors_from_params(params, config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        if "tokenizer.json" not in copied and "vocab.txt" not in copied:
            raise FileNotFoundError(f"{src} has no tokenizer.json or vocab.txt to export with the model")
        for name in copied:
            shutil.copy2(src / name, tmp / name)
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(pooling, config.hidden_size),
                                                                   indent=2))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (tmp / "2_Normalize").mkdir()
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
        (tmp / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
