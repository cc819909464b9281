"""Ablation: pooling {mean, cls} x Matryoshka {off, on} x 2 seeds, retrieval InfoNCE.

    python -m embedjax sweep --config configs/ablation_pooling_matryoshka.py:small --workdir runs/abl_small
    python -m embedjax results runs/abl_small --dims 8
    python -m embedjax sweep --config configs/ablation_pooling_matryoshka.py:full --workdir gs://BUCKET/abl \\
        --launcher tpu_pod --launcher_args "--name my-v5e --zone us-west4-a"

ARG:
  small  2 CPU cores, a few minutes for the 8 runs: a randomly initialised 2-layer,
         32-wide BERT (MiniLM's tokenizer) trained for 60 steps of batch 32 (~2 passes) on the
         scifact train (query, abstract) pairs (919) and evaluated after training on the
         disjoint scifact test queries (300, the same corpus, as BEIR defines it), per query,
         so `results` can run paired tests. (Until 2026-12 this scale trained and evaluated on
         LIMIT-small itself; those figures measured fitting, not retrieval, and were re-run.)
  full   pod scale: the pretrained all-MiniLM-L6-v2, 300 steps of global batch 1024 with the
         exact ring InfoNCE over the data axis on the nfcorpus train pairs (110,575, the largest
         training split here; repeated queries in a batch are masked as false negatives, not
         deduplicated: 2,590 queries cannot fill batches of thousands), the nfcorpus dev split
         every 100 steps, and nfcorpus test, scifact test (transfer) and msmarco before and
         after. For a larger run point ``--config.data.train`` at a larger training set (e.g. the
         MS MARCO train pairs; never the msmarco evaluation subset: the leak check refuses it).

The Matryoshka arm trains nested prefixes (8, 16, 32) / (64, 128, 256, 384); the "off"
arm trains the full dimension only. `results --dims` evaluates every arm at a
truncated dimension too, where Matryoshka training is meant to pay off.
"""
from embedjax.train.config import default_config

POOLINGS = ("mean", "cls")
SEEDS = (0, 1)


def _matryoshka_dims(arg: str) -> tuple:
    return (8, 16, 32) if arg == "small" else (64, 128, 256, 384)


def get_config(arg: str = "small"):
    c = default_config()
    c.train.loss = "infonce"
    c.train.temperature = 0.05
    c.train.bidirectional = False
    c.train.mask_false_negatives = True  # a document relevant to two queries of a batch is no negative
    c.model.pooling = POOLINGS[0]
    c.eval.sts = ""
    c.eval.at_start = False
    if arg == "small":
        c.model.init = "random"
        c.model.path = "minilm"  # tokenizer only
        c.model.config.hidden_size = 32
        c.model.config.num_layers = 2
        c.model.config.num_heads = 2
        c.model.config.intermediate_size = 64
        c.model.max_length = 64
        c.model.config.hidden_dropout = 0.0  # dropout RNG triples CPU compile time
        c.model.config.attention_dropout = 0.0
        c.data.train = "beir:scifact:train"
        c.data.pad_to_max_length = True  # one compiled training shape
        c.train.batch_size = 32
        c.train.num_epochs = 0
        c.train.num_steps = 60
        c.mesh.num_devices = 1  # one device: the smallest compile; 2 cores gain nothing from splitting
        c.train.progress = False
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 3
        # Scored once, after training, per query (evals/step_60.per_query.json), which `results` reads;
        # it scores the exports again only for settings not evaluated here (--dims, --quantization).
        c.eval.beir = "scifact:test"
        c.export.enabled = True
        c.checkpoint.every_steps = 1_000_000  # only the final step
        c.checkpoint.async_save = False
    elif arg == "full":
        c.model.init = "pretrained"
        c.model.path = "minilm"
        c.model.max_length = 128
        c.data.train = "beir:nfcorpus:train"
        c.data.no_duplicates = False
        c.train.ring = True
        c.train.batch_size = 1024
        c.train.num_epochs = 0
        c.train.num_steps = 300
        c.optim.learning_rate = 5e-5
        c.eval.beir = "nfcorpus:test,scifact:test,msmarco,nfcorpus:dev"
        c.eval.every_steps = 100
        c.checkpoint.every_steps = 100
    else:
        raise ValueError(f"unknown ablation_pooling_matryoshka.py argument {arg!r}: use 'small' or 'full'")
    return c


def get_sweep(arg: str = "small"):
    """pooling x Matryoshka x seeds; the first value of each axis is the baseline."""
    from embedjax.sweep import product, with_seeds

    grid = product({
        "model.pooling": list(POOLINGS),
        "train.matryoshka_dims": [(), _matryoshka_dims(arg)],
    })
    return with_seeds(grid, SEEDS)
