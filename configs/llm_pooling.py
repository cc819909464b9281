"""Pooling x attention on a real LLM (experiments/llm_pooling): SmolLM2-135M-Instruct with LoRA r=16,
ring InfoNCE with one hard negative, on NLI triplets + SciFact train + NFCorpus train.

    python experiments/llm_pooling/prepare_data.py --out runs/llm_pooling/data
    python -m embedjax sweep --config configs/llm_pooling.py:smoke --workdir runs/llm_pooling

ARG: ``smoke`` (sized for 2 CPU cores: 24 steps of 16 triplets at 32 tokens) or ``full``
(pod scale: 2,000 steps of 512, 256 tokens, LoRA dropout 0.1; the evaluation adds SciFact and
NFCorpus test). ``root=DIR`` (after a comma) names the sweep's workdir when it is not
``runs/llm_pooling``: the MNTP -> contrastive chain starts from the MNTP run's export there.

The grid (`get_sweep`): {causal, bidirectional} x {last token, mean, latent attention} x 2 seeds,
and bidirectional + MNTP + mean (an MNTP run, then a contrastive run from its merged export), in
priority order (`get_sweep`). Evaluation and the report:
``experiments/llm_pooling/run.py``.
"""
from embedjax.train.config import default_config

DATA = "runs/llm_pooling/data"
SEEDS = (0, 1)
ATTENTIONS = ("causal", "bidirectional")
POOLERS = {  # cell label -> overrides
    "last token": {"model.pooling": "lasttoken"},
    "mean": {"model.pooling": "mean"},
    "latent attention": {"model.pooling": "mean", "model.head.type": "latent_attention"},
}
# NV-Embed's ablation cells (attention, pooler), run first.
NV_EMBED_CELLS = (("causal", "last token"), ("bidirectional", "last token"), ("bidirectional", "mean"),
                  ("bidirectional", "latent attention"))


def _args(arg: str) -> tuple[str, str]:
    parts = [p for p in (arg or "smoke").split(",") if p]
    size = "full" if "full" in parts else "smoke"
    root = next((p.split("=", 1)[1] for p in parts if p.startswith("root=")), "runs/llm_pooling")
    unknown = [p for p in parts if p not in ("smoke", "full") and not p.startswith("root=")]
    if unknown:
        raise ValueError(f"configs/llm_pooling.py: unknown argument(s) {unknown}; use smoke or full, and root=DIR")
    return size, root


def get_config(arg: str = "smoke"):
    size, _ = _args(arg)
    c = default_config()
    c.model.path = "SmolLM2-135M-Instruct"
    c.model.pooling = "lasttoken"
    c.model.normalize = True
    c.model.config.attention = "causal"
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.dropout = 0.05
    c.data.train = (f"jsonl:{DATA}/nli.jsonl@0.5,jsonl:{DATA}/scifact-train-1neg.jsonl@0.25,"
                    f"jsonl:{DATA}/nfcorpus-train-1neg.jsonl@0.25")
    c.data.num_negatives = 1
    c.train.loss = "infonce"
    c.train.ring = True
    c.train.temperature = 0.05
    c.train.num_epochs = 0
    c.optim.learning_rate = 5e-4  # LoRA adapters and a fresh pooler want a far larger rate than full tuning
    c.optim.weight_decay = 0.0
    # The evaluation (STS-B test, msmarco with documents at 128 tokens) runs on the exports: run.py.
    c.eval.sts = ""
    c.eval.at_start = False
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = False
    c.train.mntp_probability = 0.2  # LLM2Vec's choice for Llama models
    if size == "smoke":
        # Sized for 2 CPU cores: a step of 16 triplets x 3 columns x 32 tokens is ~0.9 TFLOP forward
        # + backward through the frozen backbone, measured ~10-15 s, so a run of 24 steps (384
        # triplets) takes ~6 minutes with its compilation and STS-B test (all 1,379 pairs) ~1 more.
        # Every column is padded to one shape: a new shape costs a compilation. A first reading, not
        # converged models.
        c.model.max_length = 32
        c.data.pad_to_max_length = True
        c.train.batch_size = 16
        c.train.num_steps = 24
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 2
    else:
        c.model.max_length = 256
        c.model.lora.dropout = 0.1
        c.train.batch_size = 512
        c.train.num_steps = 2000
        c.train.gradcache_sub_batch = 64
        c.optim.learning_rate = 2e-4
        c.optim.warmup_steps = 100
        c.checkpoint.every_steps = 200
        c.checkpoint.async_save = True
    return c


def get_sweep(arg: str = "smoke"):
    """Runs in priority order, so a partial sweep answers the main question first: NV-Embed's four
    cells (seed 0, then seed 1), then causal + mean / latent attention, then the MNTP chain."""
    from embedjax.sweep import run_name

    _, root = _args(arg)

    def cell(attention, pooler, seed):
        return {"model.config.attention": attention, **POOLERS[pooler], "seed": seed}

    nv_embed = [cell(a, p, seed) for seed in SEEDS for a, p in NV_EMBED_CELLS]
    rest = [cell(a, p, seed) for seed in SEEDS for a in ATTENTIONS for p in POOLERS
            if (a, p) not in NV_EMBED_CELLS]
    chain = []
    for seed in SEEDS:
        mntp = {"train.objective": "mntp", "model.config.attention": "bidirectional", "model.pooling": "mean",
                "seed": seed}
        chain.append(mntp)
        chain.append({"model.path": f"{root}/{run_name(mntp)}/export", "model.config.attention": "bidirectional",
                      "model.pooling": "mean", "seed": seed})
    return nv_embed + rest + chain
