"""Retrieval fine-tuning with InfoNCE: in-batch + mined hard negatives, false-negative
masking by document id, optional bidirectional term, Matryoshka prefixes, the exact
memory-tiled ring loss over the data axis, and GradCache.

    python -m embedjax train --config configs/retrieval_infonce.py --workdir runs/retrieval
    python -m embedjax train --config configs/retrieval_infonce.py:tiny --workdir /tmp/tiny

ARG:
  (none)  all-MiniLM-L6-v2 on the msmarco subset's judged (query, passage) pairs,
          Matryoshka (64, 128, 256, 384), bidirectional, ring loss, GradCache sub-batches
          of 16, no-duplicate batches.
  tiny    a 2-layer 32-wide random BERT, 20 steps of global batch 16: the configuration the
          multi-device / multi-process equality tests run (seconds on CPU).
  mined   like the default, but on a JSONL file written by `python -m embedjax.data.mining`
          with 3 hard negatives per query (set data.train to the file).
"""
from embedjax.train.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.data.train = "beir:msmarco"
    c.data.no_duplicates = True
    c.train.loss = "infonce"
    c.train.temperature = 0.05
    c.train.bidirectional = True
    c.train.ring = True
    c.train.batch_size = 32
    c.train.gradcache_sub_batch = 16  # activations for 16 rows at a time; same gradients
    c.train.num_epochs = 0
    c.train.num_steps = 200
    c.train.matryoshka_dims = (64, 128, 256, 384)
    c.optim.learning_rate = 2e-5
    c.model.max_length = 128
    c.eval.sts = ""
    c.eval.beir = "msmarco"
    c.checkpoint.every_steps = 50
    if arg == "tiny":
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
    elif arg == "mined":
        c.data.train = "jsonl:msmarco_mined.jsonl"
        c.data.num_negatives = 3
    elif arg:
        raise ValueError(f"unknown retrieval_infonce.py argument {arg!r}: use '', 'tiny' or 'mined'")
    return c
