"""BERT-family bidirectional encoder (BERT, MiniLM, all-MiniLM-L6-v2) on the shared layers.

Embeddings (word + absolute position + token type) -> LayerNorm -> N post-LayerNorm blocks
(self-attention -> add & norm -> exact-GELU MLP -> add & norm), scanned over layers. Positions
count real tokens (0, 1, ...), which equals transformers' ``arange`` for BERT's right padding and
keeps the embedding the same under left padding; a batch may also carry explicit
``position_ids`` (PoSE training).

Inputs longer than the position table go through a ``position_extension``
(`embedjax.models.position_extension`: interpolate, grouped, recurrent, pcw), selected at load
time: ``Encoder.from_pretrained(dir, max_length=L, position_extension={"type": ..., "max_length": L})``
or ``model.config.position_extension`` in a training config. ``interpolate`` builds the longer
table when the checkpoint is read (`prepare_tensors`) and exports it as a plain table of L rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from embedjax.convert.tables import TensorRule
from embedjax.models import layers
from embedjax.models import position_extension as extension
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.rope import positions_from_mask

POSITION_TABLE = "embeddings.position_embeddings.weight"
EXTENSION_KEY = "embedjax_position_extension"  # config.json key of an extension (transformers ignores it)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters (the fields of a transformers ``BertConfig`` that matter)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    attention: str = "bidirectional"
    model_type: str = "bert"
    # {"type": "interpolate" | "grouped" | "recurrent" | "pcw", "max_length": L} as sorted items, or
    # None; max_position_embeddings stays the length the table was trained on.
    position_extension: tuple | None = None
    # How attention is computed (embedjax.models.layers.ATTENTION_IMPLS); not written to config.json.
    attention_impl: str = "auto"

    def __post_init__(self):
        layers.check_attention_impl(self.attention_impl)
        if isinstance(self.position_extension, Mapping):  # a plain dict (configs, from_pretrained options)
            normalized = extension.normalize_extension(self.position_extension, self.max_position_embeddings)
            object.__setattr__(self, "position_extension", tuple(sorted(normalized.items())) if normalized else None)
        elif self.position_extension is not None:
            extension.normalize_extension(dict(self.position_extension), self.max_position_embeddings)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )
        if self.attention != "bidirectional":
            raise ValueError(f"attention={self.attention!r}: BERT-family encoders are bidirectional only "
                             "(causal attention is a decoder-family option)")
        if self.model_type != "bert":
            raise ValueError(f"BertConfig has model_type={self.model_type!r}; it reads 'bert' configs")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def extension(self) -> dict | None:
        return dict(self.position_extension) if self.position_extension else None

    @property
    def max_supported_length(self) -> int:
        """The longest input: the table's trained length, or the extension's max_length."""
        ext = self.extension
        return ext["max_length"] if ext else self.max_position_embeddings

    @property
    def position_table_rows(self) -> int:
        """Rows of the position table the model holds (an interpolated table is longer)."""
        ext = self.extension
        return ext["max_length"] if ext and ext["type"] == "interpolate" else self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "BertConfig":
        """Read a transformers ``config.json`` dict (BERT keys); ``options`` replace fields."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json has hidden_act={act!r}; only exact 'gelu' is implemented for BERT")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"config.json has position_embedding_type={pos!r}; only 'absolute' is implemented")
        saved = dict(hf.get(EXTENSION_KEY) or {})  # an exported extended model
        trained = saved.pop("original_max_position_embeddings", None) or hf.get("max_position_embeddings", 512)
        config = cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=trained,
            position_extension=saved or None,
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            initializer_range=hf.get("initializer_range", 0.02),
            model_type=hf.get("model_type", "bert"),
        )
        return FAMILY.configure(config, **options)

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this architecture."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            # transformers reads the table as it is (an interpolated one at natural positions).
            "max_position_embeddings": self.position_table_rows,
        } | self._extension_hf()

    def _extension_hf(self) -> dict[str, Any]:
        ext = self.extension
        if not ext:
            return {}
        return {EXTENSION_KEY: {**ext, "original_max_position_embeddings": self.max_position_embeddings}}

    def block_spec(self) -> layers.BlockSpec:
        return layers.BlockSpec(
            hidden_size=self.hidden_size,
            attention=layers.AttentionSpec(self.num_heads, self.num_heads, self.head_dim,
                                           mask="bidirectional", dropout=self.attention_dropout,
                                           impl=self.attention_impl),
            mlp=layers.MLPSpec(self.intermediate_size, "plain", "gelu"),
            norm=layers.NormSpec("layernorm", self.layer_norm_eps),
            norm_placement="post",
            hidden_dropout=self.hidden_dropout,
            init_std=self.initializer_range,
        )


