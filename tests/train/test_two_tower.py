"""Two-tower training: ring = dense for the CLIP and SigLIP losses on 8 fake devices (values and
gradients, the logit scale and bias included), GradCache per tower = plain autodiff, LiT locking,
the scale clamp, and a few real optimisation steps.

Tolerances: float32; ring and GradCache reorder sums and round sub-batched matmuls differently:
loss values agree to ~1e-7, gradient leaves to ~1e-6 relative, up to ~4e-5 of a leaf's largest
entry for near-zero entries (observed: SigLIP MAP-head in_proj). rtol 2e-5 plus an absolute
1e-4 x the leaf's largest entry (at least 1e-7) leaves room without hiding a wrong term (those are O(1) off).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses.two_tower import clip_loss, logit_scale, siglip_loss
from embedjax.models.registry import get_family
from embedjax.models.towers.text import TextSpec
from embedjax.models.towers.vision import VisionSpec
from embedjax.train import two_tower as tt

TOL = dict(rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def _features(seed, b=16, d=7):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(b, d)), jnp.float32), jnp.asarray(rng.normal(size=(b, d)) * 2, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas"])  # the ring's tiles: XLA loops or the fused kernels
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_ring_equals_dense_in_value_and_gradients(mesh, loss, impl):
    text, image = _features(0)
    log_scale, bias = jnp.float32(math.log(12.0)), jnp.float32(-2.5)

    def f(t, v, s, b, ring):
        kwargs = {"mesh": mesh, "impl": impl} if ring else {}
        if loss == "clip":
            return clip_loss(t, v, s, **kwargs) + 0.0 * b
        return siglip_loss(t, v, s, b, **kwargs)

    def value_and_grads(ring):  # jitted: eagerly, every op of the ring's tile loops compiles on its own
        return jax.jit(jax.value_and_grad(lambda *a: f(*a, ring), argnums=(0, 1, 2, 3)))(text, image, log_scale, bias)

    dense, dense_grads = value_and_grads(False)
    ring, ring_grads = value_and_grads(True)
    np.testing.assert_allclose(ring, dense, **TOL)
    for name, g_ring, g_dense in zip(["text", "image", "log_scale", "bias"], ring_grads, dense_grads):
        np.testing.assert_allclose(g_ring, g_dense, **TOL, err_msg=name)
    assert abs(float(dense_grads[2])) > 1e-3  # the scale's gradient is live (not clamped away)
    if loss == "siglip":
        assert abs(float(dense_grads[3])) > 1e-3


def test_losses_match_numpy_formulas():
    text, image = _features(1, b=5, d=3)
    t = np.asarray(text, np.float64) / np.linalg.norm(text, axis=1, keepdims=True)
    v = np.asarray(image, np.float64) / np.linalg.norm(image, axis=1, keepdims=True)
    logits = 7.0 * t @ v.T

    def ce(x):
        return np.mean(np.log(np.exp(x).sum(1)) - np.diag(x))

    np.testing.assert_allclose(clip_loss(text, image, math.log(7.0)), (ce(logits) + ce(logits.T)) / 2, rtol=1e-6)
    z = 2 * np.eye(5) - 1
    want = np.sum(np.log1p(np.exp(-z * (logits - 1.5)))) / 5
    np.testing.assert_allclose(siglip_loss(text, image, math.log(7.0), -1.5), want, rtol=1e-6)


def test_scale_clamp_caps_the_scale_and_stops_its_gradient():
    text, image = _features(2, b=6)
    above = jnp.float32(math.log(150.0))
    np.testing.assert_allclose(clip_loss(text, image, above), clip_loss(text, image, math.log(100.0)), rtol=1e-6)
    assert float(jax.grad(lambda s: clip_loss(text, image, s))(above)) == 0.0
    np.testing.assert_allclose(logit_scale(above, 200.0), 150.0, rtol=1e-6)
    assert float(jax.grad(lambda s: clip_loss(text, image, s, max_scale=200.0))(above)) != 0.0


@functools.cache
def _tiny_dual(family_name):
    """A 1-layer dual encoder of ``family_name`` and its split params, built once per family: the
    tests never change them (jax arrays are immutable), and jitting ``init`` is one compile where
    running it op by op cost ~10 s."""
    family = get_family(family_name)
    siglip = family_name == "siglip"
    text = TextSpec(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                    max_position_embeddings=8, activation="gelu_tanh" if siglip else "quick_gelu",
                    mask="bidirectional" if siglip else "causal", pooling="last" if siglip else "eos",
                    eos_token_id=49, attend_padding=siglip)
    vision = VisionSpec(hidden_size=12, num_layers=1, num_heads=2, intermediate_size=20, image_size=(8, 12),
                        patch_size=4, pooling="map" if siglip else "cls", class_token=not siglip,
                        patch_bias=siglip, pre_norm=not siglip)
    config = family.config_from_fields(text=text, vision=vision, projection_dim=12)
    model = family.build(config)
    from flax.linen import meta

    params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **family.example_inputs(config))["params"])
    return model, tt.split_dual_params(params)


def _batch(b=8, seed=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 48, (b, 8)).astype(np.int32)
    ids[np.arange(b), rng.integers(2, 8, b)] = 49  # an EOS somewhere in each row
    return {"tokens": {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, 8), jnp.int32)},
            "pixels": jnp.asarray(rng.normal(size=(b, 8, 12, 3)), jnp.float32)}


def _assert_trees_close(a, b):
    """Leaf by leaf, with the absolute tolerance scaled by the leaf's largest entry: sub-batched and
    sharded matmuls round differently (~1e-7 relative), which near-zero entries cannot absorb."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        # Floor 1e-7: a leaf whose true gradient is zero (attention key biases: softmax ignores a shift
        # shared by all keys) holds rounding noise of ~1e-11 on both sides.
        atol = max(1e-4 * float(np.abs(np.asarray(y)).max()), 1e-7)
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family_name", ["clip", "siglip"])
def test_gradcache_per_tower_equals_plain_autodiff(family_name):
    model, params = _tiny_dual(family_name)
    text_fn, image_fn = tt.dual_encoder_towers(model)
    plain = tt.TwoTowerObjective(text_fn, image_fn, loss=family_name)
    cached = tt.TwoTowerObjective(text_fn, image_fn, loss=family_name, text_sub_batch=2, image_sub_batch=4)
    batch = _batch()
    # Jitted throughout: eager op-by-op execution of the towers cost ~40 s per case here.
    want_loss, want = jax.jit(jax.value_and_grad(plain.loss_fn))(params, batch)
    for objective in (plain, cached):
        loss, grads = jax.jit(objective.value_and_grad)(params, batch)
        np.testing.assert_allclose(loss, want_loss, **TOL)
        _assert_trees_close(grads, want)
    assert np.abs(np.asarray(want["logit"]["log_scale"])) > 0


