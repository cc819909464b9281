"""The sentence-transformers STS-B recipe, in embedjax.

all-MiniLM-L6-v2 fine-tuned on STS-B train with CoSENT (scale 20), 1 epoch of batch
16 (359 full batches; the 5-pair remainder is dropped so every step has one shape),
AdamW lr 2e-5 with weight decay 0.01 on matrices only, 10% linear warm-up then linear
decay, global-norm clipping at 1.0, dropout 0.1: what ``SentenceTransformerTrainer``
does with these settings (see ../shared/data/README.md). Evaluated on STS-B dev
before and after, and on STS-B test after.

    python -m embedjax train --config configs/stsb_cosent.py --workdir runs/stsb_cosent

ARG:
  (none)  the recipe.
  steps=N only the first N steps (with the same 1-epoch schedule), no evaluation or
          export: what `python -m embedjax bench train` times.
"""
from embedjax.train.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = "minilm"
    c.model.max_length = 256
    c.model.normalize = True
    c.data.train = "sts:stsb/sts-train.csv"
    # A short ladder: STS-B pairs are short, and every distinct padded length is one more compile.
    c.data.length_buckets = (32, 48, 64, 96, 128)
    # Both sides of the 16 pairs packed end to end into rows of 64 tokens (embedjax.data.packing):
    # the same embeddings as padding each sentence, at ~45% of the padded batch's tokens.
    c.data.pack = True
    c.train.loss = "cosent"
    c.train.cosent_scale = 20.0
    c.train.batch_size = 16
    c.train.num_epochs = 1
    c.optim.learning_rate = 2e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_ratio = 0.1
    c.optim.schedule = "linear"
    c.optim.grad_clip = 1.0
    c.eval.sts = "stsb/sts-dev.csv"
    c.eval.sts_test = "stsb/sts-test.csv"
    c.eval.at_start = True
    c.checkpoint.every_steps = 100
    c.mesh.data = -1
    if arg.startswith("steps="):
        c.train.num_steps = 0  # the schedule still spans the epoch; the loop stops early
        c.train.stop_after = int(arg.split("=", 1)[1])
        c.eval.sts = ""
        c.eval.sts_test = ""
        c.eval.at_start = False
        c.export.enabled = False
        c.checkpoint.every_steps = 1_000_000
    elif arg:
        raise ValueError(f"unknown stsb_cosent.py argument {arg!r}: use '' or 'steps=N'")
    return c
