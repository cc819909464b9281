"""Ablation families of one retrieval recipe: each axis of the research workflow as a sweep.

    python -m embedjax sweep --config configs/ablations.py:loss --workdir runs/abl_loss
    python -m embedjax results runs/abl_loss --dims 8 --quantization int8,binary+rescore
    python -m embedjax sweep --config configs/ablations.py:loss,full --workdir gs://BUCKET/abl_loss \\
        --launcher tpu_pod --launcher_args "--name my-v5e --zone us-west4-a"

ARG is ``AXIS`` (smoke scale: 2 CPU cores, minutes; scifact train -> scifact test) or ``AXIS,full``
(pod scale: the pretrained MiniLM on nfcorpus train with the ring loss over the data axis,
evaluated on nfcorpus test, scifact test and msmarco). Both scales share the base recipe of
``configs/ablation_pooling_matryoshka.py`` (``small`` / ``full``); every family crosses its axis with
seeds 0 and 1, and the first value of the axis is the baseline of the paired tests.

AXIS:
  pooling         mean, cls, lasttoken, weightedmean
  loss            infonce, siglip (sigmoid pairs, bias -10), cosent (in-batch binary relevance)
  temperature     0.01, 0.02, 0.05, 0.1
  batch           negatives per step through the global batch: 8, 32, 128 (small);
                  1,024, 4,096, 16,384 (full, ring loss: the all-gather would not fit)
  hard_negatives  0 vs 1 mined hard negative per pair, mined from the training split (MiniLM ranks
                  the corpus; the file's .meta.json records the split for the leak check):
                    python -m embedjax.data.mining --model minilm --beir scifact --split train \\
                      --out runs/mined/scifact-train-1neg.jsonl --num-negatives 1
                  (``full``: --beir nfcorpus --out runs/mined/nfcorpus-train-1neg.jsonl)
  matryoshka      off vs nested prefixes (8, 16, 32) / (64, 128, 256, 384)
  layer_dims      2D Matryoshka (every layer x every prefix) vs Starbucks (the diagonal: small
                  layers with small prefixes) against the last-layer-only baseline

Compression at evaluation (float32 / int8 / binary + rescoring) needs no retraining: pass
``--quantization int8,binary+rescore`` to ``results`` for any family; each compressed search is
then tested against float32 search of the same models.
"""
import pathlib

from embedjax.train.config import load_config_module

SEEDS = (0, 1)
AXES = ("pooling", "loss", "temperature", "batch", "hard_negatives", "matryoshka", "layer_dims")
MINED = {"small": "runs/mined/scifact-train-1neg.jsonl", "full": "runs/mined/nfcorpus-train-1neg.jsonl"}
BASE_FAMILY = pathlib.Path(__file__).with_name("ablation_pooling_matryoshka.py")


def _parse(arg: str) -> tuple[str, str]:
    axis, _, scale = (arg or "pooling").partition(",")
    scale = scale or "small"
    if axis not in AXES or scale not in ("small", "full"):
        raise ValueError(f"ablations.py argument {arg!r}: use AXIS or AXIS,full with AXIS one of {AXES}")
    return axis, scale


def get_config(arg: str = "pooling"):
    axis, scale = _parse(arg)
    module, _, _ = load_config_module(str(BASE_FAMILY), prefix="embedjax_ablation_base")
    c = module.get_config(scale)
    c.model.pooling = "mean"
    c.train.matryoshka_dims = ()
    if axis in ("loss", "layer_dims"):
        c.train.ring = False  # the ring covers infonce and siglip on the last layer only
    return c


def _layer_dim_lists(scale: str) -> list[tuple]:
    from embedjax.losses.matryoshka import starbucks_pairs, two_d_matryoshka_pairs

    if scale == "small":  # the 2-layer, 32-wide smoke model
        layers, dims, diagonal = (1, 2), (8, 16, 32), ((1, 2), (16, 32))
    else:  # MiniLM: 6 layers, 384 wide
        layers, dims = (2, 4, 6), (64, 128, 384)
        diagonal = (layers, dims)
    last = ((layers[-1], dims[-1]),)
    return [last, two_d_matryoshka_pairs(layers, dims), starbucks_pairs(*diagonal)]


def _axis_values(axis: str, scale: str) -> dict:
    from embedjax.sweep import product, zip_axes

    small = scale == "small"
    if axis == "pooling":
        return product({"model.pooling": ["mean", "cls", "lasttoken", "weightedmean"]})
    if axis == "loss":
        return product({"train.loss": ["infonce", "siglip", "cosent"]})
    if axis == "temperature":
        return product({"train.temperature": [0.05, 0.01, 0.02, 0.1]})
    if axis == "batch":
        return product({"train.batch_size": [32, 8, 128] if small else [4096, 1024, 16384]})
    if axis == "hard_negatives":
        source = "beir:scifact:train" if small else "beir:nfcorpus:train"
        return zip_axes({"data.train": [source, f"jsonl:{MINED[scale]}"], "data.num_negatives": [0, 1]})
    if axis == "matryoshka":
        return product({"train.matryoshka_dims": [(), (8, 16, 32) if small else (64, 128, 256, 384)]})
    return product({"train.layer_dims": _layer_dim_lists(scale)})


def get_sweep(arg: str = "pooling"):
    """The family's axis crossed with seeds 0 and 1; the axis's first value is the baseline."""
    from embedjax.sweep import with_seeds

    axis, scale = _parse(arg)
    return with_seeds(_axis_values(axis, scale), SEEDS)
