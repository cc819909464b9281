"""The training objective and the jitted, sharded, donating train step.

``make_objective`` turns config values into an `Objective`: a function that embeds
each text column of a batch with dropout on, and the configured loss: CoSENT for graded
pairs; for retrieval pairs InfoNCE or SigLIP (dense, or the memory-tiled ring version over
the ``data`` mesh axis) or CoSENT on binary in-batch relevance, optionally summed over
(layer, dim) pairs (2D Matryoshka / Starbucks, ``layer_dims``).
``make_train_step`` wraps one optimizer update (plain autodiff, or GradCache when
``gradcache_sub_batch`` > 0) in `jax.jit` with explicit input and output shardings,
the old state's buffers donated to the new one, and on CPU the kernel libraries
`embedjax.xla_cpu` chooses (``EMBEDJAX_CPU_GEMM``).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from embedjax import xla_cpu
from embedjax.data.packing import is_packed
from embedjax.train.state import DEFAULT_DROPOUT_RNG, TrainState, check_dropout_rng

LOSSES_FOR_KIND = {"sts": ("cosent",), "retrieval": ("infonce", "siglip", "cosent")}
RING_LOSSES = ("infonce", "siglip")  # the losses `embedjax.losses.ring` tiles over the data axis


def global_l2_norm(tree) -> jax.Array:
    """L2 norm of all leaves together, in float32 (optax renamed its own across versions we support)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def _flatten_negatives(tokens_bkl: dict) -> dict:
    """[B, K, L] negatives -> [B * K, L] texts (a packed column holds them flat already)."""
    if is_packed(tokens_bkl):
        return tokens_bkl
    return {name: array.reshape(-1, array.shape[-1]) for name, array in tokens_bkl.items()}


def make_embed(model, *, pooling: str, normalize: bool, head=None, lora=None) -> Callable:
    """The training embedding function of a family's model, with dropout keyed by ``rng``.

    ``params`` is the encoder tree ``{"backbone", "head"}``.
    ``embed(params, tokens, rng) -> float32 [B, D]`` pools the last layer or runs ``head`` (`embed_batch`);
    ``embed(params, tokens, rng, layers=(l1, l2, ...)) -> float32 [B, n, D]`` runs the
    encoder once, keeping every hidden state, and pools each listed layer (1 = the first
    transformer layer) with the same pooler (and normalisation) — what ``train.layer_dims``
    needs, at the cost of one forward pass instead of one per layer. ``lora``: the `LoRAConfig` of
    the tree's adapters. ``embed.precompute(params)`` is the head's batch-independent part (None
    when it has none), passed back as ``embed(..., shared=...)``.
    """
    from embedjax.encoder import embed_batch
    from embedjax.models.lora import apply_model
    from embedjax.models.poolers import l2_normalize, pool

    def embed(params, tokens, rng, layers=None, shared=None):
        rngs = {"dropout": rng}
        if layers is None:
            return embed_batch(model, params, tokens, pooling=pooling, normalize=normalize, head=head,
                               deterministic=False, rngs=rngs, lora=lora, head_shared=shared)
        if head is not None:
            raise ValueError("train.layer_dims pools transformer layers directly; it does not combine with a "
                             "trainable head (model.head): set one of them")
        _, extras = apply_model(model, params, tokens, lora=lora, deterministic=False, output_hidden_states=True,
                                rngs=rngs)
        mask = tokens.get("pool_mask", tokens["attention_mask"])
        pooled = [pool(extras["hidden_states"][layer], mask, pooling) for layer in layers]
        return jnp.stack([l2_normalize(e) if normalize else e for e in pooled], axis=1)

    embed.precompute = None
    if head is not None and hasattr(head, "batch_independent"):
        embed.precompute = lambda params: head.batch_independent(params["head"])
    return embed


class Objective(NamedTuple):
    """A loss split at the embeddings (what GradCache needs).

    ``embed_columns(params, batch, rng, shared=None) -> {name: float32 [b, ...]}`` embeds every
    text column of a (sub-)batch; ``loss_from_embeddings(embeddings, batch) -> scalar`` scores
    the global batch's embeddings with the batch's labels/ids. ``precompute(params)`` (optional)
    is the batch-independent part of embedding (a head's latent keys and values): the step computes
    it once and passes it to every ``embed_columns`` call as ``shared``.
    """

    embed_columns: Callable
    loss_from_embeddings: Callable
    precompute: Callable | None = None


