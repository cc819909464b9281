"""``python -m embedjax bench lora``: compiled memory of a LoRA training step against full fine-tuning.

The trainer's own step (`embedjax.train.step.make_train_step`: InfoNCE over (query, positive,
hard negative) columns, AdamW, the state donated) is lowered and compiled twice for the same
model and batch shape, without allocating any weights:

- full fine-tuning: every parameter trained, Adam moments for all of them;
- LoRA: adapters of rank ``--rank`` on the ``q, k, v, o, gate, up, down`` kernels, the backbone
  frozen (no gradient, no moments).

Reported from ``compiled.memory_analysis()`` on the device JAX runs on (CPU here: the XLA CPU
compiler's buffer assignment, labelled as such): argument bytes (parameters, optimizer state,
batch), temporary bytes (activations, gradients, updates), and their sum, with the ratios full /
LoRA. The trainable parameter counts and the optimizer-state bytes come from the state's shapes.
"""
from __future__ import annotations

import argparse

from embedjax.bench import report

SECTION = "LoRA vs full fine-tuning: compiled training-step memory (issue 12)"
MIB = 2.0 ** 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model folder or packaged alias")
    parser.add_argument("--batch-size", type=int, default=16, help="(query, positive, hard negative) triplets")
    parser.add_argument("--length", type=int, default=64, help="padded tokens per text")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--remat", default="none", help="remat policy of the layer stack (embedjax.models.layers)")
    report.add_arguments(parser)


def _batch(batch_size: int, length: int, token_type_ids: bool) -> dict:
    import numpy as np

    def tokens(*lead):
        out = {"input_ids": np.ones((*lead, length), np.int32), "attention_mask": np.ones((*lead, length), np.int32)}
        if token_type_ids:
            out["token_type_ids"] = np.zeros((*lead, length), np.int32)
        return out

    ids = np.arange(batch_size, dtype=np.int32)
    return {"query": tokens(batch_size), "positive": tokens(batch_size), "negatives": tokens(batch_size, 1),
            "query_id": ids, "positive_id": ids, "negative_ids": ids[:, None] + batch_size}


def step_memory(model, family, batch: dict, *, lora=None) -> dict:
    """Compile the trainer's step for ``model`` (full fine-tuning, or LoRA with ``lora``) -> bytes."""
    import jax
    import numpy as np

    from embedjax.encoder import abstract_params
    from embedjax.sharding.mesh import make_mesh
    from embedjax.train import optim
    from embedjax.train.state import create_state, state_shardings, unbox
    from embedjax.train.step import batch_shardings, make_embed, make_objective, make_train_step

    trainable = ("head", "lora") if lora is not None else None
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1],
                     axis_type=jax.sharding.AxisType.Auto)
    schedule = optim.learning_rate_schedule(1e-4, 10, 1)
    tx = optim.adamw(schedule, weight_decay=0.01)
    objective = make_objective(make_embed(model, pooling="mean", normalize=True, lora=lora), kind="retrieval",
                               loss="infonce", temperature=0.05)
    boxed = abstract_params(model, None, family, lora)
    shardings = state_shardings(boxed, tx, mesh, "data_parallel", trainable)
    state = unbox(jax.eval_shape(lambda p: create_state(p, tx, 0, trainable), boxed))
    step = make_train_step(objective, tx, schedule, shardings, batch_shardings(batch, mesh, None), mesh,
                           trainable=trainable)
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    train_part = state.params if trainable is None else {k: state.params[k] for k in trainable}
    return {"argument_mib": memory.argument_size_in_bytes / MIB, "temp_mib": memory.temp_size_in_bytes / MIB,
            "total_mib": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / MIB,
            "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(train_part))),
            "optimizer_state_mib": nbytes(state.opt_state) / MIB, "params_mib": nbytes(state.params) / MIB}


def run(args: argparse.Namespace) -> dict:
    import jax

    from embedjax.convert import hf
    from embedjax.models.lora import LoRAConfig
    from embedjax.models.pretrained import resolve_model_dir
    from embedjax.models.registry import family_for_config

    if args.batch_size < 1 or args.length < 2:
        raise ValueError(f"--batch-size {args.batch_size} and --length {args.length}: use >= 1 and >= 2")
    config = hf.read_config(resolve_model_dir(args.model))
    family = family_for_config(config)
    model = family.build(config, remat=args.remat)
    batch = _batch(args.batch_size, args.length, family.tokenizer.token_type_ids)
    started = report.start(args)
    full = step_memory(model, family, batch)
    adapted = step_memory(model, family, batch, lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    row = {
        "model": args.model,
        "layers": config.num_layers,
        "batch": f"{args.batch_size}x3x{args.length}",
        "rank": args.rank,
        "remat": args.remat,
        "memory": f"compiled, {jax.devices()[0].platform.upper()} (XLA buffer assignment)",
        **{f"full_{k}": v for k, v in full.items()},
        **{f"lora_{k}": v for k, v in adapted.items()},
        "total_ratio_full_vs_lora": full["total_mib"] / adapted["total_mib"],
        "temp_ratio_full_vs_lora": full["temp_mib"] / adapted["temp_mib"],
        "device": report.device_description(),
    }
    shown = ["model", "batch", "rank", "memory", "full_total_mib", "lora_total_mib", "total_ratio_full_vs_lora",
             "full_temp_mib", "lora_temp_mib", "full_optimizer_state_mib", "lora_optimizer_state_mib",
             "lora_trainable_params"]
    return report.finish(args, "lora", SECTION, [row], started, shown=shown)[0]


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    import json

    print(json.dumps(run(parser.parse_args())))
