"""Fine-tuning only the new rows of an interpolated position table with PoSE skips (issue 15):
the original rows and every other weight stay bit-for-bit, the skips reach rows far past the
trained length, the loss falls on a fixed set, and only interpolated tables are accepted."""
import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.models import position_extension as ext
from embedjax.train.position_tuning import TABLE_PATH, tune_new_positions

EXAMPLES = [("A man is playing a flute.", "Someone plays a wind instrument.", "A woman is sleeping."),
            ("Two dogs run in a park.", "Animals are running outside.", "The dogs are asleep indoors."),
            ("A child reads a book.", "A kid is reading.", "A child is swimming."),
            ("The chef cooks pasta.", "Food is being prepared.", "The kitchen is empty."),
            ("A cyclist climbs a hill.", "Someone rides a bike uphill.", "A car drives downhill.")]


def _leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_only_new_rows_move_and_short_inputs_embed_as_before():
    enc = ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=2048, position_extension={"type": "interpolate"})
    before = _leaves(enc.params)
    short = ["A man is playing a flute.", "Three dogs run across a green park."]
    emb_before = enc.encode(short)
    result = tune_new_positions(enc, EXAMPLES, steps=12, batch_size=5, learning_rate=2e-2, train_length=24,
                                seed=0, progress=False)
    after = _leaves(result.params)
    table_key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in TABLE_PATH))
    for name, value in before.items():
        if name != table_key:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    new = ext.new_rows(512, 2048)
    np.testing.assert_array_equal(after[table_key][~new], before[table_key][~new])  # the original rows
    moved = np.abs(after[table_key] - before[table_key]).max(axis=1) > 0
    assert moved[new].sum() > 50 and moved[1024:].any()  # PoSE reached rows far past 512
    assert result.trainable_rows == 2048 - 512 and result.positions_reached > 100
    assert result.losses[-1] < result.losses[0]  # twelve steps on five triplets: the loss falls
    enc.params = result.params
    np.testing.assert_array_equal(enc.encode(short), emb_before)  # short inputs read only original rows


@pytest.mark.slow
def test_pairs_train_too_and_tuning_needs_an_interpolated_table():
    enc = ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=1024, position_extension={"type": "interpolate"})
    result = tune_new_positions(enc, [e[:2] for e in EXAMPLES], steps=1, batch_size=4, train_length=16,
                                progress=False)
    assert np.isfinite(result.losses).all()
    with pytest.raises(ValueError, match="must all be \\(anchor, positive\\) or all"):
        tune_new_positions(enc, [EXAMPLES[0], EXAMPLES[1][:2]], steps=1, progress=False)
    with pytest.raises(ValueError, match="train_length=600 must be between 2 and the trained length 512"):
        tune_new_positions(enc, EXAMPLES, steps=1, train_length=600, progress=False)
    grouped = ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=1024, position_extension={"type": "grouped"})
    with pytest.raises(ValueError, match="trains the new rows of an interpolated table"):
        tune_new_positions(grouped, EXAMPLES, steps=1, progress=False)
