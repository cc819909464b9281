"""What the corpus-wide packing plan of `Encoder.encode` computes and costs, against the plan it replaced.

    python benchmarks/packing_plan.py [--out benchmarks/packing_plan.json] [--rounds 7]

Both plans pack MiniLM's STS-B test sentences (2,758 texts) into rows of 64 tokens:

- ``per_batch`` (before commit `c3c9b5b`): the texts first-fit into rows over the corpus, taken
  row by row 64 texts a batch, then each batch's texts first-fit again into its own rows (`packing.pack`),
  the row count rounded up to the row ladder (`packing.row_bucket`) and the text count to a power
  of two with one-token filler texts;
- ``corpus`` (`encoder.packed_batches`): the corpus's first-fit rows dealt out whole to batches
  of about 64 texts' tokens, densest rows first in snake order (`packing.pack_rows`).

For each plan and batch size it counts the positions computed and the distinct compiled shapes
(rows, texts); sentence-transformers' positions (texts longest first, each batch padded to its
longest) are counted for reference. Then, at batch 64, the two plans' batches are built and run
through the same compiled embedding program, alternating for ``--rounds`` rounds (batch building
included, tokenising not), and the per-round ratio is reported. A diagnostic, not a speed claim:
run it idle.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

ROW_LENGTH = 64


def per_batch_plan(lengths, batch_size):
    """The plan before `c3c9b5b`: text index lists of each batch (re-packed per batch)."""
    from embedjax.data import packing

    order = [i for members in packing.first_fit_rows(lengths, ROW_LENGTH) for i in members]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def per_batch_shape(lengths, texts, batch_size):
    """(rows, texts) of one per-batch packed batch: its own first-fit rows on the ladder, texts filled
    with one-token fillers to `encoder._row_bucket` (which may need rows of their own)."""
    from embedjax.data import packing
    from embedjax.encoder import _row_bucket

    count = _row_bucket(len(texts), batch_size)
    rows = packing.first_fit_rows([lengths[i] for i in texts] + [1] * (count - len(texts)), ROW_LENGTH)
    return packing.row_bucket(len(rows)), count


def st_positions(lengths, batch_size):
    desc = sorted(lengths, reverse=True)
    return sum(len(desc[i:i + batch_size]) * desc[i] for i in range(0, len(desc), batch_size))


def main() -> None:
    import jax

    from embedjax import provenance
    from embedjax.bench.encode import load_texts
    from embedjax.bench.report import device_description
    from embedjax.bench.timing import interleaved_seconds
    from embedjax.data import packing
    from embedjax.encoder import Encoder, packed_batches, packed_positions, packed_text_count, padded_positions

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/packing_plan.json")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    texts = load_texts("stsb", None, None)
    encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256)
    tokenizer = encoder.tokenizer
    ids = tokenizer.token_ids(texts)
    lengths = [len(x) for x in ids]
    plans = []
    for batch_size in (16, 64, 256):
        old = per_batch_plan(lengths, batch_size)
        old_shapes = [per_batch_shape(lengths, b, batch_size) for b in old]
        new = packed_batches(lengths, batch_size, ROW_LENGTH)
        new_texts = packed_text_count(new)
        plans.append({
            "batch_size": batch_size, "tokens": sum(lengths),
            "sentence_transformers_positions": st_positions(lengths, batch_size),
            "padded_positions": padded_positions(lengths, batch_size, tokenizer.buckets),
            "per_batch": {"positions": sum(r for r, _ in old_shapes) * ROW_LENGTH, "batches": len(old),
                          "compiled_shapes": sorted(set(old_shapes))},
            "corpus": {"positions": packed_positions(new, ROW_LENGTH), "batches": len(new),
                       "compiled_shapes": sorted({(len(rows), new_texts) for rows in new})},
        })

    kwargs = {"row_length": ROW_LENGTH, "pad_id": tokenizer.pad_id, "token_type_ids": tokenizer.token_type_ids}
    old, new = per_batch_plan(lengths, 64), packed_batches(lengths, 64, ROW_LENGTH)
    new_texts = packed_text_count(new)

    def run_per_batch():
        from embedjax.encoder import _row_bucket

        outs = []
        for b in old:
            filler = [[tokenizer.pad_id]] * (_row_bucket(len(b), 64) - len(b))
            outs.append(encoder._jitted(encoder.params, packing.pack([ids[i] for i in b] + filler, **kwargs)))
        jax.block_until_ready(outs)

    def run_corpus():
        outs = []
        for rows in new:
            _, batch = packing.pack_planned(ids, rows, num_texts=new_texts, **kwargs)
            outs.append(encoder._jitted(encoder.params, batch))
        jax.block_until_ready(outs)

    load = provenance.load_average_1min()
    calls = {"per_batch": run_per_batch, "corpus": run_corpus}
    for fn in calls.values():
        fn()  # compiles every shape of the plan
    seconds = interleaved_seconds(calls, args.rounds)
    ratios = [a / b for a, b in zip(seconds["per_batch"], seconds["corpus"])]
    record = {
        "what": "STS-B test sentences packed into 64-token rows: the per-batch plan (before c3c9b5b) against the "
                "corpus-wide plan (encoder.packed_batches); positions, compiled (rows, texts) shapes, and both "
                "plans' batches run through one MiniLM embedding program, alternating",
        "plans": plans,
        "timing_batch_size": 64, "rounds": args.rounds,
        "seconds": {name: [round(s, 3) for s in values] for name, values in seconds.items()},
        "median_seconds": {name: round(float(np.median(values)), 3) for name, values in seconds.items()},
        "per_batch_over_corpus": [round(r, 3) for r in ratios],
        "per_batch_over_corpus_median": round(float(np.median(ratios)), 3),
        "rounds_corpus_faster": int(sum(r > 1 for r in ratios)),
        "device": device_description(), "load_1min": load, "commit": provenance.git_commit(),
        "command": "python benchmarks/packing_plan.py",
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("median_seconds", "per_batch_over_corpus_median",
                                             "rounds_corpus_faster")}))
    for plan in plans:
        print(plan["batch_size"], plan["per_batch"]["positions"], plan["corpus"]["positions"],
              len(plan["per_batch"]["compiled_shapes"]), len(plan["corpus"]["compiled_shapes"]))


if __name__ == "__main__":
    main()
