"""transformers / sentence-transformers folders <-> embedjax configs and params, without torch.

The family comes from ``config.json``'s ``model_type`` through the registry
(`embedjax.models.registry`); its name-map table (`embedjax.convert.tables`) moves the tensors.
Weights are read from ``model.safetensors`` or a sharded index, in float32, float16 or bfloat16
(`embedjax.convert.safetensors_io`), and held as float32. Export assembles the whole folder in a
temporary sibling and renames it into place, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import numpy as np

from embedjax.convert import safetensors_io, tables
from embedjax.jsonfile import read_json_file
from embedjax.models.registry import family_for_config, family_for_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": safetensors_io.DTYPES["BF16"]}


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json`` as a dict (a missing or broken file is a clear error)."""
    path = pathlib.Path(folder) / "config.json"
    hf = read_json_file(path, missing="a model folder needs the transformers config.json")
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return hf


def read_config(folder: str | os.PathLike, **options):
    """The family config of a folder; ``options`` (e.g. ``attention="bidirectional"``) replace fields."""
    path = pathlib.Path(folder) / "config.json"
    hf = read_hf_config(folder)
    family = family_for_hf_config(hf, str(path))
    try:
        return family.config_cls.from_hf(hf, **options)
    except KeyError as err:
        raise ValueError(f"{path} is not a valid {family.name} config: missing key {err}") from err


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of the folder's weights (single file or shards), names as stored."""
    return safetensors_io.read_folder(folder)


def params_from_tensors(tensors, config, source: str = "checkpoint"):
    """The Flax params tree (float32) from HF-named tensors, every mismatch reported at once."""
    family = family_for_config(config)
    tensors = tables.strip_prefixes(tensors, family.hf_stripped_prefixes)
    if family.hf_prepare_tensors is not None:
        tensors = family.hf_prepare_tensors(tensors, config)
    return tables.params_from_tensors(tensors, family.hf_table(config), source=source, family=family.name,
                                      ignored=family.hf_ignored)


def load_pretrained(folder: str | os.PathLike, **options):
    """Read ``config.json`` + weights -> ``(config, params)`` (numpy float32 leaves)."""
    config = read_config(folder, **options)
    return config, params_from_tensors(read_safetensors(folder), config, source=str(pathlib.Path(folder)))


def tensors_from_params(params, config, dtype=np.float32) -> dict[str, np.ndarray]:
    """The inverse of `params_from_tensors`: HF-named tensors in ``dtype``."""
    return tables.tensors_from_params(params, family_for_config(config).hf_table(config), dtype=dtype)


@dataclasses.dataclass(frozen=True)
class PoolingSettings:
    """What a sentence-transformers folder declares about pooling and prompts."""

    pooling: str = "mean"
    normalize: bool = False
    max_length: int | None = None
    include_prompt: bool = True
    prompts: tuple = ()  # (name, prompt) pairs from config_sentence_transformers.json
    default_prompt_name: str | None = None

    @property
    def prompt_dict(self) -> dict[str, str]:
        return dict(self.prompts)


_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: pathlib.Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_pooling_settings(folder: str | os.PathLike) -> PoolingSettings:
    """Pooling, normalisation, max length, ``include_prompt`` and prompts as a sentence-transformers
    folder declares them. A plain transformers folder defaults to mean pooling, no normalisation,
    the model's position limit and no prompts."""
    folder = pathlib.Path(folder)
    pooling, include_prompt = "mean", True
    pool_cfg = folder / "1_Pooling" / "config.json"
    modules = _read_json(folder / "modules.json", [])
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pool_cfg = folder / module.get("path", "1_Pooling") / "config.json"
    cfg = _read_json(pool_cfg, None)
    if cfg is not None:
        if "pooling_mode" in cfg:
            pooling = cfg["pooling_mode"]
        else:
            chosen = [name for key, name in _POOLING_KEYS.items() if cfg.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"{pool_cfg} enables {chosen or 'no'} pooling modes; embedjax needs exactly one")
            pooling = chosen[0]
        include_prompt = bool(cfg.get("include_prompt", True))
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    sbert = _read_json(folder / "sentence_bert_config.json", {})
    st_config = _read_json(folder / "config_sentence_transformers.json", {})
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{folder / 'config_sentence_transformers.json'}: 'prompts' must map names to strings")
    return PoolingSettings(pooling=pooling, normalize=normalize, max_length=sbert.get("max_seq_length"),
                           include_prompt=include_prompt, prompts=tuple(sorted(prompts.items())),
                           default_prompt_name=st_config.get("default_prompt_name"))


