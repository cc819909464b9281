"""TFDS ArrayRecord builders of the CTR datasets and their in-memory loader.

    data = load_ctr("movielens")          # prepares the ArrayRecord dataset once, then reads it
    data.train["ids"]    # int32 [N, F]   categorical ids, field f in [0, data.vocab_sizes[f])
    data.train["dense"]  # float32 [N, D] (criteo: 13; others: 0 columns)
    data.train["label"]  # int32 [N] in {0, 1}
    data.test[...]       # the evaluation-only split (never trained on)

Vocabularies come from the **training** split only: each field's values seen at least
``min_count`` times get ids 0, 1, ... in order of descending training frequency (ties by value),
and every other value, including values first seen in the test split, gets the field's last id
(out-of-vocabulary), so ``vocab_size = kept values + 1``. Numbering by frequency is what lets
mixed-dimension tables read an id's tier from the id (`embedjax.tables.mixed_dim`).

Prepared datasets live under ``cache_dir/ctr_examples/<dataset>-<fingerprint>-m<min_count>/<version>``
(fingerprint of the source files), with field names and vocab sizes in the dataset metadata.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from embedjax.data import ctr_readers
from embedjax.data.builders import _fingerprint, _LocalSourceBuilder, data_root, default_cache_dir

NUM_FIELDS = {"movielens": len(ctr_readers.MOVIELENS_FIELDS), "frappe": len(ctr_readers.FRAPPE_FIELDS),
              "criteo": ctr_readers.CRITEO_CATEGORICAL}
NUM_DENSE = {"movielens": 0, "frappe": 0, "criteo": ctr_readers.CRITEO_DENSE}
SPLITS = ("train", "test")


def build_vocabularies(values_nf: np.ndarray, is_train: np.ndarray, min_count: int) -> list[dict]:
    """Per field: {value: id} of the training values seen >= min_count times, most frequent first."""
    if min_count < 1:
        raise ValueError(f"min_count={min_count} must be >= 1")
    vocabs = []
    for f in range(values_nf.shape[1]):
        counts = collections.Counter(values_nf[is_train, f].tolist())
        kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
        vocabs.append({v: i for i, v in enumerate(kept)})
    return vocabs


def encode_ids(values_nf: np.ndarray, vocabs: list[dict]) -> np.ndarray:
    """int32 [N, F]: each value's id, the field's out-of-vocabulary id (len(vocab)) when unknown."""
    out = np.empty(values_nf.shape, np.int32)
    for f, vocab in enumerate(vocabs):
        oov = len(vocab)
        out[:, f] = [vocab.get(v, oov) for v in values_nf[:, f].tolist()]
    return out


@dataclasses.dataclass
class CtrConfig(tfds.core.BuilderConfig):
    dataset: str = "movielens"
    source: str = ""
    min_count: int = 1


class CtrExamples(_LocalSourceBuilder):
    """One CTR dataset as train/test ArrayRecord splits of (ids, dense, label, source_row)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "ids": tfds.features.Tensor(shape=(NUM_FIELDS[cfg.dataset],), dtype=np.int32),
                "dense": tfds.features.Tensor(shape=(NUM_DENSE[cfg.dataset],), dtype=np.float32),
                "label": np.int32,
                "source_row": np.int64,
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        raw = ctr_readers.read_raw(cfg.dataset, pathlib.Path(cfg.source))
        vocabs = build_vocabularies(raw.values, ~raw.is_test, cfg.min_count)
        ids = encode_ids(raw.values, vocabs)
        self.info.metadata.update({
            "fields": list(raw.fields), "vocab_sizes": [len(v) + 1 for v in vocabs],
            "num_dense": int(raw.dense.shape[1]), "min_count": cfg.min_count,
            "split_seed": ctr_readers.SPLIT_SEED, "test_fraction": ctr_readers.TEST_FRACTION,
        })
        return {split: self._generate_examples(raw, ids, raw.is_test == (split == "test")) for split in SPLITS}

    def _generate_examples(self, raw, ids, rows):
        for i in np.flatnonzero(rows):
            yield int(i), {"ids": ids[i], "dense": raw.dense[i], "label": int(raw.labels[i]),
                           "source_row": int(raw.source_row[i])}


