"""``train.dropout_rng``: the PRNG implementation of the dropout key reaches the training step.

A toy objective (one weight vector, a Bernoulli mask drawn from the step's key) through
`create_state` and `make_train_step` on a one-device mesh: the default keeps the raw threefry key
data every earlier run used; ``rbg`` stores its four words and hands the objective a typed rbg key,
folded with the step like the default one; an unknown name is refused naming the setting.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embedjax.sharding.mesh import make_mesh
from train_runs import read_losses, tiny_config
from embedjax.train.state import create_state, state_shardings
from embedjax.train.step import Objective, batch_shardings, make_train_step


def _mask_objective(seen):
    def embed_columns(params, batch, rng, shared=None):
        seen.append(rng)
        keep = jax.random.bernoulli(rng, 0.5, batch["x"].shape)
        return {"x": jnp.where(keep, batch["x"] * params["w"], 0.0)}

    return Objective(embed_columns=embed_columns, loss_from_embeddings=lambda emb, batch: jnp.sum(emb["x"]))


def _run_step(dropout_rng):
    seen = []
    params = {"w": jnp.ones((64,), jnp.float32)}
    tx = optax.sgd(1.0)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    shardings = state_shardings(params, tx, mesh, (), dropout_rng=dropout_rng)
    state = create_state(params, tx, 3, dropout_rng=dropout_rng)
    batch = {"x": jnp.ones((2, 64), jnp.float32)}
    step = make_train_step(_mask_objective(seen), tx, lambda s: 1.0, shardings, batch_shardings(batch, mesh, None),
                           mesh, dropout_rng=dropout_rng)
    stored = np.asarray(state.rng)  # the step donates the old state's buffers
    new_state, _ = step(state, batch)
    return stored, new_state, seen


def test_default_keeps_the_raw_threefry_key_and_rbg_reaches_the_objective():
    stored, new_state, seen = _run_step("threefry2x32")
    np.testing.assert_array_equal(stored, jax.random.PRNGKey(3))  # what every earlier run stored
    assert seen[-1].dtype == jnp.uint32  # raw key data, folded with the step
    # SGD at rate 1 on sum(mask * x * w): w drops by 2 where both rows' masks keep it.
    want_keep = jax.random.bernoulli(jax.random.fold_in(jax.random.PRNGKey(3), 0), 0.5, (2, 64))
    np.testing.assert_allclose(new_state.params["w"], 1.0 - np.sum(np.asarray(want_keep), axis=0))

    stored_rbg, new_rbg, seen_rbg = _run_step("rbg")
    assert stored_rbg.shape == (4,) and stored_rbg.dtype == np.uint32  # checkpoints as plain data
    assert jax.random.key_impl(seen_rbg[-1]) == "rbg"
    key = jax.random.fold_in(jax.random.key(3, impl="rbg"), 0)
    np.testing.assert_allclose(new_rbg.params["w"],
                               1.0 - np.sum(np.asarray(jax.random.bernoulli(key, 0.5, (2, 64))), axis=0))
    assert not np.array_equal(new_rbg.params["w"], new_state.params["w"])  # other masks


def test_unknown_dropout_rng_is_refused():
    with pytest.raises(ValueError, match="train.dropout_rng='philox' is not a PRNG implementation"):
        create_state({"w": jnp.ones(2)}, optax.sgd(1.0), 0, dropout_rng="philox")


@pytest.mark.slow  # two tiny runs with dropout on (~1 min on 2 cores)
def test_a_run_with_rbg_dropout_trains_and_repeats_itself(tmp_path, tfds_cache):
    from embedjax.train.loop import train

    overrides = ("train.dropout_rng=rbg", "model.config.hidden_dropout=0.1", "train.num_steps=40", "train.stop_after=3",
                 f"data.cache_dir={tfds_cache}")
    for name in ("a", "b"):
        summary = train(tiny_config(*overrides), tmp_path / name)
        assert summary["status"] == "stopped_after" and np.isfinite(summary["final_loss"])
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")  # the same seed, the same masks
