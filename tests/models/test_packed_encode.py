"""``Encoder.encode`` with sequence packing (issue 17): packed batches give every text the embedding
the padded batches give it, in input order, and ``auto`` packs only where it saves positions.

Tolerance 2e-6 absolute on unit-norm MiniLM embeddings (measured 2.5e-7 on STS-B; packed rows change
the matmul shapes, so XLA sums in other blockings), 2e-5 on the tiny random decoder's raw last-token
states; a text that read another text's tokens, or a row put back in the wrong place, is off by ~1e-1.
"""
import pathlib
import sys

import numpy as np
import pytest

import embedjax as ej
from embedjax.data import packing
from embedjax.data.readers import read_sts
from embedjax.encoder import PACK_SAVING, Encoder, packed_batches, packed_positions, padded_positions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_fixtures import WORDS, save_tiny_decoder  # noqa: E402


@pytest.fixture(scope="module")
def sts_texts(data_dir):
    s1, s2, _ = read_sts(data_dir / "stsb" / "sts-test.csv")
    return (s1 + s2)[:203]  # STS-B test sentences: short, lengths 7-60 word pieces; 203 = 3 x 64 + 11


def test_packing_plan_deals_first_fit_rows_to_batches():
    lengths = [30, 5, 5, 60, 12, 33, 2, 7]  # mean 19.25: 6 texts' worth is 1.8 rows -> 2 rows a batch
    # First fit, longest first: [60, 2] [33, 30] [12, 7, 5, 5]; densest row first, snake order over 2 batches.
    assert packed_batches(lengths, batch_size=6, row_length=64) == [[[4, 7, 1, 2]], [[3, 6], [5, 0]]]
    assert packed_positions(packed_batches(lengths, 6, 64), 64) == 3 * 64
    # Padded, longest first in threes: [60, 33, 30] -> 3 x 64, [12, 7, 5] -> 3 x 16, [5, 2] -> 2 x 8.
    assert padded_positions(lengths, 3, (8, 16, 24, 32, 40, 48, 56, 64)) == 3 * 64 + 3 * 16 + 2 * 8
    # Over 4 data-parallel devices both plans round each batch's rows up to a multiple of 4.
    assert packed_positions(packed_batches(lengths, 6, 64), 64, multiple=4) == 2 * 4 * 64
    assert padded_positions(lengths, 3, (8, 16, 24, 32, 40, 48, 56, 64), multiple=4) == 4 * (64 + 16 + 8)
    # Windows of 4 texts in input order: [30, 5, 5, 60] -> [60] [30, 5, 5]; [12, 33, 2, 7] -> [33, 12, 7, 2].
    assert packed_batches(lengths, 6, 64, window=4) == [[[5, 4, 7, 6]], [[0, 1, 2], [3]]]


def test_packing_plan_balances_rows_and_texts_over_batches():
    rng = np.random.default_rng(3)
    lengths = list(rng.integers(3, 47, 1001))
    batches = packed_batches(lengths, batch_size=64, row_length=64, window=300)
    rows = [row for b in batches for row in b]
    assert sorted(i for row in rows for i in row) == list(range(1001))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    row_counts = [len(b) for b in batches]
    assert max(row_counts) - min(row_counts) <= 1  # two compiled row counts at most
    # 64 texts of the mean length ~24.5 fill ~24.5 rows: the batch holds about that many tokens.
    assert max(row_counts) == round(64 * np.mean(lengths) / 64)
    text_counts = [sum(map(len, b)) for b in batches]
    assert max(text_counts) - min(text_counts) <= max(map(len, rows))


def test_packed_encode_equals_padded_on_real_sentences(minilm_encoder, sts_texts):
    enc = minilm_encoder
    ids = enc.tokenizer.token_ids(sts_texts)
    row_length, batches = enc.packing_plan(ids, 64, None)  # auto packs short sentences
    lengths = [len(x) for x in ids]
    assert packed_positions(batches, row_length) <= PACK_SAVING * padded_positions(lengths, 64, enc.tokenizer.buckets)
    padded = enc.encode(sts_texts, pack=False)
    packed = enc.encode(sts_texts)
    assert packed.shape == padded.shape == (203, 384)
    np.testing.assert_allclose(packed, padded, atol=2e-6)
    # A smaller batch puts other texts side by side in the rows; the embeddings stay.
    np.testing.assert_allclose(enc.encode(sts_texts, batch_size=16, pack=True), padded, atol=2e-6)


