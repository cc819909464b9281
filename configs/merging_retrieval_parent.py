"""The retrieval parent of the merging experiment (experiments/merging): all-MiniLM-L6-v2
fine-tuned with InfoNCE on the scifact and nfcorpus **train** qrels only (never their test
qrels, msmarco or limit-small, which the experiment evaluates on).

    python -m embedjax train --config configs/merging_retrieval_parent.py --workdir runs/merging/parents/retrieval
    python -m embedjax train --config configs/merging_retrieval_parent.py:full --workdir DIR   # an accelerator

One dataset per batch (scifact and nfcorpus steps drawn 1:1), in-batch negatives with
false-negative masking (nfcorpus queries have many relevant documents, so a batch can hold a
query twice), temperature 0.05, AdamW lr 3e-5 with 10% warm-up then linear decay, dropout 0.1.
No evaluation inside the run: the experiment scores every model (parents and merges) once,
with cached corpus embeddings, at 256 tokens.

ARG:
  (none)  smoke size, 2 CPU cores: 100 steps of global batch 32 at 128 tokens (3,200 pairs:
          scifact's 919 train pairs ~1.7 times, ~1,600 of nfcorpus' 110,575). A step embeds
          32 queries (~20 tokens) and 32 documents (128) ~ 4,700 tokens x 66 MFLOP (forward +
          backward) ~ 0.3 TFLOP: ~30 TFLOP in all, about 40 minutes on 2 loaded cores.
  full    an accelerator: 500 steps of global batch 256 at 256 tokens, scifact and nfcorpus
          steps drawn 1:9 (~14 passes over scifact's 919 pairs, ~1 over nfcorpus' 110,575; at
          1:1 scifact would be repeated ~70 times).
"""
from embedjax.train.config import default_config


def get_config(arg: str = ""):
    if arg not in ("", "full"):
        raise ValueError(f"unknown merging_retrieval_parent.py argument {arg!r}: use '' or 'full'")
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = "minilm"
    c.model.max_length = 128
    c.data.train = "beir:scifact:train@1,beir:nfcorpus:train@1"
    c.data.no_duplicates = False  # repeated nfcorpus queries are masked as false negatives instead
    c.train.loss = "infonce"
    c.train.temperature = 0.05
    c.train.mask_false_negatives = True
    c.train.batch_size = 32
    c.train.num_epochs = 0
    c.train.num_steps = 100
    c.optim.learning_rate = 3e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_ratio = 0.1
    c.optim.schedule = "linear"
    c.optim.grad_clip = 1.0
    c.eval.sts = ""
    c.eval.beir = ""
    c.eval.at_start = False
    c.checkpoint.every_steps = 25
    c.mesh.data = -1
    if arg == "full":
        c.model.max_length = 256
        c.data.train = "beir:scifact:train@1,beir:nfcorpus:train@9"
        c.train.batch_size = 256
        c.train.num_steps = 500
        c.checkpoint.every_steps = 100
    return c
