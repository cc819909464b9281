"""LoRA adapters as inputs (and outputs) of every `embedjax.merge` method.

An adapter ``i`` on a kernel ``W`` stands for the per-layer delta ``Delta_i = s_i A_i B_i``
(``A_i [*lead, in, r_i]``, ``B_i [*lead, r_i, out]``, ``s_i = alpha_i / r_i``; the layout of
`embedjax.models.lora`). The merge functions take `LoRAAdapter` objects in ``models`` and an
explicit ``lora=`` mode:

- ``lora="fold"``: each adapter is folded into ``base`` (``W + Delta_i``, `embedjax.models.lora.merge`)
  and the method merges the full trees, exactly as if the caller had folded them. Full trees and
  adapters may be mixed, and adapters may adapt different modules (each folds into its own kernels).
  The result is a full tree.
- ``lora="adapters"``: the result is one `LoRAAdapter` (``rank = alpha``, so its scale is 1, as
  peft's ``add_weighted_adapter`` writes merged adapters). Every model must be an adapter, all of
  one base model, with the same target modules and shapes.

  * Linear methods (soup, task arithmetic, Self Positioning's learned lambdas, the greedy soup's
    averages) are exact by rank concatenation: ``sum_i c_i s_i A_i B_i = [A_1 ... A_n] @
    [c_1 s_1 B_1; ...; c_n s_n B_n]``, an adapter of rank ``sum_i r_i``. With ``rank=R`` the exact
    sum is instead re-factorised to rank R by truncated SVD (below).
  * Non-linear methods (SLERP, TIES, DARE) act entry-wise on the per-layer deltas ``Delta_i``
    (never on ``A`` and ``B`` separately: the product of merged factors is not the merge of the
    products). The merged delta is re-factorised per layer by truncated SVD to ``rank`` (default:
    the largest input rank, peft's default): ``A = U_R sqrt(S_R)``, ``B = sqrt(S_R) V_R^T``. By
    Eckart-Young this is the best rank-R approximation in Frobenius norm; its relative error
    ``sqrt(sum_{j>R} sigma_j^2) / ||Delta||_F`` per module (all its layers together) is returned in
    ``LoRAAdapter.truncation_error``. At ``rank = min(in, out)`` nothing is dropped and the merge
    is exact up to float32 rounding. SLERP of two deltas is per tensor a linear combination of
    them, so ``rank = r_a + r_b`` is already exact for SLERP; TIES' trimming and DARE's dropping
    make the delta full-rank, so any smaller rank truncates.

  SLERP in adapter mode interpolates the *deltas* (task vectors), not ``W + Delta``: the base
  is shared, and an adapter has no ``W`` to hold. TIES and DARE treat the deltas as the task
  vectors, as with full trees. In adapter mode, each layer's delta is one tensor (the adapter's
  leading axes are its layers), so ``stacked`` is not used.

Errors name the input: an adapter in ``models`` without ``lora=``; ``lora="fold"`` without
``base``; a full tree in adapter mode; adapters naming different base models or whose delta shapes
differ (made for different bases); adapters whose target modules differ; a ``rank`` below 1 or
above ``min(in, out)`` of some module (a rank that cannot be met).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.models import lora as lora_lib

Tree = Any
MODES = ("fold", "adapters")
LINEAR_METHODS = ("soup", "task_arithmetic", "greedy_soup", "self_positioning")


@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
    """A LoRA adapter as a merge input or result.

    ``params``: the adapter tree (`embedjax.models.lora` layout: ``{"a": A [*lead, in, r], "b": B
    [*lead, r, out]}`` at each adapted module's path). ``config``: its `LoRAConfig` (rank, alpha).
    ``base_model``: the model it was trained on, as peft's ``base_model_name_or_path`` names it
    ("" when unknown); adapters naming different bases are not merged. ``truncation_error``: set on
    SVD-refactorised merge results, per module path, the relative Frobenius error of the rank-r
    factorisation (None when the result is exact by construction).
    """

    params: Mapping
    config: lora_lib.LoRAConfig
    base_model: str = ""
    truncation_error: Mapping[str, float] | None = None

    @classmethod
    def from_peft(cls, folder, model_config, backbone=None) -> "LoRAAdapter":
        """Read a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) for a model
        of ``model_config`` (`embedjax.convert.peft.load_peft`)."""
        import json
        import pathlib

        from embedjax.convert import peft

        adapters, config = peft.load_peft(folder, model_config, backbone)
        meta = json.loads((pathlib.Path(folder) / peft.CONFIG_FILE).read_text())
        return cls(adapters, config, str(meta.get("base_model_name_or_path") or ""))

    def save_peft(self, folder, model_config, *, overwrite: bool = False):
        """Write this adapter as a peft folder (`embedjax.convert.peft.save_peft`)."""
        from embedjax.convert import peft

        return peft.save_peft(folder, jax.tree.map(np.asarray, dict(self.params)), self.config, model_config,
                              base_model=self.base_model, overwrite=overwrite)

    def modules(self) -> list[tuple[str, ...]]:
        return [path for path, _, _ in lora_lib.adapter_leaves(self.params)]

    def deltas(self) -> dict:
        """``{module path: scale * A @ B [*lead, in, out]}`` in float32 (float64 factors under x64)."""
        return {path: _delta(a, b, self.config.scale) for path, a, b in lora_lib.adapter_leaves(self.params)}


def is_adapter(x) -> bool:
    return isinstance(x, LoRAAdapter)


def _delta(a, b, scale: float):
    dtype = jnp.float64 if jax.config.jax_enable_x64 and np.dtype(jnp.asarray(a).dtype) == np.float64 else jnp.float32
    return scale * jnp.einsum("...ir,...ro->...io", jnp.asarray(a, dtype), jnp.asarray(b, dtype))


def _path_name(path) -> str:
    return lora_lib.path_string(path)


def nest_paths(flat: Mapping[tuple, Any]) -> dict:
    """``{(k1, k2, ...): leaf}`` -> the nested dict ``{k1: {k2: ... leaf}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _targets(paths) -> tuple[str, ...]:
    return tuple("^" + re.escape(_path_name(p + ("kernel",))) + "$" for p in sorted(paths))


# ---------------------------------------------------------------- mode and input checks


def dispatch_needed(models, base=None, lora: str | None = None) -> bool:
    """True when any input is a `LoRAAdapter` (the merge goes through this module). Adapters
    without a ``lora`` mode, a mode without adapters, or a bad mode are errors."""
    items = list(models) if isinstance(models, Sequence) and not isinstance(models, (str, dict)) else []
    found = [i for i, m in enumerate(items) if is_adapter(m)]
    if is_adapter(base):
        raise ValueError("base is a LoRAAdapter; base must be the full parameter tree the adapters were trained on")
    if lora is not None and lora not in MODES:
        raise ValueError(f"lora={lora!r}: use 'fold' (fold each adapter into base, merge the full trees) or "
                         "'adapters' (merge into one LoRA adapter)")
    if found and lora is None:
        raise ValueError(f"models[{found[0]}] is a LoRAAdapter: pass lora='fold' (fold each adapter into base and "
                         "merge the full trees) or lora='adapters' (merge the adapters into one adapter)")
    if lora is not None and not found:
        raise ValueError(f"lora={lora!r} was given but no model is a LoRAAdapter; drop lora= to merge full trees")
    return bool(found)


def _backbone(base):
    """The tree adapters index: an encoder tree's ``backbone``, or ``base`` itself."""
    if isinstance(base, Mapping) and "backbone" in base:
        return base["backbone"]
    return base


def _check_fits(base, adapter: LoRAAdapter, name: str) -> None:
    """Every adapted module of ``adapter`` has a kernel in ``base`` with the delta's entries."""
    backbone = _backbone(base)
    for path, a, b in lora_lib.adapter_leaves(adapter.params):
        node = backbone
        try:
            for key in path:
                node = node[key]
            kernel = node["kernel"]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"{name} adapts {_path_name(path)}, which has no kernel in base: the adapter was made "
                             f"for another base model{_named(adapter)}") from None
        lead, n_in, n_out = np.shape(a)[:-2], np.shape(a)[-2], np.shape(b)[-1]
        if math.prod(lead) * n_in * n_out != math.prod(np.shape(kernel)) or tuple(np.shape(kernel)[:len(lead)]) != lead:
            raise ValueError(f"{name} at {_path_name(path)}: delta [{', '.join(map(str, (*lead, n_in, n_out)))}] does "
                             f"not fit base's kernel {tuple(np.shape(kernel))}: the adapter was made for another base "
                             f"model{_named(adapter)}")


