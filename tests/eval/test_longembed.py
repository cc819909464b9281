"""The LongEmbed-style benchmark (issue 15): synthetic passkey and needle sets built to exact token
lengths, deterministic from a seed; QMSum's test meetings; nDCG@1 as LongEmbed scores it."""
import re

import numpy as np
import pytest

import embedjax as ej
from embedjax.eval import longembed


@pytest.fixture(scope="module")
def minilm():
    return ej.Encoder.from_pretrained("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def count(minilm):
    return longembed.token_counter(minilm.tokenizer)


@pytest.mark.parametrize("length", [256, 1024])
def test_passkey_documents_fill_their_length_and_hold_one_passkey_each(count, length):
    task = longembed.passkey_task(length, count, num_candidates=30, num_queries=12, seed=3)
    assert len(task.corpus) == 30 and len(task.queries) == 12 and task.length == length
    unit = count(longembed.FILLER) - 2
    depths = []
    for doc_id, text in task.corpus.items():
        n = count(text)
        assert length - unit <= n <= length, (doc_id, n)
        found = re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+)'s passkey is (\d{5})\. Remember it\. (\d{5}) is the passkey for "
                           r"([A-Z][a-z]+ [A-Z][a-z]+)\.", text)
        assert len(found) == 1 and found[0][0] == found[0][3] and found[0][1] == found[0][2]
        depths.append(text.index("passkey") / len(text))
    assert np.std(depths) > 0.15  # the sentence sits at varied depths
    names = {re.search(r"for ([A-Z][a-z]+ [A-Z][a-z]+)\?", q).group(1) for q in task.queries.values()}
    assert len(names) == 12
    for qid, rel in task.qrels.items():
        (doc_id,) = rel
        name = re.search(r"for ([A-Z][a-z]+ [A-Z][a-z]+)\?", task.queries[qid]).group(1)
        assert f"passkey for {name}." in task.corpus[doc_id]


def test_synthetic_sets_are_deterministic_from_the_seed(count, data_dir):
    a = longembed.passkey_task(512, count, num_candidates=10, num_queries=5, seed=0)
    assert a == longembed.passkey_task(512, count, num_candidates=10, num_queries=5, seed=0)
    assert a.corpus != longembed.passkey_task(512, count, num_candidates=10, num_queries=5, seed=1).corpus
    b = longembed.synthetic_task("needle", 512, count, data_dir=data_dir, num_candidates=10, num_queries=5)
    assert b == longembed.synthetic_task("needle", 512, count, data_dir=data_dir, num_candidates=10, num_queries=5)


def test_needle_documents_are_real_prose_with_one_distinct_fact(count, data_dir):
    haystack = longembed.read_haystack(data_dir)
    task = longembed.needle_task(768, count, haystack, num_candidates=100, num_queries=50, seed=0)
    assert len(task.corpus) == 100 and len(task.queries) == 50
    assert len(set(task.queries.values())) == 50
    facts = task.notes["needles"]
    for qid, rel in task.qrels.items():
        (doc_id,) = rel
        assert count(task.corpus[doc_id]) <= 768
        assert task.corpus[doc_id].count(facts[doc_id]) == 1
        assert sum(facts[doc_id] in text for text in task.corpus.values()) == 1
        entity = re.search(r"in ([A-Z][a-z]+)\?$|in ([A-Z][a-z]+)'s|the ([A-Z][a-z]+) family", task.queries[qid])
        assert next(g for g in entity.groups() if g) in facts[doc_id]
    # the haystack is MS MARCO text, not a repeated filler
    assert any(passage[:60] in task.corpus["needle-768-d0"] for passage in haystack)
    with pytest.raises(ValueError, match="only 110 distinct needles"):
        longembed.needle_task(256, count, haystack, num_candidates=111, num_queries=5)


def test_qmsum_reads_the_test_meetings_only(data_dir):
    task = longembed.qmsum_task(data_dir)
    test_meetings = sorted(p.stem for p in (data_dir / "qmsum" / "test").glob("*.json"))
    assert sorted(task.corpus) == test_meetings and len(test_meetings) == 35
    assert task.notes["queries_total"] == 281
    assert len(task.queries) == 281 - task.notes["dropped_ambiguous"] > 200
    assert all(len(rel) == 1 and next(iter(rel)) in task.corpus for rel in task.qrels.values())
    assert max(len(t.split()) for t in task.corpus.values()) > 20000  # transcripts up to ~24k words
    assert "Summarize the whole meeting." not in task.queries.values()  # asked of many meetings: dropped
    answers = longembed.qmsum_task(data_dir, query_field="answer")
    assert answers.corpus == task.corpus and answers.queries != task.queries
    with pytest.raises(ValueError, match="query_field='summary'"):
        longembed.qmsum_task(data_dir, query_field="summary")


def test_ndcg_at_1_is_top_1_accuracy_of_the_encoder(minilm, count):
    task = longembed.passkey_task(256, count, num_candidates=20, num_queries=10, seed=1)
    result = longembed.evaluate(minilm, task, k_values=(1,), per_query=True)
    qids, docs = list(task.queries), list(task.corpus)
    scores = minilm.encode([task.queries[q] for q in qids]) @ minilm.encode([task.corpus[d] for d in docs]).T
    hits = [docs[int(np.argmax(s))] in task.qrels[q] for q, s in zip(qids, scores)]
    assert result["ndcg@1"] == pytest.approx(100 * np.mean(hits))
    assert result["ndcg@1"] >= 50  # names are easy to match at 256 tokens


def test_bad_sizes_are_refused(count):
    with pytest.raises(ValueError, match="num_queries=30 must be between 1 and num_candidates=20"):
        longembed.passkey_task(256, count, num_candidates=20, num_queries=30)
    with pytest.raises(ValueError, match="takes more than 8 tokens"):
        longembed.passkey_task(8, count, num_candidates=2, num_queries=1)
    with pytest.raises(ValueError, match="unknown synthetic task 'haystack'"):
        longembed.synthetic_task("haystack", 256, count)