def check_layer_dims(layer_dims, layer_dims_weights, *, num_layers, hidden_size, matryoshka: bool = False,
                     ring: bool = False):
    """Validate ``train.layer_dims`` / ``train.layer_dims_weights`` -> (pairs, weights).

    Pairs are (layer, dim): layer in 1..num_layers (transformer layers; the embedding
    output is not one), dim a prefix size in 1..hidden_size, listed in increasing
    (layer, dim) order without repeats (so within a layer the dims increase). Not
    combinable with Matryoshka prefixes (``matryoshka``) or the ring loss (``ring``).
    """
    pairs = []
    for pair in layer_dims:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ValueError(f"train.layer_dims entry {pair!r} is not a (layer, dim) pair of ints; "
                             "write e.g. ((2, 64), (4, 128)) or build it with two_d_matryoshka_pairs/starbucks_pairs")
        pairs.append((int(pair[0]), int(pair[1])))
    if not pairs:
        raise ValueError("train.layer_dims is empty; leave it () to turn layer/dim training off")
    if matryoshka:
        raise ValueError("train.layer_dims and train.matryoshka_dims (or _weights) both set: put the prefix "
                         "sizes into the (layer, dim) pairs (two_d_matryoshka_pairs((num_layers,), dims) is plain "
                         "Matryoshka) and set train.matryoshka_dims=() and train.matryoshka_weights=()")
    if ring:
        raise ValueError("train.layer_dims does not run with train.ring=True (the ring loss takes one embedding "
                         "per text); set train.ring=False")
    if num_layers is None or hidden_size is None:
        raise ValueError("train.layer_dims needs the model's num_layers and hidden_size to check the pairs")
    for layer, dim in pairs:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"train.layer_dims pair ({layer}, {dim}): layer must be in 1..{num_layers} "
                             f"(the model's transformer layers)")
        if not 1 <= dim <= hidden_size:
            raise ValueError(f"train.layer_dims pair ({layer}, {dim}): dim must be in 1..{hidden_size} "
                             f"(the model width)")
    if pairs != sorted(set(pairs)):
        raise ValueError(f"train.layer_dims {tuple(pairs)} must list (layer, dim) pairs in increasing order "
                         f"without repeats (dims increasing within a layer): {tuple(sorted(set(pairs)))}")
    weights = tuple(float(w) for w in layer_dims_weights) or (1.0,) * len(pairs)
    if len(weights) != len(pairs):
        raise ValueError(f"train.layer_dims_weights has {len(weights)} entries for {len(pairs)} train.layer_dims "
                         "pairs; give one weight per pair or () for all 1")
    return tuple(pairs), weights


