"""The ``triplets`` training source: the shared NLI triplets, third column the hard negative."""
import pytest

from embedjax.data import builders
from embedjax.data.pipeline import DatasetSpec, build_train_data, text_id
from embedjax.data.readers import DataFormatError, read_triplets
from embedjax.data.tokenization import Tokenizer


def test_nli_triplets_read_whole(data_dir):
    anchors, positives, negatives = read_triplets(data_dir / "nli" / "triplets.tsv")
    assert len(anchors) == len(positives) == len(negatives) == 14_865  # the data README's count
    assert anchors[0] == "Two women are embracing while holding to go packages."
    assert positives[0] == "Two woman are holding packages."
    assert negatives[0] == "The men are fighting outside a deli."


def test_malformed_triplet_files_name_file_and_line(tmp_path):
    bad = tmp_path / "t.tsv"
    bad.write_text("anchor\tpositive\tsource\na\tb\tc\n")
    with pytest.raises(DataFormatError, match=r"t.tsv:1: .*lacks column\(s\) \['hard_negative'\]"):
        read_triplets(bad)
    bad.write_text("positive\thard_negative\tanchor\nb\tc\ta\nb\t\ta\n")
    with pytest.raises(DataFormatError, match="t.tsv:3: empty hard_negative"):
        read_triplets(bad)
    bad.write_text("anchor\tpositive\thard_negative\na\tb\n")
    with pytest.raises(DataFormatError, match="t.tsv:2: 2 tab-separated fields, the header has 3"):
        read_triplets(bad)


def test_nli_batches_carry_the_contradiction_as_hard_negative_with_stable_ids(minilm_dir, tmp_path, data_dir):
    # A 64-row slice keeps the ArrayRecord build to a second; the full file builds the same way.
    lines = (data_dir / "nli" / "triplets.tsv").read_text(encoding="utf-8").splitlines()[:65]
    path = tmp_path / "nli" / "triplets.tsv"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    anchors, positives, negatives = read_triplets(path)
    tokenizer = Tokenizer.from_folder(minilm_dir, 64)
    data = build_train_data([DatasetSpec("triplets", str(path))], tokenizer, global_batch_size=8, seed=0,
                            num_steps=2, num_negatives=1, shuffle=False, cache_dir=str(tmp_path / "cache"))
    batch = next(data.iterator())
    assert batch["negatives"]["input_ids"].shape[:2] == (8, 1)

    def decode(tokens, *index):
        ids = tokens["input_ids"][index][tokens["attention_mask"][index].astype(bool)]
        return tokenizer.backend.decode(ids.tolist()).replace(" ", "")

    def key(text):  # MiniLM lower-cases; decoding re-joins word pieces
        return text.lower().replace(" ", "")[:60]

    triplets_of: dict = {}  # NLI premises repeat (13,514 distinct anchors in 14,865 rows)
    for triplet in zip(anchors, positives, negatives):
        triplets_of.setdefault(key(triplet[0]), []).append(triplet)
    for i in range(8):
        positive_text, negative_text = decode(batch["positive"], i), decode(batch["negatives"], i, 0)
        [(anchor, positive, negative)] = [t for t in triplets_of[decode(batch["query"], i)[:60]]
                                          if key(t[1]).startswith(positive_text[:50])
                                          and key(t[2]).startswith(negative_text[:50])]
        # ids are hashes of the texts: the same text gets the same id in every run and every process
        assert batch["query_id"][i] == text_id(builders._stable_id(anchor))
        assert batch["positive_id"][i] == text_id(builders._stable_id(positive))
        assert batch["negative_ids"][i, 0] == text_id(builders._stable_id(negative))
    with pytest.raises(ValueError, match="num_negatives=2"):
        next(build_train_data([DatasetSpec("triplets", str(path))], tokenizer, global_batch_size=8, seed=0,
                              num_steps=2, num_negatives=2, cache_dir=str(tmp_path / "cache")).iterator())
