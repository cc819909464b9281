"""Which split of which dataset each data source is, and the check that training never reads evaluation data.

Source grammar
--------------

Training sources (``config.data.train``), comma-separated ``KIND:PATH[:SPLIT][@WEIGHT]``:

- ``beir:scifact:train`` -- the (query, relevant document) pairs of a BEIR folder's ``qrels/train.tsv``.
  ``SPLIT`` may be left out when the folder has one qrels split only (``beir:msmarco`` is
  ``msmarco:test``); a folder with several (scifact: train, test) needs it named.
- ``triplets:nli/triplets.tsv`` -- tab-separated (anchor, positive, hard_negative) rows with a header.
- ``jsonl:runs/mined/scifact-train-1neg.jsonl`` -- generic pairs / triplets; its provenance (the
  dataset splits it was made from) comes from the sidecar ``<file>.meta.json`` that
  `embedjax.data.mining` writes (`write_provenance`).
- ``sts:stsb/sts-train.csv`` -- graded pairs.

File sources (sts, triplets) are the split ``<parent folder>:<file stem>`` (``stsb:sts-train``).
PATH may be relative to ``EMBEDJAX_DATA_DIR``. A PATH that itself contains ``:`` (``gs://...``)
keeps it: only a last ``:``-part without ``/`` is read as a split.

Evaluation sets (``config.eval.beir``), comma-separated ``PATH[:SPLIT]`` with the same split rule:
``"scifact:test,nfcorpus:test,msmarco"``.

The leak check
--------------

`check_disjoint` refuses a configuration whose training data is one of its evaluation sets (same
dataset, same split), or is evaluation-only data at all (`EVALUATION_ONLY`, from the shared data
README's "What may be trained on"), naming both sides. Only ``allow_overlap=True``
(``data.allow_eval_overlap``) lets it through, and then the overlaps are returned for the run
summary to record. Datasets are identified by folder name, so a copy of scifact under another
name is not recognised: keep the shared names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Iterable, Mapping, Sequence

PROVENANCE_SUFFIX = ".meta.json"
SHARED_DATA_RULES = "../shared/data/README.md, 'What may be trained on'"
# dataset -> its evaluation-only splits ("*": every split).
EVALUATION_ONLY: Mapping[str, str | tuple[str, ...]] = {
    "msmarco": "*",
    "limit-small": "*",
    "scifact": ("test",),
    "nfcorpus": ("test",),
    "stsb": ("sts-test",),
    "qmsum": ("test",),
}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class EvaluationLeakError(ValueError):
    """The training data includes evaluation data; the message names both."""


@dataclasses.dataclass(frozen=True)
class SplitRef:
    """One split of one dataset, e.g. ``SplitRef("scifact", "train")``."""

    dataset: str
    split: str

    def __str__(self) -> str:
        return f"{self.dataset}:{self.split}"


def is_evaluation_only(ref: SplitRef) -> bool:
    splits = EVALUATION_ONLY.get(ref.dataset)
    return splits is not None and (splits == "*" or ref.split in splits)


# ---------------------------------------------------------------- BEIR splits


def beir_splits(folder: pathlib.Path) -> tuple[str, ...]:
    """The qrels splits of a BEIR folder: ``qrels/<split>.tsv`` stems, or ``("test",)`` for a lone ``qrels.jsonl``."""
    tsv = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
    if tsv:
        return tuple(tsv)
    return ("test",) if (folder / "qrels.jsonl").is_file() else ()


def resolve_beir_split(path: str, split: str | None, where: str) -> tuple[pathlib.Path, str]:
    """-> (the resolved folder, the split): the named one, or the folder's only split; errors name ``where``."""
    from embedjax.data.builders import resolve_source

    folder = resolve_source(path)
    if not folder.is_dir():
        raise ValueError(f"{where}: BEIR folder {path!r} does not exist (looked at {folder}); give an existing "
                         "folder, or one relative to EMBEDJAX_DATA_DIR")
    available = beir_splits(folder)
    if not available:
        raise ValueError(f"{where}: BEIR folder {str(folder)!r} has no qrels/<split>.tsv nor qrels.jsonl")
    if split is None:
        if len(available) > 1:
            raise ValueError(f"{where}: BEIR folder {path!r} has qrels splits {', '.join(available)}; name one, "
                             f"e.g. {path}:{available[-1]}")
        return folder, available[0]
    if split not in available:
        raise ValueError(f"{where}: BEIR folder {path!r} has no split {split!r}; its qrels splits are "
                         f"{', '.join(available)}")
    return folder, split


