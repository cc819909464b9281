"""Plain readers of the shared dataset formats, with errors that name the file and line."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np


class DataFormatError(ValueError):
    """A data file does not follow its documented format; the message names file and line."""


def read_sts(path: str | os.PathLike):
    """Read an STS Benchmark file (tab-separated: genre, file, year, id, score, sentence1, sentence2[, extra...]).

    Fields 5-7 (score 0-5, sentence1, sentence2) are read; trailing source columns are ignored.
    Lines are split on tabs only (no CSV quoting: sentences contain ``"``).

    Returns:
        ``(sentences1, sentences2, scores)``: two lists of N str and float32 [N].
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STS file {path} does not exist; point at e.g. $EMBEDJAX_DATA_DIR/stsb/sts-test.csv")
    s1, s2, scores = [], [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 7:
                raise DataFormatError(f"{path}:{lineno}: expected at least 7 tab-separated fields "
                                      f"(genre, file, year, id, score, sentence1, sentence2), found {len(fields)}")
            try:
                score = float(fields[4])
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: score field {fields[4]!r} is not a number") from None
            if not 0.0 <= score <= 5.0:
                raise DataFormatError(f"{path}:{lineno}: score {score} is outside the STS range 0-5")
            s1.append(fields[5])
            s2.append(fields[6])
            scores.append(score)
    if not scores:
        raise DataFormatError(f"{path} holds no STS pairs")
    return s1, s2, np.asarray(scores, dtype=np.float32)


TRIPLET_COLUMNS = ("anchor", "positive", "hard_negative")


def read_triplets(path: str | os.PathLike):
    """Read tab-separated triplets under a header that names ``anchor``, ``positive`` and ``hard_negative``
    (in any order; other columns, e.g. ``source``, are ignored). No quoting: fields are split on tabs.

    Returns:
        ``(anchors, positives, hard_negatives)``: three lists of N non-empty str.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triplets file {path} does not exist; point at e.g. $EMBEDJAX_DATA_DIR/nli/triplets.tsv")
    columns: tuple[list[str], ...] = ([], [], [])
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").rstrip("\r").split("\t")
        missing = [c for c in TRIPLET_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path}:1: the header {header} lacks column(s) {missing}; the first line must name "
                                  f"the columns, tab-separated: {', '.join(TRIPLET_COLUMNS)}")
        where = [header.index(c) for c in TRIPLET_COLUMNS]
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataFormatError(f"{path}:{lineno}: {len(fields)} tab-separated fields, the header has "
                                      f"{len(header)}")
            for column, name, i in zip(columns, TRIPLET_COLUMNS, where):
                if not fields[i].strip():
                    raise DataFormatError(f"{path}:{lineno}: empty {name}")
                column.append(fields[i])
    if not columns[0]:
        raise DataFormatError(f"{path} holds no triplets")
    return columns


def parse_json_object(line: str, where: str) -> dict:
    """One JSONL line -> its object; ``where`` (file:line) starts the error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_jsonl(path: pathlib.Path, required: tuple[str, ...]):
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = parse_json_object(line, f"{path}:{lineno}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataFormatError(f"{path}:{lineno}: missing field(s) {missing}")
            yield lineno, row


def _read_qrels_tsv(path: pathlib.Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if lineno == 1 and fields[0] in {"query-id", "query_id", "qid"}:
                continue  # BEIR files from the hub carry a header line; the shared subset does not
            if len(fields) == 4:  # TREC style: qid 0 docid rel
                fields = [fields[0], fields[2], fields[3]]
            if len(fields) != 3:
                raise DataFormatError(f"{path}:{lineno}: expected 3 tab-separated fields "
                                      f"(query-id, corpus-id, score), found {len(fields)}")
            try:
                score = int(fields[2])
            except ValueError:
                raise DataFormatError(f"{path}:{lineno}: score {fields[2]!r} is not an integer") from None
            qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def read_qrels(folder: pathlib.Path, split: str = "test") -> dict[str, dict[str, int]]:
    """Graded judgements ``{query_id: {doc_id: score}}`` from ``qrels/<split>.tsv`` or ``qrels.jsonl``."""
    tsv = folder / "qrels" / f"{split}.tsv"
    if tsv.is_file():
        return _read_qrels_tsv(tsv)
    jsonl = folder / "qrels.jsonl"
    if jsonl.is_file() and split == "test":  # a lone qrels.jsonl (LIMIT) is an evaluation set: its split is "test"
        qrels: dict[str, dict[str, int]] = {}
        for lineno, row in _read_jsonl(jsonl, ("query-id", "corpus-id", "score")):
            try:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
            except (TypeError, ValueError):
                raise DataFormatError(f"{jsonl}:{lineno}: score {row['score']!r} is not an integer") from None
        return qrels
    if jsonl.is_file():
        raise FileNotFoundError(f"{folder} has no qrels/{split}.tsv; its qrels.jsonl is the split 'test'")
    raise FileNotFoundError(f"{folder} has no qrels/{split}.tsv nor qrels.jsonl")


def read_beir(folder: str | os.PathLike, split: str = "test"):
    """Read a BEIR-format folder.

    Returns:
        ``(corpus, queries, qrels)``: ``{doc_id: {"title", "text"}}``, ``{query_id: text}``,
        ``{query_id: {doc_id: score}}``.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder {folder} does not exist; point at e.g. $EMBEDJAX_DATA_DIR/msmarco")
    corpus = {}
    for _, row in _read_jsonl(folder / "corpus.jsonl", ("_id", "text")):
        corpus[str(row["_id"])] = {"title": row.get("title") or "", "text": row["text"]}
    queries = {str(row["_id"]): row["text"] for _, row in _read_jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels = read_qrels(folder, split)
    return corpus, queries, qrels
