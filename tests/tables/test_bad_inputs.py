"""Bad input gets a clear error: ids out of range, negative ids, a budget too small for a method,
a field count that disagrees with the configuration, and misused options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax.tables as T

VOCAB = (10, 3, 7)


def test_ids_out_of_range_for_a_full_table():
    method = T.build("full", VOCAB, 4, 1.0)
    with pytest.raises(ValueError, match=r"id 3 in gender \(row 1\) is out of range .* 3 rows"):
        T.check_ids(method, np.asarray([[0, 2, 1], [9, 3, 0]]), field_names=["user", "gender", "age"])
    T.check_ids(method, np.asarray([[9, 2, 6]]))  # the last id of each field is fine


def test_hashed_fields_take_any_id_but_direct_fields_do_not():
    method = T.build("hash", VOCAB, 4, 0.5)  # 10 rows: a cap of 3 hashes fields 0 and 2, field 1 fits
    assert method.bounded_fields() == (False, True, False)
    T.check_ids(method, np.asarray([[123456, 2, 99]]))
    with pytest.raises(ValueError, match="out of range"):
        T.check_ids(method, np.asarray([[0, 5, 0]]))
    multiplex = T.build("multiplex", VOCAB, 4, 0.5)
    T.check_ids(multiplex, np.asarray([[10**9, 10**9, 10**9]]))


@pytest.mark.parametrize("method", T.METHODS)
def test_negative_ids_are_rejected_by_every_method(method):
    table = T.build(method, VOCAB, 4, 1.0 if method == "full" else 0.9)
    with pytest.raises(ValueError, match="negative id -1 in field 1"):
        T.check_ids(table, np.asarray([[0, -1, 0]]))


def test_field_count_must_match_the_table():
    method = T.build("qr", VOCAB, 4, 0.9)
    with pytest.raises(ValueError, match="ids have 2 fields but the qr table was configured with 3"):
        T.check_ids(method, np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match=r"must be \[batch, fields\]"):
        T.check_ids(method, np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        T.check_ids(method, np.zeros((4, 3), np.float32))
    module = T.EmbeddingTable(method)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"ids must be \[batch, 3\]"):
        module.apply(variables, jnp.zeros((2, 4), jnp.int32))


def test_budget_too_small_names_the_smallest_budget():
    with pytest.raises(T.BudgetTooSmall, match=r"too small for qr.*budget >= 0\.\d+"):
        T.build("qr", (10_000, 5_000), 16, 0.001)


def test_method_construction_errors():
    with pytest.raises(ValueError, match="probes dividing dim"):
        T.HashedTable(VOCAB, 6, buckets=(5, 3, 7), probes=4, combine="concat")
    with pytest.raises(ValueError, match="needs at most"):
        T.HashedTable(VOCAB, 4, buckets=(11, 3, 7))
    with pytest.raises(ValueError, match="does not apply to float32"):
        T.HashedTable(VOCAB, 4, buckets=(5, 3, 7), update="stochastic")
    with pytest.raises(ValueError, match="phases"):
        T.build("full", VOCAB, 4, 1.0).check_phase("search")
    with pytest.raises(ValueError, match="vocab_sizes"):
        T.build("hash", (), 4, 0.5)
    with pytest.raises(ValueError, match="sparse optimizer"):
        T.SparseOptimizer("adamw")
