"""Multi-vector (ColBERT) vs single-vector MiniLM, trained the same way (issue 13's experiment;
`experiments/multivector/run.py` trains every variant and evaluates them).

    python -m embedjax train --config configs/multivector.py:colbert --workdir runs/multivector/colbert
    python -m embedjax train --config configs/multivector.py:single  --workdir runs/multivector/single
    python -m embedjax train --config configs/multivector.py:crisp   --workdir runs/multivector/crisp

ARG is ``VARIANT`` (smoke size: 2 CPU cores), ``VARIANT,full`` (an accelerator) or ``check`` (a
tiny ColBERT run for the runner's own test):

  colbert  all-MiniLM-L6-v2 + a 128-d multi-vector head (PyLate framing: [unused0]/[unused1]
           markers, queries expanded to 32 tokens with [MASK], punctuation skiplist), MaxSim InfoNCE.
  single   all-MiniLM-L6-v2 mean pooling, cosine InfoNCE.
  crisp    colbert with CRISP in training: 8 query and 32 document centroids per text.

Both models see the same data (scifact + nfcorpus train qrels and the NLI pairs, one dataset per
batch), steps, batch, learning rate, documents cut at 256 tokens, the exact ring loss and GradCache.
The temperature follows the score's range: 0.05 for cosines in [-1, 1], 1.0 for MaxSim sums over
32 query tokens (PyLate's default), so both see logits spanning ~30.

Sizes (MiniLM ~22 MFLOP per token forward; a GradCache step ~4 forwards):
  smoke  40 steps of batch 32: a ColBERT step is ~32 x (32 + 256) tokens x 88 MFLOP = 0.8 TFLOP,
         ~32 TFLOP per model; evaluation (run.py) encodes scifact, nfcorpus and msmarco corpora
         once per model (~54 TFLOP).
  full   500 steps of batch 256 (8x the rows, 12.5x the steps).
"""
from embedjax.train.config import default_config

PAIRS = ("beir:scifact:train", "beir:nfcorpus:train", "triplets:nli/triplets.tsv")
VARIANTS = ("colbert", "single", "crisp", "check")
HEAD = {"type": "multivector", "dim": 128, "query_length": 32, "document_length": 256}


def _parse(arg: str) -> tuple[str, str]:
    variant, _, scale = arg.partition(",")
    if variant not in VARIANTS or scale not in ("", "full") or (variant == "check" and scale):
        raise ValueError(f"unknown multivector.py argument {arg!r}: use one of {VARIANTS}, optionally ',full'")
    return variant, scale or "smoke"


def get_config(arg: str = "colbert"):
    variant, scale = _parse(arg)
    c = default_config()
    c.data.train = ",".join(PAIRS)
    c.data.no_duplicates = True
    c.train.loss = "infonce"
    c.train.ring = True
    c.train.batch_size = 32
    c.train.gradcache_sub_batch = 16
    c.train.num_epochs = 0
    c.train.num_steps = 40
    c.optim.learning_rate = 2e-5
    c.model.max_length = 256
    c.eval.sts = ""
    c.eval.beir = ""  # run.py evaluates the exports (per-query scores for paired tests)
    c.eval.at_start = False
    c.checkpoint.every_steps = 20
    if variant == "single":
        c.train.temperature = 0.05
    else:
        c.train.temperature = 1.0
        c.model.normalize = False  # tokens are normalised by the head
        for name, value in HEAD.items():
            setattr(c.model.head, name, value)
        if variant == "crisp":
            c.model.head.crisp_query_k = 8
            c.model.head.crisp_document_k = 32
    if scale == "full":
        c.train.batch_size = 256
        c.train.gradcache_sub_batch = 64
        c.train.num_steps = 500
        c.checkpoint.every_steps = 100
    if variant == "check":
        c.data.train = "beir:scifact:train"
        c.data.max_examples = 64
        c.model.max_length = 32
        c.model.head.query_length = 8
        c.model.head.document_length = 32
        c.model.head.dim = 16
        c.train.batch_size = 8
        c.train.gradcache_sub_batch = 0
        c.train.num_steps = 2
    return c
