"""Structural checks on the traced ring loss (no compilation): the next key block's
ppermute comes before the tile loop that consumes the current block, and no array inside
the per-device program is as large as the local rows x global batch logits."""
import jax
import jax.numpy as jnp
import numpy as np

from embedjax.losses import allgather, ring

GLOBAL, DIM, TILE = 64, 8, 3     # 8 rows per device; tile 3 does not divide 8


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def _walk(jaxpr):
    yield jaxpr
    for eqn in jaxpr.eqns:
        for sub in _subjaxprs(eqn):
            yield from _walk(sub)


def _is_loop(eqn):
    return eqn.primitive.name in ("scan", "while")


def _traced(loss_fn):
    x = jnp.ones((GLOBAL, DIM))
    return jax.make_jaxpr(jax.value_and_grad(loss_fn, argnums=(0, 1)))(x, x).jaxpr


def _shard_map_bodies(jaxpr):
    return [sub for j in _walk(jaxpr) for e in j.eqns if e.primitive.name == "shard_map" for sub in _subjaxprs(e)]


def test_next_block_transfer_is_issued_before_the_tile_loop():
    mesh = jax.make_mesh((8,), ("data",))
    jaxpr = _traced(lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.1, tile=TILE, bidirectional=True))
    loop_bodies = [sub for j in _walk(jaxpr) for e in j.eqns if _is_loop(e) for sub in _subjaxprs(e)]
    ring_steps = [j for j in loop_bodies
                  if any(e.primitive.name == "ppermute" for e in j.eqns) and any(_is_loop(e) for e in j.eqns)]
    assert len(ring_steps) >= 2   # forward ring and backward ring
    for body in ring_steps:
        names = [e.primitive.name for e in body.eqns]
        first_loop = next(i for i, e in enumerate(body.eqns) if _is_loop(e))
        assert "ppermute" in names[:first_loop], names


def _largest_intermediate(jaxpr):
    sizes = [int(np.prod(v.aval.shape)) for body in _shard_map_bodies(jaxpr) for j in _walk(body)
             for e in j.eqns for v in e.outvars if hasattr(v.aval, "shape")]
    return max(sizes)


def test_no_local_by_global_logits_inside_the_ring():
    mesh = jax.make_mesh((8,), ("data",))
    local_by_global = (GLOBAL // 8) * GLOBAL
    ring_jaxpr = _traced(lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.1, tile=TILE,
                                                         bidirectional=True, same_side=True))
    assert _largest_intermediate(ring_jaxpr) < local_by_global
    # The check has teeth: the all-gather loss does hold [local, global] logits.
    gather_jaxpr = _traced(lambda q, d: allgather.allgather_infonce(q, d, mesh=mesh, temperature=0.1))
    assert _largest_intermediate(gather_jaxpr) >= local_by_global
