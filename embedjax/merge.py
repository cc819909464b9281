"""Model merging on parameter pytrees: soups, SLERP, task arithmetic, TIES, DARE, Self Positioning.

Every function takes and returns plain pytrees of arrays (the encoder's ``{"backbone", "head"}``
tree, a bare backbone, any Flax params) and never asks which model family they hold. Merged
leaves keep the dtype of the first input's leaf; the arithmetic runs in float32 (in float64 for
float64 leaves when ``jax_enable_x64`` is on). Notation: ``theta_0`` the base, ``theta_i`` the fine-tuned models, ``tau_i = theta_i -
theta_0`` their task vectors.

- `soup`: the (weighted) mean of the models; `greedy_soup` adds a model, best first, only when
  the held-out score of the average does not drop (Wortsman et al., 2022).
- `task_arithmetic`: ``theta_0 + sum_i lambda_i tau_i`` (Ilharco et al., 2023).
- `slerp`: interpolation along the arc between two models, per tensor, with linear
  interpolation where the tensors are nearly parallel (``|cos| > 0.9995``).
- `ties`: trim each task vector to its top-``density`` entries by magnitude, elect each entry's
  sign from the weighted sum of the trimmed vectors (a zero sum elects +), and average the
  entries that agree with it (Yadav et al., 2023).
- `dare`: drop each task-vector entry with probability ``p`` and rescale the survivors by
  ``1 / (1 - p)`` before task arithmetic (Yu et al., 2024).
- `self_positioning`: the task vectors stay frozen and one coefficient per model is learned by
  gradient descent on a small probe set, one batch of every probe task per step, so the tasks
  weigh equally whatever their sizes (Li et al., 2024, "Improving General Text Embedding Model:
  Tackling Task Conflict and Data Imbalance through Model Merging").

Per tensor. SLERP's angle and TIES' top-k look at one tensor at a time, as mergekit does on
transformers checkpoints. A leaf that stacks several tensors on leading axes (the scanned layer
stack: ``[layers, ...]``) says so through ``stacked``: an int per leaf (a pytree like the
params, or one int for all) counting those leading axes; each slice is then its own tensor.
`stacked_axes` reads the counts from a model's logical axis names, so
``stacked=stacked_axes(abstract_params(...))`` merges a scanned model exactly as its per-layer
transformers checkpoint would be merged. (Head-split kernels such as ``[embed, heads, kv]`` hold
the same entries as the checkpoint's matrix, so norms, angles and top-k agree.)

LoRA adapters. Every method takes `embedjax.merge_lora.LoRAAdapter` objects in ``models`` with an
explicit ``lora=`` mode: ``"fold"`` folds each adapter into ``base`` and merges the full trees;
``"adapters"`` returns one adapter (exact rank concatenation for the linear methods, truncated
SVD of the merged per-layer deltas to ``rank`` for SLERP, TIES and DARE, with the truncation error
reported). See `embedjax.merge_lora`.

Bad input is a `ValueError` naming it: trees whose structure or shapes differ (the first
mismatching path), a density, ``p`` or ``t`` outside [0, 1], weight or lambda lists of the wrong
length.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_compatible", "dare", "drop_and_rescale", "greedy_soup", "GreedySoup", "LoRAAdapter", "self_positioning",
           "SelfPositioning", "slerp", "soup", "stacked_axes", "task_arithmetic", "task_vectors", "ties"]

def __getattr__(name):
    if name == "LoRAAdapter":  # lazily: embedjax.merge_lora imports flax
        from embedjax.merge_lora import LoRAAdapter

        return LoRAAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PARALLEL_THRESHOLD = 0.9995  # |cos| above which SLERP falls back to linear interpolation

Tree = Any


# ---------------------------------------------------------------- checks


def _name(path) -> str:
    return jax.tree_util.keystr(path) or "(the root)"


def _flatten(tree: Tree, what: str):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves:
        raise ValueError(f"{what} holds no arrays: pass a parameter tree")
    return [p for p, _ in leaves], [leaf for _, leaf in leaves], treedef


def check_compatible(trees: Sequence[Tree], names: Sequence[str]) -> None:
    """Raise a `ValueError` naming the first path where ``trees`` differ in structure or shape,
    or a leaf that is not a floating-point array."""
    ref_paths, ref_leaves, _ = _flatten(trees[0], names[0])
    for path, leaf in zip(ref_paths, ref_leaves):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{names[0]}{_name(path)} has dtype {dtype}; only floating-point parameters can be "
                             "merged")
    for tree, name in zip(trees[1:], names[1:]):
        paths, leaves, _ = _flatten(tree, name)
        for i in range(max(len(paths), len(ref_paths))):
            mine = paths[i] if i < len(paths) else None
            ref = ref_paths[i] if i < len(ref_paths) else None
            if mine == ref:
                continue
            if ref is not None and ref not in paths:
                raise ValueError(f"{name} has no parameter {_name(ref)}, which {names[0]} has: the trees differ "
                                 "(merge models of one architecture)")
            raise ValueError(f"{name} has a parameter {_name(mine)} that {names[0]} lacks: the trees differ "
                             "(merge models of one architecture)")
        for path, leaf, ref_leaf in zip(paths, leaves, ref_leaves):
            if np.shape(leaf) != np.shape(ref_leaf):
                raise ValueError(f"{name}{_name(path)} has shape {tuple(np.shape(leaf))} but "
                                 f"{names[0]}{_name(path)} has {tuple(np.shape(ref_leaf))}: the models must share "
                                 "one architecture")


def _check_models(models, base=None) -> list:
    if isinstance(models, dict) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError("models must be a non-empty list of parameter trees")
    trees = ([base] if base is not None else []) + list(models)
    names = (["base"] if base is not None else []) + [f"models[{i}]" for i in range(len(models))]
    check_compatible(trees, names)
    return list(models)


def _check_fraction(value, name: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} is not a number in [0, 1]: {hint}")
    return float(value)


def _per_model(values, n: int, name: str, default: float) -> list[float]:
    """A scalar or one value per model -> n floats."""
    if values is None:
        return [default] * n
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return [float(values)] * n
    values = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} models: give one per model (or one scalar)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}={values} must be finite")
    return values


def _soup_weights(weights, n: int) -> list[float]:
    values = _per_model(weights, n, "weights", 1.0)
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"weights={values} must be non-negative with a positive sum")
    return values


def _lora_mode(models, lora, base=None, rank=None) -> str | None:
    """None for a merge of full trees; ``"fold"`` / ``"adapters"`` when ``models`` hold LoRA
    adapters (`embedjax.merge_lora`; adapters without a mode, or a mode without adapters, are errors)."""
    from embedjax import merge_lora

    if not merge_lora.dispatch_needed(models, base, lora):
        if rank is not None:
            raise ValueError(f"rank={rank!r} is the rank of a merged LoRA adapter (lora='adapters'); these models are "
                             "full trees: drop rank=")
        return None
    if lora == "fold" and rank is not None:
        raise ValueError("rank= applies to lora='adapters' only (lora='fold' returns a full tree); drop rank=")
    return lora


def _base_only_when_folding(mode, base, method: str) -> None:
    if base is not None and mode != "fold":
        raise ValueError(f"{method} takes base= only with lora='fold' (the tree LoRA adapters are folded into); "
                         "drop base=")


# ---------------------------------------------------------------- leaf helpers


def _compute_dtype(leaf):
    return jnp.float64 if jax.config.jax_enable_x64 and np.dtype(leaf.dtype) == np.float64 else jnp.float32


def _like(out, ref):
    return out.astype(jnp.asarray(ref).dtype)


def _stacked_list(stacked, reference: Tree) -> list[int]:
    """Per leaf of ``reference`` (flattening order), how many leading axes stack separate tensors."""
    paths, leaves, treedef = _flatten(reference, "the reference tree")
    if stacked is None:
        counts = [0] * len(leaves)
    elif isinstance(stacked, numbers.Integral) and not isinstance(stacked, bool):
        counts = [int(stacked)] * len(leaves)
    else:
        try:
            counts = [int(c) for c in treedef.flatten_up_to(stacked)]
        except (ValueError, TypeError) as err:
            raise ValueError(f"stacked must be an int or a tree of ints shaped like the params: {err}") from None
    for path, leaf, count in zip(paths, leaves, counts):
        if not 0 <= count <= np.ndim(leaf):
            raise ValueError(f"stacked={count} at {_name(path)} is not between 0 and the leaf's {np.ndim(leaf)} axes")
    return counts


def _rows(x, count: int):
    """Leaf -> [tensors, entries]: one row per stacked tensor."""
    shape = jnp.shape(x)
    return jnp.reshape(x, (int(np.prod(shape[:count], dtype=np.int64)), -1))


def stacked_axes(abstract_tree: Tree, axis_name: str = "layers") -> Tree:
    """Per leaf, the number of leading axes named ``axis_name`` in its logical axis names
    (Flax ``LogicallyPartitioned`` boxes, as ``embedjax.encoder.abstract_params`` returns them);
    0 for leaves without names. Pass the result as ``stacked=``."""
    import flax.linen as nn

    def count(leaf):
        names = getattr(leaf, "names", None) if isinstance(leaf, nn.LogicallyPartitioned) else None
        n = 0
        for name in names or ():
            if name != axis_name:
                break
            n += 1
        return n

    return jax.tree.map(count, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# ---------------------------------------------------------------- soups and task arithmetic


def task_vectors(base: Tree, models: Sequence[Tree]) -> list[Tree]:
    """``[theta_i - theta_0]``, in the compute dtype (float32; float64 leaves under ``jax_enable_x64``)."""
    models = _check_models(models, base)
    return [jax.tree.map(_difference, m, base) for m in models]


@jax.jit
def _difference(m, b):
    dtype = _compute_dtype(b)
    return m.astype(dtype) - b.astype(dtype)


@jax.jit
def _add_scaled_leaf(b, taus, lambdas_n):
    out = b.astype(_compute_dtype(b))
    for i, t in enumerate(taus):
        out = out + lambdas_n[i].astype(out.dtype) * t
    return _like(out, b)


def _add_scaled(base: Tree, taus: Sequence[Tree], lambdas: Sequence[float]) -> Tree:
    """``base + sum_i lambdas[i] * taus[i]`` leaf by leaf (one compiled kernel per leaf shape)."""
    lambdas_n = jnp.asarray(lambdas, jnp.float32).reshape(-1)
    return jax.tree.map(lambda b, *ts: _add_scaled_leaf(b, ts, lambdas_n), base, *taus)


def soup(models: Sequence[Tree], weights=None, *, lora: str | None = None, base: Tree = None,
         rank: int | None = None) -> Tree:
    """The weighted mean of ``models`` (uniform by default).

    Computed as ``theta_1 + sum_i w_i (theta_i - theta_1) / sum(w)``, so a soup of identical
    models is that model bit for bit. LoRA adapters in ``models``: ``lora="fold"`` (with ``base``,
    the tree they fold into) or ``lora="adapters"`` (the exact rank-concatenated adapter; with
    ``rank``, its truncated SVD); see `embedjax.merge_lora`.
    """
    mode = _lora_mode(models, lora, base, rank)
    _base_only_when_folding(mode, base, "soup")
    if mode is not None:
        from embedjax import merge_lora

        if mode == "fold":
            return soup(merge_lora.fold_all(models, base, "soup"), weights)
        return merge_lora.soup(models, weights, rank=rank)
    models = _check_models(models)
    w = _soup_weights(weights, len(models))
    total = sum(w)
    first = models[0]
    return _add_scaled(first, task_vectors(first, models[1:]) if len(models) > 1 else [],
                       [wi / total for wi in w[1:]])


def task_arithmetic(base: Tree, models: Sequence[Tree], lambdas=1.0, *, lora: str | None = None,
                    rank: int | None = None) -> Tree:
    """``theta_0 + sum_i lambda_i (theta_i - theta_0)``; ``lambdas`` one scalar or one per model.

    LoRA adapters in ``models``: ``lora="fold"`` or ``lora="adapters"`` (the exact adapter of ``sum_i
    lambda_i Delta_i`` by rank concatenation; ``base`` may be None, else the adapters must fit it);
    see `embedjax.merge_lora`."""
    mode = _lora_mode(models, lora, base, rank)
    if mode is not None:
        from embedjax import merge_lora

        if mode == "fold":
            return task_arithmetic(base, merge_lora.fold_all(models, base, "task_arithmetic"), lambdas)
        return merge_lora.task_arithmetic(base, models, lambdas, rank=rank)
    models = _check_models(models, base)
    return _add_scaled(base, task_vectors(base, models), _per_model(lambdas, len(models), "lambdas", 1.0))


@dataclasses.dataclass(frozen=True)
class GreedySoup:
    """`greedy_soup`'s result: the soup, the models it kept (indices, in the order added), every
    model's own score, and the score of the soup after each accepted addition."""

    params: Tree
    kept: tuple[int, ...]
    scores: tuple[float, ...]
    soup_scores: tuple[float, ...]


