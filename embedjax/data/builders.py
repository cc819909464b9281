"""TFDS builders that turn the shared text formats into ArrayRecord datasets.

Four source kinds, each a `tfds.core.GeneratorBasedBuilder` written with
``file_format="array_record"`` (TensorFlow is not needed to write or read them):

- ``"sts"``: graded pairs (a STS-B style tab-separated file, read with
  `embedjax.data.readers.read_sts`): features ``sentence1``, ``sentence2``, ``score``.
- ``"beir"``: a BEIR folder (corpus/queries/qrels): one example per judged
  (query, relevant document) pair, features of the retrieval kind below.
- ``"triplets"``: tab-separated (anchor, positive, hard_negative) rows under a header (the
  NLI triplets, `embedjax.data.readers.read_triplets`): one retrieval example each, the third
  column its one hard negative; ids are stable hashes of the texts.
- ``"jsonl"``: generic pairs / triplets, one JSON object a line:
  ``{"query": str, "positive": str, "negatives": [str, ...]}`` (``"anchor"`` is accepted
  for ``"query"``, ``"negative": str`` for a single negative; optional ``"query_id"``,
  ``"positive_id"``, ``"negative_ids"``). Offline mining (`embedjax.data.mining`) writes
  this format.

Retrieval-kind features: ``query``, ``positive``, ``query_id``, ``positive_id``,
``negatives`` (sequence of text), ``negative_ids`` (sequence of text). Document ids
let the loss mask false negatives (the same document appearing as another row's
positive).

The prepared dataset lives under ``cache_dir/<builder>/<kind>-<fingerprint>/<version>``;
the fingerprint covers the source path, size and modification time, so an edited
source is rebuilt, and TFDS writes into an ``incomplete.*`` folder renamed only on
success, so a malformed source never leaves a half-written dataset behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tarfile
import tempfile
import urllib.request

import numpy as np
import tensorflow_datasets as tfds

STS_KIND = "sts"
RETRIEVAL_KINDS = ("beir", "jsonl", "triplets")
KINDS = (STS_KIND, *RETRIEVAL_KINDS)

# Where STS-B comes from when no local copy exists and the machine is online.
STSB_CANONICAL_URL = "https://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz"
_STSB_FILES = ("sts-train.csv", "sts-dev.csv", "sts-test.csv")


def data_root() -> pathlib.Path | None:
    """The local data folder from ``EMBEDJAX_DATA_DIR`` (None when unset)."""
    root = os.environ.get("EMBEDJAX_DATA_DIR")
    return pathlib.Path(root) if root else None


def default_cache_dir() -> pathlib.Path:
    """Where prepared ArrayRecord datasets go unless a config says otherwise."""
    root = os.environ.get("EMBEDJAX_CACHE_DIR")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "embedjax" / "tfds"


def resolve_source(path: str) -> pathlib.Path:
    """A source path as given, or relative to ``EMBEDJAX_DATA_DIR`` when not found as given."""
    candidate = pathlib.Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    root = data_root()
    if root is not None and (root / candidate).exists():
        return root / candidate
    return candidate


def _fingerprint(path: pathlib.Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha1(str(path.resolve()).encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def fetch_stsb(dest: pathlib.Path, url: str = STSB_CANONICAL_URL, timeout_s: float = 30.0) -> pathlib.Path:
    """Download STS-B from its canonical URL into ``dest`` (online machines only)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed https URL
            payload = response.read()
    except OSError as err:
        raise ValueError(
            f"STS-B is not available locally and the download from {url} failed ({err}); "
            "set EMBEDJAX_DATA_DIR to a folder holding stsb/ (see ../shared/data/README.md)"
        ) from err
    with tempfile.TemporaryDirectory() as tmp:
        archive = pathlib.Path(tmp) / "stsb.tar.gz"
        archive.write_bytes(payload)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = pathlib.Path(member.name).name
                if name in _STSB_FILES and member.isfile():
                    (dest / name).write_bytes(tar.extractfile(member).read())
    return dest


def _check_source(kind: str, path: pathlib.Path, download: bool) -> pathlib.Path:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: use one of {KINDS}")
    if not path.exists():
        if download and kind == STS_KIND and path.name in _STSB_FILES:
            fetch_stsb(path.parent)
            return path
        raise ValueError(
            f"{kind} dataset source {str(path)!r} does not exist: give an existing path, or a path "
            "relative to EMBEDJAX_DATA_DIR (the shared data folder)"
        )
    if kind == "beir":
        for part in ("corpus.jsonl", "queries.jsonl"):
            if not (path / part).is_file():
                raise ValueError(f"BEIR folder {str(path)!r} has no {part}: it is not a BEIR dataset folder")
    elif path.is_dir():
        raise ValueError(f"{kind} dataset source {str(path)!r} is a folder; give the file itself")
    return path


@dataclasses.dataclass
class SourceConfig(tfds.core.BuilderConfig):
    """One concrete source file/folder; the config name carries its fingerprint."""

    source: str = ""
    split: str = "test"  # BEIR qrels split
    min_relevance: int = 1  # BEIR qrels at or above this grade are positives


