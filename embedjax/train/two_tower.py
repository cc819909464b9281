"""Two-tower (image-text) contrastive training: separate text and image towers, either one
optionally locked (LiT, Zhai et al. 2022), a learned logit scale (clamped) and bias, the CLIP or
SigLIP loss dense or on the exact ring, and GradCache per tower.

Parameters are one tree ``{"text": ..., "image": ..., "logit": {"log_scale", ["bias"]}}``; a tower
is a pure function ``fn(tower_params, inputs, rng) -> [B, D]`` features (``rng`` None:
deterministic). `dual_encoder_towers` makes the pair for a CLIP/SigLIP family module; any other
pair works (`module_tower` of any Linen module, a text `Encoder.embed_fn`, or `precomputed_tower`: a locked
tower's outputs computed once).

`TwoTowerObjective.value_and_grad` computes both towers' features, differentiates the loss with
respect to the features and the logit parameters, then pulls the feature gradients back through
each unlocked tower: in one pass (``*_sub_batch=None``) or GradCache-style one sub-batch at a
time (`embedjax.losses.gradcache`), so a tower's activation memory is set by its sub-batch while
the loss still sees the whole (global) batch. A locked tower runs forward only and gets zero
gradients; `make_optimizer` also freezes it (no weight decay on it either). `loss_fn` is the plain
autodiff reference the tests hold it to.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from embedjax.losses import gradcache
from embedjax.losses.two_tower import CLIP_MAX_SCALE, LOSSES, SIGLIP_MAX_SCALE

TOWERS = ("text", "image")
INPUTS = {"text": "tokens", "image": "pixels"}  # batch key of each tower's inputs


@dataclasses.dataclass(frozen=True)
class TwoTowerObjective:
    text_fn: Callable
    image_fn: Callable
    loss: str = "clip"  # "clip" | "siglip"
    max_scale: float | None = None  # clamp of exp(log_scale); None: 100 (CLIP) / 1000 (SigLIP)
    locked: tuple[str, ...] = ()  # towers held fixed: "text" and/or "image" (LiT locks one)
    mesh: Any = None  # ring loss over `axis` of this mesh; None: dense
    axis: str = "data"
    tile: int | None = None
    ring_impl: str = "xla"  # the ring's tiles: "xla" or "pallas" (fused kernels, embedjax.kernels.ring_tiles)
    text_sub_batch: int | None = None  # GradCache sub-batch of each tower; None: one pass
    image_sub_batch: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"two-tower loss {self.loss!r}: use one of {sorted(LOSSES)}")
        locked = tuple(self.locked)
        if set(locked) - set(TOWERS):
            raise ValueError(f"locked={locked}: name towers from {TOWERS}")
        if set(locked) == set(TOWERS):
            raise ValueError("both towers are locked: only the logit scale would train; unlock one tower")
        object.__setattr__(self, "locked", locked)
        if self.max_scale is None:
            object.__setattr__(self, "max_scale", CLIP_MAX_SCALE if self.loss == "clip" else SIGLIP_MAX_SCALE)

    def _fn(self, tower):
        return self.text_fn if tower == "text" else self.image_fn

    def _sub_batch(self, tower):
        return self.text_sub_batch if tower == "text" else self.image_sub_batch

    def contrastive_loss(self, text_bd, image_bd, logit):
        """The loss of already computed features and the logit parameters."""
        kwargs = dict(max_scale=self.max_scale, mesh=self.mesh, axis=self.axis, tile=self.tile, impl=self.ring_impl)
        if self.loss == "clip":
            return LOSSES["clip"](text_bd, image_bd, logit["log_scale"], **kwargs)
        return LOSSES["siglip"](text_bd, image_bd, logit["log_scale"], logit.get("bias", 0.0), **kwargs)

    def loss_fn(self, params, batch, rng=None):
        """Plain autodiff reference: ``value_and_grad(loss_fn)`` equals `value_and_grad`."""
        feats = {}
        for i, tower in enumerate(TOWERS):
            tower_params = params[tower]
            if tower in self.locked:
                tower_params = jax.lax.stop_gradient(tower_params)
            feats[tower] = self._fn(tower)(tower_params, batch[INPUTS[tower]], _key(rng, i))
        return self.contrastive_loss(feats["text"], feats["image"], params["logit"])

    def value_and_grad(self, params, batch, rng=None):
        """``(loss, grads)`` shaped like ``params`` (see the module docstring)."""
        feats, pullbacks = {}, {}
        for i, tower in enumerate(TOWERS):
            fn, inputs, key, sub = self._fn(tower), batch[INPUTS[tower]], _key(rng, i), self._sub_batch(tower)
            if tower in self.locked:
                feats[tower] = fn(jax.lax.stop_gradient(params[tower]), inputs, key)
            elif sub is None:
                feats[tower], pullbacks[tower] = jax.vjp(lambda p, fn=fn, x=inputs, k=key: fn(p, x, k), params[tower])
            else:
                feats[tower] = gradcache.embed_without_grad(lambda p, x, k, fn=fn: fn(p, x, k), params[tower], inputs,
                                                            sub_batch_size=sub, rng=key)
        loss, (g_text, g_image, g_logit) = jax.value_and_grad(self.contrastive_loss, argnums=(0, 1, 2))(
            feats["text"], feats["image"], params["logit"])
        cotangents = {"text": g_text, "image": g_image}
        grads = {"logit": g_logit}
        for i, tower in enumerate(TOWERS):
            if tower in self.locked:
                grads[tower] = jax.tree.map(jnp.zeros_like, params[tower])
            elif tower in pullbacks:
                (grads[tower],) = pullbacks[tower](cotangents[tower])
            else:
                fn = self._fn(tower)
                grads[tower] = gradcache.pull_back(lambda p, x, k, fn=fn: fn(p, x, k), params[tower],
                                                   batch[INPUTS[tower]], cotangents[tower],
                                                   sub_batch_size=self._sub_batch(tower), rng=_key(rng, i))
        return loss, grads


def _key(rng, index):
    return None if rng is None else jax.random.fold_in(rng, index)


def make_optimizer(learning_rate, *, locked: tuple[str, ...] = (), weight_decay: float = 0.0, b2: float = 0.98):
    """AdamW over the unlocked towers and the logit parameters; locked towers get no update (and
    no decay). ``b2=0.98`` as CLIP and SigLIP train. Weight decay skips the logit parameters."""
    import optax

    def labels(params):
        out = {}
        for name, subtree in params.items():
            kind = "frozen" if name in locked else ("logit" if name == "logit" else "train")
            out[name] = jax.tree.map(lambda _, kind=kind: kind, subtree)
        return out

    return optax.multi_transform({
        "train": optax.adamw(learning_rate, b2=b2, weight_decay=weight_decay),
        "logit": optax.adam(learning_rate, b2=b2),
        "frozen": optax.set_to_zero(),
    }, labels)


def make_train_step(objective: TwoTowerObjective, optimizer):
    """A jittable ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``; metrics:
    the loss, the (clamped) logit scale and the bias."""
    import optax

    from embedjax.losses.two_tower import logit_scale

    def step(params, opt_state, batch, rng):
        loss, grads = objective.value_and_grad(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "logit_scale": logit_scale(params["logit"]["log_scale"], objective.max_scale),
                   "logit_bias": params["logit"].get("bias", jnp.float32(0.0))}
        return params, opt_state, metrics

    return step


def module_tower(model, method: str | None = None) -> Callable:
    """A Linen module (or one of its methods) as a tower ``fn(params, inputs, rng) -> [B, D]``;
    ``rng`` feeds dropout (None: deterministic)."""

    def fn(p, inputs, rng):
        rngs = None if rng is None else {"dropout": rng}
        kwargs = {} if method is None else {"method": method}
        return model.apply({"params": p}, inputs, deterministic=rng is None, rngs=rngs, **kwargs)

    return fn


def dual_encoder_towers(model) -> tuple[Callable, Callable]:
    """``(text_fn, image_fn)`` of a dual-encoder family module (CLIP, SigLIP): each applies the
    module's ``encode_text`` / ``encode_image`` to its half of `split_dual_params`."""
    return module_tower(model, "encode_text"), module_tower(model, "encode_image")


