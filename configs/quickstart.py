"""Quickstart (what `make demo` trains): a few minutes on 2 CPU cores.

Fine-tunes the pretrained all-MiniLM-L6-v2 with CoSENT on a 960-pair slice of STS-B
train (60 steps of batch 16, the stsb_cosent recipe otherwise), evaluates STS-B test
before and after, exports a sentence-transformers folder, and prints where the
checkpoint, the logs and the export went.

    python -m embedjax train --config configs/quickstart.py --workdir runs/quickstart

Rerunning the command with the same workdir resumes (or, once finished, re-evaluates
and re-exports the final checkpoint).
"""
from embedjax.train.config import default_config


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/quickstart.py takes no argument (got {arg!r})")
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = "minilm"
    c.model.max_length = 128
    c.data.train = "sts:stsb/sts-train.csv"
    c.data.max_examples = 960  # a fixed slice: 60 steps of 16
    c.data.length_buckets = (32, 48, 64, 96)
    # Both sides of the 16 pairs packed end to end into rows of 64 tokens (embedjax.data.packing):
    # the same embeddings as padding each sentence, at ~45% of the padded batch's tokens.
    c.data.pack = True
    c.train.loss = "cosent"
    c.train.batch_size = 16
    c.train.num_epochs = 1
    c.optim.learning_rate = 2e-5
    c.optim.warmup_ratio = 0.1
    c.eval.sts = "stsb/sts-test.csv"
    c.eval.sts_test = ""
    c.eval.at_start = True
    c.checkpoint.every_steps = 20
    return c