def _stable_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class _LocalSourceBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the builders: they read a local file, so there is no checksums file to locate.

    (Setting ``code_path`` to None also keeps TFDS from probing package resources
    through ``importlib_resources``, which is not a dependency.)
    """

    code_path = None

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}


class StsPairs(_LocalSourceBuilder):
    """Graded sentence pairs (STS-B format)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(), "score": np.float32}
            ),
        )

    def _generate_examples(self):
        from embedjax.data.readers import read_sts

        s1, s2, scores = read_sts(self.builder_config.source)
        for i, (a, b, score) in enumerate(zip(s1, s2, scores)):
            yield i, {"sentence1": a, "sentence2": b, "score": float(score)}


def _retrieval_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "query": tfds.features.Text(),
            "positive": tfds.features.Text(),
            "query_id": tfds.features.Text(),
            "positive_id": tfds.features.Text(),
            "negatives": tfds.features.Sequence(tfds.features.Text()),
            "negative_ids": tfds.features.Sequence(tfds.features.Text()),
        }
    )


class _RetrievalPairsBuilder(_LocalSourceBuilder):
    """Base of the builders that yield (query, positive[, negatives]) examples."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_retrieval_features())


class BeirPairs(_RetrievalPairsBuilder):
    """(query, relevant document) pairs from a BEIR folder's qrels."""

    VERSION = tfds.core.Version("1.0.0")

    def _generate_examples(self):
        from embedjax.data.readers import read_beir
        from embedjax.eval.retrieval import document_text

        cfg = self.builder_config
        corpus, queries, qrels = read_beir(cfg.source, split=cfg.split)
        key = 0
        for qid in sorted(qrels):
            if qid not in queries:
                raise ValueError(f"BEIR folder {cfg.source!r}: qrels name query {qid!r} missing from queries.jsonl")
            for doc_id, grade in sorted(qrels[qid].items()):
                if grade < cfg.min_relevance:
                    continue
                if doc_id not in corpus:
                    raise ValueError(f"BEIR folder {cfg.source!r}: qrels name document {doc_id!r} missing from corpus.jsonl")
                yield key, {
                    "query": queries[qid],
                    "positive": document_text(corpus[doc_id]),
                    "query_id": qid,
                    "positive_id": doc_id,
                    "negatives": [],
                    "negative_ids": [],
                }
                key += 1


def parse_pairs_line(line: str, where: str) -> dict:
    """One generic pairs/triplets JSON line -> retrieval-kind example (validated)."""
    from embedjax.data.readers import parse_json_object

    obj = parse_json_object(line, where)
    query = obj.get("query", obj.get("anchor"))
    positive = obj.get("positive")
    if not isinstance(query, str) or not isinstance(positive, str) or not query or not positive:
        raise ValueError(f"{where}: needs non-empty string fields 'query' (or 'anchor') and 'positive'")
    negatives = obj.get("negatives", [obj["negative"]] if "negative" in obj else [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n for n in negatives):
        raise ValueError(f"{where}: 'negatives' must be a list of non-empty strings")
    negative_ids = obj.get("negative_ids", [_stable_id(n) for n in negatives])
    if len(negative_ids) != len(negatives):
        raise ValueError(f"{where}: 'negative_ids' has {len(negative_ids)} entries for {len(negatives)} negatives")
    return {
        "query": query,
        "positive": positive,
        "query_id": str(obj.get("query_id", _stable_id(query))),
        "positive_id": str(obj.get("positive_id", _stable_id(positive))),
        "negatives": negatives,
        "negative_ids": [str(i) for i in negative_ids],
    }


class TripletsTsv(_RetrievalPairsBuilder):
    """(anchor, positive, hard negative) triplets from a tab-separated file with a header."""

    VERSION = tfds.core.Version("1.0.0")

    def _generate_examples(self):
        from embedjax.data.readers import read_triplets

        anchors, positives, negatives = read_triplets(self.builder_config.source)
        for i, (anchor, positive, negative) in enumerate(zip(anchors, positives, negatives)):
            yield i, {
                "query": anchor,
                "positive": positive,
                "query_id": _stable_id(anchor),
                "positive_id": _stable_id(positive),
                "negatives": [negative],
                "negative_ids": [_stable_id(negative)],
            }


class JsonlPairs(_RetrievalPairsBuilder):
    """Generic pairs / triplets from a JSONL file."""

    VERSION = tfds.core.Version("1.0.0")

    def _generate_examples(self):
        path = self.builder_config.source
        count = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield lineno, parse_pairs_line(line, f"{path}:{lineno}")
                count += 1
        if count == 0:
            raise ValueError(f"JSONL dataset {path!r} holds no examples")


_BUILDERS = {"sts": StsPairs, "beir": BeirPairs, "jsonl": JsonlPairs, "triplets": TripletsTsv}


def prepare(
    kind: str,
    source: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    split: str = "test",
    min_relevance: int = 1,
    download: bool = False,
) -> tfds.core.DatasetBuilder:
    """Build (once) and return the TFDS builder of one source; ``builder.as_data_source()["train"]`` reads it."""
    path = _check_source(kind, resolve_source(source), download)
    name = f"{kind}-{_fingerprint(path)}"
    if kind == "beir":
        name += f"-{split}-r{min_relevance}"
    config = SourceConfig(name=name, source=str(path), split=split, min_relevance=min_relevance)
    builder = _BUILDERS[kind](
        config=config, data_dir=str(cache_dir or default_cache_dir()), file_format="array_record"
    )
    tfds.disable_progress_bar()
    builder.download_and_prepare()
    return builder


def data_source(builder: tfds.core.DatasetBuilder):
    """The random-access ArrayRecord reader of a prepared builder."""
    return builder.as_data_source()["train"]
