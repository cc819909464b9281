"""embedjax.merge on plain parameter trees: each method against hand-computed values or a float64
NumPy reference, the properties the methods promise, and clear errors for bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import merge

# Awkward sizes (odd, prime, one-element, stacked) so no result can depend on a lucky shape.
SHAPES = {"layers": {"kernel": (3, 7, 5), "bias": (3, 5)}, "embed": (11, 6), "scalar_like": (1,)}
STACKED = {"layers": {"kernel": 1, "bias": 1}, "embed": 0, "scalar_like": 0}


def random_tree(seed, scale=1.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


def slerp_reference(a, b, t, threshold=0.9995):
    """float64 SLERP of two flat tensors (the formula, written out)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    omega = np.arccos(np.clip(cos, -1, 1))
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


# ---------------------------------------------------------------- SLERP


@pytest.mark.parametrize("stacked", [None, STACKED])
def test_slerp_endpoints_are_exact(stacked):
    a, b = random_tree(0), random_tree(1)
    assert_trees_equal(merge.slerp(a, b, 0.0, stacked=stacked), a)
    assert_trees_equal(merge.slerp(a, b, 1.0, stacked=stacked), b)
    assert_trees_equal(merge.slerp(a, b, 0, stacked=stacked), a)  # an int t is a number too


def test_slerp_keeps_the_norm_of_equal_norm_tensors_at_half():
    a, b = random_tree(2), random_tree(3)
    # Give every tensor of b the norm of a's: then the arc's midpoint has that norm too (a chord would
    # shrink it by cos(Omega / 2), ~0.7 for these nearly orthogonal random tensors).
    b = jax.tree.map(lambda x, y: y * (np.linalg.norm(x) / np.linalg.norm(y)), a, b)
    b["scalar_like"] = np.abs(b["scalar_like"]) * np.sign(a["scalar_like"])  # one entry: parallel, not opposite
    mid = merge.slerp(a, b, 0.5)
    chord = jax.tree.map(lambda x, y: 0.5 * (x + y), a, b)
    for x, m, c in zip(leaves(a), leaves(mid), leaves(chord)):
        np.testing.assert_allclose(np.linalg.norm(m), np.linalg.norm(x), rtol=1e-5)
        if x.size > 1:
            assert np.linalg.norm(c) < 0.95 * np.linalg.norm(x)


@pytest.mark.parametrize("t", [0.1, 0.37, 0.5, 0.9])
def test_slerp_matches_a_float64_reference_per_tensor_and_per_stacked_slice(t):
    a, b = random_tree(4), random_tree(5)
    whole = merge.slerp(a, b, t)
    sliced = merge.slerp(a, b, t, stacked=STACKED)
    for x, y, got in zip(leaves(a), leaves(b), leaves(whole)):
        np.testing.assert_allclose(got.ravel(), slerp_reference(x, y, t), rtol=2e-5, atol=2e-6)
    ka, kb, kgot = (np.asarray(tree["layers"]["kernel"]) for tree in (a, b, sliced))
    for layer in range(ka.shape[0]):  # each stacked layer is its own tensor, with its own angle
        np.testing.assert_allclose(kgot[layer].ravel(), slerp_reference(ka[layer], kb[layer], t), rtol=2e-5,
                                   atol=2e-6)
    assert not np.allclose(np.asarray(whole["layers"]["kernel"]), kgot)  # the two groupings differ


def test_slerp_falls_back_to_linear_for_nearly_parallel_and_zero_tensors():
    a = random_tree(6)
    rng = np.random.default_rng(7)
    b = jax.tree.map(lambda x: 2.0 * x + 1e-3 * rng.standard_normal(x.shape).astype(np.float32), a)  # |cos| > 0.9995
    b["scalar_like"] = -a["scalar_like"]  # anti-parallel: linear too
    a["embed"] = np.zeros_like(a["embed"])  # a zero tensor has no direction
    got = merge.slerp(a, b, 0.3)
    for x, y, m in zip(leaves(a), leaves(b), leaves(got)):
        np.testing.assert_allclose(m, 0.7 * x + 0.3 * y, rtol=1e-6, atol=1e-7)