def _split_suffix(text: str) -> tuple[str, str | None]:
    """``"scifact:train"`` -> ("scifact", "train"); ``"gs://b/x"`` -> ("gs://b/x", None)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and _SPLIT_NAME.match(tail):
        return head, tail
    return text, None


# ---------------------------------------------------------------- training sources


@dataclasses.dataclass(frozen=True)
class TrainSource:
    """One training source: ``kind``, ``path`` (as written), ``split`` (beir only, resolved), mixing ``weight``."""

    kind: str
    path: str
    split: str | None = None
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.split}" if self.split else "")


def parse_train_sources(spec: str) -> list[TrainSource]:
    """``"beir:scifact:train@2,triplets:nli/triplets.tsv"`` -> `TrainSource` list (BEIR splits resolved)."""
    from embedjax.data.builders import KINDS

    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, rest = part.partition(":")
        if not sep or not rest:
            raise ValueError(f"data source {part!r} must look like kind:path[:split][@weight] "
                             f"(kind: {', '.join(KINDS)}), e.g. beir:scifact:train")
        if kind not in KINDS:
            raise ValueError(f"data source {part!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        body, _, weight = rest.partition("@")
        try:
            weight_value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"data source {part!r}: weight {weight!r} is not a number") from None
        if kind == "beir":
            path, split = _split_suffix(body)
            _, split = resolve_beir_split(path, split, f"data source {part!r}")
        else:
            path, split = body, None
            named, suffix = _split_suffix(body)
            if suffix is not None:
                raise ValueError(f"data source {part!r}: only beir sources take a split; a {kind} source is a "
                                 f"file (its split is the file itself), e.g. {kind}:{named}")
        out.append(TrainSource(kind, path, split, weight_value))
    if not out:
        raise ValueError("config.data.train names no data source; set it to e.g. 'beir:scifact:train' "
                         "or 'sts:stsb/sts-train.csv'")
    return out


def _file_ref(path: str) -> SplitRef:
    from embedjax.data.builders import resolve_source

    file = resolve_source(path)
    return SplitRef(file.resolve().parent.name, file.stem)


def source_refs(source: TrainSource) -> tuple[SplitRef, ...]:
    """The dataset splits a training source reads (a JSONL file without a provenance sidecar: none known)."""
    from embedjax.data.builders import resolve_source

    if source.kind == "beir":
        return (SplitRef(resolve_source(source.path).resolve().name, source.split),)
    if source.kind == "jsonl":
        return read_provenance(resolve_source(source.path)) or ()
    return (_file_ref(source.path),)


# ---------------------------------------------------------------- evaluation sets


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One BEIR evaluation set: the folder as written, its split, and what it is."""

    path: str
    split: str
    ref: SplitRef

    @property
    def name(self) -> str:
        """``<folder>-<split>``, e.g. ``scifact-test`` (the prefix of its metric names)."""
        return f"{pathlib.Path(self.path).name}-{self.split}"


def parse_eval_sets(spec: str, default_split: str | None = None, where: str = "eval.beir") -> list[EvalSet]:
    """``"scifact:test,nfcorpus:test,msmarco"`` -> `EvalSet` list; an entry without a split takes
    ``default_split`` when given, else its folder's only split."""
    out: list[EvalSet] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, split = _split_suffix(part)
        folder, split = resolve_beir_split(path, split or default_split, f"{where} entry {part!r}")
        entry = EvalSet(path, split, SplitRef(folder.resolve().name, split))
        if any(e.name == entry.name for e in out):
            raise ValueError(f"{where} {spec!r} names the evaluation set {entry.name} twice")
        out.append(entry)
    return out