def _named(adapter: LoRAAdapter) -> str:
    return f" ({adapter.base_model!r})" if adapter.base_model else ""


def fold(base: Tree, adapter: LoRAAdapter, name: str = "adapter") -> Tree:
    """``base`` with ``adapter`` folded into its kernels (``W + scale A B``; an encoder tree's
    backbone, the head unchanged)."""
    _check_fits(base, adapter, name)
    if isinstance(base, Mapping) and "backbone" in base:
        return {**base, "backbone": lora_lib.merge(base["backbone"], adapter.params, adapter.config)}
    return lora_lib.merge(base, adapter.params, adapter.config)


def fold_all(models: Sequence, base, method: str) -> list:
    """Fold mode: every adapter in ``models`` folded into ``base``; full trees pass through."""
    if base is None:
        raise ValueError(f"{method}(..., lora='fold') needs base=: the full parameter tree the adapters were trained "
                         "on (each adapter is folded into it)")
    return [fold(base, m, f"models[{i}]") if is_adapter(m) else m for i, m in enumerate(models)]


def check_adapters(models: Sequence, base=None) -> list[LoRAAdapter]:
    """Adapter mode's checks: all adapters, one base model, the same modules with the same shapes
    (and fitting ``base`` when given)."""
    for i, m in enumerate(models):
        if not is_adapter(m):
            raise ValueError(f"models[{i}] is a full parameter tree, but lora='adapters' merges LoRA adapters only; "
                             "use lora='fold' to merge adapters with full models")
    ref = models[0]
    ref_shapes = {path: (np.shape(a)[:-2], np.shape(a)[-2], np.shape(b)[-1])
                  for path, a, b in lora_lib.adapter_leaves(ref.params)}
    if not ref_shapes:
        raise ValueError("models[0] holds no adapter ({'a', 'b'} pairs): pass LoRAAdapter(params=adapter tree, ...)")
    for i, m in enumerate(models[1:], start=1):
        if m.base_model and ref.base_model and m.base_model != ref.base_model:
            raise ValueError(f"models[{i}] was trained on base model {m.base_model!r} but models[0] on "
                             f"{ref.base_model!r}: adapters of different base models cannot be merged")
        shapes = {path: (np.shape(a)[:-2], np.shape(a)[-2], np.shape(b)[-1])
                  for path, a, b in lora_lib.adapter_leaves(m.params)}
        extra, missing = sorted(set(shapes) - set(ref_shapes)), sorted(set(ref_shapes) - set(shapes))
        if extra or missing:
            detail = "; ".join(part for part in (
                f"it adapts {[_path_name(p) for p in extra]}, which models[0] does not" if extra else "",
                f"it lacks {[_path_name(p) for p in missing]}, which models[0] adapts" if missing else "") if part)
            raise ValueError(f"models[{i}]'s target modules differ from models[0]'s ({detail}); lora='adapters' "
                             "merges adapters of the same modules; use lora='fold' to merge them as full models")
        for path, (lead, n_in, n_out) in shapes.items():
            if (lead, n_in, n_out) != ref_shapes[path]:
                r_lead, r_in, r_out = ref_shapes[path]
                raise ValueError(f"models[{i}] at {_path_name(path)} has delta shape {(*lead, n_in, n_out)} but "
                                 f"models[0] has {(*r_lead, r_in, r_out)}: adapters of different base models cannot "
                                 "be merged")
    if base is not None:
        for i, m in enumerate(models):
            _check_fits(base, m, f"models[{i}]")
    return list(models)


