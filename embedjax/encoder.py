"""``Encoder``: the application object. Tokenizer + a family's model + pooler + optional
normalisation, jitted, with batching that keeps compiled shapes few and padding small.

It never asks which family it holds: the registry builds the model from the folder's
``config.json`` and the family's tokenizer needs shape the inputs.

``encode`` sorts texts by token count (longest first, as sentence-transformers does), cuts them
into batches, pads each batch to its length bucket and its row count to a power of two (at most
``batch_size``, and a multiple of the data-parallel size on a mesh), dispatches every batch before
reading any result back (so host-side padding overlaps device compute) and returns rows in input
order. Where the family reads packed batches and packing computes at most `PACK_SAVING` of the
padded positions (short texts of mixed lengths, e.g. STS-B: 39.7k positions instead of 51k for
39k real tokens), the texts are packed end to end into rows over the whole corpus and the rows
dealt out to batches of a fixed token budget (`packed_batches`; two compiled row counts and one
text count per corpus; `embedjax.data.packing`: every text attends to itself only, so embeddings
are unchanged up to float rounding). With a ``mesh``, parameters stay sharded by the logical-axis
rules (an 8B encoder is evaluated across a pod without gathering it on one device) and batches
are split over the data axes; embeddings come back replicated. Packed batches there take whole
rows per device too (empty rows and filler texts round both counts up to the data-parallel
size); each text's token states are gathered from whichever device holds its row, a collective
XLA inserts once per batch, after the last layer.

Image-text families (CLIP, SigLIP; ViT for images only) declare ``features`` and their
``modalities`` on the registry: ``encode`` then runs the model's own ``encode_text`` (its pooling
and projection, no pooler or head), and ``encode_images`` preprocesses images as the folder's
``preprocessor_config.json`` says (`embedjax.data.images`) and runs ``encode_image``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax import xla_cpu
from embedjax.convert import hf
from embedjax.data import packing
from embedjax.data.images import ImageProcessor, as_images
from embedjax.data.tokenization import Tokenizer, bucket_length, validate_texts
from embedjax.models.heads import head_output
from embedjax.models.poolers import get_pooler, l2_normalize, select_layers
from embedjax.models.pretrained import resolve_model_dir
from embedjax.models.registry import family_for_config

DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # the names sentence-transformers tries, in order


def embed_batch(model, params, batch: dict, *, pooling: str, normalize: bool, layers=None, head=None,
                deterministic: bool = True, rngs=None, lora=None, head_shared=None):
    """Pure embedding function: token batch -> float32 [B, D] sentence embeddings.

    ``params`` is the encoder's tree ``{"backbone": ..., "head": ...}``, plus ``"lora"`` adapters
    (`embedjax.models.lora`, configured by ``lora``) when it has them. The backbone's token states
    go through ``head`` (a trainable head of `embedjax.models.heads`) when given, else through the
    ``pooling`` pooler of the last layer (or of ``layers``). Pooling covers ``batch["pool_mask"]``
    when present (tokens left out of pooling, e.g. a prompt with ``include_prompt=False``), else
    the attention mask. ``head_shared``: the head's `batch_independent` tensors, when the caller
    computed them once for several batches.
    """
    from embedjax.models.lora import apply_model

    need_all = layers is not None or (head is not None and head.needs_hidden_states)
    last_bld, extras = apply_model(model, params, batch, lora=lora, deterministic=deterministic,
                                   output_hidden_states=need_all, rngs=rngs)
    mask = batch.get("pool_mask", batch["attention_mask"])
    if head is not None:
        shared = {} if head_shared is None else {"shared": head_shared}
        emb_bd = head.apply({"params": params["head"]}, last_bld, mask, extras["hidden_states"],
                            deterministic=deterministic, rngs=rngs, **shared).astype(jnp.float32)
    else:
        states_bld = select_layers(extras["hidden_states"], layers) if layers is not None else last_bld
        emb_bd = get_pooler(pooling)(states_bld, mask).astype(jnp.float32)
    return l2_normalize(emb_bd) if normalize else emb_bd


def encoder_params(backbone, head=None) -> dict:
    """The encoder's parameter tree from a backbone's params (as `hf.load_pretrained` returns them)
    and, optionally, a head's."""
    return {"backbone": backbone, "head": head if head is not None else {}}