def retrieval_loss_fn(loss: str, *, temperature: float, siglip_bias: float, cosent_scale: float,
                      bidirectional: bool, ring: bool, mesh=None, similarity: str = "cos",
                      ring_impl: str = "xla", stripe_rows: int = 0) -> Callable:
    """``fn(q_bd, d_bd, **metadata) -> scalar``: the configured retrieval loss with its
    hyperparameters bound, cosine similarity, and the dense, ring or (``stripe_rows`` > 0, InfoNCE)
    row-stripe implementation.

    ``metadata`` are the keywords the three losses share: hard_negatives_bkd,
    group_ids_b, doc_ids_b, hard_negative_ids_bk, matryoshka_dims, matryoshka_weights.
    """
    if ring and loss not in RING_LOSSES:
        raise ValueError(f"train.ring=True supports train.loss in {RING_LOSSES} only, got {loss!r}; "
                         "set train.ring=False for the dense loss")
    if bidirectional and loss != "infonce":
        # SigLIP and in-batch CoSENT already score every (query, document) pair once.
        raise ValueError(f"train.bidirectional=True applies to infonce only; train.loss={loss!r} scores every "
                         "(query, document) pair in both roles already: set train.bidirectional=False")
    if ring and mesh is None:
        raise ValueError("the ring loss needs the mesh")
    from embedjax.losses.ring import TILE_IMPLS

    if ring_impl not in TILE_IMPLS:
        raise ValueError(f"train.ring_impl={ring_impl!r}: use one of {TILE_IMPLS}")
    if ring_impl != "xla" and not ring:
        raise ValueError(f"train.ring_impl={ring_impl!r} chooses the ring loss's tiles; set train.ring=True "
                         "or leave train.ring_impl='xla'")
    if similarity == "maxsim" and loss != "infonce":
        raise ValueError(f"a multi-vector head (MaxSim) trains with train.loss='infonce'; got {loss!r}")
    if stripe_rows:
        return _striped_loss_fn(loss, stripe_rows, temperature=temperature, bidirectional=bidirectional, ring=ring,
                                mesh=mesh, similarity=similarity)
    if loss == "cosent":
        from embedjax.losses.pairwise import cosent_in_batch

        return functools.partial(cosent_in_batch, scale=cosent_scale)
    # "cos" equals "dot" for normalised embeddings, and normalises Matryoshka prefixes.
    if loss == "siglip":
        from embedjax.losses.contrastive import siglip
        from embedjax.losses.ring import ring_siglip

        fn, options = (ring_siglip if ring else siglip), dict(temperature=temperature, bias=siglip_bias)
    else:
        from embedjax.losses.contrastive import infonce
        from embedjax.losses.ring import ring_infonce

        fn, options = (ring_infonce if ring else infonce), dict(temperature=temperature, bidirectional=bidirectional)
    if ring:
        options.update(mesh=mesh, axis="data", impl=ring_impl)
    return functools.partial(fn, similarity=similarity, **options)


def _striped_loss_fn(loss, stripe_rows, *, temperature, bidirectional, ring, mesh, similarity) -> Callable:
    """`retrieval_loss_fn` for ``train.stripe_rows`` > 0: `embedjax.losses.striped_infonce`."""
    from embedjax.losses.stripes import striped_infonce

    if isinstance(stripe_rows, bool) or not isinstance(stripe_rows, int) or stripe_rows < 0:
        raise ValueError(f"train.stripe_rows must be 0 (off) or a positive int (query rows per stripe), "
                         f"got {stripe_rows!r}")
    refusals = [(ring, "train.ring=True (two implementations of the loss over the data axis; set one)"),
                (loss != "infonce", f"train.loss={loss!r} (stripes run infonce)"),
                (bidirectional, "train.bidirectional=True (its column statistics need whole columns: use "
                                "train.ring=True)"),
                (similarity not in ("dot", "cos"), "a multi-vector (MaxSim) head (use train.ring=True)"),
                (mesh is None, "no mesh")]
    reasons = [reason for on, reason in refusals if on]
    if reasons:
        raise ValueError(f"train.stripe_rows={stripe_rows} does not run with {'; '.join(reasons)}; "
                         "set train.stripe_rows=0 for the dense loss")
    return functools.partial(striped_infonce, mesh=mesh, axis="data", temperature=temperature,
                             row_block=stripe_rows, similarity=similarity)


