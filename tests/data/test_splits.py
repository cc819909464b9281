"""Per-source splits and the leak check (embedjax/data/splits.py) on the shared data folders."""
import json

import pytest

from embedjax.data import splits
from embedjax.data.splits import (EvaluationLeakError, SplitRef, TrainSource, check_disjoint, parse_eval_sets,
                                  parse_train_sources, read_provenance, write_provenance)


@pytest.fixture(autouse=True)
def _shared_data(data_dir, monkeypatch):
    monkeypatch.setenv("EMBEDJAX_DATA_DIR", str(data_dir))


def test_training_sources_name_their_split():
    got = parse_train_sources("beir:scifact:train@2, beir:nfcorpus:dev, triplets:nli/triplets.tsv@0.5,"
                              "jsonl:/x/mined.jsonl, sts:stsb/sts-train.csv")
    assert got == [TrainSource("beir", "scifact", "train", 2.0), TrainSource("beir", "nfcorpus", "dev", 1.0),
                   TrainSource("triplets", "nli/triplets.tsv", None, 0.5), TrainSource("jsonl", "/x/mined.jsonl"),
                   TrainSource("sts", "stsb/sts-train.csv")]
    # The old form stays valid where the folder has a single split.
    assert parse_train_sources("beir:msmarco") == [TrainSource("beir", "msmarco", "test", 1.0)]
    assert parse_train_sources("beir:limit-small")[0].split == "test"  # a lone qrels.jsonl


def test_ambiguous_or_malformed_sources_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"'beir:scifact'.*has qrels splits test, train; name one, e\.g\. scifact:train"):
        parse_train_sources("beir:scifact")
    with pytest.raises(ValueError, match=r"no split 'dev'; its qrels splits are test, train"):
        parse_train_sources("beir:scifact:dev")
    with pytest.raises(ValueError, match="only beir sources take a split"):
        parse_train_sources("triplets:nli/triplets.tsv:train")
    with pytest.raises(ValueError, match="kind:path"):
        parse_train_sources("msmarco")
    with pytest.raises(ValueError, match="unknown kind 'tsv'"):
        parse_train_sources("tsv:nli/triplets.tsv")
    with pytest.raises(ValueError, match="weight 'x'"):
        parse_train_sources("beir:scifact:train@x")
    with pytest.raises(ValueError, match="does not exist"):
        parse_train_sources("beir:/no/such/folder:train")
    with pytest.raises(ValueError, match="names no data source"):
        parse_train_sources(" , ")
    # a ':' inside a path (a bucket URL) is not a split
    assert splits._split_suffix("gs://bucket/scifact") == ("gs://bucket/scifact", None)
    assert splits._split_suffix("gs://bucket/scifact:train") == ("gs://bucket/scifact", "train")


def test_evaluation_sets_parse_with_splits_and_names():
    sets = parse_eval_sets("scifact:test, nfcorpus:test,msmarco,nfcorpus:dev")
    assert [s.name for s in sets] == ["scifact-test", "nfcorpus-test", "msmarco-test", "nfcorpus-dev"]
    assert sets[3].ref == SplitRef("nfcorpus", "dev")
    assert [s.split for s in parse_eval_sets("scifact,limit-small", default_split="test")] == ["test", "test"]
    with pytest.raises(ValueError, match="eval.beir entry 'scifact'.*name one"):
        parse_eval_sets("scifact")
    with pytest.raises(ValueError, match="names the evaluation set scifact-test twice"):
        parse_eval_sets("scifact:test,scifact:test")


@pytest.mark.parametrize("train, beir, sts, named", [
    # the same split of the same dataset, trained and evaluated
    ("beir:scifact:test", "scifact:test", (), ["'beir:scifact:test'", "eval.beir scifact:test"]),
    ("beir:nfcorpus:dev", "nfcorpus:dev", (), ["'beir:nfcorpus:dev'", "eval.beir nfcorpus:dev"]),
    ("sts:stsb/sts-dev.csv", "", ("stsb/sts-dev.csv",), ["'sts:stsb/sts-dev.csv'", "eval.sts stsb/sts-dev.csv"]),
    # evaluation-only data, whatever the run evaluates
    ("beir:msmarco", "", (), ["'beir:msmarco:test'", "msmarco:test, which is evaluation-only"]),
    ("beir:limit-small", "scifact:test", (), ["limit-small:test, which is evaluation-only"]),
    ("beir:scifact:train,beir:nfcorpus:test", "", (), ["'beir:nfcorpus:test'", "evaluation-only"]),
    ("sts:stsb/sts-test.csv", "", ("stsb/sts-dev.csv",), ["stsb:sts-test, which is evaluation-only"]),
])
def test_leak_check_refuses_training_on_evaluation_data_naming_both(train, beir, sts, named):
    with pytest.raises(EvaluationLeakError) as err:
        check_disjoint(train, beir=beir, sts=sts)
    for text in named:
        assert text in str(err.value)
    assert "data.allow_eval_overlap=True" in str(err.value)
    # the override lets it through and hands the overlaps back for the summary
    overlaps = check_disjoint(train, beir=beir, sts=sts, allow_overlap=True)
    assert overlaps and all(any(text in o for o in overlaps) for text in named)


def test_leak_check_passes_disjoint_recipes():
    assert check_disjoint("beir:scifact:train,beir:nfcorpus:train,triplets:nli/triplets.tsv",
                          beir="scifact:test,nfcorpus:test,msmarco,nfcorpus:dev",
                          sts=("stsb/sts-dev.csv", "stsb/sts-test.csv")) == []
    assert check_disjoint("sts:stsb/sts-train.csv", sts=("stsb/sts-dev.csv", "")) == []


def test_mined_files_carry_provenance_that_the_check_sees_through(tmp_path):
    mined = tmp_path / "mined.jsonl"
    mined.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n"]}) + "\n")
    assert read_provenance(mined) is None  # no sidecar: provenance unknown
    assert check_disjoint(f"jsonl:{mined}", beir="scifact:test") == []
    write_provenance(mined, [SplitRef("scifact", "test")], tool="test")
    assert read_provenance(mined) == (SplitRef("scifact", "test"),)
    with pytest.raises(EvaluationLeakError, match=r"made from scifact:test, per its \.meta\.json\) is the evaluation "
                                                  r"set eval\.beir scifact:test"):
        check_disjoint(f"jsonl:{mined}", beir="scifact:test")
    write_provenance(mined, [SplitRef("scifact", "train")])
    assert check_disjoint(f"jsonl:{mined}", beir="scifact:test") == []
    # a sidecar that describes another version of the file is refused, not trusted
    mined.write_text(mined.read_text() + json.dumps({"query": "q2", "positive": "p2"}) + "\n")
    with pytest.raises(ValueError, match="describes another version of mined.jsonl"):
        check_disjoint(f"jsonl:{mined}", beir="scifact:test")
    splits.provenance_path(mined).write_text("{}")
    with pytest.raises(ValueError, match="is malformed"):
        read_provenance(mined)
