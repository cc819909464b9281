"""Retrieval fine-tuning with InfoNCE: in-batch + mined hard negatives, false-negative
masking by document id, bidirectional term, Matryoshka prefixes, the exact
memory-tiled ring loss over the data axis, and GradCache.

Trains on training splits only (scifact and nfcorpus train qrels, the NLI triplets) and
evaluates on test splits (scifact:test, nfcorpus:test) and on msmarco as out-of-domain
transfer; the leak check refuses any other arrangement (embedjax/data/splits.py).

    python -m embedjax train --config configs/retrieval_infonce.py --workdir runs/retrieval
    python -m embedjax train --config configs/retrieval_infonce.py:mined --workdir runs/retrieval_mined
    python -m embedjax train --config configs/retrieval_infonce.py:tiny --workdir /tmp/tiny

ARG is ``VARIANT`` (smoke size: 2 CPU cores) or ``VARIANT,full`` (an accelerator):

  (none)  all-MiniLM-L6-v2 on the scifact and nfcorpus train (query, document) pairs and the
          NLI (anchor, entailment) pairs, one dataset per batch (steps drawn 1:1:1 at smoke size,
          1:4:2 at full size, where scifact's 919 pairs would otherwise be repeated ~50 times),
          in-batch negatives only; Matryoshka (64, 128, 256, 384), bidirectional, ring loss,
          GradCache sub-batches, no-duplicate batches.
  mined   the same with one hard negative per pair: mined from each train split by
          `embedjax.data.mining` (mine first; the files carry their provenance):
              python -m embedjax.data.mining --model minilm --beir scifact --split train \\
                  --out runs/mined/scifact-train-1neg.jsonl --num-negatives 1
              python -m embedjax.data.mining --model minilm --beir nfcorpus --split train \\
                  --out runs/mined/nfcorpus-train-1neg.jsonl --num-negatives 1
          and, for NLI, the triplet's contradiction.
  tiny    a 2-layer 32-wide random BERT, 20 steps of global batch 16 on scifact train pairs:
          the configuration the multi-device / multi-process equality tests run (seconds on CPU).

Sizes (MiniLM costs ~22 MFLOP per token forward; a GradCache training step ~4 forwards):
  smoke   40 steps of global batch 32 at 256 tokens: a scifact/nfcorpus step with one hard
          negative is ~32 x (20 + 2 x 240) tokens x 88 MFLOP = 1.4 TFLOP, an NLI step 0.13 TFLOP,
          so ~40 TFLOP of training; evaluation before and after encodes the three corpora
          (5,183 + 3,633 + 5,000 documents, ~54 TFLOP each time).
  full    500 steps of global batch 256 (scifact ~20 passes over its 919 pairs, nfcorpus ~0.7
          of its 110,575, NLI ~2.5 of its 14,865), the nfcorpus dev split scored every 100 steps
          for model selection, the test splits only before and after.
"""
from embedjax.train.config import default_config

EVAL_SETS = "scifact:test,nfcorpus:test,msmarco"
PAIRS = ("beir:scifact:train", "beir:nfcorpus:train", "triplets:nli/triplets.tsv")
MINED = ("jsonl:runs/mined/scifact-train-1neg.jsonl", "jsonl:runs/mined/nfcorpus-train-1neg.jsonl",
         "triplets:nli/triplets.tsv")
WEIGHTS = {"smoke": (1, 1, 1), "full": (1, 4, 2)}  # scifact, nfcorpus, NLI: share of the steps


def _parse(arg: str) -> tuple[str, str]:
    variant, _, scale = arg.partition(",")
    if variant not in ("", "mined", "tiny") or scale not in ("", "full") or (variant == "tiny" and scale):
        raise ValueError(f"unknown retrieval_infonce.py argument {arg!r}: use '', 'mined', 'tiny', ',full' or "
                         "'mined,full'")
    return variant, scale or "smoke"


def get_config(arg: str = ""):
    variant, scale = _parse(arg)
    c = default_config()
    sources = MINED if variant == "mined" else PAIRS
    c.data.train = ",".join(f"{s}@{w}" for s, w in zip(sources, WEIGHTS[scale]))
    c.data.num_negatives = 1 if variant == "mined" else 0
    c.data.no_duplicates = True
    c.train.loss = "infonce"
    c.train.temperature = 0.05
    c.train.bidirectional = True
    c.train.ring = True
    c.train.batch_size = 32
    c.train.gradcache_sub_batch = 16  # activations for 16 rows at a time; same gradients
    c.train.num_epochs = 0
    c.train.num_steps = 40
    c.train.matryoshka_dims = (64, 128, 256, 384)
    c.optim.learning_rate = 2e-5
    c.model.max_length = 256  # the model's own limit: the scores before training are the published ones
    c.eval.sts = ""
    c.eval.beir = EVAL_SETS
    c.eval.at_start = True
    c.checkpoint.every_steps = 10
    if scale == "full":
        c.train.batch_size = 256
        c.train.gradcache_sub_batch = 64
        c.train.num_steps = 500
        c.eval.beir = EVAL_SETS + ",nfcorpus:dev"
        c.eval.every_steps = 100
        c.checkpoint.every_steps = 100
    if variant == "tiny":
        c.data.train = "beir:scifact:train"
        c.model.init = "random"
        c.model.config.hidden_size = 32
        c.model.config.num_layers = 2
        c.model.config.num_heads = 2
        c.model.config.intermediate_size = 64
        c.model.max_length = 32
        c.data.pad_to_max_length = True
        c.model.config.hidden_dropout = 0.0  # dropout RNG (threefry) triples CPU compile time; the recipes keep 0.1
        c.model.config.attention_dropout = 0.0
        c.train.batch_size = 16
        c.train.gradcache_sub_batch = 0  # tests switch it on to compare with plain autodiff
        c.train.num_steps = 20
        c.train.matryoshka_dims = (16, 32)
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 4
        c.eval.beir = ""
        c.eval.at_start = False
        c.export.enabled = False
        c.checkpoint.every_steps = 10
    return c