def read_head(folder: str | os.PathLike, pooling: str):
    """``(head, params)`` of the trainable head a sentence-transformers folder declares, or (None, None)."""
    from embedjax.models.heads import read_st_head

    folder = pathlib.Path(folder)
    return read_st_head(folder, _read_json(folder / "modules.json", []), pooling)


def _pooling_config(pooling: str, dim: int, include_prompt: bool) -> dict:
    config = {"word_embedding_dimension": dim}
    config.update({key: (name == pooling) for key, name in _POOLING_KEYS.items()})
    config["include_prompt"] = include_prompt
    return config


def _write_folder(tmp: pathlib.Path, config, params, src: pathlib.Path, *, pooling, normalize, max_length, dtype,
                  max_shard_bytes, prompts, include_prompt, head, head_params):
    (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    safetensors_io.write_folder(tmp, tensors_from_params(params, config, EXPORT_DTYPES[dtype]),
                                max_shard_bytes=max_shard_bytes)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if "tokenizer.json" not in copied and "vocab.txt" not in copied:
        raise FileNotFoundError(f"{src} has no tokenizer.json or vocab.txt to export with the model")
    for name in copied:
        shutil.copy2(src / name, tmp / name)
    from embedjax.models.heads import head_output

    per_token = head_output(head) == "tokens"  # a late-interaction folder (PyLate): no Pooling, no Normalize
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if not per_token:
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(
            json.dumps(_pooling_config(pooling, config.hidden_size, include_prompt), indent=2))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if head is not None:
        if not hasattr(head, "write_st"):
            raise ValueError(f"head {type(head).__name__} has no sentence-transformers form to export")
        modules.append(head.write_st(head_params, tmp, len(modules)))
    if normalize and not per_token:
        index = len(modules)
        modules.append({"idx": index, "name": str(index), "path": f"{index}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (tmp / f"{index}_Normalize").mkdir()
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
    st_config = {"prompts": dict(prompts or {}), "default_prompt_name": None,
                 "similarity_fn_name": "MaxSim" if per_token else "cosine", "model_type": "SentenceTransformer"}
    if head is not None and hasattr(head, "st_config"):
        st_config.update(head.st_config())
    (tmp / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))


def export_pretrained(
    out_dir: str | os.PathLike,
    config,
    params,
    tokenizer_src: str | os.PathLike,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 256,
    overwrite: bool = False,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    prompts: dict[str, str] | None = None,
    include_prompt: bool = True,
    head=None,
    head_params=None,
) -> pathlib.Path:
    """Write a folder that ``transformers.AutoModel`` and ``SentenceTransformer`` load unchanged.

    ``dtype`` is the weights' dtype on disk (float32, float16, bfloat16); ``max_shard_bytes`` splits
    them into transformers-style shards with an index. ``prompts`` and ``include_prompt`` go into
    ``config_sentence_transformers.json`` and ``1_Pooling/config.json``. A trainable ``head`` (with
    ``head_params``) is written as the sentence-transformers module after Pooling (a projection
    head as ``Dense``). An existing non-empty
    ``out_dir`` is an error unless ``overwrite=True``.
    """
    from embedjax.models.poolers import POOLERS

    if pooling not in POOLERS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLERS)}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use one of {sorted(EXPORT_DTYPES)}")
    family = family_for_config(config)
    if family.features:
        raise ValueError(f"export_pretrained writes sentence-transformers text folders; a {family.name!r} model "
                         "is written with tensors_from_params(params, config) and config.to_hf() (its HF names)")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True")
    src = pathlib.Path(tokenizer_src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_folder(tmp, config, params, src, pooling=pooling, normalize=normalize, max_length=max_length,
                      dtype=dtype, max_shard_bytes=max_shard_bytes, prompts=prompts, include_prompt=include_prompt,
                      head=head, head_params=head_params)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_folder(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Move a finished folder ``tmp`` to ``out``, replacing an old ``out`` only after the move is ready."""
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup)
    else:
        tmp.rename(out)

