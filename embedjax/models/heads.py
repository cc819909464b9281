"""Trainable embedding heads: what turns a backbone's token states into the embedding when a
parameter-free pooler is not enough.

A head is a Linen module registered in ``HEADS`` and built from a plain spec dict
(``{"type": "projection", "dim": 256}``) by `build_head`. Its call maps the backbone's output to
the embedding::

    head.apply({"params": p}, last_hidden_bld, pool_mask_bl, hidden_states, deterministic=True) -> [B, D']

``hidden_states`` holds every layer's output when the head's ``needs_hidden_states`` is True (a
layer mix), else None. A head whose work partly depends on its parameters alone (the latent
attention pooler's keys and values, computed from its latents) defines
``batch_independent(head_params) -> pytree`` and accepts it back as ``shared=`` in its call, so a
training step computes that part once for all the text columns and sub-batches it embeds
(`embedjax.encoder.embed_batch`'s ``head_shared``). The encoder's parameters are one tree ``{"backbone": ..., "head": ...}``
(``head`` is ``{}`` without a head), so training, checkpoints and optimizers see one pytree and can
select the parts by name. Matryoshka truncation and normalisation apply to the head's output.
"""
from __future__ import annotations

import json
import pathlib
import string
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from embedjax.models.layers import logical
from embedjax.models.poolers import get_pooler


class ProjectionHead(nn.Module):
    """Pool with ``pooling``, then a linear map to ``dim`` (no bias, as sentence-transformers' Dense
    heads of embedders usually are): changes the embedding width, e.g. 576 -> 256."""

    dim: int
    pooling: str = "mean"
    use_bias: bool = False
    needs_hidden_states = False
    output = "sentence"  # one vector per text

    @nn.compact
    def __call__(self, hidden_bld, mask_bl, hidden_states=None, *, deterministic: bool = True):
        pooled_bd = get_pooler(self.pooling)(hidden_bld, mask_bl).astype(jnp.float32)
        return nn.Dense(self.dim, use_bias=self.use_bias, dtype=jnp.float32,
                        kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "head")),
                        bias_init=logical(nn.initializers.zeros, ("head",)), name="dense")(pooled_bd)


    # ---- sentence-transformers folders: a Dense module after Pooling ----
    st_type = "sentence_transformers.models.Dense"

    def write_st(self, params, folder: pathlib.Path, index: int) -> dict:
        """Write the head as a sentence-transformers ``Dense`` module (``{index}_Dense/``); returns its
        ``modules.json`` entry."""
        return write_dense_module(params, self.use_bias, folder, index, self.st_type)

    @classmethod
    def read_st(cls, path: pathlib.Path, pooling: str):
        """``(head, params)`` from a sentence-transformers ``Dense`` module folder."""
        dim, use_bias, params = read_dense_module(path)
        return cls(dim=dim, pooling=pooling, use_bias=use_bias), params


def write_dense_module(params, use_bias: bool, folder: pathlib.Path, index: int, st_type: str) -> dict:
    """A linear map ``params["dense"]`` as a sentence-transformers style ``{index}_Dense/`` module
    (identity activation, weights [out, in]); returns its ``modules.json`` entry."""
    from embedjax.convert import safetensors_io

    kernel = np.asarray(params["dense"]["kernel"], np.float32)  # [in, out]
    path = folder / f"{index}_Dense"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]), "bias": use_bias,
        "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
    tensors = {"linear.weight": np.ascontiguousarray(kernel.T)}
    if use_bias:
        tensors["linear.bias"] = np.asarray(params["dense"]["bias"], np.float32)
    safetensors_io.write_file(path / "model.safetensors", tensors)
    return {"idx": index, "name": str(index), "path": path.name, "type": st_type}