class BertModel(nn.Module):
    """``apply({"params": p}, tokens, deterministic=True, output_hidden_states=False)`` ->
    ``(last_hidden_bld, {"hidden_states": (embeddings, layer 1, ..., layer N) or None})``.

    ``tokens``: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``,
    ``position_ids`` and (packed texts, `embedjax.data.packing`) ``segment_ids``, each [B, L].
    Dropout is active when ``deterministic=False`` (rng collection ``"dropout"``).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, output_hidden_states: bool = False):
        cfg = self.config
        ids_bl, mask_bl = layers.check_token_batch(tokens)
        # Explicit position ids (PoSE) may run past the length; the table must hold the ids themselves.
        if "position_ids" not in tokens and ids_bl.shape[1] > cfg.max_supported_length:
            raise ValueError(f"sequence length {ids_bl.shape[1]} exceeds the {cfg.max_supported_length} positions "
                             f"this model supports (max_position_embeddings={cfg.max_position_embeddings}, "
                             f"position_extension={cfg.extension}); lower max_length or extend the positions")
        ext = cfg.extension
        if ext and "segment_ids" in tokens:
            raise ValueError(f"packed sequences (segment_ids) run on the trained position table only; this model has "
                             f"position_extension={ext}: turn data.pack off or drop the extension")
        unwind = None
        if ext and ext["type"] == "pcw":
            tokens, unwind = cut_windows(tokens, cfg.max_position_embeddings)
            ids_bl, mask_bl = tokens["input_ids"], tokens["attention_mask"]
            ext = None  # each window is an ordinary input
        token_type_bl = tokens.get("token_type_ids")
        if token_type_bl is None:
            token_type_bl = jnp.zeros_like(ids_bl)
        positions_bl = tokens.get("position_ids")
        natural = positions_bl is None
        if natural:
            positions_bl = positions_from_mask(mask_bl)
        if ext:
            positions_bl = extension.table_rows(ext["type"], positions_bl, mask_bl.astype(jnp.int32).sum(axis=1),
                                                cfg.max_position_embeddings, ext["max_length"], natural=natural)
        init = nn.initializers.normal(cfg.initializer_range)

        def table(name, rows, axis):
            return nn.Embed(rows, cfg.hidden_size, embedding_init=layers.logical(init, (axis, "embed")), name=name)

        x_bld = (table("word_embeddings", cfg.vocab_size, "vocab")(ids_bl)
                 + table("position_embeddings", cfg.position_table_rows, "position")(positions_bl)
                 + table("token_type_embeddings", cfg.type_vocab_size, "token_type")(token_type_bl))
        x_bld = layers.Norm(layers.NormSpec("layernorm", cfg.layer_norm_eps), self.dtype, name="embeddings_norm")(x_bld)
        embedded_bld = nn.Dropout(cfg.hidden_dropout)(x_bld, deterministic=deterministic)
        x_bld, per_layer = layers.layer_stack(
            cfg.block_spec(), cfg.num_layers, dtype=self.dtype, remat=self.remat, unroll=self.scan_unroll,
            deterministic=deterministic, collect=output_hidden_states)(
                embedded_bld, layers.attention_key_mask(tokens, mask_bl), None)
        hidden = layers.hidden_states_tuple(embedded_bld, per_layer, x_bld) if output_hidden_states else None
        if unwind is not None:
            x_bld = unwind(x_bld)
            hidden = tuple(unwind(h) for h in hidden) if hidden is not None else None
        return x_bld, {"hidden_states": hidden}


def cut_windows(tokens, window: int):
    """Parallel context windows: every [B, L] entry of ``tokens`` -> [B * n, window] (the length
    padded with padding tokens to n windows), and the function putting [B * n, window, D] states
    back as [B, L, D]."""
    if "position_ids" in tokens:
        raise ValueError("position_ids are not defined for parallel context windows (each window restarts at 0)")
    b, length = tokens["input_ids"].shape
    n = -(-length // window)

    def cut(x):
        return jnp.pad(x, [(0, 0), (0, n * window - length)]).reshape(b * n, window)

    def unwind(x_nwd):
        return x_nwd.reshape(b, n * window, x_nwd.shape[-1])[:, :length]

    return {k: cut(v) for k, v in tokens.items()}, unwind


def hf_table(config: BertConfig) -> list[TensorRule]:
    """transformers ``BertModel`` names <-> embedjax paths, with the shapes ``config`` implies."""
    d, f, h = config.hidden_size, config.intermediate_size, config.num_heads
    rules = [
        TensorRule("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), "copy",
                   (config.vocab_size, d)),
        TensorRule(POSITION_TABLE, ("position_embeddings", "embedding"), "copy", (config.position_table_rows, d)),
        TensorRule("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding"), "copy",
                   (config.type_vocab_size, d)),
        TensorRule("embeddings.LayerNorm.weight", ("embeddings_norm", "scale"), "copy", (d,)),
        TensorRule("embeddings.LayerNorm.bias", ("embeddings_norm", "bias"), "copy", (d,)),
    ]
    for i in range(config.num_layers):
        hf = f"encoder.layer.{i}."
        for proj, short in (("query", "q"), ("key", "k"), ("value", "v")):
            rules += [
                TensorRule(f"{hf}attention.self.{proj}.weight", ("layers", "attention", short, "kernel"),
                           "heads_in", (d, d), i, h),
                TensorRule(f"{hf}attention.self.{proj}.bias", ("layers", "attention", short, "bias"),
                           "heads_bias", (d,), i, h),
            ]
        rules += [
            TensorRule(f"{hf}attention.output.dense.weight", ("layers", "attention", "o", "kernel"),
                       "heads_out", (d, d), i, h),
            TensorRule(f"{hf}attention.output.dense.bias", ("layers", "attention", "o", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}attention.output.LayerNorm.weight", ("layers", "attention_norm", "scale"), "copy",
                       (d,), i),
            TensorRule(f"{hf}attention.output.LayerNorm.bias", ("layers", "attention_norm", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}intermediate.dense.weight", ("layers", "mlp", "mlp_in", "kernel"), "transpose",
                       (f, d), i),
            TensorRule(f"{hf}intermediate.dense.bias", ("layers", "mlp", "mlp_in", "bias"), "copy", (f,), i),
            TensorRule(f"{hf}output.dense.weight", ("layers", "mlp", "mlp_out", "kernel"), "transpose", (d, f), i),
            TensorRule(f"{hf}output.dense.bias", ("layers", "mlp", "mlp_out", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}output.LayerNorm.weight", ("layers", "mlp_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}output.LayerNorm.bias", ("layers", "mlp_norm", "bias"), "copy", (d,), i),
        ]
    return rules


def prepare_tensors(tensors: Mapping[str, Any], config: BertConfig) -> Mapping[str, Any]:
    """Checkpoint tensors as the config's model holds them: an ``interpolate`` extension turns the
    trained table [L0, D] into the longer one (a table already that long, as an exported extended
    model has, is kept)."""
    ext = config.extension
    table = tensors.get(POSITION_TABLE)
    if not ext or ext["type"] != "interpolate" or table is None or table.shape[0] != config.max_position_embeddings:
        return tensors
    return {**tensors, POSITION_TABLE: extension.interpolate_table(table, ext["max_length"])}


FAMILY = Family(
    name="bert",
    hf_model_types=("bert",),
    config_cls=BertConfig,
    module_cls=BertModel,
    hf_table=hf_table,
    tokenizer=TokenizerNeeds(padding_side="right", append_eos=False, token_type_ids=True),
    # The position-id buffer and the next-sentence pooler head are not used by sentence embeddings.
    hf_ignored=(r"embeddings\.position_ids", r"pooler\."),
    hf_stripped_prefixes=("bert.", "model."),
    hf_prepare_tensors=prepare_tensors,
    packs_sequences=True,
    packs_config=lambda config: not config.extension,  # an extended position table reads padded rows only
)