def greedy_soup(models: Sequence[Tree], score_fn: Callable[[Tree], float], *, scores=None, lora: str | None = None,
                base: Tree = None, rank: int | None = None) -> GreedySoup:
    """Greedy soup: sort ``models`` by held-out score (best first), start from the best and add
    each next model only when ``score_fn`` of the uniform soup does not drop.

    ``score_fn(params) -> float`` (higher is better) must score held-out data, never the test
    set. ``scores``: the models' own scores when already known (saves one call per model).
    LoRA adapters: ``lora="fold"`` (with ``base``) folds them first and ``score_fn`` gets full
    trees; ``lora="adapters"`` soups adapters (`soup`'s adapter mode) and ``score_fn`` gets
    `LoRAAdapter` objects (the best model alone is returned as given).
    """
    mode = _lora_mode(models, lora, base, rank)
    _base_only_when_folding(mode, base, "greedy_soup")
    if mode == "fold":
        from embedjax import merge_lora

        return greedy_soup(merge_lora.fold_all(models, base, "greedy_soup"), score_fn, scores=scores)
    if mode == "adapters":
        from embedjax import merge_lora

        models = merge_lora.check_adapters(models)
        merge_lora.check_rank(rank, models)
        return _greedy(models, score_fn, scores, lambda ms: soup(ms, lora="adapters", rank=rank))
    models = _check_models(models)
    return _greedy(models, score_fn, scores, soup)