def check_rank(rank, adapters: Sequence[LoRAAdapter]) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an int >= 1 (the rank of the merged adapter)")
    limits = {path: (np.shape(a)[-2], np.shape(b)[-1]) for path, a, b in lora_lib.adapter_leaves(adapters[0].params)}
    for path, (n_in, n_out) in limits.items():
        if rank > min(n_in, n_out):
            raise ValueError(f"rank={rank} cannot be met: {_path_name(path)}'s delta is {n_in} x {n_out}, so its rank "
                             f"is at most {min(n_in, n_out)}; choose rank <= {min(min(v) for v in limits.values())}")
    return int(rank)


# ---------------------------------------------------------------- building merged adapters


def concatenate(adapters: Sequence[LoRAAdapter], coefficients: Sequence[float]) -> LoRAAdapter:
    """The exact adapter of ``sum_i c_i Delta_i``: ``A = [A_1 ... A_n]`` on the rank axis and
    ``B = [c_1 s_1 B_1; ...; c_n s_n B_n]``; rank ``sum_i r_i``, alpha = rank (scale 1)."""
    out = {}
    for path, _, _ in lora_lib.adapter_leaves(adapters[0].params):
        a_parts, b_parts = [], []
        for m, c in zip(adapters, coefficients):
            node = m.params
            for key in path:
                node = node[key]
            a_parts.append(jnp.asarray(node["a"], jnp.float32))
            b_parts.append(jnp.asarray(node["b"], jnp.float32) * jnp.float32(c * m.config.scale))
        out[path] = {"a": jnp.concatenate(a_parts, axis=-1), "b": jnp.concatenate(b_parts, axis=-2)}
    rank = sum(m.config.rank for m in adapters)
    config = lora_lib.LoRAConfig(rank=rank, alpha=float(rank), dropout=adapters[0].config.dropout,
                                 targets=_targets(out))
    return LoRAAdapter(nest_paths(out), config, adapters[0].base_model)


