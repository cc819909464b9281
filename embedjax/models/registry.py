"""The one seam for model families.

A `Family` bundles everything embedjax needs to know about an architecture:

- ``config_cls``: a frozen dataclass with ``from_hf(config_json, **options)`` and ``to_hf()``; every
  family config has ``model_type``, ``vocab_size``, ``hidden_size``, ``num_layers`` and
  ``max_position_embeddings``, and validates its own fields;
- ``module_cls``: a Linen module built as ``module_cls(config, dtype=..., remat=..., scan_unroll=...)``
  whose call maps a token batch ``{"input_ids", "attention_mask", ...}`` to
  ``(hidden_bld, extras)``, ``extras["hidden_states"]`` holding every layer's output on request;
- ``hf_table(config)``: the family's HF name map (`embedjax.convert.tables.TensorRule` rows with the
  expected shapes as data);
- ``tokenizer``: its `TokenizerNeeds` (padding side, EOS, token type ids);
- ``modalities``: what it embeds, ``("text",)``, ``("image",)`` or both. A family with
  ``features=True`` pools and projects inside its module: ``encode_text(tokens)`` /
  ``encode_image(pixels_bhwc)`` (Linen ``method=``) return [B, D] features, no pooler or head
  applies, and ``module.init(key, **example_inputs(config))`` creates every parameter.

Code outside a family's own files asks the registry, never which family it has. Adding a family
is one entry in ``_BUILTIN`` (or `register` at run time).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class TokenizerNeeds:
    """What a family's inputs look like, beyond the tokenizer files themselves."""

    padding_side: str = "right"  # default when the folder's tokenizer_config.json does not say
    append_eos: bool = False  # end every text with the EOS token (unless the tokenizer already does)
    token_type_ids: bool = False  # the model reads segment ids (BERT)
    pad_to_max_length: bool = False  # every batch padded to max_length (SigLIP's text tower was trained so)

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={self.padding_side!r}: use 'left' or 'right'")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    config_cls: type
    module_cls: type
    hf_table: Callable[[Any], list]
    tokenizer: TokenizerNeeds
    # Regexes (matched at the start) of HF tensors the encoder does not use (BERT's next-sentence
    # pooler, a decoder's LM head).
    hf_ignored: tuple[str, ...] = ()
    # Prefixes of task-model checkpoints (BertForMaskedLM's "bert.") stripped before matching.
    hf_stripped_prefixes: tuple[str, ...] = ()
    # (tensors, config) -> tensors as the config's model holds them, applied to a checkpoint before
    # matching (BERT's interpolated position table); None: as stored.
    hf_prepare_tensors: Callable[[Mapping[str, Any], Any], Mapping[str, Any]] | None = None
    # Param path of the input embedding table that doubles as the LM head when the config ties
    # them (what MNTP predicts through); None: the family has no LM head embedjax can use.
    tied_lm_head: tuple[str, ...] | None = None
    modalities: tuple[str, ...] = ("text",)
    # The module reads packed token batches (`embedjax.data.packing`: ``segment_ids`` and per-text
    # ``position_ids``, attention kept within each text), so training may pack (``data.pack``).
    packs_sequences: bool = False
    # config -> whether that model reads packed batches (None: every config of a family that packs);
    # e.g. BERT's extended position tables do not.
    packs_config: Callable[[Any], bool] | None = None
    features: bool = False
    # config -> keyword inputs of ``module.init`` touching every parameter (features families).
    example_inputs: Callable[[Any], dict] | None = None

    def __post_init__(self):
        unknown = set(self.modalities) - {"text", "image"}
        if unknown or not self.modalities:
            raise ValueError(f"family {self.name!r}: modalities {self.modalities} must be 'text' and/or 'image'")
        if "image" in self.modalities and not self.features:
            raise ValueError(f"family {self.name!r} embeds images, so its module must give features (features=True)")
        if self.features and self.example_inputs is None:
            raise ValueError(f"family {self.name!r} gives features; it needs example_inputs for initialisation")

    def packs(self, config) -> bool:
        """Whether ``config``'s model reads packed token batches (`embedjax.data.packing`)."""
        return self.packs_sequences and (self.packs_config is None or bool(self.packs_config(config)))

    def build(self, config, *, dtype: Any = "float32", remat: str = "none", scan_unroll: int = 1):
        """The family's Linen module for ``config`` (compute ``dtype``, remat policy, layers per scan step)."""
        from embedjax.models.layers import check_remat

        return self.module_cls(config, dtype=parse_dtype(dtype), remat=check_remat(remat), scan_unroll=scan_unroll)

    def config_from_fields(self, **fields):
        """A config built from plain fields (random initialisation); unknown fields are an error."""
        _check_fields(self, fields)
        return self.config_cls(**fields)

    def configure(self, config, **options):
        """``config`` with the given fields replaced (None leaves a field as it is); each family's
        dataclass validates the result, and a field the family does not have is an error."""
        options = {k: v for k, v in options.items() if v is not None}
        _check_fields(self, options)
        return dataclasses.replace(config, **options) if options else config


# name -> "module:attribute" of its Family; imported on first use.
_BUILTIN: dict[str, str] = {
    "bert": "embedjax.models.towers.bert:FAMILY",
    "llama": "embedjax.models.towers.decoder:LLAMA",
    "mistral": "embedjax.models.towers.decoder:MISTRAL",
    "qwen2": "embedjax.models.towers.decoder:QWEN2",
    "qwen3": "embedjax.models.towers.decoder:QWEN3",
    "vit": "embedjax.models.towers.vit:FAMILY",
    "clip": "embedjax.models.towers.clip:FAMILY",
    "siglip": "embedjax.models.towers.siglip:FAMILY",
}
_LOADED: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` available by name and by its HF ``model_type`` values."""
    _LOADED[family.name] = family
    return family


def _check_fields(family: Family, fields: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(family.config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model family {family.name!r} has no option(s) {unknown}; its config fields are "
                         f"{sorted(known)}")


def parse_dtype(dtype: Any):
    """``"float32"``/``"bfloat16"`` (or a jnp dtype) -> jnp dtype; anything else is an error."""
    import jax.numpy as jnp

    names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
        return names[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r} is not supported; use float32 or bfloat16")
    return dtype


def families() -> list[str]:
    """Names of every known family."""
    return sorted(set(_BUILTIN) | set(_LOADED))


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name is an error listing the supported ones."""
    if name in _LOADED:
        return _LOADED[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown model family {name!r}; supported families: {families()}")
    module_name, attribute = _BUILTIN[name].split(":")
    family = getattr(importlib.import_module(module_name), attribute)
    return register(family)


def family_for_config(config) -> Family:
    """The family a config object belongs to (by its ``model_type``)."""
    return family_for_hf_config({"model_type": getattr(config, "model_type", None)}, type(config).__name__)


def family_for_hf_config(hf_config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family that reads a transformers ``config.json`` (by its ``model_type``)."""
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise ValueError(f"{where} has no model_type; embedjax needs it to pick the model family "
                         f"(supported: {families()})")
    for name in families():
        family = get_family(name)
        if model_type in family.hf_model_types:
            return family
    raise ValueError(f"{where} has model_type={model_type!r}, which no embedjax family reads; "
                     f"supported families: {families()}")