def _greedy(models, score_fn, scores, average) -> GreedySoup:
    if scores is None:
        scores = [float(score_fn(m)) for m in models]
    scores = _per_model(scores, len(models), "scores", 0.0)
    order = sorted(range(len(models)), key=lambda i: -scores[i])  # stable: ties keep the given order
    kept, best, params = [order[0]], scores[order[0]], models[order[0]]
    history = [best]
    for i in order[1:]:
        candidate = average([models[k] for k in kept + [i]])
        score = float(score_fn(candidate))
        if score >= best:
            kept, best, params = kept + [i], score, candidate
            history.append(score)
    return GreedySoup(params=params, kept=tuple(kept), scores=tuple(scores), soup_scores=tuple(history))


# ---------------------------------------------------------------- SLERP


@functools.partial(jax.jit, static_argnames=("count",))
def _slerp_leaf(a, b, t, threshold, count: int):
    dtype = _compute_dtype(a)
    rows = _slerp_rows(_rows(a.astype(dtype), count), _rows(b.astype(dtype), count), t, threshold)
    return _like(jnp.reshape(rows, jnp.shape(a)), a)


def _slerp_rows(a_gm, b_gm, t, threshold):
    """Row-wise SLERP of [G, M] tensors: the angle from the normalised rows, the coefficients
    applied to the raw rows; linear where |cos| > threshold or a row is all zeros."""
    na = jnp.linalg.norm(a_gm, axis=-1, keepdims=True)
    nb = jnp.linalg.norm(b_gm, axis=-1, keepdims=True)
    degenerate = (na == 0) | (nb == 0)
    cos = jnp.sum((a_gm / jnp.where(degenerate, 1, na)) * (b_gm / jnp.where(degenerate, 1, nb)), axis=-1,
                  keepdims=True)
    cos = jnp.clip(cos, -1.0, 1.0)
    linear = degenerate | (jnp.abs(cos) > threshold)
    omega = jnp.arccos(jnp.where(linear, 0.0, cos))
    sin_omega = jnp.where(linear, 1.0, jnp.sin(omega))
    # sin(x) / sin(x) is exactly 1 and sin(0) exactly 0, so t = 0 and t = 1 return a and b exactly.
    s0 = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin_omega)
    s1 = jnp.where(linear, t, jnp.sin(t * omega) / sin_omega)
    return s0 * a_gm + s1 * b_gm