@jax.jit
def _svd(delta_kio):
    return jnp.linalg.svd(delta_kio, full_matrices=False)


def factorize(deltas: Mapping[tuple, Any], rank: int, *, dropout: float = 0.0, base_model: str = "") -> LoRAAdapter:
    """A rank-``rank`` adapter of per-module deltas ``[*lead, in, out]`` by truncated SVD per layer
    (``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``, scale 1), with each module's relative
    Frobenius truncation error ``sqrt(sum_{j>r} sigma_j^2) / ||Delta||_F`` (0 for a zero delta)."""
    out, errors = {}, {}
    for path in sorted(deltas):
        d = jnp.asarray(deltas[path])
        n_in, n_out = d.shape[-2:]
        if rank > min(n_in, n_out):
            raise ValueError(f"rank={rank} cannot be met: {_path_name(path)}'s delta is {n_in} x {n_out}")
        u, s, vt = _svd(d)
        root = jnp.sqrt(s[..., :rank])
        out[path] = {"a": (u[..., :, :rank] * root[..., None, :]).astype(jnp.float32),
                     "b": (root[..., :, None] * vt[..., :rank, :]).astype(jnp.float32)}
        s64 = np.asarray(s, np.float64)
        total = float(np.sum(s64 ** 2))
        errors[_path_name(path)] = math.sqrt(float(np.sum(s64[..., rank:] ** 2)) / total) if total > 0 else 0.0
    config = lora_lib.LoRAConfig(rank=int(rank), alpha=float(rank), dropout=dropout, targets=_targets(out))
    return LoRAAdapter(nest_paths(out), config, base_model, truncation_error=errors)