def read_dense_module(path: pathlib.Path):
    """``(out_features, use_bias, params)`` of a ``Dense`` module folder (identity activation only)."""
    from embedjax.convert import safetensors_io

    config = json.loads((path / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if not activation.endswith("Identity"):
        raise ValueError(f"{path}: Dense activation {activation!r} is not implemented (only Identity)")
    tensors = safetensors_io.read_file(path / "model.safetensors")
    params = {"dense": {"kernel": np.asarray(tensors["linear.weight"], np.float32).T}}
    use_bias = bool(config.get("bias", False))
    if use_bias:
        params["dense"]["bias"] = np.asarray(tensors["linear.bias"], np.float32)
    return int(config["out_features"]), use_bias, params


class MultiVectorHead(nn.Module):
    """Late interaction (ColBERT): every token state projected to ``dim`` (no bias) and L2-normalised;
    the output is token vectors [B, L, dim], scored with MaxSim over the batch's ``pool_mask``.

    The framing fields (markers, query expansion to ``query_length``, document skiplist) shape the
    tokens (`embedjax.data.late_interaction`) and are written to / read from PyLate-style folders."""

    dim: int = 128
    use_bias: bool = False
    query_marker: str = "[unused0]"
    document_marker: str = "[unused1]"
    query_length: int = 32
    document_length: int = 180
    attend_to_expansion: bool = False
    skiplist: tuple = tuple(string.punctuation)
    # CRISP (in-training clustering): k centroids per query / document replace the token vectors in
    # training and encoding; 0 keeps every token.
    crisp_query_k: int = 0
    crisp_document_k: int = 0
    crisp_iters: int = 3
    needs_hidden_states = False
    output = "tokens"  # one vector per token

    @property
    def framing(self):
        from embedjax.data.late_interaction import LateInteractionFraming

        return LateInteractionFraming(self.query_marker, self.document_marker, int(self.query_length),
                                      int(self.document_length), bool(self.attend_to_expansion), tuple(self.skiplist))

    @nn.compact
    def __call__(self, hidden_bld, mask_bl, hidden_states=None, *, deterministic: bool = True):
        tokens_bld = nn.Dense(self.dim, use_bias=self.use_bias, dtype=jnp.float32,
                              kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "head")),
                              bias_init=logical(nn.initializers.zeros, ("head",)), name="dense")(
            hidden_bld.astype(jnp.float32))
        return tokens_bld / jnp.maximum(jnp.linalg.norm(tokens_bld, axis=-1, keepdims=True), 1e-12)

    def reduce(self, tokens_bld, mask_bl, side: str):
        """The vectors a side is scored with: its tokens, or their CRISP centroids ``(tokens, mask)``."""
        from embedjax.multivector.crisp import cluster_tokens

        k = self.crisp_query_k if side == "query" else self.crisp_document_k
        if not k:
            return tokens_bld, mask_bl
        return cluster_tokens(tokens_bld, mask_bl, int(k), iters=int(self.crisp_iters))

    # ---- PyLate folders: a Dense module right after the Transformer, framing in the ST config ----
    st_type = "pylate.models.Dense.Dense"

    def write_st(self, params, folder: pathlib.Path, index: int) -> dict:
        return write_dense_module(params, self.use_bias, folder, index, self.st_type)

    def st_config(self) -> dict:
        crisp = {"crisp_query_k": int(self.crisp_query_k), "crisp_document_k": int(self.crisp_document_k),
                 "crisp_iters": int(self.crisp_iters)}
        return {**self.framing.to_st(), **crisp}

    @classmethod
    def read_st(cls, path: pathlib.Path, pooling: str):
        from embedjax.data.late_interaction import LateInteractionFraming

        dim, use_bias, params = read_dense_module(path)
        st_config = path.parent / "config_sentence_transformers.json"
        config = json.loads(st_config.read_text()) if st_config.is_file() else {}
        framing = LateInteractionFraming.from_st(config)
        crisp = {name: int(config[name]) for name in ("crisp_query_k", "crisp_document_k", "crisp_iters")
                 if name in config}
        return cls(dim=dim, use_bias=use_bias, query_marker=framing.query_marker,
                   document_marker=framing.document_marker, query_length=framing.query_length,
                   document_length=framing.document_length, attend_to_expansion=framing.attend_to_expansion,
                   skiplist=framing.skiplist, **crisp), params




