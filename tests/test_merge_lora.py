"""Every merge method on LoRA adapters (embedjax.merge_lora): fold mode is the by-hand fold then
merge; adapter mode is exact for linear merges (rank concatenation) and a truncated SVD with the
stated error for SLERP / TIES / DARE.

Trees are small and synthetic (a stacked q kernel [layers, in, heads, head_dim], a stacked o
kernel with two input axes, an unstacked kernel): seconds. Tolerances: fold-mode merges run the
same operations as the by-hand ones, so they are compared bit for bit; adapter-mode deltas vs
full-tree merges differ by float32 rounding of ``W + Delta - W`` (|W| ~ 3, eps 1.2e-7: 1e-5
absolute) and of the SVD (1e-5 relative to the largest entry).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import merge
from embedjax.merge_lora import LoRAAdapter, check_adapters, nest_paths as _nest
from embedjax.models.lora import LoRAConfig, adapter_leaves

LAYERS = 2
# module path -> (kernel shape, number of leading layer axes, input axes)
KERNELS = {("layers", "attention", "q"): ((LAYERS, 12, 2, 5), 1, 1),
           ("layers", "attention", "o"): ((LAYERS, 2, 5, 12), 1, 2),
           ("out",): ((12, 7), 0, 1)}


def base_tree(seed=0):
    rng = np.random.default_rng(seed)
    flat = {path + ("kernel",): rng.standard_normal(shape).astype(np.float32) for path, (shape, _, _) in KERNELS.items()}
    flat[("layers", "norm", "scale")] = rng.standard_normal((LAYERS, 12)).astype(np.float32)
    return {"backbone": _nest(flat), "head": {"dense": {"kernel": rng.standard_normal((12, 4)).astype(np.float32)}}}


def make_adapter(seed, rank=3, alpha=6.0, modules=tuple(KERNELS), base_model="tiny-base"):
    rng = np.random.default_rng(100 + seed)
    flat = {}
    for path in modules:
        shape, lead, n_in_axes = KERNELS[path]
        n_in = math.prod(shape[lead:lead + n_in_axes])
        n_out = math.prod(shape[lead + n_in_axes:])
        flat[path] = {"a": (rng.standard_normal((*shape[:lead], n_in, rank)) / math.sqrt(n_in)).astype(np.float32),
                      "b": (0.3 * rng.standard_normal((*shape[:lead], rank, n_out))).astype(np.float32)}
    return LoRAAdapter(_nest(flat), LoRAConfig(rank=rank, alpha=alpha), base_model)


def fold_by_hand(base, adapter):
    """W + (alpha / r) A B per module, in float64, then float32 (an independent twin of the fold)."""
    out = jax.tree.map(np.asarray, base)
    for path, a, b in adapter_leaves(adapter.params):
        node = out["backbone"]
        for key in path:
            node = node[key]
        product = np.einsum("...ir,...ro->...io", np.float64(a), np.float64(b)) * adapter.config.scale
        node["kernel"] = (np.float64(node["kernel"]) + product.reshape(node["kernel"].shape)).astype(np.float32)
    return out


def reference_deltas(adapter, coefficient=1.0):
    return {path: coefficient * adapter.config.scale * np.einsum("...ir,...ro->...io", np.float64(a), np.float64(b))
            for path, a, b in adapter_leaves(adapter.params)}


def full_tree_delta(merged, base):
    """{module path: merged kernel - base kernel, as [*lead, in, out]} for every adapted module."""
    out = {}
    for path, (shape, lead, n_in_axes) in KERNELS.items():
        node_m, node_b = merged["backbone"], base["backbone"]
        for key in path:
            node_m, node_b = node_m[key], node_b[key]
        diff = np.float64(node_m["kernel"]) - np.float64(node_b["kernel"])
        out[path] = diff.reshape(*shape[:lead], math.prod(shape[lead:lead + n_in_axes]), -1)
    return out


def assert_deltas_close(got, want, *, atol):
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_allclose(np.asarray(got[path], np.float64), want[path], atol=atol, rtol=0, err_msg=str(path))


def fine_tune(base, seed):
    rng = np.random.default_rng(200 + seed)
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(np.shape(x)).astype(np.float32), base)


# ---------------------------------------------------------------- fold mode


FOLD_CASES = {
    "soup": lambda base, ms, **kw: merge.soup(ms, [1.0, 2.0, 0.5][:len(ms)], **({"base": base} if kw else {}), **kw),
    "task_arithmetic": lambda base, ms, **kw: merge.task_arithmetic(base, ms, [0.7, 1.3, 0.4][:len(ms)], **kw),
    "slerp": lambda base, ms, **kw: merge.slerp(ms[0], ms[1], 0.3, stacked=1, **({"base": base} if kw else {}), **kw),
    "ties": lambda base, ms, **kw: merge.ties(base, ms, 0.4, [1.0, 2.0, 1.0][:len(ms)], scale=1.2, stacked=1, **kw),
    "dare": lambda base, ms, **kw: merge.dare(base, ms, 0.5, 3, 0.8, **kw),
}


@pytest.mark.parametrize("method", sorted(FOLD_CASES))
def test_fold_mode_equals_merging_the_trees_folded_by_hand(method):
    base = base_tree()
    # two adapters of different modules and ranks, and a full fine-tune (SLERP takes two models)
    models = [make_adapter(1), make_adapter(2, rank=5, alpha=4.0, modules=(("out",), ("layers", "attention", "q"))),
              fine_tune(base, 3)]
    if method == "slerp":
        models = [models[0], models[2]]
    got = FOLD_CASES[method](base, models, lora="fold")
    by_hand = FOLD_CASES[method](base, [fold_by_hand(base, m) if isinstance(m, LoRAAdapter) else m for m in models])
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got["head"]["dense"]["kernel"], by_hand["head"]["dense"]["kernel"])
    assert jax.tree.structure(got) == jax.tree.structure(base)


def test_fold_mode_of_greedy_soup_and_self_positioning():
    base = base_tree()
    models = [make_adapter(1), make_adapter(2, rank=4)]
    folded = [fold_by_hand(base, m) for m in models]
    target = np.asarray(folded[1]["backbone"]["out"]["kernel"])

    def score(params):  # held-out stand-in: closeness of one kernel to model 1's
        return -float(np.sum((np.asarray(params["backbone"]["out"]["kernel"]) - target) ** 2))

    got = merge.greedy_soup(models, score, lora="fold", base=base)
    want = merge.greedy_soup(folded, score)
    assert got.kept == want.kept == (1,)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)

    def loss(params, batch):
        return jnp.sum((params["backbone"]["out"]["kernel"] - batch) ** 2)

    probe = [[jnp.asarray(target)]]
    sp = merge.self_positioning(base, models, probe, loss, steps=5, learning_rate=0.01, lora="fold")
    sp_hand = merge.self_positioning(base, folded, probe, loss, steps=5, learning_rate=0.01)
    np.testing.assert_allclose(sp.lambdas, sp_hand.lambdas, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- adapter mode, linear: exact


def test_adapter_mode_soup_and_task_arithmetic_are_exact_rank_concatenations():
    base = base_tree()
    models = [make_adapter(1, rank=3, alpha=6.0), make_adapter(2, rank=5, alpha=4.0)]
    for got, fold, coefficients in (
            (merge.soup(models, [1.0, 3.0], lora="adapters"), merge.soup(models, [1.0, 3.0], lora="fold", base=base),
             [0.25, 0.75]),
            (merge.task_arithmetic(base, models, [0.7, -1.4], lora="adapters"),
             merge.task_arithmetic(base, models, [0.7, -1.4], lora="fold"), [0.7, -1.4])):
        assert isinstance(got, LoRAAdapter) and got.truncation_error is None
        assert got.config.rank == 8 and got.config.scale == 1.0 and got.base_model == "tiny-base"
        # the adapter's delta is the full-tree merge's delta (float32 rounding of W + Delta - W) ...
        assert_deltas_close(got.deltas(), full_tree_delta(fold, base), atol=1e-5)
        # ... and the float64 sum_i c_i s_i A_i B_i to float32 rounding of the factors
        want = {p: sum(reference_deltas(m, c)[p] for m, c in zip(models, coefficients)) for p in KERNELS}
        assert_deltas_close(got.deltas(), want, atol=2e-6)


def test_adapter_mode_greedy_soup_and_self_positioning_give_adapters():
    base = base_tree()
    models = [make_adapter(1), make_adapter(2, rank=4)]
    target = reference_deltas(models[1])[("out",)]

    def score(adapter):  # score_fn gets adapters in adapter mode
        assert isinstance(adapter, LoRAAdapter)
        return -float(np.sum((np.asarray(adapter.deltas()[("out",)]) - target) ** 2))

    greedy = merge.greedy_soup(models, score, lora="adapters")
    assert greedy.kept == (1,) and greedy.params is models[1]

    def loss(params, batch):
        return jnp.sum((params["backbone"]["out"]["kernel"] - batch) ** 2)

    probe = [[jnp.asarray(fold_by_hand(base, models[1])["backbone"]["out"]["kernel"])]]
    sp = merge.self_positioning(base, models, probe, loss, steps=5, learning_rate=0.01, lora="adapters")
    sp_fold = merge.self_positioning(base, models, probe, loss, steps=5, learning_rate=0.01, lora="fold")
    np.testing.assert_allclose(sp.lambdas, sp_fold.lambdas, rtol=1e-5)
    assert isinstance(sp.params, LoRAAdapter) and sp.params.config.rank == 7
    want = {p: sum(reference_deltas(m, lam)[p] for m, lam in zip(models, sp.lambdas)) for p in KERNELS}
    assert_deltas_close(sp.params.deltas(), want, atol=2e-6)


# ---------------------------------------------------------------- adapter mode, non-linear: SVD


def _merged_delta_reference(method, models):
    """The method on the adapters' per-layer deltas as full trees (float32, the same `merge` code),
    as {path: [*lead, in, out]}."""
    deltas = [_nest(m.deltas()) for m in models]
    stacked = _nest({p: KERNELS[p][1] for p in models[0].deltas()})
    zero = jax.tree.map(jnp.zeros_like, deltas[0])
    if method == "ties":
        tree = merge.ties(zero, deltas, 0.3, [1.0, 2.0], scale=1.5, stacked=stacked)
    elif method == "dare":
        tree = merge.dare(zero, deltas, 0.6, 7, [0.9, 1.1])
    else:
        tree = merge.slerp(deltas[0], deltas[1], 0.35, stacked=stacked)
    flat = {}
    for path in models[0].deltas():
        node = tree
        for key in path:
            node = node[key]
        flat[path] = np.asarray(node, np.float64)
    return flat


def _svd_merge(method, models, rank):
    if method == "ties":
        return merge.ties(None, models, 0.3, [1.0, 2.0], scale=1.5, lora="adapters", rank=rank)
    if method == "dare":
        return merge.dare(None, models, 0.6, 7, [0.9, 1.1], lora="adapters", rank=rank)
    return merge.slerp(models[0], models[1], 0.35, lora="adapters", rank=rank)


@pytest.mark.parametrize("method", ["ties", "dare", "slerp"])
def test_svd_refactorisation_is_exact_at_full_rank_and_has_the_stated_error_below(method):
    # full rank: q (12 x 10) and o (10 x 12) deltas have rank <= 10, and rank 10 keeps every singular value
    attention = (("layers", "attention", "q"), ("layers", "attention", "o"))
    pair = [make_adapter(1, rank=3, alpha=6.0, modules=attention), make_adapter(2, rank=3, alpha=3.0, modules=attention)]
    want = _merged_delta_reference(method, pair)
    full = _svd_merge(method, pair, rank=10)
    scale = max(float(np.max(np.abs(d))) for d in want.values())
    assert_deltas_close(full.deltas(), want, atol=1e-5 * scale)
    assert max(full.truncation_error.values()) < 1e-6

    models = [make_adapter(1, rank=3, alpha=6.0), make_adapter(2, rank=3, alpha=3.0)]
    want = _merged_delta_reference(method, models)
    scale = max(float(np.max(np.abs(d))) for d in want.values())
    # default rank: the largest input rank (peft's default)
    assert _svd_merge(method, models, rank=None).config.rank == 3

    low = _svd_merge(method, models, rank=2)
    assert low.config.rank == 2 and low.config.scale == 1.0
    got = low.deltas()
    for path, delta in want.items():
        s = np.linalg.svd(delta, compute_uv=False)  # float64 singular values per layer
        stated = math.sqrt(np.sum(s[..., 2:] ** 2) / np.sum(s ** 2))
        actual = np.linalg.norm(np.asarray(got[path], np.float64) - delta) / np.linalg.norm(delta)
        name = "/".join(path)
        assert low.truncation_error[name] == pytest.approx(stated, abs=1e-5), name
        assert actual == pytest.approx(stated, abs=1e-5), name
        assert stated > 1e-3  # the truncation really drops something
    if method == "slerp":  # a per-tensor linear combination of two rank-3 deltas: rank 6 is exact
        six = _svd_merge(method, models, rank=6)
        assert max(six.truncation_error.values()) < 1e-6
        assert_deltas_close(six.deltas(), want, atol=1e-5 * scale)


# ---------------------------------------------------------------- errors


def test_bad_lora_merges_are_clear_errors():
    base = base_tree()
    a, b = make_adapter(1), make_adapter(2)
    with pytest.raises(ValueError, match=r"models\[0\] is a LoRAAdapter: pass lora='fold'"):
        merge.soup([a, b])
    with pytest.raises(ValueError, match=r"lora='merge': use 'fold'"):
        merge.soup([a, b], lora="merge")
    with pytest.raises(ValueError, match=r"no model is a LoRAAdapter"):
        merge.soup([base, base], lora="fold")
    with pytest.raises(ValueError, match=r"soup\(\.\.\., lora='fold'\) needs base="):
        merge.soup([a, b], lora="fold")
    with pytest.raises(ValueError, match=r"models\[1\] is a full parameter tree, but lora='adapters'"):
        merge.task_arithmetic(base, [a, fine_tune(base, 1)], lora="adapters")
    with pytest.raises(ValueError, match=r"base is a LoRAAdapter"):
        merge.ties(a, [a, b], 0.2, lora="adapters")
    # different base models: by name, and by shape
    other = LoRAAdapter(b.params, b.config, "another-base")
    with pytest.raises(ValueError, match=r"models\[1\] was trained on base model 'another-base' but models\[0\] on "
                                         r"'tiny-base': adapters of different base models"):
        merge.soup([a, other], lora="adapters")
    wide = jax.tree.map(lambda x: np.concatenate([x, x], axis=-1) if x.shape[-1] == 7 else x, dict(b.params))
    with pytest.raises(ValueError, match=r"models\[1\] at out has delta shape \(12, 14\) but models\[0\] has \(12, 7\): "
                                         r"adapters of different base models"):
        merge.soup([a, LoRAAdapter(wide, b.config)], lora="adapters")
    with pytest.raises(ValueError, match=r"models\[1\] at out: delta \[12, 14\] does not fit base's kernel \(12, 7\): "
                                         r"the adapter was made for another base model"):
        merge.soup([a, LoRAAdapter(wide, b.config)], lora="fold", base=base)
    # ranks that cannot be met
    for rank, message in ((8, r"rank=8 cannot be met: out's delta is 12 x 7, so its rank is at most 7; choose rank "
                               r"<= 7"), (0, r"rank=0 must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            merge.ties(base, [a, b], 0.2, lora="adapters", rank=rank)
    with pytest.raises(ValueError, match=r"rank= applies to lora='adapters' only"):
        merge.dare(base, [a, b], 0.5, 0, lora="fold", rank=2)
    # target modules that differ
    q_only = make_adapter(3, modules=(("layers", "attention", "q"), ("out",)))
    with pytest.raises(ValueError, match=r"models\[1\]'s target modules differ from models\[0\]'s \(it lacks "
                                         r"\['layers/attention/o'\], which models\[0\] adapts\)"):
        merge.task_arithmetic(base, [a, q_only], lora="adapters")
    with pytest.raises(ValueError, match=r"does not take stacked="):
        merge.slerp(a, b, 0.5, stacked=1, lora="adapters")
    assert check_adapters([a, b], base) == [a, b]