def test_objective_on_the_ring_equals_dense(mesh):
    model, params = _tiny_dual("siglip")
    text_fn, image_fn = tt.dual_encoder_towers(model)
    batch = _batch(b=16, seed=4)
    dense = tt.TwoTowerObjective(text_fn, image_fn, loss="siglip")
    ring = tt.TwoTowerObjective(text_fn, image_fn, loss="siglip", mesh=mesh, image_sub_batch=8)
    want_loss, want = jax.jit(dense.value_and_grad)(params, batch)
    loss, grads = jax.jit(ring.value_and_grad)(params, batch)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    _assert_trees_close(grads, want)


def test_locked_tower_gets_no_gradient_and_no_update():
    model, params = _tiny_dual("clip")
    text_fn, image_fn = tt.dual_encoder_towers(model)
    batch = _batch()
    _, free = jax.jit(tt.TwoTowerObjective(text_fn, image_fn).value_and_grad)(params, batch)
    lit = tt.TwoTowerObjective(text_fn, image_fn, locked=("text",), image_sub_batch=4)
    _, grads = jax.jit(lit.value_and_grad)(params, batch)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["text"]))
    _assert_trees_close(grads["image"], free["image"])  # locking one tower leaves the other's gradient as is
    optimizer = tt.make_optimizer(1e-2, locked=("text",), weight_decay=0.1)
    step = jax.jit(tt.make_train_step(lit, optimizer))
    new, _, metrics = step(params, optimizer.init(params), batch, None)
    for a, b in zip(jax.tree.leaves(new["text"]), jax.tree.leaves(params["text"])):
        np.testing.assert_array_equal(a, b)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(new["image"]),
                                                              jax.tree.leaves(params["image"])))
    assert float(metrics["logit_scale"]) > 0


