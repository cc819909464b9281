"""Pooling x attention on a real LLM (experiments/llm_pooling): SmolLM2-135M-Instruct with LoRA r=16,
ring InfoNCE with one hard negative, on NLI triplets + SciFact train + NFCorpus train.

    python experiments/llm_pooling/prepare_data.py --out runs/llm_pooling/data
    python -m embedjax sweep --config configs/llm_pooling.py:smoke --workdir runs/llm_pooling

ARG: ``smoke`` (sized for 2 shared CPU cores: 20 steps of 8 triplets at <= 32 tokens) or ``full``
(pod scale: 2,000 steps of 512, 256 tokens, LoRA dropout 0.1; the evaluation adds SciFact and
NFCorpus test). ``root=DIR`` (after a comma) names the sweep's workdir when it is not
``runs/llm_pooling``: the MNTP -> contrastive chain starts from the MNTP run's export there.

The grid (`get_sweep`): {causal, bidirectional} x {last token, mean, latent attention} x 2 seeds,
and bidirectional + MNTP + mean (an MNTP run, then a contrastive run from its merged export). Seed 0
of every cell runs first, so a partial sweep covers the whole grid once. Evaluation and the report:
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
        # Sized for 2 CPU cores shared by several jobs (measured ~5-8 GFLOP/s for this process): 20 steps
        # of 8 triplets x 3 columns x 32 tokens, ~0.5 TFLOP a step (forward + backward through the frozen
        # backbone), every column padded to one shape (a new shape costs minutes of compilation here).
        c.model.max_length = 32
        c.data.pad_to_max_length = True
        c.train.batch_size = 8
        c.train.num_steps = 20
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
    _, root = _args(arg)
    first, later = [], []
    for seed in SEEDS:
        cells = []
        for attention in ATTENTIONS:
            for pooler in POOLERS.values():
                cells.append({"model.config.attention": attention, **pooler, "seed": seed})
        mntp = {"train.objective": "mntp", "model.config.attention": "bidirectional", "model.pooling": "mean",
                "seed": seed}
        from embedjax.sweep import run_name

        cells.append(mntp)
        cells.append({"model.path": f"{root}/{run_name(mntp)}/export", "model.config.attention": "bidirectional",
                      "model.pooling": "mean", "seed": seed})
        (first if seed == SEEDS[0] else later).extend(cells)
    return first + later
