"""TFDS ArrayRecord builders and the grain training pipeline on the real shared data."""
import json

import numpy as np
import pytest

from embedjax.data import builders
from embedjax.data.pipeline import DatasetSpec, PackSpec, build_train_data
from embedjax.data.readers import read_sts
from embedjax.data.tokenization import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_folder(minilm_dir, 64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _decode(tokenizer, ids_l, mask_l):
    return tokenizer.backend.decode(ids_l[mask_l.astype(bool)].tolist())


def test_sts_rows_are_real_pairs_and_resume_replays_the_same_batches(tokenizer, cache, data_dir):
    path = data_dir / "stsb" / "sts-train.csv"
    data = build_train_data([DatasetSpec("sts", str(path))], tokenizer, global_batch_size=16, seed=7,
                            num_epochs=1, cache_dir=cache)
    s1, s2, scores = read_sts(path)
    assert data.num_steps == len(s1) // 16 == data.steps_per_epoch
    truth = {(a.lower(), b.lower()): s for a, b, s in zip(s1, s2, scores)}
    it = data.iterator()
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    later = [next(it) for _ in range(2)]
    for batch in batches:
        for i in range(16):
            a = _decode(tokenizer, batch["a"]["input_ids"][i], batch["a"]["attention_mask"][i])
            b = _decode(tokenizer, batch["b"]["input_ids"][i], batch["b"]["attention_mask"][i])
            # MiniLM lower-cases; decoding re-joins word pieces, so compare without spaces.
            match = [s for (x, y), s in truth.items()
                     if x.replace(" ", "")[:40] == a.replace(" ", "")[:40] and y.replace(" ", "")[:40] == b.replace(" ", "")[:40]]
            assert match and np.isclose(match[0], batch["score"][i])
    resumed = data.iterator(json.loads(json.dumps(state)))  # the state survives JSON (the checkpoint format)
    for expected in later:
        got = next(resumed)
        for side in ("a", "b"):
            assert np.array_equal(got[side]["input_ids"], expected[side]["input_ids"])
        assert np.array_equal(got["score"], expected["score"])


def test_two_processes_split_the_one_process_global_batch(tokenizer, cache, data_dir):
    spec = [DatasetSpec("beir", str(data_dir / "msmarco"))]
    kw = dict(global_batch_size=8, seed=3, num_steps=4, cache_dir=cache, no_duplicates=True)
    whole = next(build_train_data(spec, tokenizer, **kw).iterator())
    parts = [next(build_train_data(spec, tokenizer, process_index=p, process_count=2, **kw).iterator())
             for p in range(2)]
    for column in ("query", "positive"):
        for name in ("input_ids", "attention_mask"):
            joined = np.concatenate([p[column][name] for p in parts])
            assert np.array_equal(joined, whole[column][name])
    assert np.array_equal(np.concatenate([p["positive_id"] for p in parts]), whole["positive_id"])
    # no-duplicates: each query appears at most once in the global batch.
    assert len(set(whole["query_id"].tolist())) == 8


def test_jsonl_triplets_with_hard_negatives(tokenizer, cache, tmp_path):
    path = tmp_path / "triplets.jsonl"
    rows = [{"query": f"question number {i}", "positive": f"answer {i}",
             "negatives": [f"wrong {i} a", f"wrong {i} b", f"wrong {i} c"]} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = build_train_data([DatasetSpec("jsonl", str(path))], tokenizer, global_batch_size=4, seed=0,
                            num_steps=2, cache_dir=cache, num_negatives=2, shuffle=False)
    batch = next(data.iterator())
    assert batch["negatives"]["input_ids"].shape[:2] == (4, 2)
    for i in range(4):
        q = _decode(tokenizer, batch["query"]["input_ids"][i], batch["query"]["attention_mask"][i])
        number = q.split()[-1]
        n0 = _decode(tokenizer, batch["negatives"]["input_ids"][i, 0], batch["negatives"]["attention_mask"][i, 0])
        assert n0 == f"wrong {number} a"
    with pytest.raises(ValueError, match="num_negatives=4"):
        next(build_train_data([DatasetSpec("jsonl", str(path))], tokenizer, global_batch_size=4, seed=0,
                              num_steps=2, cache_dir=cache, num_negatives=4).iterator())


def test_bad_sources_give_clear_errors(tokenizer, cache, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        builders.prepare("sts", str(tmp_path / "nope.csv"), cache_dir=cache)
    (tmp_path / "beir").mkdir()
    with pytest.raises(ValueError, match="corpus.jsonl"):
        builders.prepare("beir", str(tmp_path / "beir"), cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q2"\n')
    own_cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        builders.prepare("jsonl", str(bad), cache_dir=own_cache)
    # The failed build left no dataset behind (TFDS wrote into an incomplete.* folder, now gone).
    assert not [p for p in own_cache.rglob("*") if p.is_file()]
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        build_train_data([DatasetSpec("sts", "stsb/sts-dev.csv")], tokenizer, global_batch_size=16, seed=0,
                         num_steps=1, process_count=3, cache_dir=cache)


def test_mixture_batches_each_come_whole_from_one_dataset(tokenizer, cache, tmp_path, data_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"query": f"synthetic question {i}", "positive": f"synthetic answer {i}"})
                              for i in range(40)) + "\n")
    data = build_train_data([DatasetSpec("beir", str(data_dir / "msmarco"), weight=1.0),
                             DatasetSpec("jsonl", str(path), weight=1.0)],
                            tokenizer, global_batch_size=4, seed=1, num_steps=24, cache_dir=cache)
    it = data.iterator()
    origins = []
    for step in range(24):
        batch = next(it)
        queries = [_decode(tokenizer, batch["query"]["input_ids"][i], batch["query"]["attention_mask"][i])
                   for i in range(4)]
        synthetic = ["synthetic question" in q for q in queries]
        assert all(synthetic) or not any(synthetic), f"step {step} mixes datasets: {queries}"
        assert synthetic[0] == (data.plan[step][0] == 1)
        origins.append(synthetic[0])
    assert 0 < sum(origins) < 24  # both datasets are drawn


def _packed_texts(packed):
    """Each text's token ids, rebuilt from a packed column through its unpacking index."""
    flat = packed["input_ids"].reshape(-1)
    return [flat[index[mask > 0]].tolist() if mask.any() else []
            for index, mask in zip(packed["unpack_index"], packed["pool_mask"])]


def test_packed_sts_batches_hold_the_padded_batches_pairs(tokenizer, cache, data_dir):
    """Packing (issue 17): the same step's pairs, interleaved (a_0, b_0, a_1, ...), over 4 shards; two
    processes' parts put together are the one-process batch."""
    spec = [DatasetSpec("sts", str(data_dir / "stsb" / "sts-train.csv"))]
    kw = dict(global_batch_size=16, seed=7, num_steps=3, cache_dir=cache)
    padded = next(build_train_data(spec, tokenizer, **kw).iterator())
    pack = PackSpec(row_length=48, shards=4)
    whole = next(build_train_data(spec, tokenizer, pack=pack, **kw).iterator())
    assert sorted(whole) == ["score", "texts"] and np.array_equal(whole["score"], padded["score"])
    texts = _packed_texts(whole["texts"])
    for i in range(16):
        for j, side in enumerate("ab"):
            mask = padded[side]["attention_mask"][i] > 0
            assert texts[2 * i + j] == padded[side]["input_ids"][i][mask].tolist()
    rows = whole["texts"]["input_ids"].shape[0]
    assert rows % 4 == 0 and rows < 32  # several texts per row
    parts = [next(build_train_data(spec, tokenizer, pack=pack, process_index=p, process_count=2, **kw).iterator())
             for p in range(2)]
    for name, array in whole["texts"].items():
        assert np.array_equal(np.concatenate([p["texts"][name] for p in parts]), array), name
    with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
        build_train_data(spec, tokenizer, pack=pack, process_index=0, process_count=3,
                         **{**kw, "global_batch_size": 18})


def test_packed_negatives_stay_pair_major(tokenizer, cache, tmp_path):
    path = tmp_path / "triplets.jsonl"
    rows = [{"query": f"question number {i}", "positive": f"answer {i}",
             "negatives": [f"wrong {i} a", f"wrong {i} b"]} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    batch = next(build_train_data([DatasetSpec("jsonl", str(path))], tokenizer, global_batch_size=4, seed=0,
                                  num_steps=1, cache_dir=cache, num_negatives=2, shuffle=False,
                                  pack=PackSpec(row_length=16, shards=2)).iterator())
    decode = lambda ids: tokenizer.backend.decode(ids)  # noqa: E731
    queries = [decode(t) for t in _packed_texts(batch["query"])]
    negatives = [decode(t) for t in _packed_texts(batch["negatives"])]
    assert len(negatives) == 8
    for i, q in enumerate(queries):
        number = q.split()[-1]
        assert negatives[2 * i:2 * i + 2] == [f"wrong {number} a", f"wrong {number} b"]