def slerp(a: Tree, b: Tree, t: float, *, stacked=None, threshold: float = PARALLEL_THRESHOLD, lora: str | None = None,
          base: Tree = None, rank: int | None = None) -> Tree:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), per tensor.

    For each tensor, ``Omega = arccos(<a/|a|, b/|b|>)`` and the result is
    ``sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b``; where ``|cos Omega| >
    threshold`` (nearly parallel or anti-parallel) or a tensor is zero, ``(1-t) a + t b``. The
    endpoints are exact, and at t = 0.5 two equal-norm tensors give a tensor of the same norm.
    ``stacked``: see the module docstring.

    LoRA adapters as ``a`` / ``b``: ``lora="fold"`` (with ``base``) interpolates ``W + Delta``;
    ``lora="adapters"`` interpolates the per-layer deltas and re-factorises them by truncated SVD
    to ``rank`` (default the larger input rank; ``r_a + r_b`` is exact); see `embedjax.merge_lora`.
    """
    t = _check_fraction(t, "t", "SLERP interpolates between a (t=0) and b (t=1)")
    mode = _lora_mode([a, b], lora, base, rank)
    _base_only_when_folding(mode, base, "slerp")
    if mode is not None:
        from embedjax import merge_lora

        if mode == "fold":
            a, b = merge_lora.fold_all([a, b], base, "slerp")
            return slerp(a, b, t, stacked=stacked, threshold=threshold)
        merge_lora.refuse_stacked(stacked, "slerp")
        return merge_lora.slerp(a, b, t, rank=rank, threshold=threshold)
    _check_models([b], a)
    counts = _stacked_list(stacked, a)
    leaves_a, treedef = jax.tree_util.tree_flatten(a)
    leaves_b = treedef.flatten_up_to(b)
    t_, threshold_ = jnp.float32(t), jnp.float32(threshold)
    out = [_slerp_leaf(la, lb, t_, threshold_, count=count) for la, lb, count in zip(leaves_a, leaves_b, counts)]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------- TIES


def _top_fraction_mask(x_gm, k: int):
    """bool [G, M]: per row, the ``k`` entries of largest magnitude (equal magnitudes: the
    earlier position first)."""
    m = x_gm.shape[-1]
    if k >= m:
        return jnp.ones(x_gm.shape, bool)
    if k == 0:
        return jnp.zeros(x_gm.shape, bool)
    order = jnp.argsort(-jnp.abs(x_gm), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < k


def ties(base: Tree, models: Sequence[Tree], density: float, weights=None, *, scale: float = 1.0,
         stacked=None, lora: str | None = None, rank: int | None = None) -> Tree:
    """TIES merging: ``theta_0 + scale * merged``, per tensor.

    1. Trim: keep each task vector's ``density`` fraction of entries with the largest magnitude
       (``round-half-up(density * size)`` entries per tensor), zero the rest.
    2. Elect: per entry, the sign of ``sum_i w_i trimmed_i`` (a zero sum elects +).
    3. Disjoint mean: ``sum_i w_i trimmed_i m_i / sum_i w_i m_i`` over the models whose trimmed
       entry is non-zero with the elected sign (``m_i``); 0 where none agrees.

    ``weights``: one per model (default 1), non-negative. ``scale``: the paper's lambda on the
    merged task vector. ``stacked``: see the module docstring.

    LoRA adapters in ``models``: ``lora="fold"``, or ``lora="adapters"``: TIES on the per-layer
    deltas (the task vectors), re-factorised by truncated SVD to ``rank`` (default the largest input
    rank) with the truncation error reported; see `embedjax.merge_lora`.
    """
    density = _check_fraction(density, "density", "it is the fraction of each task vector's entries TIES keeps")
    mode = _lora_mode(models, lora, base, rank)
    if mode is not None:
        from embedjax import merge_lora

        if mode == "fold":
            return ties(base, merge_lora.fold_all(models, base, "ties"), density, weights, scale=scale, stacked=stacked)
        merge_lora.refuse_stacked(stacked, "ties")
        return merge_lora.ties(base, models, density, weights, scale=scale, rank=rank)
    models = _check_models(models, base)
    w = _soup_weights(weights, len(models))
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be finite")
    counts = _stacked_list(stacked, base)
    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    model_leaves = [treedef.flatten_up_to(m) for m in models]
    w_n, scale_ = jnp.asarray(w, jnp.float32), jnp.float32(scale)
    out = []
    for j, (b, count) in enumerate(zip(base_leaves, counts)):
        entries = int(np.prod(np.shape(b)[count:], dtype=np.int64))
        k = int(math.floor(density * entries + 0.5))  # round half up: density 0.5 of one entry keeps it
        out.append(_ties_leaf(b, tuple(leaves[j] for leaves in model_leaves), w_n, scale_, count=count, k=k))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("count", "k"))
def _ties_leaf(b, models, w_n, scale, count: int, k: int):
    dtype = _compute_dtype(b)
    xb = b.astype(dtype)
    trimmed = []
    for m in models:
        tau = _rows(m.astype(dtype) - xb, count)
        trimmed.append(jnp.where(_top_fraction_mask(tau, k), tau, 0.0))
    elected_positive = sum(w_n[i] * t for i, t in enumerate(trimmed)) >= 0
    numerator, denominator = jnp.zeros_like(trimmed[0]), jnp.zeros_like(trimmed[0])
    for i, t in enumerate(trimmed):
        agrees = jnp.where(elected_positive, t > 0, t < 0)
        numerator = numerator + jnp.where(agrees, w_n[i] * t, 0.0)
        denominator = denominator + jnp.where(agrees, w_n[i], 0.0)
    merged = jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return _like(xb + scale * jnp.reshape(merged, jnp.shape(xb)), b)


# ---------------------------------------------------------------- DARE


def drop_and_rescale(tau: Tree, p: float, key) -> Tree:
    """DARE's operator on one task vector: each entry is dropped with probability ``p`` and the
    survivors are multiplied by ``1 / (1 - p)`` (so the expectation is ``tau``); ``p = 1`` drops
    everything. ``key``: a `jax.random` key (each leaf draws from its own fold of it)."""
    p = _check_fraction(p, "p", "it is the probability that DARE drops a task-vector entry")
    leaves, treedef = jax.tree_util.tree_flatten(tau)
    if p == 0.0:
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    if p == 1.0:
        return jax.tree_util.tree_unflatten(treedef, [jnp.zeros_like(x) for x in leaves])
    p_ = jnp.float32(p)
    return jax.tree_util.tree_unflatten(treedef, [_drop_leaf(x, p_, jax.random.fold_in(key, i))
                                                  for i, x in enumerate(leaves)])


@jax.jit
def _drop_leaf(x, p, key):
    keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x))
    return jnp.where(keep, x / (1.0 - p).astype(x.dtype), 0.0).astype(x.dtype)


def dare(base: Tree, models: Sequence[Tree], p: float, seed: int, lambdas=1.0, *, lora: str | None = None,
         rank: int | None = None) -> Tree:
    """DARE + task arithmetic: ``theta_0 + sum_i lambda_i drop_and_rescale(tau_i, p)``.

    Model ``i`` draws its masks from ``fold_in(PRNGKey(seed), i)``: the same seed gives the same
    merge. With ``p = 0`` this is `task_arithmetic` exactly.

    LoRA adapters in ``models``: ``lora="fold"``, or ``lora="adapters"``: DARE drops entries of the
    per-layer deltas ``s A B`` (not of ``A`` or ``B``), then re-factorises by truncated SVD to
    ``rank`` (default the largest input rank); see `embedjax.merge_lora`.
    """
    p = _check_fraction(p, "p", "it is the probability that DARE drops a task-vector entry")
    mode = _lora_mode(models, lora, base, rank)
    if mode is not None:
        from embedjax import merge_lora

        if mode == "fold":
            return dare(base, merge_lora.fold_all(models, base, "dare"), p, seed, lambdas)
        return merge_lora.dare(base, models, p, seed, lambdas, rank=rank)
    models = _check_models(models, base)
    lams = _per_model(lambdas, len(models), "lambdas", 1.0)
    key = jax.random.PRNGKey(int(seed))
    taus = [drop_and_rescale(tau, p, jax.random.fold_in(key, i)) for i, tau in enumerate(task_vectors(base, models))]
    return _add_scaled(base, taus, lams)


# ---------------------------------------------------------------- Self Positioning


@dataclasses.dataclass(frozen=True)
class SelfPositioning:
    """`self_positioning`'s result: the merged params, the learned lambdas (one per model) and
    the probe loss (mean over tasks) at every step, before its update."""

    params: Tree
    lambdas: np.ndarray
    losses: np.ndarray


def self_positioning(base: Tree, models: Sequence[Tree], probe_batches: Sequence[Sequence[Any]],
                     loss_fn, *, steps: int = 100, learning_rate: float = 0.01, init=None,
                     momentum: float = 0.0, optimizer: str = "sgd", progress: bool = False, lora: str | None = None,
                     rank: int | None = None) -> SelfPositioning:
    """Learn one coefficient per task vector, the vectors frozen: minimise over ``lambdas`` the
    probe loss of ``theta_0 + sum_i lambda_i tau_i``.

    Args:
        probe_batches: one sequence of batches per probe task (any pytrees ``loss_fn`` takes).
            Each step takes the next batch of *every* task (cycling through each task's own
            list) and averages the task losses, so the probe set is balanced across tasks
            whatever their sizes.
        loss_fn: ``loss_fn(params, batch) -> scalar``, or one such function per probe task.
        steps: gradient steps. ``learning_rate``, ``momentum``: of ``optimizer`` ("sgd" or "adam").
        init: starting lambdas (default ``1 / len(models)`` each: the uniform soup's point).
        lora: with LoRA adapters in ``models``, ``"fold"`` (fold them into ``base``, learn, return a
            full tree) or ``"adapters"`` (the same lambdas, learned on the folded models, and
            ``params`` the exact adapter of ``sum_i lambda_i Delta_i``; with ``rank``, its SVD).
    """
    import optax

    mode = _lora_mode(models, lora, base, rank)
    if mode is not None:
        from embedjax import merge_lora

        def run(folded):
            return self_positioning(base, folded, probe_batches, loss_fn, steps=steps, learning_rate=learning_rate,
                                    init=init, momentum=momentum, optimizer=optimizer, progress=progress)

        if mode == "fold":
            return run(merge_lora.fold_all(models, base, "self_positioning"))
        return merge_lora.self_positioning(base, models, run, rank=rank)

    models = _check_models(models, base)
    n = len(models)
    if isinstance(probe_batches, dict) or not isinstance(probe_batches, Sequence) or not probe_batches:
        raise ValueError("probe_batches must be a non-empty list with one list of batches per probe task")
    for i, task in enumerate(probe_batches):
        if isinstance(task, dict) or not isinstance(task, Sequence) or len(task) == 0:
            raise ValueError(f"probe_batches[{i}] must be a non-empty list of batches (one list per probe task)")
    loss_fns = list(loss_fn) if isinstance(loss_fn, Sequence) else [loss_fn] * len(probe_batches)
    if len(loss_fns) != len(probe_batches) or not all(callable(f) for f in loss_fns):
        raise ValueError(f"loss_fn must be a callable or {len(probe_batches)} callables (one per probe task)")
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive int")
    if optimizer == "sgd":
        opt = optax.sgd(learning_rate, momentum=momentum or None)
    elif optimizer == "adam":
        opt = optax.adam(learning_rate)
    else:
        raise ValueError(f"optimizer={optimizer!r}: use 'sgd' or 'adam'")
    lams = jnp.asarray(_per_model(init, n, "init", 1.0 / n), jnp.float32)
    taus = task_vectors(base, models)

    def merged(lam_n, base_tree, tau_list):
        def leaf(b, *ts):
            out = jnp.asarray(b, _compute_dtype(b))
            for i, t in enumerate(ts):
                out = out + lam_n[i].astype(out.dtype) * t
            return _like(out, b)

        return jax.tree.map(leaf, base_tree, *tau_list)

    def probe_loss(lam_n, base_tree, tau_list, batches):
        params = merged(lam_n, base_tree, tau_list)
        return sum(f(params, batch) for f, batch in zip(loss_fns, batches)) / len(batches)

    value_and_grad = jax.jit(jax.value_and_grad(probe_loss))
    state = opt.init(lams)
    losses = []
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="self positioning", disable=not progress):
        batches = tuple(task[step % len(task)] for task in probe_batches)
        loss, grad = value_and_grad(lams, base, taus, batches)
        if not bool(jnp.isfinite(loss)):
            raise FloatingPointError(f"self positioning: the probe loss is {float(loss)} at step {step} "
                                     f"(lambdas {np.asarray(lams).tolist()}); lower learning_rate")
        losses.append(float(loss))
        updates, state = opt.update(grad, state, lams)
        lams = optax.apply_updates(lams, updates)
    lam_np = np.asarray(lams, dtype=np.float64)
    return SelfPositioning(params=_add_scaled(base, taus, lam_np.tolist()), lambdas=lam_np, losses=np.asarray(losses))
