"""Name-map tables between transformers checkpoints and embedjax param trees.

Each family writes one table: a list of `TensorRule` rows, each naming the HF tensor, the path of
the Flax leaf, the layout change between them, the HF shape the config implies (data, so a
mismatch can be reported without guessing), and for per-layer tensors the layer index into the
leaf's leading (scanned) ``layers`` axis. Import checks the whole table against the file and
reports every missing, unexpected and mis-shaped tensor at once; export walks the same rows
backwards, so the two directions cannot disagree.

Layouts (HF stores a Linear weight as [out, in]):

- ``copy``: same shape.
- ``transpose``: [out, in] -> Flax Dense [in, out].
- ``heads_in``: [heads * head_dim, d] -> DenseGeneral [d, heads, head_dim] (q, k, v kernels).
- ``heads_bias``: [heads * head_dim] -> [heads, head_dim].
- ``heads_out``: [d, heads * head_dim] -> DenseGeneral [heads, head_dim, d] (output projection).
- ``conv``: a torch Conv2d weight [out, in, kh, kw] -> Flax Conv [kh, kw, in, out] (patch embeddings).
- ``squeeze``: leading singleton axes dropped ([1, 1, d] -> [d], [1] -> []: ViT's class token,
  SigLIP's logit scale); export restores ``hf_shape``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

LAYOUTS = ("copy", "transpose", "heads_in", "heads_bias", "heads_out", "conv", "squeeze")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One row of a name map."""

    hf_name: str
    flax_path: tuple[str, ...]
    layout: str
    hf_shape: tuple[int, ...]
    layer: int | None = None  # index into the leaf's leading layers axis; None: an unstacked leaf
    heads: int | None = None  # for the heads_* layouts

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r} in rule for {self.hf_name}; use one of {LAYOUTS}")
        if self.layout.startswith("heads") and not self.heads:
            raise ValueError(f"rule for {self.hf_name}: layout {self.layout!r} needs heads")


def to_flax(array: np.ndarray, rule: TensorRule) -> np.ndarray:
    """HF layout -> Flax layout of one tensor."""
    if rule.layout == "copy":
        return array
    if rule.layout == "transpose":
        return array.T
    if rule.layout == "conv":
        return array.transpose(2, 3, 1, 0)
    if rule.layout == "squeeze":
        while array.ndim and array.shape[0] == 1:
            array = array[0]
        return array
    h = rule.heads
    if rule.layout == "heads_in":
        out, d = array.shape
        return array.T.reshape(d, h, out // h)
    if rule.layout == "heads_bias":
        return array.reshape(h, -1)
    d, inner = array.shape  # heads_out
    return array.T.reshape(h, inner // h, d)


def to_hf(array: np.ndarray, rule: TensorRule) -> np.ndarray:
    """Flax layout -> HF layout of one tensor (the inverse of `to_flax`)."""
    if rule.layout == "copy":
        return array
    if rule.layout == "transpose":
        return array.T
    if rule.layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if rule.layout == "squeeze":
        return array.reshape(rule.hf_shape)
    if rule.layout == "heads_in":
        d, h, k = array.shape
        return array.reshape(d, h * k).T
    if rule.layout == "heads_bias":
        return array.reshape(-1)
    h, k, d = array.shape  # heads_out
    return array.reshape(h * k, d).T


def strip_prefixes(tensors: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """Drop a task model's prefix (``bert.``, ``model.``) from every name that has one."""
    out = {}
    for name, value in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


def mismatch_report(rules: Sequence[TensorRule], shapes: Mapping[str, tuple[int, ...]],
                    ignored: Iterable[str] = ()) -> list[str]:
    """Every problem between a table and a checkpoint's tensor shapes, as report lines (empty: all
    good). ``ignored``: regexes (matched at the start) of tensors the model does not use."""
    expected = {r.hf_name for r in rules}
    skip = re.compile("|".join(f"(?:{p})" for p in ignored)) if ignored else None
    missing = [r.hf_name for r in rules if r.hf_name not in shapes]
    unexpected = sorted(n for n in shapes if n not in expected and not (skip and skip.match(n)))
    misshaped = [f"{r.hf_name}: file {tuple(shapes[r.hf_name])} vs config {r.hf_shape}"
                 for r in rules if r.hf_name in shapes and tuple(shapes[r.hf_name]) != r.hf_shape]
    lines = []
    if missing:
        lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}): {'; '.join(misshaped)}")
    return lines


def params_from_tensors(tensors: Mapping[str, np.ndarray], rules: Sequence[TensorRule], *,
                        source: str = "checkpoint", family: str = "model",
                        ignored: Iterable[str] = (), dtype=np.float32) -> dict:
    """The Flax params tree from HF-named tensors; every problem is reported at once (ValueError)."""
    problems = mismatch_report(rules, {n: tuple(a.shape) for n, a in tensors.items()}, ignored)
    if problems:
        raise ValueError("\n".join([f"{source} does not match the {family} config:", *problems]))
    leaves: dict[tuple[str, ...], Any] = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for rule in rules:
        value = np.asarray(to_flax(np.asarray(tensors[rule.hf_name]), rule), dtype=dtype)
        if rule.layer is None:
            leaves[rule.flax_path] = value
        else:
            stacked.setdefault(rule.flax_path, {})[rule.layer] = value
    for path, by_layer in stacked.items():
        leaves[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
    params: dict[str, Any] = {}
    for path, value in leaves.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def tensors_from_params(params, rules: Sequence[TensorRule], dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named tensors from a Flax params tree (numpy or JAX leaves), ``dtype`` on disk."""
    out = {}
    for rule in rules:
        node = params
        for key in rule.flax_path:
            node = node[key]
        array = np.asarray(node)
        if rule.layer is not None:
            array = array[rule.layer]
        out[rule.hf_name] = np.ascontiguousarray(to_hf(array, rule).astype(dtype))
    return out