def test_slerp_keeps_each_leaf_dtype():
    a = {"w": np.ones((4, 3), jnp.bfloat16), "v": np.arange(5, dtype=np.float16)}
    b = {"w": np.full((4, 3), 2, jnp.bfloat16), "v": -np.arange(5, dtype=np.float16) + 1}
    got = merge.slerp(a, b, 0.25)
    assert got["w"].dtype == jnp.bfloat16 and got["v"].dtype == np.float16
    np.testing.assert_allclose(np.asarray(got["w"], np.float32), 1.25)  # parallel: linear, in float32


# ---------------------------------------------------------------- TIES

# Three task vectors over a base of ones, computed by hand (density 0.5: 2 of 4 entries, 1 of 2).
TIES_BASE = {"a": np.ones(4, np.float32), "b": np.ones(2, np.float32), "c": np.ones(2, np.float32)}
TIES_TAUS = [
    {"a": [0.4, -1.0, 2.0, 0.1], "b": [1.0, 0.25], "c": [2.0, 1.0]},
    {"a": [-0.6, 0.5, -0.3, 0.9], "b": [-1.0, 0.5], "c": [4.0, -0.1]},
    {"a": [0.8, 0.7, -3.0, -0.2], "b": [0.1, -0.2], "c": [-1.0, 0.5]},
]


def ties_reference(base, models, density, weights=None):
    """float64 TIES of flat tensors, written out: trim, elect, disjoint mean."""
    b = np.asarray(base, np.float64).ravel()
    w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
    k = int(np.floor(density * b.size + 0.5))
    trimmed = []
    for m in models:
        tau = np.asarray(m, np.float64).ravel() - b
        keep = np.zeros(b.size, bool)
        keep[np.argsort(-np.abs(tau), kind="stable")[:k]] = True
        trimmed.append(np.where(keep, tau, 0.0))
    sign = np.where(sum(wi * t for wi, t in zip(w, trimmed)) >= 0, 1.0, -1.0)
    num, den = np.zeros(b.size), np.zeros(b.size)
    for wi, t in zip(w, trimmed):
        agree = np.sign(t) == sign
        num += np.where(agree, wi * t, 0.0)
        den += np.where(agree, wi, 0.0)
    return b + np.divide(num, den, out=np.zeros(b.size), where=den > 0)


def ties_models():
    return [jax.tree.map(lambda b, t: b + np.asarray(t, np.float32), TIES_BASE, tau) for tau in TIES_TAUS]


def test_ties_matches_a_hand_computed_three_task_example():
    # Trimmed (top half by magnitude):
    #   a: [0, -1, 2, 0], [-0.6, 0, 0, 0.9], [0.8, 0, -3, 0]
    #   b: [1, 0], [-1, 0], [0, -0.2]          c: [2, 0], [4, 0], [-1, 0]
    # Elected signs (sum of trimmed): a: +0.2, -1, -1, +0.9 -> [+, -, -, +]; b: 0 -> +, -0.2 -> -;
    # c: 5 -> +, 0 -> + (nothing to average).
    # Disjoint means: a: [0.8, -1, -3, 0.9]; b: [1 (only model 0 is +), -0.2]; c: [(2 + 4) / 2, 0].
    got = merge.ties(TIES_BASE, ties_models(), density=0.5)
    for name in TIES_BASE:  # the written-out reference agrees with the hand computation too
        np.testing.assert_allclose(got[name], ties_reference(TIES_BASE[name], [m[name] for m in ties_models()], 0.5),
                                   rtol=1e-6)
    np.testing.assert_allclose(got["a"], 1 + np.array([0.8, -1.0, -3.0, 0.9]), rtol=1e-6)
    np.testing.assert_allclose(got["b"], 1 + np.array([1.0, -0.2]), rtol=1e-6)
    np.testing.assert_allclose(got["c"], 1 + np.array([3.0, 0.0]), rtol=1e-6)


def test_ties_weights_change_the_election_and_the_mean():
    # Weights (1, 2, 1): a[0] sum = -1.2 + 0.8 < 0 -> '-', only model 1 agrees: -0.6;
    # b[0]: 1 - 2 + 0 < 0 -> '-': -1.0; c[0]: (1 * 2 + 2 * 4) / (1 + 2) = 10 / 3.
    got = merge.ties(TIES_BASE, ties_models(), density=0.5, weights=[1.0, 2.0, 1.0], scale=0.5)
    np.testing.assert_allclose(got["a"], 1 + 0.5 * np.array([-0.6, -1.0, -3.0, 0.9]), rtol=1e-6)
    np.testing.assert_allclose(got["b"], 1 + 0.5 * np.array([-1.0, -0.2]), rtol=1e-6)
    np.testing.assert_allclose(got["c"], 1 + 0.5 * np.array([10 / 3, 0.0]), rtol=1e-6)


