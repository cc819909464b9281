"""LoRA (Hu et al. 2021) as pure functions on the Linen parameter tree, for every model family.

An adapter on a kernel ``W`` adds ``scale * dropout(x) @ A @ B`` to the layer's output, with
``A [in, r]`` (Kaiming-uniform, as peft initialises it), ``B [r, out]`` = 0 (so a fresh adapter
changes nothing) and ``scale = alpha / r``. Kernels are picked by regexes over their parameter
paths (``"layers/attention/q/kernel"``), never by family.

The adapter tree (what `init_adapters` returns, the encoder tree's ``"lora"`` entry, and what
`merge` and the peft files read) mirrors the backbone's parameter tree down to each targeted
layer, where ``{"kernel": W, ...}`` becomes ``{"a": A, "b": B}``:

- ``A``: ``[*lead, in, r]`` and ``B``: ``[*lead, r, out]``, where ``lead`` are the kernel's leading
  stacked axes (``layers`` under ``nn.scan``: one adapter per layer), ``in`` the product of the
  kernel's input axes and ``out`` the product of its output axes, in the kernel's row-major order
  (a q kernel ``[L, d, heads, head_dim]`` has ``A [L, d, r]``, ``B [L, r, heads * head_dim]``);
- the merged kernel is ``W + scale * (A @ B).reshape(W.shape)`` (`merge`);
- rank, alpha, dropout and the target patterns live in a `LoRAConfig`, not in the tree.

Applying adapters needs no change in any family: `apply_model` runs the backbone under a flax
method interceptor that adds the adapter term to every ``nn.Dense`` / ``nn.DenseGeneral`` call
that has an adapter in the ``"lora"`` variable collection (the shared layer stack scans that
collection with the parameters). Dropout acts on the adapter's input only, which is why the
adapter is applied inside the layer instead of being merged into the weights while training.
With adapters present the backbone is frozen (``stop_gradient``): its gradients are exactly zero,
and the trainer differentiates only the adapters and the head.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embedjax.data import packing

# q, k, v, o attention projections and the gated MLP's gate/up/down, in every family's naming
# (BERT's plain MLP is mlp_in / mlp_out: name them to adapt it).
DEFAULT_TARGETS = (r"(^|/)(q|k|v|o|gate|up|down)/kernel$",)
COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``rank`` r >= 1, ``alpha`` (scale = alpha / r), ``dropout`` on the adapter input while
    training, ``targets``: regexes searched in ``"/"``-joined kernel paths."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r} must be an int >= 1 (16 is the usual choice)")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} must be positive (scale = alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ValueError("LoRA targets is empty; give at least one regex over kernel paths, e.g. 'attention/q/kernel$'")
        for pattern in targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"LoRA target {pattern!r} is not a valid regex: {err}") from None
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | None) -> "LoRAConfig | None":
        """A config from a plain dict (``model.lora`` in training configs); None or {} = no LoRA."""
        if not spec:
            return None
        spec = dict(spec)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"model.lora has no option(s) {unknown}; its options are {sorted(fields)}")
        return cls(**spec)


# ---- paths ----

def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def path_string(path: Sequence[str]) -> str:
    return "/".join(path)


def kernel_paths(backbone) -> list[tuple[str, ...]]:
    """Paths (tuples of names) of every ``kernel`` leaf of a parameter tree."""
    paths = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(backbone, is_leaf=_is_box)[0]:
        names = tuple(_key_name(k) for k in key_path)
        if names and names[-1] == "kernel":
            paths.append(names)
    return paths


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def target_paths(backbone, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """The kernel paths the target regexes pick. A pattern that matches no kernel is an error
    listing the kernels there are."""
    kernels = kernel_paths(backbone)
    names = [path_string(p) for p in kernels]
    chosen = set()
    for pattern in targets:
        hits = [p for p, name in zip(kernels, names) if re.search(pattern, name)]
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no kernel; the model's kernels are "
                             f"{sorted(names)}")
        chosen.update(hits)
    return sorted(chosen)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def adapter_leaves(adapters) -> list[tuple[tuple[str, ...], Any, Any]]:
    """``(module_path, A, B)`` for every adapter in an adapter tree."""
    out = []

    def walk(node, path):
        if isinstance(node, Mapping) and "a" in node and "b" in node and not isinstance(node["a"], Mapping):
            out.append((path, node["a"], node["b"]))
            return
        if isinstance(node, Mapping):
            for key in sorted(node):
                walk(node[key], path + (key,))

    walk(adapters, ())
    return out


# ---- which axes of a kernel are its input and output ----

def _dense_axes(module) -> tuple[int, int]:
    """(number of input axes, number of output axes) of a Dense / DenseGeneral kernel."""
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        features = module.features if isinstance(module.features, Sequence) else (module.features,)
        if getattr(module, "batch_dims", ()):
            raise ValueError(f"LoRA does not adapt DenseGeneral layers with batch_dims ({module.path})")
        return len(axis), len(features)
    return 1, 1


def _trailing_axes(module, ndim: int) -> bool:
    if not isinstance(module, nn.DenseGeneral):
        return True
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    normalized = sorted(a % ndim for a in axis)
    return normalized == list(range(ndim - len(axis), ndim))


def dense_layout(model, backbone, tokens) -> dict[tuple[str, ...], tuple[int, int]]:
    """``{kernel path: (input axes, output axes)}`` of every Dense layer of ``model``, found by tracing
    one (shape-only) forward pass with an interceptor."""
    layout: dict[tuple[str, ...], tuple[int, int]] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            layout[tuple(module.path) + ("kernel",)] = _dense_axes(module)
        return next_fun(*args, **kwargs)

    def run(params):
        with nn.intercept_methods(record):
            return model.apply({"params": params}, tokens)

    jax.eval_shape(run, nn.meta.unbox(backbone))
    return layout


# ---- initialisation ----

def init_adapters(model, backbone, tokens, config: LoRAConfig, key, *, boxed: bool = False) -> dict:
    """Fresh adapters for the kernels ``config.targets`` pick: ``A`` Kaiming-uniform (bound
    ``1 / sqrt(in)``, peft's default), ``B`` zero. ``tokens``: any token batch of the model's
    layout (only shapes are used). ``boxed`` wraps leaves with logical axis names (``A`` keeps the
    kernel's leading and single input axis names, the rank axis is replicated) for sharding."""
    layout = dense_layout(model, backbone, tokens)
    adapters: dict = {}
    paths = target_paths(backbone, config.targets)
    keys = jax.random.split(key, max(len(paths), 1))
    for path, k in zip(paths, keys):
        if path not in layout:
            raise ValueError(f"LoRA target {path_string(path)} is not the kernel of a Dense layer; adapt Dense / "
                             "DenseGeneral kernels only")
        kernel = _get(backbone, path)
        names = kernel.names if _is_box(kernel) else None
        shape = tuple(kernel.value.shape if _is_box(kernel) else kernel.shape)
        n_in, n_out = layout[path]
        lead = len(shape) - n_in - n_out
        fan_in = math.prod(shape[lead:lead + n_in])
        fan_out = math.prod(shape[lead + n_in:])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (*shape[:lead], fan_in, config.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*shape[:lead], config.rank, fan_out), jnp.float32)
        if boxed:
            lead_names = tuple(names[:lead]) if names else (None,) * lead
            in_name = names[lead] if names and n_in == 1 else None
            out_name = names[-1] if names and n_out == 1 else None
            a = nn.LogicallyPartitioned(a, (*lead_names, in_name, None))
            b = nn.LogicallyPartitioned(b, (*lead_names, None, out_name))
        _set(adapters, path[:-1], {"a": a, "b": b})
    return adapters


# ---- application ----

@contextlib.contextmanager
def lora_scope(config: LoRAConfig, *, deterministic: bool = True):
    """Within this context, every ``nn.Dense`` / ``nn.DenseGeneral`` call whose module has
    ``a`` and ``b`` in the ``"lora"`` collection returns ``W x + scale * dropout(x) @ A @ B``
    (dropout only when not ``deterministic``; its key comes from the ``dropout`` rng stream)."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
                or not module.has_variable(COLLECTION, "a")):
            return out
        x = args[0] if args else kwargs["inputs"]
        if not _trailing_axes(module, x.ndim):
            raise ValueError(f"LoRA on {module.path}: the layer contracts non-trailing input axes")
        n_in, _ = _dense_axes(module)
        a = module.get_variable(COLLECTION, "a")
        b = module.get_variable(COLLECTION, "b")
        x_flat = x.reshape(*x.shape[:x.ndim - n_in], -1)
        if config.dropout > 0.0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, x_flat.shape)
            x_flat = jnp.where(keep, x_flat / (1.0 - config.dropout), 0.0).astype(x_flat.dtype)
        compute = out.dtype
        delta = (x_flat.astype(compute) @ a.astype(compute)) @ b.astype(compute)
        return out + (delta * jnp.asarray(config.scale, compute)).reshape(out.shape)

    with nn.intercept_methods(intercept):
        yield


def apply_model(model, params, tokens, *, lora: LoRAConfig | None = None, deterministic: bool = True,
                output_hidden_states: bool = False, rngs=None):
    """``model.apply`` on the encoder tree's backbone, with its LoRA adapters when it has any.

    ``params``: the encoder tree ``{"backbone", "head", ["lora"]}``. With adapters, ``lora`` (their
    `LoRAConfig`) is required and the backbone is held constant (``stop_gradient``). A packed token
    batch (`embedjax.data.packing`) comes back unpacked: every returned state is [N texts, P, D].
    """
    adapters = params.get("lora") if isinstance(params, Mapping) else None
    if not adapters:
        last, extras = model.apply({"params": params["backbone"]}, tokens, deterministic=deterministic,
                                   output_hidden_states=output_hidden_states, rngs=rngs)
        return _per_text(last, extras, tokens)
    if lora is None:
        raise ValueError("the parameters carry LoRA adapters but no LoRAConfig was given (scale and dropout); "
                         "pass lora=LoRAConfig(...) or merge the adapters first (embedjax.models.lora.merge)")
    variables = {"params": jax.lax.stop_gradient(params["backbone"]), COLLECTION: adapters}
    with lora_scope(lora, deterministic=deterministic):
        last, extras = model.apply(variables, tokens, deterministic=deterministic,
                                   output_hidden_states=output_hidden_states, rngs=rngs)
    return _per_text(last, extras, tokens)


def _per_text(last_bld, extras: dict, tokens):
    """The model's outputs with packed rows gathered back into one row per text (unchanged when
    the batch is not packed)."""
    if not packing.is_packed(tokens):
        return last_bld, extras
    index = tokens["unpack_index"]
    hidden = extras.get("hidden_states")
    if hidden is not None:
        extras = {**extras, "hidden_states": tuple(packing.unpack_states(h, index) for h in hidden)}
    return packing.unpack_states(last_bld, index), extras


# ---- merging ----

def delta(a, b, kernel_shape, scale: float):
    """``scale * A @ B`` shaped like the kernel (leading stacked axes kept)."""
    product = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return (scale * product).reshape(kernel_shape)


def merge(backbone, adapters, config: LoRAConfig):
    """The backbone with every adapter folded into its kernel: ``W + scale * A @ B`` (a new tree;
    the inputs are not changed). Adapters at a path with no kernel are an error."""
    merged = jax.tree.map(lambda x: x, backbone)  # a structural copy we may write into
    for path, a, b in adapter_leaves(adapters):
        try:
            layer = _get(merged, path)
        except (KeyError, TypeError):
            raise ValueError(f"LoRA adapter at {path_string(path)} has no kernel in the backbone") from None
        kernel = layer["kernel"]
        layer["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta(a, b, kernel.shape, config.scale)).astype(kernel.dtype)
    return merged


def merge_encoder_params(params, config: LoRAConfig | None):
    """The encoder tree with its adapters merged into the backbone and the ``lora`` entry dropped
    (unchanged when it has none)."""
    if not params.get("lora"):
        return {k: v for k, v in params.items() if k != "lora"}
    return {"backbone": merge(params["backbone"], params["lora"], config), "head": params.get("head", {})}


def count_parameters(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