def make_objective(
    embed: Callable,
    *,
    kind: str,
    loss: str,
    cosent_scale: float = 20.0,
    temperature: float = 0.05,
    siglip_bias: float = -10.0,
    bidirectional: bool = False,
    mask_false_negatives: bool = True,
    matryoshka_dims=(),
    matryoshka_weights=(),
    layer_dims=(),
    layer_dims_weights=(),
    num_layers: int | None = None,
    hidden_size: int | None = None,
    ring: bool = False,
    mesh=None,
    similarity: str = "cos",
    reduce_tokens: Callable | None = None,
    ring_impl: str = "xla",
    stripe_rows: int = 0,
) -> Objective:
    """The configured loss for a batch layout of `embedjax.data.pipeline`.

    ``embed(params, tokens, rng) -> float32 [B, D]`` embeds one text column with dropout
    keyed by ``rng``; with ``layer_dims`` it is also called as ``embed(params, tokens, rng,
    layers=(l1, ...)) -> float32 [B, n, D]`` (see `make_embed`). ``num_layers`` and
    ``hidden_size`` (the model's) are needed only to check ``layer_dims``.
    ``similarity="maxsim"``: ``embed`` returns token vectors [B, L, D] (a multi-vector head) and
    the loss scores MaxSim over each column's ``pool_mask``; ``reduce_tokens(tokens, mask, side)``
    (a multi-vector head's ``reduce``: CRISP clustering) maps each side's tokens first, inside the
    loss so that GradCache differentiates through it.
    """
    if loss not in LOSSES_FOR_KIND.get(kind, ()):
        raise ValueError(
            f"train.loss={loss!r} does not fit {kind!r} data; use one of {LOSSES_FOR_KIND.get(kind, ())} "
            "(cosent for graded sts pairs; infonce, siglip or cosent for retrieval pairs)"
        )
    if similarity == "maxsim" and kind != "retrieval":
        raise ValueError("a multi-vector head (MaxSim) trains on retrieval pairs; graded sts pairs need a "
                         "sentence embedding")
    if kind == "sts":
        if layer_dims:
            raise ValueError("train.layer_dims applies to retrieval data only; set train.layer_dims=()")
        if stripe_rows:
            raise ValueError("train.stripe_rows applies to retrieval data (train.loss='infonce') only; "
                             "set train.stripe_rows=0")
        from embedjax.losses.pairwise import cosent

        def embed_sts(params, batch, rng, shared=None):
            if "texts" in batch:  # packed: both sides in one batch, pair-interleaved (a_0, b_0, a_1, ...)
                emb_2bd = embed(params, batch["texts"], rng, **_shared_kw(shared))
                return {"a": emb_2bd[0::2], "b": emb_2bd[1::2]}
            # One forward pass over both sides (the pipeline pads them to one length): one
            # larger matmul per layer instead of two, and half the program to compile.
            b = batch["score"].shape[0]
            both = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), batch["a"], batch["b"])
            emb_2bd = embed(params, both, rng, **_shared_kw(shared))
            return {"a": emb_2bd[:b], "b": emb_2bd[b:]}

        def sts_loss(emb, batch):
            return cosent(emb["a"], emb["b"], batch["score"], scale=cosent_scale)

        return Objective(embed_sts, sts_loss, getattr(embed, "precompute", None))

    contrastive = retrieval_loss_fn(loss, temperature=temperature, siglip_bias=siglip_bias,
                                    cosent_scale=cosent_scale, bidirectional=bidirectional, ring=ring, mesh=mesh,
                                    similarity=similarity, ring_impl=ring_impl, stripe_rows=stripe_rows)
    if layer_dims and similarity == "maxsim":
        raise ValueError("train.layer_dims pools layers into sentence embeddings; it does not apply to MaxSim")
    if layer_dims:
        pairs, weights = check_layer_dims(layer_dims, layer_dims_weights, num_layers=num_layers,
                                          hidden_size=hidden_size, ring=ring,
                                          matryoshka=bool(matryoshka_dims or matryoshka_weights))
        return _layer_dims_objective(embed, contrastive, pairs, weights, mask_false_negatives)._replace(
            precompute=getattr(embed, "precompute", None))
    prefixes = dict(matryoshka_dims=tuple(matryoshka_dims) or None,
                    matryoshka_weights=tuple(matryoshka_weights) or None)

    def retrieval_loss(emb, batch):
        masks = {}
        if similarity == "maxsim":
            emb, masks = _scored_tokens(emb, batch, reduce_tokens)
        return contrastive(emb["query"], emb["positive"], hard_negatives_bkd=emb.get("negatives"), **prefixes,
                           **masks, **_retrieval_ids(batch, "negatives" in emb, mask_false_negatives))

    return Objective(functools.partial(_embed_retrieval, embed, {}), retrieval_loss,
                     getattr(embed, "precompute", None))


def _shared_kw(shared) -> dict:
    return {} if shared is None else {"shared": shared}


