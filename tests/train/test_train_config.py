"""Config loading: schema validation, overrides, the CLI argument split, bad-input errors."""
import argparse

import pytest

from embedjax.train import cli
from embedjax.train.config import apply_overrides, default_config, load_config_file, validate
from train_runs import TINY, tiny_config


def test_overrides_are_typed_and_applied():
    cfg = apply_overrides(default_config(), ["train.batch_size=32", "optim.learning_rate=1e-4",
                                             "train.matryoshka_dims=(64, 128)", "data.no_duplicates=true",
                                             "data.train=beir:scifact:train"])
    assert cfg.train.batch_size == 32 and cfg.optim.learning_rate == 1e-4
    assert tuple(cfg.train.matryoshka_dims) == (64, 128) and cfg.data.no_duplicates is True
    assert cfg.data.train == "beir:scifact:train"


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.batchsize'.*did you mean 'train.batch_size'"):
        apply_overrides(default_config(), ["train.batchsize=8"])
    with pytest.raises(ValueError, match=r"'data.beir_split' in .* was removed: .*data.train='beir:scifact:train'"):
        apply_overrides(default_config(), ["data.beir_split=train"])
    bad = tmp_path / "typo.py"
    bad.write_text(
        "from embedjax.train.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.optim.lerning_rate = 1e-3\n"
        "    return c\n"
    )
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lerning_rate' in .*typo.py"):
        load_config_file(str(bad))


def test_wrong_types_and_malformed_values_are_errors():
    with pytest.raises(ValueError, match="train.batch_size"):
        apply_overrides(default_config(), ["train.batch_size=sixteen"])
    import ml_collections

    with pytest.raises(TypeError, match="train.batch_size"):
        validate(ml_collections.ConfigDict({"train": {"batch_size": "16"}}))


def test_cli_arguments_split_into_overrides():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = cli.parse_args(parser, ["--config", TINY, "--workdir", "/tmp/w", "--config.train.num_steps=3",
                                   "--config.seed", "4"])
    assert args.config == TINY and cli.split_overrides(args.overrides) == ["train.num_steps=3", "seed=4"]
    with pytest.raises(ValueError, match="--config.KEY=VALUE"):
        cli.split_overrides(["--cfg.x=1"])


def test_launcher_environment_fills_the_distributed_block():
    cfg = tiny_config()
    env = {"EMBEDJAX_COORDINATOR": "127.0.0.1:1234", "EMBEDJAX_NUM_PROCESSES": "2", "EMBEDJAX_PROCESS_ID": "1"}
    assert sorted(cli.distributed_from_environment(cfg, env)) == [
        "distributed.coordinator=127.0.0.1:1234", "distributed.num_processes=2", "distributed.process_id=1"]
    assert cli.distributed_from_environment(cfg, {}) == []


def test_refused_runs_leave_no_workdir(tmp_path, tfds_cache):
    from embedjax.train.loop import train

    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        train(tiny_config("train.batch_size=12", f"data.cache_dir={tfds_cache}"), workdir)
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_config("data.train=beir:/no/such/folder", f"data.cache_dir={tfds_cache}"), workdir)
    malformed = tmp_path / "broken_beir"
    malformed.mkdir()
    (malformed / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    with pytest.raises(ValueError, match="has no qrels/<split>.tsv nor qrels.jsonl"):
        train(tiny_config(f"data.train=beir:{malformed}", f"data.cache_dir={tfds_cache}"), workdir)
    (malformed / "qrels").mkdir()
    (malformed / "qrels" / "train.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(ValueError, match="queries.jsonl"):
        train(tiny_config(f"data.train=beir:{malformed}", f"data.cache_dir={tfds_cache}"), workdir)
    with pytest.raises(ValueError, match=r"train.ring=True supports train.loss in \('infonce', 'siglip'\) only"):
        train(tiny_config("train.loss=cosent", f"data.cache_dir={tfds_cache}"), workdir)
    with pytest.raises(ValueError, match="train.dropout_rng='philox' is not a PRNG implementation"):
        train(tiny_config("train.dropout_rng=philox", f"data.cache_dir={tfds_cache}"), workdir)
    assert not workdir.exists()