def dummy_tokens(family, length: int = 8) -> dict:
    """A one-row token batch of ``family``'s layout, for shape-only initialisation."""
    batch = {"input_ids": jnp.ones((1, length), jnp.int32), "attention_mask": jnp.ones((1, length), jnp.int32)}
    if family.tokenizer.token_type_ids:
        batch["token_type_ids"] = jnp.zeros((1, length), jnp.int32)
    return batch


def init_backbone(model, family, key):
    """``model.init`` on the family's example inputs (a token batch, or its ``example_inputs``)."""
    if family.features:
        return model.init({"params": key}, **family.example_inputs(model.config))
    return model.init({"params": key}, dummy_tokens(family))


def _check_features_options(family, head, lora) -> None:
    if family.features and (head is not None or lora is not None):
        raise ValueError(f"the {family.name!r} family pools and projects inside its model; a trainable head or LoRA "
                         "adapters do not apply to it")


def init_encoder_params(model, head, family, key, backbone=None, lora=None) -> dict:
    """Fresh encoder params (unboxed): the given pretrained ``backbone`` (or a random one), a
    random head, and fresh LoRA adapters (``B = 0``) when ``lora`` (a `LoRAConfig`) is given.
    Jit it with output shardings to build them in place on a mesh."""
    from flax.linen import meta

    from embedjax.models.lora import init_adapters

    _check_features_options(family, head, lora)
    tokens = dummy_tokens(family)
    backbone_key, head_key, lora_key = jax.random.split(key, 3)
    if backbone is None:
        backbone = meta.unbox(init_backbone(model, family, backbone_key)["params"])
    params = encoder_params(backbone)
    if head is not None:
        last, extras = model.apply({"params": backbone}, tokens, output_hidden_states=head.needs_hidden_states)
        head_params = head.init({"params": head_key}, last, tokens["attention_mask"], extras["hidden_states"])
        params = encoder_params(backbone, meta.unbox(head_params["params"]))
    if lora is not None:
        params["lora"] = init_adapters(model, backbone, tokens, lora, lora_key)
    return params


def abstract_params(model, head, family, lora=None):
    """Shapes and logical axis names (boxed) of the encoder's tree, without allocating it."""
    import jax.random as jr

    from embedjax.models.lora import init_adapters

    _check_features_options(family, head, lora)

    def init(key):
        tokens = dummy_tokens(family)
        backbone = init_backbone(model, family, key)["params"]
        params = encoder_params(backbone)
        if head is not None:
            last, extras = model.apply({"params": backbone}, tokens, output_hidden_states=head.needs_hidden_states)
            mask = tokens["attention_mask"]
            params = encoder_params(backbone, head.init({"params": key}, last, mask, extras["hidden_states"])["params"])
        if lora is not None:
            params["lora"] = init_adapters(model, backbone, tokens, lora, key, boxed=True)
        return params

    return jax.eval_shape(init, jr.PRNGKey(0))


def auto_axes(mesh):
    """The same devices and axis names with every axis ``Auto``."""
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_bucket(rows: int, batch_size: int, multiple: int = 1) -> int:
    return _round_up(min(batch_size, 1 << max(rows - 1, 0).bit_length()), multiple)


# Packed rows are at least this long: on 2 CPU cores the packed CoSENT gradient ran fastest with
# 64-token rows (BENCHMARKS.md), and shorter rows leave short texts little room to share.
PACK_ROW_MIN = 64
# Pack only when the packed plan computes at most this share of the padded plan's positions: a
# packed row attends over its whole length, so a small saving does not pay for the longer rows.
PACK_SAVING = 0.9
# First fit runs over windows of this many texts in input order (each text scans the window's open
# rows, so one window over a million-passage corpus would take hours to plan; a window of mixed
# lengths fills its rows about as well).
PACK_WINDOW = 4096


