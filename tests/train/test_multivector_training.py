"""A multi-vector (ColBERT) head trains through the family-agnostic loop: framed queries and
documents, the MaxSim InfoNCE over their scored tokens, MaxSim evaluation, a PyLate-style export."""
import json
import pathlib

import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.data import late_interaction
from embedjax.encoder import init_encoder_params
from embedjax.models.heads import MultiVectorHead, build_head
from embedjax.models.pretrained import minilm_path
from embedjax.train.config import apply_overrides, default_config
from embedjax.train.step import make_objective

WORDS = ("cat dog bird fish horse mouse bread cheese apple river mountain city music paint storm rain "
         "sun moon").split()


def _pairs(path: pathlib.Path, n: int = 16):
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n):
            words = rng.choice(WORDS, size=6)
            f.write(json.dumps({"query": " ".join(words[:2]), "positive": ", ".join(words) + ".",
                                "query_id": f"q{i}", "positive_id": f"d{i}"}) + "\n")
    return path


@pytest.mark.parametrize("crisp", [{}, {"crisp_query_k": 4, "crisp_document_k": 3}])
def test_the_objective_scores_maxsim_over_the_framed_scored_tokens(crisp):
    """The training loss on a framed batch equals InfoNCE-MaxSim of what encode_query /
    encode_document return (an independent path: padding, expansion and skiplist included; with
    CRISP, the loss and the encoder both score the clustered centroids)."""
    base = ej.Encoder.from_pretrained(minilm_path())
    head = build_head({"type": "multivector", "dim": 16, "query_length": 10, "document_length": 20, **crisp},
                      pooling="mean")
    params = init_encoder_params(base.model, head, base.family, jax.random.key(0), backbone=base.params["backbone"])
    enc = ej.Encoder(base.model, params, base.tokenizer, head=head, normalize=True)
    queries, docs = ["cat dog", "bread", "storm at sea"], ["a cat, a dog.", "bread and cheese!", "rain; storm."]
    framing = head.framing
    batch = {"query": late_interaction.frame(enc.tokenizer, late_interaction.framed_ids(enc.tokenizer, queries, "query", framing), "query", framing),
             "positive": late_interaction.frame(enc.tokenizer, late_interaction.framed_ids(enc.tokenizer, docs, "document", framing), "document", framing),
             "query_id": np.arange(3, dtype=np.int32), "positive_id": np.arange(3, dtype=np.int32) + 10}
    objective = make_objective(lambda p, t, rng: enc.embed_fn(p, t), kind="retrieval", loss="infonce",
                               temperature=0.05, similarity="maxsim", reduce_tokens=head.reduce)
    emb = objective.embed_columns(enc.params, batch, jax.random.key(1))
    loss = float(objective.loss_from_embeddings(emb, batch))
    q_tok, q_mask = enc.encode_query(queries)
    d_tok, d_mask = enc.encode_document(docs)
    if crisp:
        assert q_tok.shape[1] == 4 and d_tok.shape[1] == 3
    want = float(ej.losses.infonce(q_tok, d_tok, temperature=0.05, similarity="maxsim", q_mask_bl=q_mask,
                                   d_mask_bl=d_mask))
    # The two paths' scored vectors agree to ~1e-6 (float32 rounding over different batch shapes;
    # CRISP centroids up to 8.4e-7 apart on an AMD EPYC). At temperature 0.05 a logit sums 4-10
    # token similarities times 20, so the small loss (~0.016) may move by a few 1e-7 (6.4e-7
    # measured): hence the absolute 5e-6. A wrong mask or token set moves it by > 1e-3 (below).
    assert loss == pytest.approx(want, rel=1e-5, abs=5e-6)
    # Without the masks (every padded / punctuation token scored) the loss would differ.
    unmasked = float(ej.losses.infonce(emb["query"], emb["positive"], temperature=0.05, similarity="maxsim"))
    assert abs(unmasked - loss) > 1e-3


def test_maxsim_needs_infonce_on_retrieval_pairs():
    with pytest.raises(ValueError, match="trains with train.loss='infonce'"):
        make_objective(lambda p, t, r: t, kind="retrieval", loss="siglip", similarity="maxsim")
    with pytest.raises(ValueError, match="trains on retrieval pairs"):
        make_objective(lambda p, t, r: t, kind="sts", loss="cosent", similarity="maxsim")


def test_a_colbert_minilm_trains_and_exports_a_pylate_folder(tmp_path):
    from embedjax.train.loop import train

    data = _pairs(tmp_path / "pairs.jsonl")
    cfg = apply_overrides(default_config(), [
        f"model.path={minilm_path()}", "model.max_length=32", "model.normalize=False", "model.head.type=multivector",
        "model.head.dim=16", "model.head.query_length=8", "model.head.document_length=16", f"data.train=jsonl:{data}",
        f"data.cache_dir={tmp_path / 'tfds'}", "train.loss=infonce", "train.batch_size=8", "train.num_epochs=0",
        "train.num_steps=3", "train.progress=False", "optim.learning_rate=1e-3", "optim.warmup_steps=1",
        "mesh.num_devices=1", "eval.sts=", "eval.at_start=False", "checkpoint.every_steps=100"])
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["status"] == "completed" and np.isfinite(summary["final_loss"])
    modules = json.loads((pathlib.Path(summary["export"]) / "modules.json").read_text())
    assert modules[-1]["type"] == "pylate.models.Dense.Dense"
    enc = ej.Encoder.from_pretrained(summary["export"])
    assert isinstance(enc.head, MultiVectorHead) and enc.head.framing.query_length == 8
    tokens, mask = enc.encode_query(["cat dog"])
    assert tokens.shape == (1, 8, 16) and mask.all()