def precomputed_tower(table_nd) -> Callable:
    """A locked tower whose outputs were computed once: ``fn({}, ids_b, rng) -> table_nd[ids_b]``.

    LiT against a frozen encoder (any family) sees the same features for the same input every
    step, so embedding each distinct input once (e.g. every caption with `Encoder.encode`) and
    feeding row ids replaces re-running the frozen model per step. Its params are ``{}``; lock it
    (``locked=("text",)``)."""
    table = jnp.asarray(table_nd, jnp.float32)
    if table.ndim != 2:
        raise ValueError(f"a precomputed tower's table must be [N, D]; got shape {tuple(table.shape)}")

    def fn(p, ids_b, rng):
        del p, rng  # nothing trains and nothing is random
        return jnp.take(table, jnp.asarray(ids_b), axis=0)

    return fn


DUAL_TOWER_KEYS = {"text": ("text", "text_projection"), "image": ("vision", "image_projection")}


def split_dual_params(backbone) -> dict:
    """A dual encoder's params -> ``{"text", "image", "logit"}`` (the objective's tree)."""
    out = {tower: {k: backbone[k] for k in keys if k in backbone} for tower, keys in DUAL_TOWER_KEYS.items()}
    out["logit"] = dict(backbone["logit"])
    known = {k for keys in DUAL_TOWER_KEYS.values() for k in keys} | {"logit"}
    unknown = sorted(set(backbone) - known)
    if unknown:
        raise ValueError(f"dual-encoder params have unexpected entries {unknown}")
    return out


def join_dual_params(params) -> dict:
    """The inverse of `split_dual_params` (for export and `Encoder`)."""
    return {**params["text"], **params["image"], "logit": dict(params["logit"])}