def padded_positions(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """Token positions the padded plan computes: texts longest first, batches of ``batch_size``,
    each padded to its longest text's bucket and its row count to `_row_bucket` (a multiple of
    ``multiple``, the data-parallel size)."""
    desc = sorted(lengths, reverse=True)
    return sum(_row_bucket(len(desc[i:i + batch_size]), batch_size, multiple) * bucket_length(desc[i], buckets)
               for i in range(0, len(desc), batch_size))


def packed_batches(lengths: Sequence[int], batch_size: int, row_length: int,
                   window: int = PACK_WINDOW) -> list[list[list[int]]]:
    """The rows of each packed batch, as lists of text indices: each ``window`` of texts (in input
    order) first-fit into rows of ``row_length`` (longest first), then the rows of all windows
    dealt out to batches.

    A batch holds about as many tokens as ``batch_size`` texts of the mean length, so batch sizes
    chosen for padded memory carry over. Rows go out densest first (most texts) in a snake order
    (batch 0 .. B-1, then B-1 .. 0, ...), so the batches' row counts differ by at most one and
    their text counts nearly match: a whole corpus compiles two row counts and one text count.
    """
    rows = [[start + i for i in members]
            for start in range(0, len(lengths), window)
            for members in packing.first_fit_rows(lengths[start:start + window], row_length)]
    if not rows:
        return []
    rows_per_batch = max(1, round(batch_size * (sum(lengths) / len(lengths)) / row_length))
    count = -(-len(rows) // rows_per_batch)
    batches: list[list[list[int]]] = [[] for _ in range(count)]
    densest_first = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), r))
    for k, r in enumerate(densest_first):
        lap, slot = divmod(k, count)
        batches[slot if lap % 2 == 0 else count - 1 - slot].append(rows[r])
    return batches


def packed_text_count(batches: Sequence[Sequence[Sequence[int]]]) -> int:
    """Texts per packed batch, fillers included: the most any batch holds (one compiled text count)."""
    return max(sum(len(row) for row in rows) for rows in batches)


def packed_positions(batches: Sequence[Sequence[Sequence[int]]], row_length: int, multiple: int = 1) -> int:
    """Token positions the packed plan computes: every planned row, ``row_length`` each, with each
    batch's rows rounded up to a multiple of ``multiple`` (the data-parallel size)."""
    return sum(_round_up(len(rows), multiple) for rows in batches) * row_length


