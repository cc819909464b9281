"""``python -m embedjax bench train``: STS-B CoSENT fine-tuning speed, embedjax vs sentence-transformers.

Both sides run the `configs/stsb_cosent.py` recipe (all-MiniLM-L6-v2, CoSENT scale 20,
batch 16, AdamW lr 2e-5 wd 0.01, 10% warm-up then linear decay over the 1-epoch
schedule, clip 1.0, dropout on) for the same first ``--steps`` steps on the *same
global batches* (the reference reads the texts of each step from embedjax's plan),
in the same process, one after the other, on the same machine:

- embedjax: the real ``train`` entry point (config ``stsb_cosent.py:steps=N``, which packs
  each step's 32 sentences into rows of 64 tokens, ``data.pack``; ``--set data.pack=False``
  times padded batches); pairs/s in steady state (steps whose batch shape was compiled
  earlier in the run) and over steps 2..N including the compilations of first-time length buckets (a
  short run pays them all; a full epoch amortises them).
- reference: sentence-transformers' model and ``CoSENTLoss`` in a torch loop with the
  optimizer, schedule and clipping the transformers Trainer uses for these settings
  (the Trainer itself needs the ``datasets`` and ``accelerate`` packages, which are not
  installed here); pairs/s over steps 2..N, each step padded to its longest text as
  sentence-transformers does.

With ``--record`` the row goes to BENCHMARKS.md with its provenance (commit, load average at
the start, versions; see ``embedjax.bench.report``); ``--wait-idle`` waits for an idle machine.
``--batch-size`` and ``--model`` change the recipe's global batch and starting model (the smoke
test runs 3 steps of 2 pairs on a 2-layer random BERT).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

from embedjax.bench import report

REPO = pathlib.Path(__file__).resolve().parents[2]
SECTION = "Training: STS-B CoSENT fine-tune, embedjax vs sentence-transformers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="training steps timed on each side (>= 3)")
    parser.add_argument("--model", default=None,
                        help="sentence-transformers/BERT folder both sides start from (default: the recipe's MiniLM)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's 16)")
    parser.add_argument("--workdir", default="", help="embedjax run folder (default: a temporary folder)")
    parser.add_argument("--length-buckets", default="",
                        help="comma-separated padded lengths for embedjax (default: the recipe's ladder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for the embedjax side, repeatable (e.g. model.remat=dots_no_batch)")
    report.add_cpu_gemm_argument(parser)
    report.add_arguments(parser)


def _embedjax_run(steps: int, workdir: str, batch_size: int | None, model: str | None,
                  length_buckets: str = "", overrides=()) -> tuple[dict, object]:
    from embedjax.train.config import apply_overrides, load_config_file
    from embedjax.train.loop import prepare_data, train
    from embedjax.data.tokenization import Tokenizer
    from embedjax.models.pretrained import resolve_model_dir

    # One JAX device (XLA spreads its ops over all cores), as torch runs one device with all
    # cores; fake multi-device CPU setups would only split the same cores further.
    cfg = apply_overrides(load_config_file(f"{REPO / 'configs' / 'stsb_cosent.py'}:steps={steps}"),
                          ["train.progress=False", "mesh.num_devices=1",
                           *([f"train.batch_size={batch_size}"] if batch_size else []),
                           *([f"model.path={model}"] if model else []),
                           *([f"data.length_buckets=({length_buckets},)"] if length_buckets else []),
                           *overrides])
    summary = train(cfg, workdir, log=lambda m: None)
    buckets = tuple(cfg.data.length_buckets) + (cfg.model.max_length,)
    tokenizer = Tokenizer.from_folder(resolve_model_dir(cfg.model.path), cfg.model.max_length, buckets)
    return summary, (cfg, prepare_data(cfg, tokenizer))


def step_texts(data, step: int):
    """(sentences1, sentences2, scores) of the global batch of ``step``."""
    dataset, indices = data.plan[step]
    records = [data.sources[dataset][int(i)] for i in indices]
    dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
    return ([dec(r["sentence1"]) for r in records], [dec(r["sentence2"]) for r in records],
            [float(r["score"]) for r in records])


def _reference_run(cfg, data, steps: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer, losses
    from transformers import get_linear_schedule_with_warmup

    from embedjax.models.pretrained import resolve_model_dir
    from embedjax.train.optim import warmup_steps_for

    torch.manual_seed(cfg.seed)
    model = SentenceTransformer(str(resolve_model_dir(cfg.model.path)), device="cpu")
    model.max_seq_length = cfg.model.max_length
    model.train()
    loss_fn = losses.CoSENTLoss(model, scale=cfg.train.cosent_scale)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm.weight" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.learning_rate, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps,
    )
    total = data.num_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps_for(total, cfg.optim.warmup_ratio), total)
    timed, losses_seen = 0.0, []
    for step in range(steps):
        s1, s2, scores = step_texts(data, step)
        t0 = time.perf_counter()
        features = [model.tokenize(s1), model.tokenize(s2)]
        loss = loss_fn(features, torch.tensor(scores, dtype=torch.float32) / 5.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses_seen.append(float(loss.detach()))
        if step > 0:
            timed += time.perf_counter() - t0
    return {"pairs_per_s": cfg.train.batch_size * (steps - 1) / timed, "losses": losses_seen,
            "torch_threads": torch.get_num_threads()}


def _config_value(cfg, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = node[part]
    return node


def run(args: argparse.Namespace) -> dict:
    if args.steps < 3:
        raise ValueError(f"--steps={args.steps}: time at least 3 steps (the first one is not timed)")
    if args.batch_size is not None and args.batch_size < 2:
        raise ValueError(f"--batch-size={args.batch_size}: CoSENT needs at least 2 pairs per batch")
    cpu_gemm = report.apply_cpu_gemm(args)
    started = report.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        summary, (cfg, data) = _embedjax_run(args.steps, args.workdir or os.path.join(tmp, "run"), args.batch_size,
                                             args.model, args.length_buckets, args.overrides)
        reference = _reference_run(cfg, data, args.steps)
    ours = summary["train_pairs_per_s_steady"]
    if ours is None:
        raise ValueError(f"no step of the {args.steps} ran with an already-compiled shape, so there is no steady "
                         "pairs/s to compare; raise --steps or pass fewer --length-buckets")
    theirs = reference["pairs_per_s"]
    row = {
        "steps": args.steps,
        "batch": cfg.train.batch_size,
        "length buckets": " ".join(str(b) for b in cfg.data.length_buckets),
        # read back from the config the run used, so a row shows what was applied
        "overrides": " ".join(f"{key}={_config_value(cfg, key)}" for key in (o.split("=", 1)[0] for o in args.overrides)),
        "embedjax pairs/s (steady)": round(ours, 2),
        "embedjax pairs/s (incl. compiles)": round(summary["train_pairs_per_s"], 2),
        "compiled shapes": summary["compiled_shapes"],
        "sentence-transformers pairs/s": round(theirs, 2),
        "ratio (steady)": round(ours / theirs, 3),
        "ratio (incl. compiles)": round(summary["train_pairs_per_s"] / theirs, 3),
        "embedjax tokens/s/device": round(summary["train_tokens_per_s_per_device"], 1),
        "devices": summary["devices"],
        "torch_threads": reference["torch_threads"],
        "cpu_gemm": cpu_gemm,
        "device": report.device_description(),
    }
    return report.finish(args, "train", SECTION, [row], started)[0]