def _embed_retrieval(embed, embed_options, params, batch, rng, shared=None):
    """{"query": [B, ...], "positive": [B, ...], "negatives": [B, K, ...] when the batch has them}."""
    rng_q, rng_d, rng_n = jax.random.split(rng, 3)
    embed_options = {**embed_options, **_shared_kw(shared)}
    out = {"query": embed(params, batch["query"], rng_q, **embed_options),
           "positive": embed(params, batch["positive"], rng_d, **embed_options)}
    if "negatives" in batch:
        b, k = batch["negative_ids"].shape
        flat = embed(params, _flatten_negatives(batch["negatives"]), rng_n, **embed_options)
        out["negatives"] = flat.reshape(b, k, *flat.shape[1:])
    return out


def _scored_tokens(emb, batch, reduce_tokens) -> tuple[dict, dict]:
    """Each column's scored vectors and MaxSim's token masks (as loss keywords): the tokens of the
    batch's ``pool_mask``, or what ``reduce_tokens`` (CRISP) makes of them."""
    reduce_tokens = reduce_tokens or (lambda tokens, mask, side: (tokens, mask))
    q, q_mask = reduce_tokens(emb["query"], batch["query"]["pool_mask"] > 0, "query")
    d, d_mask = reduce_tokens(emb["positive"], batch["positive"]["pool_mask"] > 0, "document")
    out, masks = {"query": q, "positive": d}, {"q_mask_bl": q_mask, "d_mask_bl": d_mask}
    if "negatives" in emb:
        h_bkld, h_mask = emb["negatives"], batch["negatives"]["pool_mask"] > 0
        b, k = h_bkld.shape[:2]
        h, h_mask = reduce_tokens(h_bkld.reshape((b * k,) + h_bkld.shape[2:]), h_mask.reshape(b * k, -1), "document")
        out["negatives"], masks["hard_negatives_mask_bkl"] = h.reshape((b, k) + h.shape[1:]), h_mask.reshape(b, k, -1)
    return out, masks


def _retrieval_ids(batch, has_negatives: bool, mask_false_negatives: bool) -> dict:
    """The ids that mark positives and false negatives, as loss keywords (none: diagonal positives)."""
    if not mask_false_negatives:
        return {}
    ids = {"group_ids_b": batch["query_id"], "doc_ids_b": batch["positive_id"]}
    if has_negatives:
        ids["hard_negative_ids_bk"] = batch["negative_ids"]
    return ids


def _layer_dims_objective(embed, contrastive, pairs, weights, mask_false_negatives: bool) -> Objective:
    """sum_p weights[p] * contrastive(prefix dim_p of layer_p's embeddings) over the (layer, dim) pairs.

    Each text column is embedded once with the needed layers: [B, n, D] (negatives
    [B, K, n, D]); the loss's cosine similarity L2-normalises every prefix.
    """
    from embedjax.losses.matryoshka import starbucks_loss

    layers = tuple(sorted({layer for layer, _ in pairs}))

    def per_pair(q_bd, d_bd, *negatives_bkd, **metadata):
        # Hard negatives travel positionally so that starbucks_loss cuts them from the same layer.
        return contrastive(q_bd, d_bd, hard_negatives_bkd=negatives_bkd[0] if negatives_bkd else None, **metadata)

    summed = starbucks_loss(per_pair, pairs, weights)

    def layer_loss(emb, batch):
        by_layer = [None] * (max(layers) + 1)  # indexed by layer number, as the pairs are
        for i, layer in enumerate(layers):
            by_layer[layer] = tuple(emb[name][..., i, :] for name in ("query", "positive", "negatives") if name in emb)
        return summed(by_layer, **_retrieval_ids(batch, "negatives" in emb, mask_false_negatives))

    return Objective(functools.partial(_embed_retrieval, embed, {"layers": layers}), layer_loss)