def _delta_trees(adapters: Sequence[LoRAAdapter]) -> tuple[list[dict], dict]:
    """Each adapter's deltas as a nested tree, and ``stacked`` (its leading layer axes) per leaf."""
    flats = [m.deltas() for m in adapters]
    stacked = nest_paths({path: d.ndim - 2 for path, d in flats[0].items()})
    return [nest_paths(f) for f in flats], stacked


def _flat(tree: Mapping) -> dict:
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(lora_lib._key_name(k) for k in key_path)] = leaf
    return out


def _linear(adapters, coefficients, rank) -> LoRAAdapter:
    if rank is None:
        return concatenate(adapters, coefficients)
    flats = [m.deltas() for m in adapters]
    summed = {p: sum(c * f[p] for c, f in zip(coefficients, flats)) for p in flats[0]}
    return factorize(summed, rank, dropout=adapters[0].config.dropout, base_model=adapters[0].base_model)


def _refactorize(merged_tree: Mapping, adapters, rank) -> LoRAAdapter:
    rank = max(m.config.rank for m in adapters) if rank is None else rank
    return factorize(_flat(merged_tree), rank, dropout=adapters[0].config.dropout, base_model=adapters[0].base_model)


def refuse_stacked(stacked, method):
    if stacked is not None:
        raise ValueError(f"{method}(..., lora='adapters') does not take stacked=: each layer's delta is one tensor "
                         "(the adapters' leading axes are their layers)")


# ---------------------------------------------------------------- the methods, adapter mode


def soup(models, weights, *, rank=None) -> LoRAAdapter:
    from embedjax import merge

    adapters = check_adapters(models)
    rank = check_rank(rank, adapters)
    w = merge._soup_weights(weights, len(adapters))
    return _linear(adapters, [wi / sum(w) for wi in w], rank)


def task_arithmetic(base, models, lambdas, *, rank=None) -> LoRAAdapter:
    from embedjax import merge

    adapters = check_adapters(models, base)
    rank = check_rank(rank, adapters)
    return _linear(adapters, merge._per_model(lambdas, len(adapters), "lambdas", 1.0), rank)


def slerp(a, b, t, *, rank=None, threshold) -> LoRAAdapter:
    from embedjax import merge

    adapters = check_adapters([a, b])
    rank = check_rank(rank, adapters)
    (da, db), stacked = _delta_trees(adapters)
    return _refactorize(merge.slerp(da, db, t, stacked=stacked, threshold=threshold), adapters, rank)


def ties(base, models, density, weights, *, scale, rank=None) -> LoRAAdapter:
    from embedjax import merge

    adapters = check_adapters(models, base)
    rank = check_rank(rank, adapters)
    deltas, stacked = _delta_trees(adapters)
    zero = jax.tree.map(jnp.zeros_like, deltas[0])
    merged = merge.ties(zero, deltas, density, weights, scale=scale, stacked=stacked)
    return _refactorize(merged, adapters, rank)


def dare(base, models, p, seed, lambdas, *, rank=None) -> LoRAAdapter:
    from embedjax import merge

    adapters = check_adapters(models, base)
    rank = check_rank(rank, adapters)
    deltas, _ = _delta_trees(adapters)
    zero = jax.tree.map(jnp.zeros_like, deltas[0])
    return _refactorize(merge.dare(zero, deltas, p, seed, lambdas), adapters, rank)


def self_positioning(base, models, run: Callable, *, rank=None):
    """Adapter mode: the lambdas are learned on the folded models (the same task vectors as the
    adapters' deltas), then the result is the adapter of ``sum_i lambda_i Delta_i``."""
    adapters = check_adapters(models, base)
    rank = check_rank(rank, adapters)
    result = run([fold(base, m, f"models[{i}]") for i, m in enumerate(adapters)])
    return dataclasses.replace(result, params=_linear(adapters, result.lambdas.tolist(), rank))
