import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from embedjax.sharding import (batch_sharding, get_rules, logical_to_spec, make_mesh, param_shardings,
                               resolve_axis_sizes)


def test_resolve_fills_minus_one_from_device_count():
    assert resolve_axis_sizes({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert resolve_axis_sizes({"tensor": 2, "fsdp": -1, "data": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("spec, match", [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": 3}, "does not divide"),
    ({"model": 2}, "unknown axes"),
    ({"data": 0}, "positive int"),
])
def test_resolve_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_axis_sizes(spec, 8)


def test_make_mesh_shape_and_explicit_axes():
    mesh = make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def test_logical_to_spec_presets():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("vocab", "embed"), "fsdp_tensor", mesh, (64, 32)) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "mlp"), "fsdp", mesh, (32, 64)) == P("fsdp", None)
    assert logical_to_spec(("embed", "mlp"), "data_parallel", mesh, (32, 64)) == P(None, None)
    # 33 is not divisible by fsdp=2: replicated rather than an error.
    assert logical_to_spec(("embed", "mlp"), "fsdp_tensor", mesh, (33, 64)) == P(None, "tensor")
    with pytest.raises(ValueError, match="unknown sharding rules preset"):
        get_rules("zero3")


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
                            (x.shape[-1], 16))
        bias = self.param("bias", nn.initializers.zeros, (16,))
        return x @ kernel + bias


def test_param_shardings_place_flax_params():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = _Dense().init(jax.random.key(0), jnp.ones((4, 8)))["params"]
    shardings = param_shardings(boxed, mesh, "fsdp_tensor")
    params = jax.device_put(nn.unbox(boxed), shardings)
    assert params["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["bias"].sharding.spec == P()
    x = jax.device_put(np.ones((8, 8), np.float32), batch_sharding(mesh, "fsdp_tensor"))
    assert x.sharding.spec == P(("data", "fsdp"), None)
    out = jax.jit(lambda p, x: _Dense().apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(np.asarray(out), np.ones((8, 8)) @ np.asarray(params["kernel"]), rtol=1e-5)