# ---------------------------------------------------------------- provenance of derived files


def provenance_path(data_path: str | os.PathLike) -> pathlib.Path:
    """Where a derived data file's provenance sidecar lives: ``<file>.meta.json``."""
    data_path = pathlib.Path(data_path)
    return data_path.with_name(data_path.name + PROVENANCE_SUFFIX)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_provenance(data_path: str | os.PathLike, refs: Iterable[SplitRef], **details) -> pathlib.Path:
    """Write ``<file>.meta.json``: the dataset splits ``data_path`` was made from, the file's sha256, ``details``.

    Call it after the data file is in place; the hash lets `read_provenance` refuse a sidecar that
    describes another version of the file.
    """
    data_path = pathlib.Path(data_path)
    payload = {"sources": [{"dataset": r.dataset, "split": r.split} for r in refs],
               "sha256": _sha256(data_path), **details}
    path = provenance_path(data_path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_provenance(data_path: str | os.PathLike) -> tuple[SplitRef, ...] | None:
    """The dataset splits recorded in ``<file>.meta.json`` (None: no sidecar); a stale sidecar is an error."""
    data_path = pathlib.Path(data_path)
    path = provenance_path(data_path)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        refs = tuple(SplitRef(str(s["dataset"]), str(s["split"])) for s in payload["sources"])
        recorded = payload["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"provenance file {path} is malformed ({err!r}); it must hold "
                         "{'sources': [{'dataset', 'split'}], 'sha256'}: rewrite it or delete it") from None
    if data_path.is_file() and _sha256(data_path) != recorded:
        raise ValueError(f"provenance file {path} describes another version of {data_path.name} (sha256 differs): "
                         "regenerate the file with its tool (e.g. python -m embedjax.data.mining) or delete the sidecar")
    return refs


# ---------------------------------------------------------------- the leak check


def find_overlaps(train: Sequence[TrainSource], evaluations: Sequence[tuple[str, SplitRef]]) -> list[str]:
    """Each way the training sources touch evaluation data, as a sentence; ``evaluations`` are
    (how the config names it, what it is) pairs."""
    found = []
    for source in train:
        refs = source_refs(source)
        via = "" if source.kind != "jsonl" else f" (made from {', '.join(map(str, refs))}, per its {PROVENANCE_SUFFIX})"
        for ref in refs:
            for label, eval_ref in evaluations:
                if ref == eval_ref:
                    found.append(f"training source {str(source)!r}{via} is the evaluation set {label} ({ref})")
            if is_evaluation_only(ref):
                found.append(f"training source {str(source)!r}{via} reads {ref}, which is evaluation-only "
                             f"({SHARED_DATA_RULES})")
    return found


def check_disjoint(train: str, *, beir: str = "", sts: Sequence[str] = (), allow_overlap: bool = False) -> list[str]:
    """Refuse training data that is evaluation data; -> the overlaps let through by ``allow_overlap`` ([] if none).

    Args:
        train: the training sources (``data.train`` grammar).
        beir: the BEIR evaluation sets (``eval.beir`` grammar).
        sts: STS evaluation files (``eval.sts``, ``eval.sts_test``; empty strings are skipped).
        allow_overlap: let overlaps through (``data.allow_eval_overlap``): the caller records them.

    Raises:
        EvaluationLeakError: naming each training source and the evaluation set it overlaps.
    """
    evaluations = [(f"eval.beir {s.path}:{s.split}", s.ref) for s in parse_eval_sets(beir)] if beir else []
    evaluations += [(f"eval.sts {path}", _file_ref(path)) for path in sts if path]
    overlaps = find_overlaps(parse_train_sources(train), evaluations)
    if overlaps and not allow_overlap:
        raise EvaluationLeakError(
            "the config trains on evaluation data: " + "; ".join(overlaps) + ". Train on a training split "
            "(e.g. beir:scifact:train, triplets:nli/triplets.tsv) or, knowingly, set data.allow_eval_overlap=True "
            "(the run summary then records the overlap)")
    return overlaps
