"""Training on packed batches (``data.pack``, issue 17) follows the padded run's losses step for step.

Packing changes no embedding (tests/models/test_packed_models.py), so with dropout off the losses
of a packed run equal the padded run's up to float32 reduction order: the tiny retrieval config
(ring InfoNCE over 8 devices, Matryoshka) against the 1-device padded reference, and a tiny CoSENT
run on STS-B pairs (both sides in one packed column) and an InfoNCE run with one hard negative per
NLI triplet (120 real triplets as a jsonl source), each against its padded twin. Held to 1e-5 over
the first steps (as the sharded-equality tests): a text that read its row-mates, or texts paired
with the wrong partners (splitting the interleaved column in halves), moves the loss by > 1e-1.
"""
import json
import types

import numpy as np
import pytest

from train_runs import read_losses, tiny_config

STEPS = 6
TOLERANCE = 1e-5
PACKED = ("data.pack=True", "data.pad_to_max_length=False", "data.pack_length=24")


def _losses(workdir):
    losses = read_losses(workdir)
    return np.array([losses[s][-1] for s in sorted(losses)])


def test_packed_ring_infonce_on_eight_devices_matches_the_padded_run(tmp_path, reference_run, tfds_cache):
    from embedjax.train.loop import train

    _, _, ref = reference_run  # 40 steps, padded to max_length, 1 device
    summary = train(tiny_config("train.num_steps=40", f"train.stop_after={STEPS}", f"data.cache_dir={tfds_cache}",
                                *PACKED), tmp_path, log=lambda m: None)
    assert summary["devices"] == 8
    want = np.array([ref[s][-1] for s in range(1, STEPS + 1)])
    np.testing.assert_allclose(_losses(tmp_path), want, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def nli_jsonl(tmp_path_factory, data_dir):
    """The first 120 NLI triplets as a jsonl source: the contradiction is each pair's hard negative."""
    lines = (data_dir / "nli" / "triplets.tsv").read_text(encoding="utf-8").splitlines()[1:121]
    path = tmp_path_factory.mktemp("nli") / "nli-120.jsonl"
    rows = [dict(zip(("query", "positive", "negative"), line.split("\t")[:3])) for line in lines]
    path.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"],
                                        "negatives": [r["negative"]]}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("recipe", ["cosent-sts", "infonce-hard-negatives"])
def test_packed_runs_match_their_padded_twins(tmp_path, tfds_cache, nli_jsonl, recipe):
    from embedjax.train.loop import train

    options = {
        "cosent-sts": ("data.train=sts:stsb/sts-train.csv", "train.loss=cosent", "train.ring=False",
                       "train.bidirectional=False", "train.matryoshka_dims=()"),
        # One hard negative per pair: the negatives are a packed column of their own.
        "infonce-hard-negatives": (f"data.train=jsonl:{nli_jsonl}", "data.num_negatives=1", "train.ring=False"),
    }[recipe]
    common = (*options, f"train.num_steps={STEPS}", f"data.cache_dir={tfds_cache}", "mesh.num_devices=2")
    # The twin pads to max_length: one compiled shape instead of a length bucket per step (~40 s less).
    train(tiny_config(*common, "data.pad_to_max_length=True"), tmp_path / "padded", log=lambda m: None)
    train(tiny_config(*common, *PACKED), tmp_path / "packed", log=lambda m: None)
    padded, packed = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    assert len(packed) == STEPS
    np.testing.assert_allclose(packed, padded, rtol=0, atol=TOLERANCE)


def test_packing_refuses_what_it_cannot_run():
    from embedjax.train.loop import check_packing

    bert = types.SimpleNamespace(name="bert", packs_sequences=True)
    with pytest.raises(ValueError, match="'clip' family does not read packed batches"):
        check_packing(tiny_config("data.pack=True"), types.SimpleNamespace(name="clip", packs_sequences=False))
    with pytest.raises(ValueError, match="GradCache"):
        check_packing(tiny_config("data.pack=True", "train.gradcache_sub_batch=4"), bert)
    with pytest.raises(ValueError, match="MNTP"):
        check_packing(tiny_config("data.pack=True", "train.objective=mntp"), bert)
    check_packing(tiny_config("data.pack=True"), bert)  # the tiny config itself packs
