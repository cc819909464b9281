"""Packed against padded document encodes of a multi-vector (ColBERT) head on MiniLM.

    python benchmarks/multivector_packing_ab.py [--out benchmarks/multivector_packing_ab.json] [--rounds 5]

`Encoder.encode(..., output="tokens")` packs framed documents end to end into shared rows as it
packs single-vector texts (`Encoder.packing_plan`). This builds one ColBERT encoder (MiniLM with a
128-d multi-vector head at PyLate's defaults, documents framed to 180 tokens; the head's weights
are random, which changes no timing) and times ``encode_document`` with ``pack=True`` against
``pack=False``, alternating (`interleaved_seconds`, one warm-up call each, so compiles are
excluded), on the first 1,000 msmarco passages and the 2,758 STS-B test sentences. Each corpus
also records what ``pack=None`` (auto) chooses, both plans' token positions, whether the scored
masks agree and the largest difference between scored vectors. A diagnostic: run it idle.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def colbert_minilm():
    import jax

    import embedjax as ej
    from embedjax.encoder import init_encoder_params
    from embedjax.models.heads import build_head

    base = ej.Encoder.from_pretrained("all-MiniLM-L6-v2")
    head = build_head({"type": "multivector", "dim": 128}, pooling="mean")
    params = init_encoder_params(base.model, head, base.family, jax.random.key(0), backbone=base.params["backbone"])
    return ej.Encoder(base.model, params, base.tokenizer, head=head, normalize=False, source=base.source)


def plan_positions(enc, texts, batch_size: int) -> dict:
    """Token positions of the packed and padded plans, and what auto chooses."""
    from embedjax.data import late_interaction as li
    from embedjax.encoder import packed_positions, padded_positions

    ids = li.framed_ids(enc.tokenizer, texts, "document", enc.head.framing)
    row_length, batches = enc.packing_plan(ids, batch_size, True)
    return {"packed_positions": packed_positions(batches, row_length),
            "padded_positions": padded_positions([len(x) for x in ids], batch_size, enc.tokenizer.buckets),
            "real_tokens": sum(map(len, ids)), "row_length": row_length,
            "auto_packs": enc.packing_plan(ids, batch_size, None) is not None}


def main() -> None:
    import os

    from embedjax import provenance
    from embedjax.bench.encode import load_texts
    from embedjax.bench.report import device_description
    from embedjax.bench.timing import interleaved_seconds

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/multivector_packing_ab.json")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per corpus")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    load = provenance.load_average_1min()
    msmarco = os.path.join(os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data"), "msmarco")
    corpora = {"msmarco_1000": load_texts("msmarco", msmarco, 1000), "stsb_2758": load_texts("stsb", None, 2758)}
    enc = colbert_minilm()
    results = {}
    for corpus, texts in corpora.items():
        calls = {arm: (lambda p=pack, t=texts: enc.encode_document(t, batch_size=args.batch_size, pack=p))
                 for arm, pack in (("packed", True), ("padded", False))}
        first = {arm: fn() for arm, fn in calls.items()}  # compiles every shape
        seconds = interleaved_seconds(calls, args.rounds)
        per_s = {arm: round(len(texts) / float(np.median(s)), 1) for arm, s in seconds.items()}
        (tokens_p, mask_p), (tokens_d, mask_d) = first["packed"], first["padded"]
        results[corpus] = {"documents": len(texts), "documents_per_s": per_s, "packed_over_padded": round(per_s["packed"] / per_s["padded"], 3),
                           **plan_positions(enc, texts, args.batch_size),
                           "masks_equal": bool(np.array_equal(mask_p, mask_d)),
                           "max_abs_scored_vector_difference": float(np.abs(tokens_p - tokens_d)[mask_d].max())}
        print(corpus, json.dumps(results[corpus]), flush=True)
    provenance.write_artifact(args.out, {  # commit, versions and command; the load is the start's
        "what": "ColBERT-MiniLM (128-d multi-vector head, documents framed to 180 tokens) document encodes, "
                "pack=True against pack=False (documents/s, medians of alternating rounds after a warm-up)",
        "rounds": args.rounds, "batch_size": args.batch_size, "corpora": results,
        "device": device_description(), "load_1min": load,
    })
    print(json.dumps({k: v["packed_over_padded"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