def interleave_rows(batch, sub_batch_size: int):
    """Reorder rows so that GradCache sub-batch i holds rows i, i + c, i + 2c, ... (c = B / sub).

    The batch is sharded in contiguous row blocks per device, so strided sub-batches
    draw rows from every device and each sub-batch pass keeps all devices busy. The
    losses are sums over rows, so the reorder changes no value (up to float rounding).
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % sub_batch_size:
        raise ValueError(f"train.gradcache_sub_batch={sub_batch_size} does not divide the global batch {size}")
    order = jnp.arange(size).reshape(sub_batch_size, size // sub_batch_size).T.reshape(-1)
    return jax.tree.map(lambda x: x[order], batch)


def trainable_part(params, trainable=None) -> dict:
    """The entries of the encoder tree the optimizer updates: ``trainable`` top-level keys (e.g.
    ``("head", "lora")`` for LoRA), or the whole tree when None."""
    if trainable is None:
        return params
    missing = sorted(set(trainable) - set(params))
    if missing:
        raise ValueError(f"trainable entries {missing} are not in the parameter tree (keys {sorted(params)})")
    return {k: params[k] for k in trainable}


def value_and_grad_fn(objective: Objective, gradcache_sub_batch: int = 0, trainable=None):
    """``(params, batch, rng) -> (loss, grads)``: plain autodiff, or GradCache over sub-batches.

    Gradients are taken for `trainable_part` only (the other entries are constants: no gradient
    memory, no weight-gradient compute). The objective's ``precompute`` runs once, outside the
    per-column and per-sub-batch embedding, and its gradient is pulled back into the parameters.
    """
    def plain(embed_columns, tree, batch, rng):
        return jax.value_and_grad(lambda t: objective.loss_from_embeddings(embed_columns(t, batch, rng), batch))(tree)

    def cached(embed_columns, tree, batch, rng):
        from embedjax.losses.gradcache import gradcache_value_and_grad

        batch = interleave_rows(batch, gradcache_sub_batch)
        return gradcache_value_and_grad(embed_columns, lambda emb: objective.loss_from_embeddings(emb, batch), tree,
                                        batch, sub_batch_size=gradcache_sub_batch, rng=rng)

    differentiate = cached if gradcache_sub_batch > 0 else plain

    def fn(params, batch, rng):
        train = trainable_part(params, trainable)
        frozen = {k: v for k, v in params.items() if k not in train}

        def full(t):
            return {**frozen, **t}

        if objective.precompute is None:
            return differentiate(lambda t, b, r: objective.embed_columns(full(t), b, r), train, batch, rng)
        shared, pullback = jax.vjp(lambda t: objective.precompute(full(t)), train)
        loss, grads = differentiate(
            lambda t, b, r: objective.embed_columns(full(t["params"]), b, r, shared=t["shared"]),
            {"params": train, "shared": shared}, batch, rng)
        (through_shared,) = pullback(grads["shared"])
        return loss, jax.tree.map(jnp.add, grads["params"], through_shared)

    return fn


def batch_shardings(batch, mesh, batch_axes) -> dict:
    """A NamedSharding per batch leaf: leading (batch) dimension over ``batch_axes``, the rest replicated."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (leaf.ndim - 1)))), batch
    )


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule, state_shardings,
                    batch_sharding_tree, mesh, *, gradcache_sub_batch: int = 0, trainable=None,
                    dropout_rng: str = DEFAULT_DROPOUT_RNG):
    """jit(step): ``(state, batch) -> (new_state, metrics)``; the old state's buffers are donated.
    ``trainable``: the top-level entries of the params the optimizer updates (None: all).
    ``dropout_rng``: the PRNG implementation of ``state.rng`` (`embedjax.train.state.DROPOUT_RNGS`);
    other than the default, the step's dropout key is a typed key of that implementation."""
    loss_and_grads = value_and_grad_fn(objective, gradcache_sub_batch, trainable)
    check_dropout_rng(dropout_rng)

    def step(state: TrainState, batch):
        # The default keeps the raw key data (the same bits as a typed threefry key, and the form
        # every earlier run and checkpoint used).
        base = state.rng if dropout_rng == DEFAULT_DROPOUT_RNG else jax.random.wrap_key_data(state.rng, impl=dropout_rng)
        rng = jax.random.fold_in(base, state.step)
        loss, grads = loss_and_grads(state.params, batch, rng)
        train = trainable_part(state.params, trainable)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        params = {**state.params, **optax.apply_updates(train, updates)}
        metrics = {
            "loss": loss,
            "grad_norm": global_l2_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding_tree),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform),
    )