class LayerMixHead(nn.Module):
    """A trainable softmax mix of every hidden state (embeddings and each layer's output), then
    ``pooling``: ``pool(sum_i softmax(w)_i h_i)``. ``w`` starts at 0 (the uniform mean of layers)."""

    pooling: str = "mean"
    needs_hidden_states = True

    @nn.compact
    def __call__(self, hidden_bld, mask_bl, hidden_states=None, *, deterministic: bool = True):
        if hidden_states is None:
            raise ValueError("the layer-mix head needs every layer's hidden states (output_hidden_states=True)")
        stacked_nbld = jnp.stack([h.astype(jnp.float32) for h in hidden_states])
        logits_n = self.param("layer_logits", logical(nn.initializers.zeros, (None,)), (stacked_nbld.shape[0],),
                              jnp.float32)
        mixed_bld = jnp.einsum("n,nbld->bld", nn.softmax(logits_n), stacked_nbld)
        return get_pooler(self.pooling)(mixed_bld, mask_bl).astype(jnp.float32)

    st_type = "embedjax.heads.LayerMix"

    def write_st(self, params, folder: pathlib.Path, index: int) -> dict:
        return write_module_folder(self, params, folder, index, "LayerMix")

    @classmethod
    def read_st(cls, path: pathlib.Path, pooling: str):
        return read_module_folder(cls, path, pooling)


def write_module_folder(head, params, folder: pathlib.Path, index: int, name: str) -> dict:
    """Write a head sentence-transformers has no module for as an embedjax module folder
    (``{index}_{name}/``: ``config.json`` with the head's options, ``model.safetensors`` with its
    parameters under ``/``-joined paths). embedjax reads it back (`read_module_folder`);
    sentence-transformers cannot load such a folder."""
    from flax.traverse_util import flatten_dict

    from embedjax.convert import safetensors_io

    path = folder / f"{index}_{name}"
    path.mkdir()
    options = {f: getattr(head, f) for f in head.__dataclass_fields__ if f not in ("parent", "name")}
    (path / "config.json").write_text(json.dumps(options, indent=2))
    tensors = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
               for k, v in flatten_dict(dict(params)).items()}
    safetensors_io.write_file(path / "model.safetensors", tensors)
    return {"idx": index, "name": str(index), "path": path.name, "type": head.st_type}


def read_module_folder(cls, path: pathlib.Path, pooling: str):
    """``(head, params)`` from a folder `write_module_folder` wrote."""
    from flax.traverse_util import unflatten_dict

    from embedjax.convert import safetensors_io

    options = json.loads((path / "config.json").read_text())
    options.setdefault("pooling", pooling)
    tensors = safetensors_io.read_file(path / "model.safetensors")
    params = unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32) for k, v in tensors.items()})
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}), params


def _latent_attention():
    from embedjax.models.latent_attention import LatentAttentionHead

    return LatentAttentionHead


HEADS: dict[str, type] = {"projection": ProjectionHead, "multivector": MultiVectorHead, "layer_mix": LayerMixHead,
                          "latent_attention": _latent_attention()}


def head_output(head) -> str:
    """"sentence" (one vector per text) or "tokens" (one per token) for a head, or no head."""
    return "sentence" if head is None else getattr(head, "output", "sentence")


def read_st_head(folder: pathlib.Path, modules: list[dict], pooling: str):
    """The head a sentence-transformers folder declares after its Pooling module: ``(head, params)``,
    or ``(None, None)``. A module type no head reads is an error naming it."""
    readers = {cls.st_type: cls for cls in HEADS.values() if hasattr(cls, "st_type")}
    known = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
             "sentence_transformers.models.Normalize"}
    found = [m for m in modules if m.get("type") not in known]
    if not found:
        return None, None
    if len(found) > 1 or found[0].get("type") not in readers:
        raise ValueError(f"{folder / 'modules.json'} declares modules {[m.get('type') for m in found]}; embedjax "
                         f"reads one head of {sorted(readers)} after Pooling")
    return readers[found[0]["type"]].read_st(folder / found[0]["path"], pooling)


def build_head(spec: Mapping[str, Any] | None, *, pooling: str):
    """The head a spec describes (None or ``{}``: no head). ``pooling`` is the encoder's pooler, the
    default for heads that pool."""
    if not spec:
        return None
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in HEADS:
        raise ValueError(f"head type {kind!r} is unknown; choose one of {sorted(HEADS)} (spec {dict(spec)})")
    cls = HEADS[kind]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(f"head {kind!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    if "pooling" in fields:
        spec.setdefault("pooling", pooling)
    return cls(**spec)
