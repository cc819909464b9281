"""``python -m embedjax bench encode``: embedjax vs sentence-transformers encode throughput.

Both encode the same texts in the same process, with the same batch size and truncation, after
one untimed warm-up each (compilation for JAX, allocator warm-up for torch). Timed runs
alternate between the two so that background load hits both alike; the median of each is
reported with the ratio. Texts (``--corpus``):

* ``stsb``: the 2,758 STS-B test sentences (short: ~15 word pieces);
* ``scifact``: the first 384 scifact abstracts (title + text), truncated at 256 word pieces:
  long documents, where attention and padding cost more.

``--pack`` sets embedjax's sequence packing (`Encoder.encode`'s ``pack``); the row records the
mode and whether the texts were packed (``auto`` packs STS-B, not scifact).
"""
from __future__ import annotations

import argparse
import os
import statistics

from embedjax.bench import report

SECTION = "Encode throughput"
CORPORA = ("stsb", "scifact")
PACK_MODES = {"auto": None, "on": True, "off": False}  # --pack -> Encoder.encode(pack=...)
SCIFACT_TEXTS = 384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--corpus", choices=CORPORA, default="stsb",
                        help="stsb: STS-B test sentences; scifact: scifact abstracts (long documents)")
    parser.add_argument("--data", default=None,
                        help="the corpus file or folder (default: $EMBEDJAX_DATA_DIR/stsb/sts-test.csv or "
                             "$EMBEDJAX_DATA_DIR/scifact)")
    parser.add_argument("--num-texts", type=int, default=None,
                        help="encode only the first N texts (default: all STS-B sentences, 384 scifact abstracts)")
    parser.add_argument("--max-length", type=int, default=256, help="truncation in word pieces, both libraries")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-impl", default="auto",
                        help="embedjax's attention kernel (embedjax.models.attention.ATTENTION_IMPLS; auto: blocked on CPU)")
    parser.add_argument("--pack", choices=tuple(PACK_MODES), default="auto",
                        help="embedjax's sequence packing (Encoder.encode's pack): auto packs where it computes at "
                             "most 90%% of the padded positions (short sentences), on always, off never")
    report.add_cpu_gemm_argument(parser)
    report.add_arguments(parser)


def load_texts(corpus: str, data: str | None, num_texts: int | None) -> list[str]:
    """The benchmark's texts, in file order."""
    import embedjax as ej
    from embedjax.eval.retrieval import document_text

    root = os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data")
    if corpus == "stsb":
        s1, s2, _ = ej.data.read_sts(data or os.path.join(root, "stsb", "sts-test.csv"))
        texts = s1 + s2
    else:
        docs, _, _ = ej.data.read_beir(data or os.path.join(root, "scifact"))
        texts = [document_text(d) for d in docs.values()]
        num_texts = num_texts or SCIFACT_TEXTS
    if num_texts is not None:
        if not 1 <= num_texts <= len(texts):
            raise ValueError(f"--num-texts must be in [1, {len(texts)}] for --corpus {corpus}; got {num_texts}")
        texts = texts[:num_texts]
    return texts


def run(args: argparse.Namespace) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    import embedjax as ej
    from embedjax.bench.timing import interleaved_seconds, seconds_once
    from embedjax.models.pretrained import resolve_model_dir

    cpu_gemm = report.apply_cpu_gemm(args)
    sentences = load_texts(args.corpus, args.data, args.num_texts)
    folder = resolve_model_dir(args.model)
    enc = ej.Encoder.from_pretrained(folder, dtype=args.dtype, max_length=args.max_length,
                                     attention_impl=args.attention_impl)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_device == "cuda":
        # JAX's default float32 matmul precision on GPUs is TF32; give PyTorch the same.
        torch.set_float32_matmul_precision("high")
    st = SentenceTransformer(str(folder), device=torch_device)
    st.max_seq_length = args.max_length
    started = report.start(args)

    def run_embedjax():
        enc.encode(sentences, batch_size=args.batch_size, pack=PACK_MODES[args.pack])

    def run_st():
        st.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)

    warmup_ej = seconds_once(run_embedjax)  # includes compilation; ST is warmed once too, untimed
    run_st()
    times = interleaved_seconds({"embedjax": run_embedjax, "st": run_st}, args.repeats)
    times_ej, times_st = times["embedjax"], times["st"]
    n = len(sentences)
    ej_rate, st_rate = n / statistics.median(times_ej), n / statistics.median(times_st)
    result = {
        "model": os.path.basename(str(folder).rstrip("/")) if args.model != "all-MiniLM-L6-v2" else args.model,
        "corpus": args.corpus,
        "texts": n,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "cpu_gemm": cpu_gemm,
        "pack": args.pack,
        "packed": enc.packing_plan(enc.tokenizer.token_ids(sentences), args.batch_size,
                                    PACK_MODES[args.pack]) is not None,
        "embedjax_texts_per_s": round(ej_rate, 1),
        "st_texts_per_s": round(st_rate, 1),
        "ratio": round(ej_rate / st_rate, 3),
        "repeats": args.repeats,
        "embedjax_first_call_s": round(warmup_ej, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch_device,
        "device": report.device_description(),
    }
    return report.finish(args, "encode", SECTION, [result], started)[0]


if __name__ == "__main__":  # `python -m embedjax.bench.encode` runs without the CLI's optional imports
    import json

    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    print(json.dumps(run(_parser.parse_args())))