@pytest.mark.parametrize("family_name", ["clip", "siglip"])
def test_training_steps_lower_the_loss_and_move_scale_and_bias(family_name):
    model, params = _tiny_dual(family_name)
    text_fn, image_fn = tt.dual_encoder_towers(model)
    objective = tt.TwoTowerObjective(text_fn, image_fn, loss=family_name)
    optimizer = tt.make_optimizer(3e-3)
    step = jax.jit(tt.make_train_step(objective, optimizer))
    batch, state = _batch(seed=5), optimizer.init(params)
    loss_fn = jax.jit(objective.loss_fn)
    first = float(loss_fn(params, batch))
    start = jax.tree.map(np.asarray, params["logit"])
    for _ in range(15):
        params, state, metrics = step(params, state, batch, None)
    assert float(loss_fn(params, batch)) < 0.9 * first  # measured: CLIP 2.53 -> 2.09
    assert float(params["logit"]["log_scale"]) != float(start["log_scale"])
    if family_name == "siglip":
        assert float(params["logit"]["bias"]) != float(start["bias"])


def test_bad_objective_options():
    with pytest.raises(ValueError, match="both towers are locked"):
        tt.TwoTowerObjective(None, None, locked=("text", "image"))
    with pytest.raises(ValueError, match="two-tower loss 'infonce'"):
        tt.TwoTowerObjective(None, None, loss="infonce")
    with pytest.raises(ValueError, match=r"name towers from \('text', 'image'\)"):
        tt.TwoTowerObjective(None, None, locked=("vision",))


def test_lit_on_a_precomputed_table_equals_the_locked_tower():
    """A locked text tower's outputs computed once and looked up by row (LiT's shortcut) give the
    same loss and image/logit gradients as running the locked tower every step."""
    model, params = _tiny_dual("clip")
    text_fn, image_fn = tt.dual_encoder_towers(model)
    texts = _batch(b=6, seed=7)["tokens"]
    table = text_fn(params["text"], texts, None)  # 6 distinct "captions"
    ids = np.array([4, 0, 5, 2, 2, 1, 3, 0])  # repeated captions, as templates repeat
    batch = _batch(b=8, seed=8)
    batch["tokens"] = jax.tree.map(lambda x: x[ids], texts)
    locked = tt.TwoTowerObjective(text_fn, image_fn, locked=("text",))
    want_loss, want = jax.jit(locked.value_and_grad)(params, batch)
    lookup = tt.TwoTowerObjective(tt.precomputed_tower(table), image_fn, locked=("text",))
    loss, grads = jax.jit(lookup.value_and_grad)({**params, "text": {}}, {**batch, "tokens": ids})
    np.testing.assert_allclose(loss, want_loss, **TOL)
    _assert_trees_close(grads["image"], want["image"])
    _assert_trees_close(grads["logit"], want["logit"])
    assert grads["text"] == {}
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        tt.precomputed_tower(np.ones(3))


def test_projected_image_tower_is_the_vision_tower_then_a_linear_map():
    from embedjax.models.towers.vision import ProjectedImageTower, VisionTower

    spec = VisionSpec(hidden_size=12, num_layers=1, num_heads=2, intermediate_size=20, image_size=(8, 12),
                      patch_size=4)
    tower = ProjectedImageTower(spec, projection_dim=5)
    pixels = _batch(b=3)["pixels"]
    from flax.linen import meta

    params = meta.unbox(tower.init(jax.random.PRNGKey(1), pixels)["params"])
    assert set(params) == {"vision", "image_projection"}  # a dual encoder's image-half names
    _, pooled = jax.jit(VisionTower(spec).apply)({"params": params["vision"]}, pixels)
    want = np.asarray(pooled, np.float64) @ np.asarray(params["image_projection"]["kernel"], np.float64)
    got = jax.jit(tt.module_tower(tower))(params, pixels, None)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