def test_ties_without_trimming_or_conflict_is_the_mean_task_vector():
    base = random_tree(8)
    rng = np.random.default_rng(9)
    models = [jax.tree.map(lambda b: b + np.abs(rng.standard_normal(b.shape)).astype(np.float32), base)
              for _ in range(3)]  # all task-vector entries positive: every entry agrees
    assert_trees_close(merge.ties(base, models, density=1.0), merge.task_arithmetic(base, models, 1 / 3),
                       rtol=1e-5, atol=1e-6)
    assert_trees_equal(merge.ties(base, models, density=0.0), base)


def test_ties_trims_per_stacked_tensor():
    base = {"w": np.zeros((2, 4), np.float32)}
    model = {"w": np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], np.float32)}
    whole = merge.ties(base, [model], density=0.5)  # top 4 of 8 entries: all of the second row
    per_row = merge.ties(base, [model], density=0.5, stacked={"w": 1})  # top 2 of each row
    np.testing.assert_array_equal(whole["w"], [[0, 0, 0, 0], [10, 20, 30, 40]])
    np.testing.assert_array_equal(per_row["w"], [[0, 0, 3, 4], [0, 0, 30, 40]])


# ---------------------------------------------------------------- DARE


def test_dare_with_p_zero_is_the_identity():
    base, model = random_tree(10), random_tree(11)
    tau = merge.task_vectors(base, [model])[0]
    assert_trees_equal(merge.drop_and_rescale(tau, 0.0, jax.random.PRNGKey(3)), tau)
    assert_trees_equal(merge.dare(base, [model], p=0.0, seed=5), merge.task_arithmetic(base, [model]))
    assert_trees_close(merge.dare(base, [model], p=0.0, seed=5), model, rtol=1e-6, atol=1e-6)


def test_dare_mean_over_seeds_approaches_the_task_vector():
    shapes = {"w": (7, 5), "b": (3,)}  # few shapes: each one compiles the vmapped sampler once
    base, model = random_tree(12, shapes=shapes), random_tree(13, shapes=shapes)
    tau = jax.tree.map(np.asarray, merge.task_vectors(base, [model])[0])
    p, seeds = 0.7, 2000
    draws = jax.vmap(lambda key: merge.drop_and_rescale(tau, p, key))(jax.random.split(jax.random.PRNGKey(0), seeds))
    kept = sum(int(np.count_nonzero(x)) for x in leaves(draws))
    total = jax.tree.map(lambda x: np.asarray(x, np.float64).sum(0), draws)
    entries = sum(x.size for x in leaves(tau))
    assert abs(kept / (seeds * entries) - (1 - p)) < 0.01  # the drop rate is p
    for t, acc in zip(leaves(tau), leaves(total)):
        # Each draw is tau/(1-p) w.p. 1-p, else 0: std |tau| sqrt(p/(1-p)); the mean of 2,000 lies
        # within 5 standard errors of tau.
        bound = 5 * np.abs(t) * np.sqrt(p / (1 - p)) / np.sqrt(seeds) + 1e-7
        assert np.all(np.abs(acc / seeds - t) <= bound)
    one = [x[0] for x in leaves(draws)]
    assert max(np.max(np.abs(x - t)) for x, t in zip(one, leaves(tau))) > 0.5  # a single draw is far off
    assert_trees_equal(merge.dare(base, [model], 0.7, seed=4), merge.dare(base, [model], 0.7, seed=4))
    assert_trees_equal(merge.dare(base, [model], 1.0, seed=4), base)


# ---------------------------------------------------------------- soups and task arithmetic


def test_a_soup_of_identical_models_is_that_model():
    model = random_tree(14)
    assert_trees_equal(merge.soup([model, model, model]), model)
    assert_trees_equal(merge.soup([model] * 3, weights=[0.2, 0.3, 0.5]), model)