def test_packed_encode_leaves_the_prompt_out_of_pooling(minilm_encoder, sts_texts):
    base = minilm_encoder
    enc = Encoder(base.model, base.params, base.tokenizer, pooling="mean", include_prompt=False)
    texts = sts_texts[:40]
    packed = enc.encode(texts, prompt="query: ", pack=True)
    np.testing.assert_allclose(packed, enc.encode(texts, prompt="query: ", pack=False), atol=2e-6)
    assert float(np.min(np.sum(packed * base.encode(texts, prompt="query: ", pack=True), axis=1))) < 0.999


def test_auto_pads_texts_that_fill_their_rows(minilm_encoder):
    texts = [("word " * (200 + n % 40)).strip() for n in range(64)]  # 202-241 tokens: one text a row
    ids = minilm_encoder.tokenizer.token_ids(texts)
    assert minilm_encoder.packing_plan(ids, 64, None) is None
    assert minilm_encoder.packing_plan(ids, 64, True) is not None


def test_packed_decoder_encode_equals_left_padding(tmp_path):
    folder = save_tiny_decoder(tmp_path / "mistral", "mistral")
    enc = ej.Encoder.from_pretrained(folder, pooling="lasttoken", normalize=False)
    assert enc.tokenizer.padding_side == "left"
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, n)) for n in (3, 17, 1, 9, 30, 4, 12, 2, 25, 6, 8)]
    packed = enc.encode(texts, pack=True)
    np.testing.assert_allclose(packed, enc.encode(texts, pack=False), atol=2e-5)
    assert np.abs(packed).max() > 0.1


def test_pack_refusals_name_the_fix(minilm_encoder, minilm_dir):
    with pytest.raises(ValueError, match="pack='yes'"):
        minilm_encoder.encode(["a"], pack="yes")
    extended = ej.Encoder.from_pretrained(minilm_dir, max_length=1024, position_extension={"type": "interpolate"})
    assert not extended.family.packs(extended.config)
    with pytest.raises(ValueError, match="pack=True: this 'bert' model does not read packed batches"):
        extended.encode(["a short one", "another"], pack=True)
    assert extended.packing_plan(extended.tokenizer.token_ids(["a", "b"]), 64, None) is None


def test_packing_rejects_a_text_longer_than_the_rows():
    with pytest.raises(ValueError, match="does not fit rows of row_length=8"):
        packing.pack([[1] * 9], row_length=8, pad_id=0)


def test_packed_encode_on_eight_devices_equals_one_device_padded(minilm_dir, minilm_encoder, sts_texts):
    """On a mesh each packed batch's rows and texts round up to the 8 data-parallel devices (empty
    rows, filler texts), so every device takes whole rows; each text's tokens are gathered from the
    device that holds its row. The embeddings equal one device's padded ones (float32, other
    reduction orders: 2e-6 on unit-norm rows)."""
    from jax.sharding import PartitionSpec as P

    from embedjax.sharding import make_mesh

    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    sharded = Encoder.from_pretrained(minilm_dir, mesh=mesh, rules="fsdp")
    plan = sharded.packing_plan(sharded.tokenizer.token_ids(sts_texts), 48, None)
    assert plan is not None  # auto packs on a mesh too
    assert sorted({len(rows) for rows in plan[1]}) == [6, 7]  # each batch takes 1-2 empty rows
    single = minilm_encoder.encode(sts_texts, pack=False)
    jitted, placed = sharded._jitted, []
    sharded._jitted = lambda params, batch: placed.append(batch) or jitted(params, batch)
    np.testing.assert_allclose(sharded.encode(sts_texts, batch_size=48), single, atol=2e-6)
    assert len(placed) == 5 and all(b["input_ids"].shape == (8, 64) for b in placed)
    for name in ("input_ids", "unpack_index", "pool_mask"):  # rows and texts split over the 8 devices
        assert placed[0][name].sharding.spec == P(("data", "fsdp")), name
