"""``python -m embedjax bench train_step``: one contrastive training step, embedjax against PyTorch.

The model-level half of training speed, on whatever device JAX and PyTorch see (a
GPU when lent; the whole-pipeline comparison with sentence-transformers on real
data is ``bench train``). Both sides train the same randomly initialised
model on the same random token batches: ``--arch bert`` (MiniLM-L6's shape by default, dropout
0.1 as BERT has it) or ``--arch llama`` (SmolLM2-135M's shape by default: 30 layers, GQA with 9
query and 3 key/value heads, SwiGLU, RMSNorm, RoPE, causal attention, tied embeddings, no dropout);
``--batch`` (query, document) pairs of up to ``--seq`` tokens with random padding,
mean pooling, L2 normalisation, in-batch InfoNCE at temperature 0.05,
AdamW. embedjax: one ``jax.jit`` step (bf16 activations, float32 softmax, norms
and master weights). PyTorch: ``transformers.BertModel`` / ``LlamaModel`` with
SDPA attention under bf16 autocast and fused AdamW, the way the
sentence-transformers trainer runs it (eager, no ``torch.compile``). The shape flags
(``--layers``, ``--hidden``, ...) override the architecture's defaults.

Reports pairs/s of both (median step time over ``--steps`` after warm-up), their
ratio, and the model FLOPs utilisation against the bf16 matmul rate measured in
the same run.
"""
from __future__ import annotations

import argparse

import numpy as np

from embedjax.bench import report
from embedjax.models.attention import ATTENTION_IMPLS
from embedjax.train.state import DEFAULT_DROPOUT_RNG, DROPOUT_RNGS

SECTION = "Train step on an accelerator"
TEMPERATURE = 0.05


# Shapes of the two architectures (the flags override them): MiniLM-L6 and SmolLM2-135M.
SHAPES = {
    "bert": dict(layers=6, hidden=384, heads=12, kv_heads=12, intermediate=1536, vocab=30522),
    "llama": dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="bert", choices=sorted(SHAPES),
                        help="bert: BERT encoder (MiniLM-L6 shape); llama: decoder (SmolLM2-135M shape)")
    for name in SHAPES["bert"]:
        given_heads = "; --heads when that is given" if name == "kv_heads" else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default: the architecture's ({SHAPES['bert'][name]} bert, "
                                 f"{SHAPES['llama'][name]} llama{given_heads})")
    parser.add_argument("--batch", type=int, default=256, help="(query, document) pairs per step")
    parser.add_argument("--seq", type=int, default=128, help="padded sequence length")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (median reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                        help="embedjax's attention (auto: cuDNN flash where it applies; under dropout on a GPU "
                             "the chunked kernel, which draws its dropout per key block; 'explicit' for the "
                             "materialised softmax)")
    parser.add_argument("--dropout-rng", default=DEFAULT_DROPOUT_RNG, choices=DROPOUT_RNGS,
                        help="PRNG implementation of embedjax's dropout keys (train.dropout_rng): rbg draws the "
                             "step's masks with XLA's RngBitGenerator instead of threefry")
    parser.add_argument("--scan-unroll", type=int, default=1,
                        help="layers per step of embedjax's layer scan (model.scan_unroll; --layers: no loop, as "
                             "the unrolled BERT of 2026-11-28 whose step ran at 0.90x PyTorch)")
    parser.add_argument("--no-torch", action="store_true", help="time embedjax only")
    parser.add_argument("--matmul-size", type=int, default=8192, help="size of the bf16 matmul ceiling")
    report.add_arguments(parser)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """Token ids int32 [2B, L] (queries then documents) and a right-padded mask [2B, L] with
    lengths uniform in [L/4, L]; the first column is [CLS]-like (id 101) as in real batches."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(2 * batch, seq), dtype=np.int32)
    ids[:, 0] = 101
    lengths = rng.integers(max(1, seq // 4), seq + 1, size=2 * batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def resolve_shape(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every shape flag left unset filled from ``--arch``'s shape (`SHAPES`); an unset
    ``--kv-heads`` beside a given ``--heads`` is ``--heads`` (no GQA)."""
    if args.kv_heads is None and args.heads is not None:
        args.kv_heads = args.heads
    for name, value in SHAPES[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def train_flops(batch: int, seq: int, layers: int, hidden: int, intermediate: int, *, kv_width: int | None = None,
                mlp_matrices: int = 2) -> float:
    """Matmul FLOPs of one training step (forward x 3) over 2*batch padded sequences.

    Per token and layer: the q and output projections 4 h^2, the k and v projections 4 h w (w: the
    key/value width, h without GQA), the MLP 2 m h i (m matrices: 2 plain, 3 gated); 2 FLOPs per
    MAC. Per sequence and layer: scores and values 4 L^2 h (all pairs, causal or not). Embedding
    lookups are not matmuls.
    """
    kv_width = hidden if kv_width is None else kv_width
    sequences = 2 * batch
    per_token = 4 * hidden ** 2 + 4 * hidden * kv_width + 2 * mlp_matrices * hidden * intermediate
    per_layer = sequences * seq * per_token + sequences * 4 * seq ** 2 * hidden
    return 3.0 * layers * per_layer


def _embedjax_config(args):
    """The architecture's config through the family registry (random initialisation)."""
    from embedjax.models.registry import get_family

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                  intermediate_size=args.intermediate, max_position_embeddings=max(512, args.seq),
                  attention_impl=args.attention_impl)
    if args.arch == "llama":
        common.update(num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads)
    family = get_family(args.arch)
    return family, family.config_from_fields(**common)


