"""Readers of the CTR datasets in the shared data folder: raw categorical strings, dense values, labels
and the train/test assignment the data README prescribes.

- ``movielens``: MovieLens 100K ratings as clicks (rating >= 4). Fields: user, item, age, gender,
  occupation, zip, year (release year, "" when unknown) and genre (the movie's genre combination,
  e.g. "Animation|Children's|Comedy", one categorical value). Split: a seeded 80/20 of the ratings.
- ``frappe``: libFM lines ``label f:1 ... f:1`` with one feature per field (10 fields), label -1/1.
  Train on ``frappe.validation.libfm``, test on ``frappe.test.libfm`` (the 202k-row train file is
  not available).
- ``criteo``: the 8,000 Criteo rows: label, 13 integer features (dense: log(1 + max(x, 0)), 0 when
  missing) and 26 hashed categorical fields ("" when missing). Split: a seeded 80/20 of the rows.

The 80/20 splits use a fixed seed (`SPLIT_SEED`) and fraction (`TEST_FRACTION`) on purpose: the
20% are evaluation-only, so every run, whatever its training seed, must hold out the same rows.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from embedjax.data.readers import DataFormatError

DATASETS = ("movielens", "frappe", "criteo")
SOURCES = {"movielens": "movielens-100k", "frappe": "frappe", "criteo": "criteo-8k/criteo_kaggle_8k.tsv"}
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MOVIELENS_FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "year", "genre")
FRAPPE_FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city")
CRITEO_DENSE = 13
CRITEO_CATEGORICAL = 26


@dataclasses.dataclass
class RawCtr:
    """One dataset before vocabularies: N examples."""

    fields: tuple[str, ...]
    values: np.ndarray  # object [N, F]: raw categorical values as strings
    dense: np.ndarray  # float32 [N, D] (D = 0 without dense features)
    labels: np.ndarray  # int32 [N] in {0, 1}
    is_test: np.ndarray  # bool [N]
    source_row: np.ndarray  # int64 [N]: the example's line number in its source (stable ids)


def seeded_test_rows(n: int) -> np.ndarray:
    """bool [n]: the evaluation-only 20% of an 80/20 split (fixed seed)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    is_test = np.zeros(n, bool)
    is_test[perm[: int(round(TEST_FRACTION * n))]] = True
    return is_test


def _split_lines(path: pathlib.Path, sep: str, width: int, encoding: str = "utf-8") -> list[list[str]]:
    rows = []
    with open(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) < width:
                raise DataFormatError(f"{path}:{lineno}: expected {width} {sep!r}-separated fields, found {len(parts)}")
            rows.append(parts)
    if not rows:
        raise DataFormatError(f"{path} holds no rows")
    return rows


def read_movielens(folder: pathlib.Path) -> RawCtr:
    for name in ("u.data", "u.user", "u.item", "u.genre"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"MovieLens folder {folder} has no {name}; point at the movielens-100k folder")
    genres = [r[0] for r in _split_lines(folder / "u.genre", "|", 2)]
    users = {r[0]: r[1:5] for r in _split_lines(folder / "u.user", "|", 5)}
    items = {}
    for r in _split_lines(folder / "u.item", "|", 5 + len(genres), encoding="latin-1"):
        date = r[2]
        year = date.rsplit("-", 1)[-1] if date else ""
        flags = r[5:5 + len(genres)]
        items[r[0]] = (year, "|".join(g for g, flag in zip(genres, flags) if flag == "1"))
    ratings = _split_lines(folder / "u.data", "\t", 4)
    values, labels = [], []
    for lineno, (user, item, rating, _) in enumerate(ratings, 1):
        if user not in users or item not in items:
            raise DataFormatError(f"{folder / 'u.data'}:{lineno}: user {user} or item {item} is not in u.user/u.item")
        age, gender, occupation, zipcode = users[user]
        year, genre = items[item]
        values.append((user, item, age, gender, occupation, zipcode, year, genre))
        labels.append(int(int(rating) >= 4))
    n = len(values)
    return RawCtr(MOVIELENS_FIELDS, np.asarray(values, dtype=object), np.zeros((n, 0), np.float32),
                  np.asarray(labels, np.int32), seeded_test_rows(n), np.arange(n, dtype=np.int64))


def _read_libfm(path: pathlib.Path, num_fields: int):
    if not path.is_file():
        raise FileNotFoundError(f"frappe file {path} does not exist; point at the shared frappe folder")
    values, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != num_fields + 1 or parts[0] not in ("1", "-1"):
                raise DataFormatError(f"{path}:{lineno}: expected a label (1 or -1) and {num_fields} features")
            values.append(tuple(p.split(":", 1)[0] for p in parts[1:]))
            labels.append(int(parts[0] == "1"))
    return values, labels


def read_frappe(folder: pathlib.Path) -> RawCtr:
    train_v, train_y = _read_libfm(folder / "frappe.validation.libfm", len(FRAPPE_FIELDS))
    test_v, test_y = _read_libfm(folder / "frappe.test.libfm", len(FRAPPE_FIELDS))
    n_train, n = len(train_v), len(train_v) + len(test_v)
    return RawCtr(FRAPPE_FIELDS, np.asarray(train_v + test_v, dtype=object), np.zeros((n, 0), np.float32),
                  np.asarray(train_y + test_y, np.int32), np.arange(n) >= n_train,
                  np.concatenate([np.arange(n_train), np.arange(n - n_train)]).astype(np.int64))


def read_criteo(path: pathlib.Path) -> RawCtr:
    if not path.is_file():
        raise FileNotFoundError(f"Criteo file {path} does not exist; point at criteo-8k/criteo_kaggle_8k.tsv")
    rows = _split_lines(path, "\t", 1 + CRITEO_DENSE + CRITEO_CATEGORICAL)
    labels = np.asarray([int(r[0]) for r in rows], np.int32)
    dense = np.zeros((len(rows), CRITEO_DENSE), np.float32)
    for i, r in enumerate(rows):
        for j, x in enumerate(r[1:1 + CRITEO_DENSE]):
            dense[i, j] = np.log1p(max(float(x), 0.0)) if x else 0.0
    values = np.asarray([tuple(r[1 + CRITEO_DENSE:1 + CRITEO_DENSE + CRITEO_CATEGORICAL]) for r in rows], dtype=object)
    fields = tuple(f"C{i + 1}" for i in range(CRITEO_CATEGORICAL))
    return RawCtr(fields, values, dense, labels, seeded_test_rows(len(rows)), np.arange(len(rows), dtype=np.int64))


def source_path(name: str, data_dir: pathlib.Path) -> pathlib.Path:
    if name not in DATASETS:
        raise ValueError(f"unknown CTR dataset {name!r}; choose one of {DATASETS}")
    return data_dir / SOURCES[name]


def read_raw(name: str, path: pathlib.Path) -> RawCtr:
    return {"movielens": read_movielens, "frappe": read_frappe, "criteo": read_criteo}[name](path)