def test_soup_and_task_arithmetic_match_float64_references():
    base = random_tree(15)
    models = [random_tree(16 + i) for i in range(3)]
    w = np.array([1.0, 3.0, 0.5])
    lam = np.array([0.3, -0.2, 1.1])
    got_soup = merge.soup(models, weights=w)
    got_ta = merge.task_arithmetic(base, models, lam)
    for i, (s, t) in enumerate(zip(leaves(got_soup), leaves(got_ta))):
        ms = [leaves(m)[i].astype(np.float64) for m in models]
        b = leaves(base)[i].astype(np.float64)
        np.testing.assert_allclose(s, sum(wi * m for wi, m in zip(w, ms)) / w.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t, b + sum(li * (m - b) for li, m in zip(lam, ms)), rtol=1e-5, atol=1e-6)
    # With two models, the uniform soup is task arithmetic at lambda = 1/2.
    assert_trees_close(merge.soup(models[:2]), merge.task_arithmetic(base, models[:2], 0.5), rtol=1e-5, atol=1e-6)


def test_greedy_soup_adds_a_model_only_when_the_held_out_score_does_not_drop():
    # Score: closeness to a target; models 0 and 2 straddle it, model 1 is far off.
    target = random_tree(20)
    rng = np.random.default_rng(21)
    offset = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), target)
    models = [jax.tree.map(lambda t, o: t + o, target, offset),
              jax.tree.map(lambda t, o: t + 5 * o + 3, target, offset),
              jax.tree.map(lambda t, o: t - 1.2 * o, target, offset)]
    calls = []

    def score(params):
        calls.append(1)
        return -sum(float(np.sum((np.asarray(p) - np.asarray(t)) ** 2)) for p, t in zip(leaves(params), leaves(target)))

    result = merge.greedy_soup(models, score)
    assert result.kept == (0, 2)  # best first (model 0), model 2 improves the soup, model 1 would not
    assert_trees_close(result.params, merge.soup([models[0], models[2]]), rtol=0, atol=0)
    assert result.soup_scores[-1] > result.scores[0] and len(calls) == 3 + 2
    assert np.argmax(result.scores) == 0
    # Known scores skip the individual evaluations.
    calls.clear()
    again = merge.greedy_soup(models, score, scores=result.scores)
    assert again.kept == (0, 2) and len(calls) == 2


# ---------------------------------------------------------------- Self Positioning


