"""Bad input: a clear error naming the input, or a documented finite result, never NaN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.losses import contrastive, matryoshka, ring


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def _pair(batch=16, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, dim)).astype(np.float32), rng.normal(size=(batch, dim)).astype(np.float32)


@pytest.mark.parametrize("loss", ["dense", "ring"])
def test_mismatched_shapes(mesh, loss):
    fn = contrastive.infonce if loss == "dense" else (lambda *a, **k: ring.ring_infonce(*a, **k, mesh=mesh))
    q, d = _pair()
    with pytest.raises(ValueError, match="d_bd has batch size 8"):
        fn(q, d[:8], temperature=0.1)
    with pytest.raises(ValueError, match="d_bd has embedding dim 4"):
        fn(q, d[:, :4], temperature=0.1)
    with pytest.raises(ValueError, match="hard_negatives_bkd must have 3 dimensions"):
        fn(q, d, temperature=0.1, hard_negatives_bkd=d)
    with pytest.raises(ValueError, match="group_ids_b must have shape"):
        fn(q, d, temperature=0.1, group_ids_b=np.arange(3))
    with pytest.raises(TypeError, match="q_bd must be a floating array"):
        fn(q.astype(np.int32), d, temperature=0.1)


def test_global_batch_not_divisible_by_data_axis(mesh):
    q, d = _pair(batch=20)
    with pytest.raises(ValueError, match="global batch 20 is not divisible by the 8 devices"):
        ring.ring_infonce(q, d, mesh=mesh, temperature=0.1)
    with pytest.raises(ValueError, match="not a mesh axis"):
        ring.ring_infonce(*_pair(), mesh=mesh, axis="batch", temperature=0.1)
    with pytest.raises(ValueError, match="tile must be a positive int"):
        ring.ring_infonce(*_pair(), mesh=mesh, temperature=0.1, tile=0)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_nonpositive_temperature(mesh, temperature):
    q, d = _pair()
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        contrastive.infonce(q, d, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        ring.ring_infonce(q, d, mesh=mesh, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        contrastive.siglip(q, d, temperature=temperature, bias=0.0)


def test_traced_nonpositive_temperature_is_clamped_finite():
    """Inside jit the value is unknown at trace time: documented clamp to MIN_TEMPERATURE."""
    q, d = _pair()
    value = jax.jit(lambda t: contrastive.infonce(q, d, temperature=t))(-1.0)
    expected = contrastive.infonce(q, d, temperature=1e-4)
    assert np.isfinite(float(value)) and float(value) == pytest.approx(float(expected), rel=1e-6)


def test_learnable_temperature_is_clamped_with_zero_gradient_outside():
    assert float(contrastive.learnable_temperature(jnp.log(5.0))) == pytest.approx(1.0)
    assert float(contrastive.learnable_temperature(jnp.log(0.05))) == pytest.approx(0.05)
    assert float(jax.grad(lambda lt: contrastive.learnable_temperature(lt))(jnp.log(1e-5))) == 0.0


def test_empty_matryoshka_list(mesh):
    q, d = _pair()
    with pytest.raises(ValueError, match="matryoshka_dims is empty"):
        contrastive.infonce(q, d, temperature=0.1, matryoshka_dims=())
    with pytest.raises(ValueError, match="matryoshka_dims is empty"):
        ring.ring_infonce(q, d, mesh=mesh, temperature=0.1, matryoshka_dims=[])
    with pytest.raises(ValueError, match="non-empty list of prefix dims"):
        matryoshka.matryoshka_loss(contrastive.infonce, [])
    with pytest.raises(ValueError, match="must lie in"):
        contrastive.infonce(q, d, temperature=0.1, matryoshka_dims=(4, 9))
    with pytest.raises(ValueError, match="non-empty list of \\(layer, dim\\) pairs"):
        matryoshka.starbucks_loss(contrastive.infonce, [])


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_fully_masked_rows_give_zero_loss_and_finite_gradients(mesh, focal_gamma):
    """Every negative shares the positive's document id -> each row's denominator holds only its
    positive: documented result 0 (and zero gradient), never NaN, in dense and ring."""
    q, d = _pair()
    h = np.random.default_rng(1).normal(size=(16, 2, 8)).astype(np.float32)
    options = dict(temperature=0.1, hard_negatives_bkd=h, doc_ids_b=np.zeros(16, np.int32),
                   hard_negative_ids_bk=np.zeros((16, 2), np.int32), focal_gamma=focal_gamma, bidirectional=True)
    for fn in (contrastive.infonce, lambda *a, **k: ring.ring_infonce(*a, **k, mesh=mesh, tile=3)):
        value, grads = jax.jit(jax.value_and_grad(lambda q, d: fn(q, d, **options), argnums=(0, 1)))(q, d)
        assert float(value) == 0.0
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 0.0)


def test_margin_filter_masking_everything_is_finite(mesh):
    q, d = _pair()
    value = jax.jit(lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.1, margin=1e9, focal_gamma=1.0))(q, d)
    assert float(value) == 0.0


def test_bad_option_values():
    q, d = _pair()
    with pytest.raises(ValueError, match="similarity must be"):
        contrastive.infonce(q, d, temperature=0.1, similarity="l2")
    with pytest.raises(ValueError, match="focal_gamma must be >= 0"):
        contrastive.infonce(q, d, temperature=0.1, focal_gamma=-1.0)
    with pytest.raises(ValueError, match="needs both guide_q_bg and guide_d_bg"):
        contrastive.infonce(q, d, temperature=0.1, guide_q_bg=q)
    with pytest.raises(ValueError, match="bias must be a scalar"):
        contrastive.siglip(q, d, temperature=0.1, bias=np.zeros(2))
