"""The ablation loss options of the trainer: train.loss="siglip" and "cosent" on retrieval
pairs, and train.layer_dims (2D Matryoshka / Starbucks).

The objective's value on fixed embeddings must equal a direct call of the loss function
with the batch's ids and the configured hyperparameters (so a dropped id, bias or scale
shows), layer_dims must pool the right layer and cut the right prefix, and the real
training loop must drive each option's loss down on a fixed batch.
"""
import math

import jax
import numpy as np
import pytest

from embedjax.losses import contrastive, pairwise
from embedjax.train.step import make_embed, make_objective
from train_runs import read_losses, tiny_config

B, K, D = 8, 2, 12


def _retrieval_batch(seed=0):
    """Embeddings of a retrieval batch and its ids: query 0 repeated at row 3 (two positives),
    rows 1 and 5 sharing a document (false negatives), hard negatives that are positives."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, D)).astype(np.float32)
    emb = {"query": q, "positive": (0.5 * q + rng.normal(size=(B, D))).astype(np.float32),
           "negatives": rng.normal(size=(B, K, D)).astype(np.float32)}
    batch = {"query_id": np.array([0, 1, 2, 0, 4, 5, 6, 7], np.int32),
             "positive_id": np.array([10, 11, 12, 13, 14, 11, 16, 17], np.int32),
             "negative_ids": np.array([[10, 99]] + [[98, 97]] * 6 + [[17, 96]], np.int32)}
    return emb, batch


def _ids(batch):
    return dict(group_ids_b=batch["query_id"], doc_ids_b=batch["positive_id"],
                hard_negative_ids_bk=batch["negative_ids"])


def _values(fn, *args):
    """The floats of fn(*args) -> tuple, through one jit compile (the eager path compiles every
    op on its own: slower on 2 cores)."""
    return [float(v) for v in jax.jit(fn)(*args)]


def test_siglip_objective_is_the_siglip_loss_with_the_batch_ids():
    emb, batch = _retrieval_batch()
    options = dict(temperature=0.07, matryoshka_dims=(4, 12), matryoshka_weights=(0.5, 1.0))
    masked = make_objective(None, kind="retrieval", loss="siglip", siglip_bias=-3.0, **options)
    # Without masking: diagonal positives, nothing dropped.
    unmasked = make_objective(None, kind="retrieval", loss="siglip", siglip_bias=-3.0, mask_false_negatives=False,
                              **options)

    def direct(e, **ids):
        return contrastive.siglip(e["query"], e["positive"], bias=-3.0, similarity="cos",
                                  hard_negatives_bkd=e["negatives"], **options, **ids)

    got, expected, got_unmasked, expected_unmasked = _values(lambda e: (
        masked.loss_from_embeddings(e, batch), direct(e, **_ids(batch)),
        unmasked.loss_from_embeddings(e, batch), direct(e)), emb)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got_unmasked, expected_unmasked, rtol=1e-6)
    assert abs(expected_unmasked - expected) > 1e-3  # the ids reach the loss


def test_cosent_objective_is_in_batch_cosent_with_the_batch_ids():
    emb, batch = _retrieval_batch(1)
    objective = make_objective(None, kind="retrieval", loss="cosent", cosent_scale=13.0, matryoshka_dims=(6, 12))

    def direct(e, scale):
        return pairwise.cosent_in_batch(e["query"], e["positive"], scale=scale, hard_negatives_bkd=e["negatives"],
                                        matryoshka_dims=(6, 12), **_ids(batch))

    got, expected, default_scale = _values(
        lambda e: (objective.loss_from_embeddings(e, batch), direct(e, 13.0), direct(e, 20.0)), emb)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert abs(default_scale - expected) > 1e-3  # the scale reaches the loss


def test_ring_siglip_objective_equals_the_dense_loss():
    emb, batch = _retrieval_batch(2)
    mesh = jax.make_mesh((2,), ("data",))
    ring = make_objective(None, kind="retrieval", loss="siglip", temperature=0.1, siglip_bias=-2.0, ring=True,
                          mesh=mesh)
    dense = make_objective(None, kind="retrieval", loss="siglip", temperature=0.1, siglip_bias=-2.0)
    got, expected = _values(lambda e: (ring.loss_from_embeddings(e, batch), dense.loss_from_embeddings(e, batch)), emb)
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # the same sums in tiled order: float32 rounding only


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_ring_impl_pallas_objective_equals_the_dense_loss(loss):
    """train.ring_impl='pallas' reaches the ring: the fused tiles (interpret mode) give the dense loss."""
    emb, batch = _retrieval_batch(4)
    mesh = jax.make_mesh((2,), ("data",))
    options = dict(kind="retrieval", loss=loss, temperature=0.1, siglip_bias=-2.0)
    fused = make_objective(None, **options, ring=True, mesh=mesh, ring_impl="pallas")
    dense = make_objective(None, **options)
    got, expected = _values(lambda e: (fused.loss_from_embeddings(e, batch), dense.loss_from_embeddings(e, batch)),
                            emb)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("stripe_rows", [1, 3])
def test_stripe_rows_objective_equals_the_dense_loss(stripe_rows, monkeypatch):
    """train.stripe_rows reaches `losses.striped_infonce` (cosine, ids, hard negatives, Matryoshka)."""
    from embedjax.losses import stripes

    traced = []
    original = stripes.striped_infonce
    monkeypatch.setattr(stripes, "striped_infonce", lambda *a, **kw: traced.append(kw["row_block"]) or original(*a, **kw))
    emb, batch = _retrieval_batch(4)
    mesh = jax.make_mesh((2,), ("data",))
    options = dict(kind="retrieval", loss="infonce", temperature=0.1, matryoshka_dims=(4, D))
    striped = make_objective(None, **options, mesh=mesh, stripe_rows=stripe_rows)
    dense = make_objective(None, **options)
    got, expected = _values(lambda e: (striped.loss_from_embeddings(e, batch), dense.loss_from_embeddings(e, batch)),
                            emb)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert set(traced) == {stripe_rows}


def test_layer_dims_objective_sums_the_weighted_prefix_losses_of_each_layer():
    _, batch = _retrieval_batch(3)
    rng = np.random.default_rng(3)
    # Two layers' embeddings per text, as make_embed(layers=(1, 2)) returns them: [B, 2, D], [B, K, 2, D].
    layered = {"query": rng.normal(size=(B, 2, D)).astype(np.float32),
               "positive": rng.normal(size=(B, 2, D)).astype(np.float32),
               "negatives": rng.normal(size=(B, K, 2, D)).astype(np.float32)}
    pairs, weights = ((1, 4), (1, 12), (2, 4), (2, 12)), (0.1, 0.2, 0.3, 0.4)
    grid = make_objective(None, kind="retrieval", loss="siglip", temperature=0.1, siglip_bias=-2.0,
                          layer_dims=pairs, layer_dims_weights=weights, num_layers=2, hidden_size=D)
    # A single pair of the last layer: only that layer is embedded, index 0 of the stack.
    last = make_objective(None, kind="retrieval", loss="cosent", layer_dims=((2, 6),), num_layers=2, hidden_size=D)

    def direct_grid(x):
        return sum(weight * contrastive.siglip(
            x["query"][:, layer - 1, :dim], x["positive"][:, layer - 1, :dim], temperature=0.1, bias=-2.0,
            hard_negatives_bkd=x["negatives"][:, :, layer - 1, :dim], similarity="cos", **_ids(batch))
            for (layer, dim), weight in zip(pairs, weights))

    def direct_last(x):
        return pairwise.cosent_in_batch(x["query"][:, 1, :6], x["positive"][:, 1, :6],
                                        hard_negatives_bkd=x["negatives"][:, :, 1, :6], **_ids(batch))

    got_grid, expected_grid, got_last, expected_last = _values(lambda x: (
        grid.loss_from_embeddings(x, batch), direct_grid(x),
        last.loss_from_embeddings({name: v[..., 1:, :] for name, v in x.items()}, batch), direct_last(x)), layered)
    np.testing.assert_allclose(got_grid, expected_grid, rtol=1e-6)
    np.testing.assert_allclose(got_last, expected_last, rtol=1e-6)


def test_layer_embeddings_come_from_one_pass_and_the_last_full_pair_is_plain_infonce():
    from embedjax.encoder import embed_batch
    from embedjax.models.towers.bert import BertConfig, BertModel

    config = BertConfig(vocab_size=40, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                        max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0)
    model = BertModel(config)
    rng = np.random.default_rng(0)

    def tokens(n, length=6):
        mask = (np.arange(length)[None, :] < rng.integers(2, length + 1, size=(n, 1))).astype(np.int32)
        return {"input_ids": rng.integers(1, 40, size=(n, length)).astype(np.int32) * mask, "attention_mask": mask}

    _, ids = _retrieval_batch()
    batch = {"query": tokens(B), "positive": tokens(B), **{k: v for k, v in ids.items() if k != "negative_ids"}}
    # Random parameters of the right shapes from NumPy: jit-compiling flax's init costs ~5 s on 2 cores.
    shapes = {"backbone": jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["query"])["params"], "head": {}}
    params = jax.tree.map(lambda x: rng.normal(scale=0.3, size=x.shape).astype(x.dtype), shapes)
    embed = make_embed(model, pooling="mean", normalize=True)
    shape = dict(kind="retrieval", loss="infonce", bidirectional=True, num_layers=2, hidden_size=8)
    plain = make_objective(embed, **shape)
    last_full = make_objective(embed, layer_dims=((2, 8),), **shape)
    key = jax.random.PRNGKey(1)

    # One forward-only program (one compile on 2 cores instead of several).
    @jax.jit
    def values(p):
        losses = [o.loss_from_embeddings(o.embed_columns(p, batch, key), batch) for o in (plain, last_full)]
        stacked = embed(p, batch["query"], key, layers=(1, 2))
        single = [embed_batch(model, p, batch["query"], pooling="mean", normalize=True, layers=layer)
                  for layer in (1, 2)]
        return losses, stacked, single

    (plain_loss, last_loss), stacked, single = values(params)
    # The single pair (num_layers, full width) is plain InfoNCE, bit for bit.
    assert float(last_loss) == float(plain_loss)
    assert stacked.shape == (B, 2, 8)
    for i in range(2):  # layer i + 1, pooled and normalised as the encoder does for that layer
        np.testing.assert_allclose(np.asarray(stacked[:, i]), np.asarray(single[i]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(single[0]), np.asarray(single[1]), atol=1e-3)


@pytest.mark.parametrize("overrides,message", [
    ({"layer_dims": ((0, 4),)}, r"train.layer_dims pair \(0, 4\): layer must be in 1..2"),
    ({"layer_dims": ((3, 4),)}, r"layer must be in 1..2"),
    ({"layer_dims": ((1, 9),)}, r"train.layer_dims pair \(1, 9\): dim must be in 1..8"),
    ({"layer_dims": ((1, 8), (1, 4))}, r"train.layer_dims .* increasing order.*\(\(1, 4\), \(1, 8\)\)"),
    ({"layer_dims": ((1, 4), (1, 4))}, r"without repeats"),
    ({"layer_dims": (4, 8)}, r"train.layer_dims entry 4 is not a \(layer, dim\) pair"),
    ({"layer_dims": ((1, 4),), "layer_dims_weights": (1.0, 2.0)}, r"train.layer_dims_weights has 2 entries for 1"),
    ({"layer_dims": ((1, 4),), "matryoshka_dims": (4, 8)}, r"train.layer_dims and train.matryoshka_dims"),
    ({"layer_dims": ((1, 4),), "ring": True, "mesh": "m"}, r"train.layer_dims does not run with train.ring"),
    ({"loss": "cosent", "ring": True}, r"train.ring=True supports train.loss in \('infonce', 'siglip'\) only"),
    ({"loss": "siglip", "bidirectional": True}, r"train.bidirectional=True applies to infonce only"),
    ({"ring_impl": "pallas"}, r"train.ring_impl='pallas' chooses the ring loss's tiles; set train.ring=True"),
    ({"ring_impl": "triton", "ring": True, "mesh": "m"}, r"train.ring_impl='triton': use one of \('xla', 'pallas'\)"),
    ({"loss": "cosent", "bidirectional": True}, r"train.bidirectional=True applies to infonce only"),
    ({"stripe_rows": 4, "ring": True, "mesh": "m"}, r"train.stripe_rows=4 does not run with train.ring=True"),
    ({"stripe_rows": 4, "loss": "siglip", "mesh": "m"}, r"stripe_rows=4 does not run with train.loss='siglip'"),
    ({"stripe_rows": 4, "bidirectional": True, "mesh": "m"}, r"does not run with train.bidirectional=True"),
    ({"stripe_rows": 4}, r"train.stripe_rows=4 does not run with no mesh"),
    ({"kind": "sts", "loss": "cosent", "stripe_rows": 4}, r"train.stripe_rows applies to retrieval data"),
    ({"stripe_rows": -2, "mesh": "m"}, r"train.stripe_rows must be 0 \(off\) or a positive int"),
    ({"kind": "sts", "loss": "cosent", "layer_dims": ((1, 4),)}, r"train.layer_dims applies to retrieval data"),
    ({"kind": "sts", "loss": "siglip"}, r"train.loss='siglip' does not fit 'sts'"),
])
def test_bad_loss_options_are_clear_errors(overrides, message):
    options = dict(kind="retrieval", loss="infonce", num_layers=2, hidden_size=8) | overrides
    with pytest.raises(ValueError, match=message):
        make_objective(None, **options)


# The same 16 pairs every step (one batch per epoch), so the loss must fall; 1 device, dense loss.
# 10 steps (4 of them warm-up): over 6 the fall is within seed noise of the 10% the tests ask for.
FIXED_BATCH = ("train.num_steps=10", "data.max_examples=16", "data.no_duplicates=False", "mesh.num_devices=1",
               "train.ring=False", "train.bidirectional=False", "train.matryoshka_dims=()",
               "checkpoint.every_steps=100")


def test_config_keys_parse_and_a_bad_layer_is_refused_before_the_workdir(tmp_path, tfds_cache):
    from embedjax.train.loop import train

    cfg = tiny_config("train.layer_dims=((1, 16), (2, 32))", "train.layer_dims_weights=(1, 2)",
                      "train.siglip_bias=-5", "train.loss=siglip")
    assert tuple(map(tuple, cfg.train.layer_dims)) == ((1, 16), (2, 32))
    assert tuple(cfg.train.layer_dims_weights) == (1, 2) and cfg.train.siglip_bias == -5.0
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=r"train.layer_dims pair \(3, 16\): layer must be in 1..2"):
        # The training tests' data (prepared once per session in tfds_cache).
        train(tiny_config(*FIXED_BATCH, "train.layer_dims=((3, 16),)", f"data.cache_dir={tfds_cache}"), workdir)
    assert not workdir.exists()


def _train_losses(tmp_path, tfds_cache, *overrides):
    from embedjax.train.loop import train

    summary = train(tiny_config(*FIXED_BATCH, f"data.cache_dir={tfds_cache}", *overrides), tmp_path,
                    log=lambda m: None)
    assert summary["status"] == "completed" and summary["step"] == 10
    losses = [values[-1] for _, values in sorted(read_losses(tmp_path).items())]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.slow  # compiles and trains the tiny model (~24 s); the objective tests above check the wiring
def test_cosent_with_2d_matryoshka_layer_dims_trains(tmp_path, tfds_cache):
    losses = _train_losses(tmp_path, tfds_cache, "train.loss=cosent",
                           "train.layer_dims=((1, 16), (1, 32), (2, 16), (2, 32))")
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow  # one more compile of the tiny step (~15-20 s on 2 loaded cores)
def test_siglip_with_starbucks_layer_dims_trains(tmp_path, tfds_cache):
    losses = _train_losses(tmp_path, tfds_cache, "train.loss=siglip", "train.temperature=0.1",
                           "train.layer_dims=((1, 16), (2, 32))")
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow  # the ring step compiled for 8 devices (~30 s on 2 loaded cores)
def test_ring_siglip_trains_on_eight_devices(tmp_path, tfds_cache):
    losses = _train_losses(tmp_path, tfds_cache, "train.loss=siglip", "train.ring=True", "mesh.num_devices=0",
                           "train.matryoshka_dims=(16, 32)")
    assert losses[-1] < 0.9 * losses[0], losses
