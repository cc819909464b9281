"""Offline hard-negative mining: the selection rules, a brute-force check, a real BEIR run."""
import json

import numpy as np
import pytest

from embedjax.data.mining import mine, mine_beir, select_hard_negatives


def test_selection_rules_on_a_hand_ranking():
    ids = np.array([5, 2, 7, 1, 9])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # Ceiling 0.95 * 0.75 = 0.7125 refuses doc 5; doc 2 is a positive.
    assert select_hard_negatives(ids, scores, {2}, 0.75, num_negatives=2, max_relative_score=0.95) == [7, 1]
    assert select_hard_negatives(ids, scores, {2}, 0.75, num_negatives=2) == [5, 7]
    assert select_hard_negatives(ids, scores, {2}, 0.75, num_negatives=2, skip_top=2) == [1, 9]
    assert select_hard_negatives(ids, scores, {2, 9}, 0.75, num_negatives=3, skip_top=2) == [1]


def test_mine_matches_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 13)).astype(np.float32)
    d = rng.normal(size=(61, 13)).astype(np.float32)
    positives = {i: set(rng.choice(61, size=2, replace=False).tolist()) for i in range(7)}
    pairs = [(i, p) for i in range(7) for p in sorted(positives[i])]
    mined, dropped = mine(q, d, pairs, positives, num_negatives=4, skip_top=1, max_relative_score=1.0, depth=61)
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    got = {(qi, p): negs for qi, p, negs in mined}
    for qi, p in pairs:
        pos_score = scores[qi, p]
        order = [j for j in np.argsort(-scores[qi], kind="stable") if j not in positives[qi]][1:]
        expected = [j for j in order if scores[qi, j] < 1.0 * pos_score][:4]
        if len(expected) < 4:
            assert (qi, p) not in got
        else:
            assert got[(qi, p)] == expected
    assert dropped == sum(1 for key in pairs if key not in got)
    with pytest.raises(ValueError, match="num_negatives"):
        mine(q, d, pairs, positives, num_negatives=0)


@pytest.mark.slow  # MiniLM encodes limit-small texts in several shapes (~1 min on 2 shared cores)
def test_mined_limit_small_file_feeds_the_training_pipeline(tmp_path, minilm_dir, data_dir):
    from embedjax.data.pipeline import DatasetSpec, build_train_data
    from embedjax.data.readers import read_beir
    from embedjax.data.tokenization import Tokenizer
    from embedjax.encoder import Encoder

    encoder = Encoder.from_pretrained(minilm_dir, max_length=64)
    out = tmp_path / "mined.jsonl"
    stats = mine_beir(encoder, data_dir / "limit-small", out, num_negatives=3, max_relative_score=0.95,
                      max_queries=24)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["written"] == len(rows) > 0 and stats["written"] + stats["dropped"] == 48  # 2 positives each
    _, _, qrels = read_beir(data_dir / "limit-small")
    emb = encoder.encode([t for row in rows for t in (row["query"], row["positive"], *row["negatives"])])
    for i, row in enumerate(rows):
        assert len(row["negatives"]) == 3
        assert not set(row["negative_ids"]) & set(qrels[row["query_id"]])
        q, pos, *negs = emb[5 * i: 5 * i + 5]
        # Rows are L2-normalised: dot = cosine. 1e-5 allows for re-encoding in other batches.
        assert all(float(q @ n) < 0.95 * float(q @ pos) + 1e-5 for n in negs)
    data = build_train_data([DatasetSpec("jsonl", str(out))], Tokenizer.from_folder(minilm_dir, 64),
                            global_batch_size=4, seed=0, num_steps=2, num_negatives=3,
                            cache_dir=str(tmp_path / "cache"))
    batch = next(data.iterator())
    assert batch["negatives"]["input_ids"].shape[:2] == (4, 3)


class _HashEncoder:
    """A stand-in ranker: a fixed random unit vector per text (mining's rules do not depend on the model)."""

    source = "hash-encoder"

    def encode(self, texts, batch_size=64, show_progress=False):
        import zlib

        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in texts]
        x = np.asarray(rows, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _toy_beir(root):
    """A BEIR folder named 'toyset' with train and test qrels over one 40-document corpus."""
    folder = root / "toyset"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"document {i}"})
                                                 + "\n" for i in range(40)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                                                  for i in range(10)))
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    (folder / "qrels" / "test.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(6, 10)))
    return folder


def test_mining_writes_provenance_and_the_leak_check_sees_through_it(tmp_path):
    from embedjax.data.splits import EvaluationLeakError, SplitRef, check_disjoint, read_provenance

    folder = _toy_beir(tmp_path)
    out = tmp_path / "mined-train.jsonl"
    stats = mine_beir(_HashEncoder(), folder, out, num_negatives=2, max_relative_score=None)  # default: train
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["written"] == len(rows) == 6 and {r["query_id"] for r in rows} == {f"q{i}" for i in range(6)}
    meta = json.loads((tmp_path / "mined-train.jsonl.meta.json").read_text())
    assert meta["sources"] == [{"dataset": "toyset", "split": "train"}] and meta["model"] == "hash-encoder"
    assert meta["settings"]["num_negatives"] == 2 and meta["counts"]["written"] == 6
    assert read_provenance(out) == (SplitRef("toyset", "train"),)
    assert check_disjoint(f"jsonl:{out}", beir=f"{folder}:test") == []
    leaked = tmp_path / "mined-test.jsonl"
    mine_beir(_HashEncoder(), folder, leaked, split="test", num_negatives=2, max_relative_score=None)
    with pytest.raises(EvaluationLeakError, match=r"made from toyset:test.*is the evaluation set eval.beir .*toyset:test"):
        check_disjoint(f"jsonl:{leaked}", beir=f"{folder}:test")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        mine_beir(_HashEncoder(), folder, tmp_path / "x.jsonl", split="dev")