def test_self_positioning_recovers_known_lambdas():
    # A linear model y = x @ W. The target is W* = W0 + 0.3 tau_1 + 0.8 tau_2; two probe tasks
    # (inputs from two different distributions, one twice the size of the other) both label with W*.
    rng = np.random.default_rng(22)
    base = {"w": rng.standard_normal((6, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    models = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(2)]
    truth = np.array([0.3, 0.8])
    target = merge.task_arithmetic(base, models, truth)

    def task(n_batches, shift):
        out = []
        for _ in range(n_batches):
            x = (rng.standard_normal((16, 6)) + shift).astype(np.float32)
            out.append({"x": x, "y": np.asarray(x @ target["w"] + target["b"])})
        return out

    def mse(params, batch):
        return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)

    result = merge.self_positioning(base, models, [task(4, 0.0), task(2, 1.5)], mse, steps=300, learning_rate=0.02,
                                    momentum=0.9)
    np.testing.assert_allclose(result.lambdas, truth, atol=2e-3)
    assert result.losses[0] > 100 * result.losses[-1]
    assert_trees_close(result.params, merge.task_arithmetic(base, models, result.lambdas), rtol=1e-6, atol=1e-6)


def test_self_positioning_takes_one_loss_per_task_and_balances_them():
    # Task 0 pulls lambda to 1, task 1 to 0 (its loss twice as steep): the balanced optimum of the
    # mean loss (lambda - 1)^2 + 2 lambda^2 is lambda = 1/3, whatever the number of batches per task.
    base = {"w": np.zeros(2, np.float32)}
    models = [{"w": np.ones(2, np.float32)}]
    losses = [lambda p, b: jnp.mean((p["w"] - b) ** 2), lambda p, b: 2 * jnp.mean((p["w"] - b) ** 2)]
    probe = [[np.ones(2, np.float32)] * 5, [np.zeros(2, np.float32)]]
    result = merge.self_positioning(base, models, probe, losses, steps=200, learning_rate=0.1, init=0.9)
    np.testing.assert_allclose(result.lambdas, [1 / 3], atol=1e-4)


# ---------------------------------------------------------------- per tensor = per checkpoint tensor


def test_stacked_axes_merge_a_scanned_model_as_its_per_layer_checkpoint():
    """SLERP and TIES on the scanned tree with ``stacked_axes`` give, tensor for tensor, what the
    per-layer transformers checkpoint merged per tensor gives."""
    from embedjax.convert.hf import tensors_from_params
    from embedjax.models.towers.bert import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12,
                        max_position_embeddings=16)
    model = BertModel(config)
    tokens = {"input_ids": jnp.ones((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32),
              "token_type_ids": jnp.zeros((1, 4), jnp.int32)}
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    stacked = merge.stacked_axes(boxed)
    assert stacked["layers"]["mlp"]["mlp_in"]["kernel"] == 1 and stacked["word_embeddings"]["embedding"] == 0
    shapes = jax.tree.map(lambda x: tuple(x.shape), jax.tree.map(lambda x: x.value, boxed,
                                                                  is_leaf=lambda x: hasattr(x, "names")))
    base, a, b = (random_tree(30 + i, shapes=shapes) for i in range(3))

    def hf(tree):
        return tensors_from_params(jax.tree.map(np.asarray, tree), config)

    got = hf(merge.slerp(a, b, 0.4, stacked=stacked))
    ha, hb = hf(a), hf(b)
    assert any(name.startswith("encoder.layer.1.") for name in got)
    for name, tensor in got.items():
        np.testing.assert_allclose(tensor.ravel(), slerp_reference(ha[name], hb[name], 0.4), rtol=2e-5, atol=2e-6,
                                   err_msg=name)
    got = hf(merge.ties(base, [a, b], density=0.3, weights=[1.0, 2.0], stacked=stacked))
    hbase = hf(base)
    for name, tensor in got.items():
        np.testing.assert_allclose(tensor.ravel(), ties_reference(hbase[name], [ha[name], hb[name]], 0.3, [1.0, 2.0]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- bad input


def test_trees_that_differ_are_named_at_the_first_mismatching_path():
    a = random_tree(40)
    missing = random_tree(41)
    del missing["layers"]["bias"]
    with pytest.raises(ValueError, match=r"models\[1\] has no parameter \['layers'\]\['bias'\], which base has"):
        merge.task_arithmetic(a, [random_tree(42), missing])
    extra = random_tree(43)
    extra["layers"]["zz"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"models\[0\] has a parameter \['layers'\]\['zz'\] that base lacks"):
        merge.ties(a, [extra], density=0.5)
    wide = random_tree(44, shapes={**SHAPES, "embed": (11, 7)})
    with pytest.raises(ValueError, match=r"models\[1\]\['embed'\] has shape \(11, 7\) but models\[0\]\['embed'\] "
                                         r"has \(11, 6\)"):
        merge.soup([a, wide])
    with pytest.raises(ValueError, match=r"models\[0\]\['embed'\] has shape"):
        merge.slerp(a, wide, 0.5)
    with pytest.raises(ValueError, match="non-empty list"):
        merge.soup([])
    with pytest.raises(ValueError, match="only floating-point"):
        merge.soup([{"step": np.arange(3)}])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_fractions_outside_zero_one_are_refused(bad):
    base, model = random_tree(50), random_tree(51)
    with pytest.raises(ValueError, match=r"density=.* is not a number in \[0, 1\]"):
        merge.ties(base, [model], density=bad)
    with pytest.raises(ValueError, match=r"p=.* is not a number in \[0, 1\]"):
        merge.dare(base, [model], p=bad, seed=0)
    with pytest.raises(ValueError, match=r"t=.* is not a number in \[0, 1\]: SLERP interpolates"):
        merge.slerp(base, model, bad)


def test_wrong_weight_and_lambda_counts_are_refused():
    base, model = random_tree(52), random_tree(53)
    with pytest.raises(ValueError, match="lambdas has 3 values for 2 models"):
        merge.task_arithmetic(base, [model, model], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights=.* non-negative with a positive sum"):
        merge.soup([base, model], weights=[1.0, -2.0])
    with pytest.raises(ValueError, match="stacked=3 at \\['embed'\\] is not between 0 and the leaf's 2 axes"):
        merge.slerp(base, model, 0.5, stacked={**STACKED, "embed": 3})
    with pytest.raises(ValueError, match="one list of batches per probe task"):
        merge.self_positioning(base, [model], [], lambda p, b: 0.0)
