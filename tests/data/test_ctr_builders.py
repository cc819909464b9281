"""CTR ArrayRecord builders on the real shared data: sizes, the prescribed train/test splits,
labels, vocabularies from the training split in frequency order, and out-of-vocabulary ids."""
import collections

import numpy as np
import pytest

from embedjax.data import ctr_readers
from embedjax.data.ctr import build_vocabularies, encode_ids, load_ctr


def test_movielens_ctr_matches_the_raw_ratings(ctr_cache_dir, data_dir):
    data = load_ctr("movielens", cache_dir=ctr_cache_dir)
    assert data.fields == ctr_readers.MOVIELENS_FIELDS and data.num_dense == 0
    assert len(data.train["label"]) == 80_000 and len(data.test["label"]) == 20_000
    raw = [line.split("\t") for line in (data_dir / "movielens-100k" / "u.data").read_text().splitlines()]
    is_test = ctr_readers.seeded_test_rows(100_000)
    np.testing.assert_array_equal(np.sort(data.test["source_row"]), np.flatnonzero(is_test))
    np.testing.assert_array_equal(np.sort(data.train["source_row"]), np.flatnonzero(~is_test))
    for split in (data.train, data.test):
        rows = split["source_row"][:500]
        assert [int(int(raw[r][2]) >= 4) for r in rows] == split["label"][:500].tolist()
    # ids are in frequency order of the training split: user 0 is the user with the most training ratings
    train_users = [raw[r][0] for r in data.train["source_row"]]
    top_user = collections.Counter(train_users).most_common(1)[0][0]
    assert data.train["ids"][np.asarray(train_users) == top_user, 0].tolist() == [0] * train_users.count(top_user)
    counts = np.bincount(data.train["ids"][:, 1], minlength=data.vocab_sizes[1])
    assert (np.diff(counts[:-1]) <= 0).all()  # item counts never increase with the id (the last id is OOV)
    for f, size in enumerate(data.vocab_sizes):
        assert data.train["ids"][:, f].max() < size - 1  # training ids never need the OOV id
        assert data.test["ids"][:, f].max() <= size - 1
    assert (data.test["ids"][:, 1] == data.vocab_sizes[1] - 1).sum() > 0  # some test items were never trained on
    assert 0.5 < data.train["label"].mean() < 0.6


def test_frappe_trains_on_validation_and_tests_on_test(ctr_cache_dir, data_dir):
    data = load_ctr("frappe", cache_dir=ctr_cache_dir)
    assert len(data.train["label"]) == 57_722 and len(data.test["label"]) == 28_860
    assert len(data.fields) == 10
    lines = (data_dir / "frappe" / "frappe.test.libfm").read_text().splitlines()
    first = int(np.flatnonzero(data.test["source_row"] == 0)[0])
    assert data.test["label"][first] == int(lines[0].split()[0] == "1")
    assert 0.3 < data.train["label"].mean() < 0.36


def test_criteo_rows_dense_features_and_split(ctr_cache_dir, data_dir):
    data = load_ctr("criteo", cache_dir=ctr_cache_dir)
    assert len(data.train["label"]) == 6_400 and len(data.test["label"]) == 1_600
    assert data.num_dense == 13 and data.train["dense"].shape == (6_400, 13) and len(data.fields) == 26
    line = (data_dir / "criteo-8k" / "criteo_kaggle_8k.tsv").read_text().splitlines()[0].split("\t")
    row = int(np.flatnonzero(data.train["source_row"] == 0)[0]) if 0 in data.train["source_row"] else None
    split = data.train if row is not None else data.test
    row = row if row is not None else int(np.flatnonzero(data.test["source_row"] == 0)[0])
    expected = [np.log1p(max(float(x), 0.0)) if x else 0.0 for x in line[1:14]]
    np.testing.assert_allclose(split["dense"][row], expected, rtol=1e-6)
    assert split["label"][row] == int(line[0])


def test_vocabularies_and_field_selection():
    values = np.asarray([["a", "x"], ["b", "x"], ["b", "y"], ["c", "z"]], dtype=object)
    is_train = np.asarray([True, True, True, False])
    vocabs = build_vocabularies(values, is_train, min_count=1)
    assert vocabs == [{"b": 0, "a": 1}, {"x": 0, "y": 1}]
    np.testing.assert_array_equal(encode_ids(values, vocabs), [[1, 0], [0, 0], [0, 1], [2, 2]])
    assert build_vocabularies(values, is_train, min_count=2) == [{"b": 0}, {"x": 0}]
    with pytest.raises(ValueError, match="min_count"):
        build_vocabularies(values, is_train, min_count=0)


def test_select_fields_and_errors(ctr_cache_dir):
    data = load_ctr("movielens", cache_dir=ctr_cache_dir)
    small = data.select_fields(("item", "user"))
    assert small.vocab_sizes == (data.vocab_sizes[1], data.vocab_sizes[0])
    np.testing.assert_array_equal(small.test["ids"], data.test["ids"][:, [1, 0]])
    with pytest.raises(ValueError, match="not fields of movielens"):
        data.select_fields(("user", "city"))
    with pytest.raises(ValueError, match="unknown CTR dataset"):
        load_ctr("avazu", cache_dir=ctr_cache_dir)