def _torch_model(args, transformers):
    """The same architecture in transformers, SDPA attention."""
    if args.arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(512, args.seq), tie_word_embeddings=True, attn_implementation="sdpa")
        return transformers.LlamaModel(config)
    config = transformers.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=args.heads, intermediate_size=args.intermediate,
                                     max_position_embeddings=max(512, args.seq), attn_implementation="sdpa")
    return transformers.BertModel(config, add_pooling_layer=False)


def embedjax_step(args, ids, mask):
    """``(step, params, opt_state)``: the jitted embedjax training step the bench times,
    ``step(params, opt_state, dropout_key) -> (params, opt_state, loss)``, and its initial state."""
    import jax
    import jax.numpy as jnp
    import optax

    from embedjax.losses import infonce
    from embedjax.models.poolers import l2_normalize, mean_pool

    family, cfg = _embedjax_config(resolve_shape(args))
    model = family.build(cfg, dtype=args.dtype, scan_unroll=args.scan_unroll)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    params = model.init(jax.random.key(0), {"input_ids": ids[:2], "attention_mask": mask[:2]})["params"]
    tx = optax.adamw(2e-5, weight_decay=0.01)

    def loss_fn(p, rng):
        hidden, _ = model.apply({"params": p}, {"input_ids": ids, "attention_mask": mask}, deterministic=False,
                                rngs={"dropout": rng})
        emb = l2_normalize(mean_pool(hidden, mask).astype(jnp.float32))
        return infonce(emb[: args.batch], emb[args.batch:], temperature=TEMPERATURE)

    @jax.jit
    def step(p, s, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, rng)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    return step, params, tx.init(params)


def _embedjax_step_seconds(args, ids, mask) -> tuple[float, float]:
    import jax

    from embedjax.bench.timing import median_seconds

    step, params, opt_state = embedjax_step(args, ids, mask)
    state = {"p": params, "s": opt_state, "i": 0}

    def one():
        state["i"] += 1
        key = jax.random.key(state["i"], impl=args.dropout_rng)
        state["p"], state["s"], loss = step(state["p"], state["s"], key)
        return loss

    seconds = median_seconds(one, args.steps, warmup=2)
    return seconds, float(one())


def _torch_step_seconds(args, ids, mask) -> tuple[float, float, str]:
    import time

    import torch
    import torch.nn.functional as F
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _torch_model(resolve_shape(args), transformers).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=device == "cuda")
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    mask_t = torch.as_tensor(mask, dtype=torch.long, device=device)
    labels = torch.arange(args.batch, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def one() -> float:
        with autocast:
            hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            m = mask_t.unsqueeze(-1).to(hidden.dtype)
            emb = F.normalize(((hidden * m).sum(1) / m.sum(1)).float(), dim=-1)
            loss = F.cross_entropy(emb[: args.batch] @ emb[args.batch:].T / TEMPERATURE, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        one()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = one()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(loss.detach()), device


def run(args: argparse.Namespace) -> dict:
    from embedjax.bench.timing import matmul_tflops, sig

    resolve_shape(args)
    if args.batch < 2 or args.seq < 2 or args.steps < 1:
        raise ValueError("--batch and --seq must be >= 2 and --steps >= 1")
    if not 1 <= args.scan_unroll <= args.layers:
        raise ValueError(f"--scan-unroll={args.scan_unroll} must be between 1 and --layers ({args.layers})")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.heads % args.kv_heads or (args.arch == "bert" and args.kv_heads != args.heads):
        raise ValueError(f"--kv-heads ({args.kv_heads}) must divide --heads ({args.heads}); BERT has no GQA, so "
                         "there the two are equal")
    ids, mask = random_batch(args.batch, args.seq, args.vocab)
    started = report.start(args)
    spec = _embedjax_config(args)[1].block_spec()  # the built model's widths, whatever the architecture
    flops = train_flops(args.batch, args.seq, args.layers, args.hidden, args.intermediate,
                        kv_width=spec.attention.num_kv_heads * spec.attention.head_dim,
                        mlp_matrices=3 if spec.mlp.kind == "gated" else 2)
    ceiling = matmul_tflops(args.matmul_size)
    ours, our_loss = _embedjax_step_seconds(args, ids, mask)
    result = dict(device=report.device_description(), arch=args.arch, batch_pairs=args.batch, seq=args.seq,
                  layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                  intermediate=args.intermediate, dtype=args.dtype, attention_impl=args.attention_impl,
                  dropout_rng=args.dropout_rng, scan_unroll=args.scan_unroll,
                  embedjax_ms=sig(ours * 1e3), embedjax_pairs_per_s=sig(args.batch / ours),
                  embedjax_mfu=sig(flops / ours / 1e12 / ceiling), bf16_matmul_TFLOPs=sig(ceiling),
                  embedjax_final_loss=sig(our_loss))
    if not args.no_torch:
        theirs, their_loss, torch_device = _torch_step_seconds(args, ids, mask)
        result.update(torch_device=torch_device, torch_ms=sig(theirs * 1e3),
                      torch_pairs_per_s=sig(args.batch / theirs),
                      torch_mfu=sig(flops / theirs / 1e12 / ceiling), torch_final_loss=sig(their_loss),
                      speedup_vs_torch=sig(theirs / ours))
    return report.finish(args, "train_step", SECTION, [result], started)[0]


if __name__ == "__main__":  # `python -m embedjax.bench.train_step` runs without the CLI's optional imports
    import json

    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    print(json.dumps(run(_parser.parse_args())))