class Encoder:
    """A sentence encoder: ``Encoder.from_pretrained(folder).encode(texts) -> [N, D] float32``."""

    def __init__(self, model, params, tokenizer: Tokenizer, *, pooling: str = "mean", normalize: bool = True,
                 layers=None, source: str | None = None, include_prompt: bool = True,
                 prompts: dict[str, str] | None = None, mesh=None, rules: Any = "fsdp", head=None, lora=None,
                 image_processor=None):
        get_pooler(pooling)  # fail early on an unknown name
        if not isinstance(params, dict) or "backbone" not in params:
            raise ValueError("Encoder params must be the tree {'backbone': ..., 'head': ...}; wrap a backbone's "
                             "params with embedjax.encoder.encoder_params(params)")
        self.model = model
        self.head = head
        self.lora = lora  # LoRAConfig of params["lora"] (None: no adapters)
        self.config = model.config
        self.family = family_for_config(model.config)
        _check_features_options(self.family, head, lora)
        if "text" in self.family.modalities and tokenizer is None:
            raise ValueError(f"a {self.family.name!r} encoder reads text and needs a tokenizer")
        if "image" in self.family.modalities and image_processor is None:
            raise ValueError(f"a {self.family.name!r} encoder reads images and needs an image_processor "
                             "(embedjax.data.images.ImageProcessor)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.layers = layers
        self.source = source
        self.include_prompt = bool(include_prompt)
        self.prompts = dict(prompts or {})
        # Auto axes: XLA propagates shardings through the model (explicit axes would make every
        # gather, e.g. the embedding lookup of sharded ids, state its output sharding).
        self.mesh = auto_axes(mesh) if mesh is not None else None
        self.rules = rules
        self._param_shardings = self._shardings_for_params() if mesh is not None else None
        self.params = params
        self._jitted = self._compile()
        self._jitted_images = self._compile(self.image_fn) if "image" in self.family.modalities else None
        if "text" in self.family.modalities:
            out = jax.eval_shape(self.embed_fn, self.params, dummy_tokens(self.family))
        else:
            out = jax.eval_shape(self.image_fn, self.params, self.family.example_inputs(self.config)["pixels_bhwc"])
        self.dim = int(out.shape[-1])

    # ---- construction ----
    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike, pooling: str | None = None,
                        normalize: bool | None = None, max_length: int | None = None, dtype: Any = "float32",
                        layers=None, attention: str | None = None, include_prompt: bool | None = None,
                        rope_scaling: dict | None = None, position_extension: dict | None = None,
                        attention_impl: str | None = None, mesh=None, rules: Any = "fsdp", remat: str = "none",
                        scan_unroll: int = 1) -> "Encoder":
        """Load a transformers / sentence-transformers folder (or a packaged alias: ``all-MiniLM-L6-v2``,
        ``SmolLM2-135M-Instruct``). Image families also read ``preprocessor_config.json``.

        Pooling, normalisation, max length, ``include_prompt`` and prompts default to what the folder
        declares (``1_Pooling/config.json``, ``modules.json``, ``sentence_bert_config.json``,
        ``config_sentence_transformers.json``). ``attention`` ("causal" / "bidirectional"),
        ``rope_scaling`` (RoPE families: ``{"type": "linear" | "ntk" | "yarn", "factor": s}``,
        ``{"type": "self_extend", "group_size": g, "window": w}``), ``position_extension`` (absolute
        position tables: ``{"type": "interpolate" | "grouped" | "recurrent" | "pcw", "max_length": L}``,
        ``max_length`` defaulting to this call's) and ``attention_impl`` ("auto", "xla", "chunked",
        "explicit") replace the model config's fields for families that have them; anything a family
        cannot take is an error naming the family.
        """
        folder = resolve_model_dir(path_or_dir)
        if position_extension is not None and "max_length" not in position_extension and max_length:
            position_extension = {**position_extension, "max_length": max_length}
        config, params = hf.load_pretrained(folder, attention=attention, rope_scaling=rope_scaling,
                                            position_extension=position_extension, attention_impl=attention_impl)
        settings = hf.read_pooling_settings(folder)
        family = family_for_config(config)
        reads_text = "text" in family.modalities
        if max_length is None and position_extension is not None:
            max_length = position_extension.get("max_length")
        max_length = max_length or settings.max_length or config.max_position_embeddings
        if reads_text and max_length > config.max_supported_length:
            raise ValueError(f"max_length={max_length} exceeds the {config.max_supported_length} positions this "
                             f"model supports as configured (max_position_embeddings="
                             f"{config.max_position_embeddings}); lower max_length")
        model = family.build(config, dtype=dtype, remat=remat, scan_unroll=scan_unroll)
        tokenizer = Tokenizer.from_folder(folder, max_length, needs=family.tokenizer) if reads_text else None
        images = ImageProcessor.from_folder(folder) if "image" in family.modalities else None
        pooling = pooling or settings.pooling
        head, head_params = (None, None) if family.features else hf.read_head(folder, pooling)
        return cls(model, encoder_params(params, head_params), tokenizer, head=head,
                   pooling=pooling,
                   normalize=settings.normalize if normalize is None else normalize,
                   layers=layers, source=str(folder),
                   include_prompt=settings.include_prompt if include_prompt is None else include_prompt,
                   prompts=settings.prompt_dict, mesh=mesh, rules=rules, image_processor=images)

    def _shardings_for_params(self):
        from embedjax.sharding.partition import param_shardings

        return param_shardings(abstract_params(self.model, self.head, self.family, self.lora), self.mesh, self.rules)

    def _compile(self, fn=None):
        """The jitted embedding function, with the kernel libraries `xla_cpu` picks for its devices."""
        embed = functools.partial(fn or self.embed_fn, deterministic=True)
        platform_name = (self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]).platform
        if self.mesh is None:
            return xla_cpu.inference_jit(embed, platform_name)
        from jax.sharding import NamedSharding, PartitionSpec

        return xla_cpu.inference_jit(embed, platform_name, out_shardings=NamedSharding(self.mesh, PartitionSpec()))

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        """Place new parameters: one device, or sharded over the mesh (already-placed arrays stay put)."""
        if self._param_shardings is None:
            self._params = jax.device_put(params)
        else:
            self._params = jax.device_put(params, self._param_shardings)

    # ---- properties ----
    @property
    def max_length(self) -> int | None:
        return self.tokenizer.max_length if self.tokenizer is not None else None

    def _data_parallel(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))

    # ---- embedding ----
    def embed_fn(self, params, batch: dict, deterministic: bool = True, rngs=None):
        """Pure, jittable: params + token batch -> float32 [B, D] (for training and GradCache)."""
        if self.family.features:
            emb_bd = self.model.apply({"params": params["backbone"]}, batch, method="encode_text",
                                      deterministic=deterministic, rngs=rngs)
            return l2_normalize(emb_bd) if self.normalize else emb_bd
        return embed_batch(self.model, params, batch, pooling=self.pooling, normalize=self.normalize,
                           layers=self.layers, head=self.head, deterministic=deterministic, rngs=rngs,
                           lora=self.lora)

    def image_fn(self, params, pixels_bhwc, deterministic: bool = True, rngs=None):
        """Pure, jittable: params + preprocessed pixels [B, H, W, C] -> float32 [B, D] image features."""
        emb_bd = self.model.apply({"params": params["backbone"]}, pixels_bhwc, method="encode_image",
                                  deterministic=deterministic, rngs=rngs)
        return l2_normalize(emb_bd) if self.normalize else emb_bd

    def _place_batch(self, batch: dict):
        if self.mesh is None:
            return batch
        from jax.sharding import NamedSharding, PartitionSpec

        axes = tuple(a for a in ("data", "fsdp") if self.mesh.shape.get(a, 1) > 1) or None
        sharding = NamedSharding(self.mesh, PartitionSpec(axes))
        # Every process holds the whole batch; each device takes its rows.
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}

    def encode(self, texts: Sequence[str], batch_size: int = 64, prompt: str | None = None,
               show_progress: bool = False, prompt_name: str | None = None, output: str | None = None,
               side: str = "document", pack: bool | None = None):
        """Embed ``texts`` -> float32 [N, D], rows in input order.

        ``pack``: None packs the texts end to end into rows (batches of about ``batch_size``
        texts' tokens, `packed_batches`) when the model reads packed batches and that computes at
        most `PACK_SAVING` of the padded positions (module docstring); True always packs (an
        error where the model cannot); False always pads.

        ``prompt`` (or ``prompt_name``, a key of the folder's prompts) is put before every text,
        tokenized separately so its boundary is exact; with ``include_prompt=False`` its tokens
        (and the leading special tokens) are attended to but left out of pooling.

        ``output="tokens"`` (the default of a multi-vector head) returns ``(tokens_bld float32
        [N, L, D], mask_bl bool [N, L])`` instead: every text's scored token vectors, framed as a
        ``side="query"`` or ``"document"`` (`embedjax.data.late_interaction`), padded to the
        longest with mask False. Documents pack as above (``pack``); queries, expanded to a fixed
        length with scored ``[MASK]`` tokens, never do.
        """
        if "text" not in self.family.modalities:
            raise ValueError(f"this {self.family.name!r} encoder embeds images only; use encode_images")
        texts = validate_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        produced = head_output(self.head)
        output = output or produced
        if output != produced:
            raise ValueError(f"output={output!r}, but this encoder's head gives {produced!r} embeddings "
                             f"({'a multi-vector head' if output == 'tokens' else 'a pooling head'} is needed)")
        if output == "tokens":
            if prompt is not None or prompt_name is not None:
                raise ValueError("late-interaction encoders frame texts with their markers; prompts do not apply")
            return self._encode_tokens(texts, batch_size, side, show_progress, pack)
        if prompt_name is not None:
            if prompt is not None:
                raise ValueError("pass prompt or prompt_name, not both")
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name={prompt_name!r} is not one of the folder's prompts {sorted(self.prompts)}")
            prompt = self.prompts[prompt_name]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenizer.token_ids(texts, prompt=prompt)
        pool_skip = self.tokenizer.pool_skip(prompt) if (prompt and not self.include_prompt) else 0
        plan = self.packing_plan(ids, batch_size, pack)
        pending = []
        if plan is not None:
            for members, batch in self._packed(ids, plan, pool_skip=pool_skip):
                pending.append((members, self._jitted(self.params, self._place_batch(batch))))
        else:
            order = np.argsort([-len(x) for x in ids], kind="stable")
            multiple = self._data_parallel()
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = self.tokenizer.pad([ids[i] for i in rows], rows=_row_bucket(len(rows), batch_size, multiple),
                                           pool_skip=pool_skip)
                pending.append((rows, self._jitted(self.params, self._place_batch(batch))))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        progress = _progress(len(texts), show_progress)
        for rows, emb in pending:
            local = emb if self.mesh is None else emb.addressable_data(0)
            out[rows] = np.asarray(local)[: len(rows)]
            progress.update(len(rows))
        progress.close()
        return out

    def _packed(self, ids, plan, pool_skip: int = 0):
        """``(text indices, packed token batch)`` of each batch of a `packing_plan`: every batch's rows
        and its text count rounded up to the data-parallel size (empty rows, filler texts), so that
        each device takes whole rows, and one text count for the whole plan."""
        row_length, batches = plan
        multiple = self._data_parallel()
        num_texts = _round_up(packed_text_count(batches), multiple)
        for rows in batches:
            rows = list(rows) + [[]] * (-len(rows) % multiple)
            yield packing.pack_planned(ids, rows, row_length=row_length, pad_id=self.tokenizer.pad_id,
                                       num_texts=num_texts, pool_skip=pool_skip,
                                       token_type_ids=self.tokenizer.token_type_ids)

    def packing_plan(self, ids, batch_size: int, pack: bool | None):
        """How ``encode(..., batch_size, pack)`` batches texts of token ids ``ids``: (row length,
        text indices of each packed batch) when it packs, None when it pads."""
        if pack is not None and not isinstance(pack, bool):
            raise ValueError(f"pack={pack!r}: use None (pack when it saves positions), True or False")
        if pack is False:
            return None
        if not self.family.packs(self.config):
            if pack:
                raise ValueError(f"pack=True: this {self.family.name!r} model does not read packed batches; "
                                 "use pack=None or pack=False")
            return None
        lengths = [len(x) for x in ids]
        buckets = self.tokenizer.buckets
        # Never longer than a padded batch could be, so a model's length limits hold for both plans.
        row_length = min(max(PACK_ROW_MIN, bucket_length(max(lengths), buckets)), buckets[-1])
        batches = packed_batches(lengths, batch_size, row_length)
        if pack is None:  # auto: pack only where it saves positions (pack=True needs no count)
            multiple = self._data_parallel()
            share = (packed_positions(batches, row_length, multiple)
                     / padded_positions(lengths, batch_size, buckets, multiple))
            if share > PACK_SAVING:
                return None
        return row_length, batches

    def encode_images(self, images, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed images -> float32 [N, D], rows in input order.

        ``images``: uint8 [N, H, W, 3] or a list of PIL images / uint8 [H, W, 3] arrays (any sizes:
        the folder's processor resizes them). A wrong shape, dtype or channel count is an error.
        """
        if "image" not in self.family.modalities:
            raise ValueError(f"this {self.family.name!r} encoder embeds text only; it has no image tower")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        items = as_images(images)
        if not items:
            return np.zeros((0, self.dim), np.float32)
        multiple = self._data_parallel()
        pending = []
        for start in range(0, len(items), batch_size):
            pixels = self.image_processor(items[start:start + batch_size])
            rows = _row_bucket(len(pixels), batch_size, multiple)
            padded = np.zeros((rows, *pixels.shape[1:]), np.float32)
            padded[: len(pixels)] = pixels
            placed = self._place_batch({"pixels": padded})["pixels"]
            pending.append((start, len(pixels), self._jitted_images(self.params, placed)))
        out = np.empty((len(items), self.dim), np.float32)
        progress = _progress(len(items), show_progress, desc="encode_images", unit="image")
        for start, count, emb in pending:
            local = emb if self.mesh is None else emb.addressable_data(0)
            out[start:start + count] = np.asarray(local)[:count]
            progress.update(count)
        progress.close()
        return out

    def _encode_tokens(self, texts: list[str], batch_size: int, side: str, show_progress: bool,
                       pack: bool | None = None):
        """Token vectors and scored-token masks of a multi-vector head (see ``encode``). Documents
        pack as `encode`'s texts do (``pack``); queries never do: each is expanded to
        ``query_length`` with scored ``[MASK]`` tokens, so they have no padding to save."""
        from embedjax.data import late_interaction

        framing = self.head.framing
        if side == "query" and pack:
            raise ValueError("pack=True: queries are expanded to query_length with scored [MASK] tokens, so they "
                             "do not pack; use pack=None or pack=False")
        if not texts:
            return np.zeros((0, 0, self.dim), np.float32), np.zeros((0, 0), bool)
        ids = late_interaction.framed_ids(self.tokenizer, texts, side, framing)
        plan = None if side == "query" else self.packing_plan(ids, batch_size, pack)
        pending = []
        if plan is not None:
            # A padded plan's widest batch is the longest text's bucket: cut the rows' width there.
            width = bucket_length(max(len(x) for x in ids), self.tokenizer.buckets)
            for members, batch in self._packed(ids, plan):
                batch = late_interaction.score_packed_documents(self.tokenizer, framing, batch)
                pending.append((members, *self._token_vectors(batch, side, width)))
        else:
            order = np.argsort([-len(x) for x in ids], kind="stable")
            multiple = self._data_parallel()
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = late_interaction.frame(self.tokenizer, [ids[i] for i in rows], side, framing,
                                               rows=_row_bucket(len(rows), batch_size, multiple))
                pending.append((rows, *self._token_vectors(batch, side)))
        length = max(mask.shape[1] for _, mask, _ in pending)
        tokens = np.zeros((len(texts), length, self.dim), np.float32)
        masks = np.zeros((len(texts), length), bool)
        progress = _progress(len(texts), show_progress)
        for rows, mask, emb in pending:
            width = mask.shape[1]
            kept = mask[: len(rows)].astype(bool)
            tokens[rows, :width] = np.where(kept[..., None], np.asarray(emb)[: len(rows)], 0.0)  # unscored: zeros
            masks[rows, :width] = kept
            progress.update(len(rows))
        progress.close()
        return tokens, masks

    def _token_vectors(self, batch: dict, side: str, width: int | None = None):
        """A framed batch's scored-token mask [B, L] (numpy) and vectors [B, L, D] (or their CRISP
        centroids); ``width`` keeps the first L columns (the rest hold no text's tokens)."""
        tokens_bld = self._jitted(self.params, self._place_batch(batch))
        if self.mesh is not None:
            tokens_bld = tokens_bld.addressable_data(0)
        mask_bl = batch["pool_mask"] > 0
        if width is not None:
            tokens_bld, mask_bl = tokens_bld[:, :width], mask_bl[:, :width]
        tokens_bld, mask_bl = self.head.reduce(tokens_bld, mask_bl, side)  # CRISP, if set
        return np.asarray(mask_bl), tokens_bld

    def encode_query(self, texts: Sequence[str], **kwargs):
        """``encode`` with the folder's ``query`` prompt (none when it declares none), as
        sentence-transformers' ``encode_query`` does; a multi-vector head frames texts as queries."""
        if head_output(self.head) == "tokens":
            return self.encode(texts, side="query", **kwargs)
        return self.encode(texts, prompt=self.prompts.get("query"), **kwargs)

    def encode_document(self, texts: Sequence[str], **kwargs):
        """``encode`` with the folder's ``document`` (else ``passage``, else ``corpus``) prompt."""
        if head_output(self.head) == "tokens":
            return self.encode(texts, side="document", **kwargs)
        name = next((n for n in DOCUMENT_PROMPT_NAMES if n in self.prompts), None)
        return self.encode(texts, prompt=self.prompts.get(name) if name else None, **kwargs)

    def __repr__(self) -> str:
        return (f"Encoder(source={self.source!r}, family={self.family.name!r}, dim={self.dim}, "
                f"layers={self.config.num_layers}, pooling={self.pooling!r}, normalize={self.normalize}, "
                f"max_length={self.max_length})")


def _progress(total: int, enabled: bool, desc: str = "encode", unit: str = "text"):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit)
