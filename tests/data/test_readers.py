"""The shared-format readers: real files, and malformed lines named by file and line."""
import pytest

import embedjax as ej
from embedjax.data import DataFormatError


def test_read_sts_real_files(data_dir):
    s1, s2, scores = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")
    assert len(s1) == len(s2) == len(scores) == 1379
    assert 0.0 <= scores.min() and scores.max() <= 5.0
    s1, _, _ = ej.data.read_sts(data_dir / "stsb" / "sts-train.csv")
    assert len(s1) == 5749


def test_read_sts_ignores_extra_columns_and_keeps_quotes(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text('g\tf\t2012\t1\t4.5\tHe said "hi".\tHe greeted.\tsrc1\tsrc2\n')
    s1, s2, scores = ej.data.read_sts(path)
    assert s1 == ['He said "hi".'] and s2 == ["He greeted."] and float(scores[0]) == 4.5


@pytest.mark.parametrize("line,message", [
    ("g\tf\t2012\t1\tnan?\ta\tb\n", r"sts.csv:2: score field 'nan\?'"),
    ("g\tf\t2012\t1\t3.0\ta\n", "sts.csv:2: expected at least 7"),
    ("g\tf\t2012\t1\t7.0\ta\tb\n", "sts.csv:2: score 7.0 is outside"),
])
def test_read_sts_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "sts.csv"
    path.write_text("g\tf\t2012\t0\t1.0\tx\ty\n" + line)
    with pytest.raises(DataFormatError, match=message):
        ej.data.read_sts(path)


def test_read_beir_real_folders(data_dir):
    corpus, queries, qrels = ej.data.read_beir(data_dir / "msmarco")
    assert len(corpus) == 5000 and len(queries) == 50
    assert sum(1 for q in qrels if any(v > 0 for v in qrels[q].values())) == 43
    corpus, queries, qrels = ej.data.read_beir(data_dir / "limit-small")
    assert len(corpus) == 46 and len(queries) == 1000
    assert all(len(v) == 2 for v in qrels.values())


def test_read_beir_malformed_json_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels.jsonl").write_text('{"query-id": "q1", "corpus-id": "d1", "score": 1}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: not valid JSON"):
        ej.data.read_beir(tmp_path)


def test_read_beir_missing_folder_and_bad_qrels(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ej.data.read_beir(tmp_path / "nope")
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td1\tone\n")
    with pytest.raises(DataFormatError, match=r"test.tsv:1: score 'one'"):
        ej.data.read_beir(tmp_path)