def prepare_ctr(name: str, *, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                min_count: int = 1) -> tfds.core.DatasetBuilder:
    """Build (once) and return the TFDS builder of a CTR dataset from the shared data folder."""
    root = pathlib.Path(data_dir) if data_dir else data_root()
    if root is None:
        raise ValueError("no data folder: pass data_dir or set EMBEDJAX_DATA_DIR to the shared data folder")
    source = ctr_readers.source_path(name, root)
    if not source.exists():
        raise FileNotFoundError(f"{name} source {source} does not exist; set EMBEDJAX_DATA_DIR to the shared data folder")
    if min_count < 1:
        raise ValueError(f"min_count={min_count} must be >= 1")
    config = CtrConfig(name=f"{name}-{_fingerprint(source)}-m{min_count}", dataset=name, source=str(source),
                       min_count=min_count)
    builder = CtrExamples(config=config, data_dir=str(cache_dir or default_cache_dir()), file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare()
    return builder


@dataclasses.dataclass
class CtrData:
    name: str
    fields: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    num_dense: int
    train: dict  # ids int32 [N, F], dense float32 [N, D], label int32 [N], source_row int64 [N]
    test: dict

    def select_fields(self, names) -> "CtrData":
        """The same data restricted to the fields ``names`` (in that order)."""
        unknown = [n for n in names if n not in self.fields]
        if unknown or not names:
            raise ValueError(f"fields {list(unknown or names)} are not fields of {self.name}; its fields are "
                             f"{list(self.fields)}")
        cols = [self.fields.index(n) for n in names]
        pick = lambda split: {**split, "ids": np.ascontiguousarray(split["ids"][:, cols])}  # noqa: E731
        return dataclasses.replace(self, fields=tuple(names), vocab_sizes=tuple(self.vocab_sizes[c] for c in cols),
                                   train=pick(self.train), test=pick(self.test))


ARRAYS_FILE = "arrays.npz"  # decoded splits beside the prepared ArrayRecord files
_KEYS = ("ids", "dense", "label", "source_row")


def _decode_split(builder, split: str) -> dict:
    source = builder.as_data_source()[split]
    records = source.__getitems__(range(len(source)))
    return {key: np.stack([r[key] for r in records]) for key in _KEYS}


def read_splits(builder) -> dict[str, dict]:
    """Both splits as arrays. Decoding ArrayRecord examples one by one takes seconds, so the first
    read also writes them as one ``arrays.npz`` in the prepared dataset's folder (atomically), and
    later reads load that file after checking its row counts against the dataset info."""
    folder = pathlib.Path(builder.data_dir)
    path = folder / ARRAYS_FILE
    expected = {split: builder.info.splits[split].num_examples for split in SPLITS}
    if path.is_file():
        with np.load(path) as stored:
            out = {split: {key: stored[f"{split}/{key}"] for key in _KEYS} for split in SPLITS}
        if all(len(out[split]["label"]) == n for split, n in expected.items()):
            return out
    out = {split: _decode_split(builder, split) for split in SPLITS}
    tmp = folder / f".{ARRAYS_FILE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{f"{split}/{key}": out[split][key] for split in SPLITS for key in _KEYS})
    os.replace(tmp, path)
    return out


def load_ctr(name: str, *, data_dir=None, cache_dir=None, min_count: int = 1) -> CtrData:
    """The prepared dataset ``name`` read into memory (both splits)."""
    builder = prepare_ctr(name, data_dir=data_dir, cache_dir=cache_dir, min_count=min_count)
    meta = builder.info.metadata
    splits = read_splits(builder)
    return CtrData(name=name, fields=tuple(meta["fields"]), vocab_sizes=tuple(int(v) for v in meta["vocab_sizes"]),
                   num_dense=int(meta["num_dense"]), train=splits["train"], test=splits["test"])
