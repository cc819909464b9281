"""Packed against padded training of the STS-B recipe: same seeds, same batches, STS-B test after one epoch.

    for seed in 0 1 2; do
      python -m embedjax train --config configs/stsb_cosent.py --workdir runs/stsb_packed_s$seed --config.seed=$seed
      python -m embedjax train --config configs/stsb_cosent.py --workdir runs/stsb_padded_s$seed --config.seed=$seed \
          --config.data.pack=False
    done
    python experiments/stsb_cosent/compare_packing.py --padded runs/stsb_padded_s{0,1,2} --packed runs/stsb_packed_s{0,1,2}

Packing changes no embedding, only the dropout masks each step draws (they are drawn over the
packed rows), so a packed and a padded run of one seed differ as two dropout seeds of one recipe
would. Each exported model scores the 1,379 STS-B test pairs; a paired bootstrap over the pairs
(10,000 resamples, `embedjax.eval.significance`) tests the difference of the seeds' mean Spearman,
so the variation between seeds stays in the comparison. Writes ``packing.json`` beside this
script: every run's summary (speed included) and the test.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def cosine_per_pair(folder: pathlib.Path, s1, s2) -> np.ndarray:
    import embedjax as ej

    encoder = ej.Encoder.from_pretrained(folder)
    unique = list(dict.fromkeys([*s1, *s2]))
    emb = np.asarray(encoder.encode(unique, batch_size=64))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    row = {s: i for i, s in enumerate(unique)}
    return np.sum(emb[[row[s] for s in s1]] * emb[[row[s] for s in s2]], axis=1)


def run_summary(workdir: pathlib.Path) -> dict:
    summary = json.loads((workdir / "summary.json").read_text())
    keep = ("eval_before", "eval_after", "num_steps", "final_loss", "compiled_shapes", "train_pairs_per_s",
            "train_pairs_per_s_steady", "status")
    return {k: summary[k] for k in keep if k in summary}


def main() -> None:
    from embedjax import provenance
    from embedjax.data.readers import read_sts
    from embedjax.eval.significance import paired_bootstrap_correlation_test

    parser = argparse.ArgumentParser()
    parser.add_argument("--padded", nargs="+", required=True, help="workdirs of the padded runs, one per seed")
    parser.add_argument("--packed", nargs="+", required=True, help="workdirs of the packed runs, same seeds")
    args = parser.parse_args()
    if len(args.padded) != len(args.packed):
        raise SystemExit(f"give one padded and one packed run per seed ({len(args.padded)} vs {len(args.packed)})")
    data = pathlib.Path(os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data"))
    s1, s2, gold = read_sts(data / "stsb" / "sts-test.csv")
    runs = {"padded": [pathlib.Path(p) for p in args.padded], "packed": [pathlib.Path(p) for p in args.packed]}
    predictions = {name: np.stack([cosine_per_pair(path / "export", s1, s2) for path in paths])
                   for name, paths in runs.items()}  # [seeds, pairs]
    test = paired_bootstrap_correlation_test(predictions["padded"], predictions["packed"], gold)
    record = {
        "what": "STS-B recipe trained on padded vs packed batches (a = padded, b = packed), STS-B test Spearman "
                "x100, mean over seeds",
        "test": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in test.items()},
        "runs": {name: {path.name: run_summary(path) for path in paths} for name, paths in runs.items()},
        "commit": provenance.git_commit(),
        "command": "python experiments/stsb_cosent/compare_packing.py --padded "
                   + " ".join(map(str, runs["padded"])) + " --packed " + " ".join(map(str, runs["packed"])),
    }
    (HERE / "packing.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["test"]))


if __name__ == "__main__":
    main()
