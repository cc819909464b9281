"""Run ``mteb`` (2.x) tasks on embedjax encoders.

``MTEBEncoder`` wraps an ``embedjax.Encoder`` (or loads one from a folder or the alias
``all-MiniLM-L6-v2``) behind mteb's encoder protocol: ``encode(DataLoader, *, task_metadata,
hf_split, hf_subset, prompt_type, **encode_kwargs) -> float32 [N, D]`` plus ``similarity``,
``similarity_pairwise`` and ``mteb_model_meta``. ``retrieval_task`` and ``sts_task`` turn local
data (as ``ej.data.read_beir`` / ``ej.data.read_sts`` return it) into mteb tasks, so mteb's own
evaluators run offline, with no hub access.

Usage (``pip install mteb``; the module is imported only when used, ``import embedjax`` never
imports mteb)::

    import mteb
    import embedjax as ej
    from embedjax.integrations.mteb import MTEBEncoder, retrieval_task, sts_task

    model = MTEBEncoder("all-MiniLM-L6-v2")            # a folder, the alias, or an ej.Encoder
    corpus, queries, qrels = ej.data.read_beir("data/msmarco")
    task = retrieval_task(corpus, queries, qrels, name="MSMARCOSubset")
    result = mteb.evaluate(model, task, encode_kwargs={"batch_size": 64}, cache=None)
    result.task_results[0].get_score()                # main score (nDCG@10) on a 0-1 scale

    # hub tasks work the same way where the hub (or a local HF datasets cache) is reachable:
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

Prompts: ``MTEBEncoder(enc, query_prompt="query: ", document_prompt="passage: ")`` prefixes queries
and documents of retrieval tasks; ``prompts={...}`` adds keys resolved like sentence-transformers'
model prompts, first match wins: ``"<task name>-<query|document>"``, ``"<task name>"``,
``"<task type>-<query|document>"``, ``"<task type>"``, ``"query"`` / ``"document"``. Symmetric tasks
(STS) encode with no prompt type, so only task-name and task-type keys reach them.

Caching: ``mteb.evaluate`` caches results under ``~/.cache/mteb`` by model name, model revision and
task name, and returns a cached result without re-running. The default revision here is a fingerprint
of the weights and encoding settings (a fine-tuned encoder never reads its base model's results), and
the default task names carry a hash of the data; pass ``cache=None`` to skip the cache altogether.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

try:
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
except ImportError as err:  # pragma: no cover - exercised by a test that hides mteb
    raise ImportError(
        "embedjax.integrations.mteb needs the mteb package (2.x): run `pip install mteb` "
        f"(or `pip install -e .[dev]`); the import failed with: {err}"
    ) from err

from embedjax.encoder import Encoder
from embedjax.eval.embedding_cache import hash_params

__all__ = ["MTEBEncoder", "dataloader_texts", "model_meta", "resolve_prompt", "retrieval_task", "sts_task",
           "weights_fingerprint"]

_SIMILARITIES = ("cosine", "dot")


def resolve_prompt(prompts: Mapping[str, str] | None, task_name: str, task_type: str,
                   prompt_type: str | None) -> str | None:
    """The prompt for one encode call, or None.

    Keys are tried most specific first, as sentence-transformers' model prompts are:
    ``"<task>-<prompt_type>"``, ``"<task>"``, ``"<type>-<prompt_type>"``, ``"<type>"``, ``"<prompt_type>"``.
    """
    if not prompts:
        return None
    if prompt_type is None:
        keys = [task_name, task_type]
    else:
        keys = [f"{task_name}-{prompt_type}", task_name, f"{task_type}-{prompt_type}", task_type, prompt_type]
    return next((prompts[k] for k in keys if k in prompts), None)


def _merge_prompts(prompts: Mapping[str, str] | None, query_prompt: str | None,
                   document_prompt: str | None) -> dict[str, str]:
    merged = dict(prompts or {})
    for key, value in (("query", query_prompt), ("document", document_prompt)):
        if value is not None:
            if key in merged and merged[key] != value:
                raise ValueError(f"prompts[{key!r}]={merged[key]!r} conflicts with {key}_prompt={value!r}: "
                                 "give one of them")
            merged[key] = value
    for key, value in merged.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"prompts must map str to str, got {key!r}: {value!r}")
        if key == "passage" or key.endswith("-passage"):
            # mteb 2.x calls the document side "document"; a "passage" key would never match
            raise ValueError(f"prompt key {key!r}: mteb names the document side 'document', use "
                             f"{key[: -len('passage')]}document")
    return merged


def _as_encoder(model, encoder_kwargs: Mapping[str, Any]) -> tuple[Encoder, str | None]:
    """``(encoder, spec)``: spec is the folder/alias it was loaded from here, None for a given Encoder."""
    if isinstance(model, Encoder):
        if encoder_kwargs:
            raise TypeError(f"{sorted(encoder_kwargs)} are options of Encoder.from_pretrained; pass them when "
                            "building the Encoder, or pass a folder/alias to MTEBEncoder instead")
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return Encoder.from_pretrained(model, **encoder_kwargs), os.fspath(model)
    raise TypeError(f"model must be an embedjax Encoder, a model folder or 'all-MiniLM-L6-v2', "
                    f"got {type(model).__name__}")


def _encoding_settings(encoder: Encoder, prompts: Mapping[str, str], similarity: str) -> dict:
    """Everything besides the weights that changes what the model returns."""
    return {"pooling": encoder.pooling, "normalize": encoder.normalize, "max_length": encoder.max_length,
            "layers": encoder.layers,
            "dtype": str(getattr(encoder.model, "dtype", None)), "prompts": dict(sorted(prompts.items())),
            "similarity": similarity}


def weights_fingerprint(encoder: Encoder, settings: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over every parameter (path, dtype, shape, bytes) and ``settings``."""
    digest = hashlib.sha256()
    hash_params(digest, encoder.params)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def _default_name(encoder: Encoder, spec: str | None) -> str:
    source = spec or encoder.source
    return f"embedjax/{pathlib.Path(source).name}" if source else "embedjax/encoder"


def model_meta(encoder: Encoder, *, name: str, revision: str, prompts: Mapping[str, str], similarity: str,
               loader_kwargs: Mapping[str, Any] | None = None) -> ModelMeta:
    """mteb's ``ModelMeta`` for an embedjax encoder.

    ``loader_kwargs`` (with ``model`` = the folder or alias) makes ``meta.load_model()`` rebuild the
    encoder; without it the meta has no loader (an in-memory encoder cannot be reloaded by name).
    """
    leaves = jax.tree_util.tree_leaves(encoder.params)
    return ModelMeta(
        loader=_load_from_meta if loader_kwargs else None,
        loader_kwargs=dict(loader_kwargs or {}),
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=int(sum(np.size(x) for x in leaves)),
        memory_usage_mb=round(sum(x.nbytes for x in leaves) / 2**20, 1),
        max_tokens=encoder.max_length,
        embed_dim=encoder.dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["JAX"],
        similarity_fn_name=similarity,
        use_instructions=bool(prompts),
        training_datasets=None,
        modalities=["text"],
    )


class MTEBEncoder(AbsEncoder):
    """An embedjax encoder behind mteb's ``EncoderProtocol``.

    Args:
        model: an ``embedjax.Encoder``, a model folder, or ``"all-MiniLM-L6-v2"``.
        revision: the revision mteb records and caches results under; default: a fingerprint of the
            weights and the settings below (see ``weights_fingerprint``).
        device: not supported (JAX places the model; choose the platform with ``JAX_PLATFORMS``).
        name: the model name mteb reports, ``"organization/model"``; default ``"embedjax/<folder name>"``.
        query_prompt / document_prompt: prefixes for retrieval queries / documents.
        prompts: further prompt keys (task names, task types), see the module docstring.
        similarity: ``"cosine"`` or ``"dot"``, the score mteb ranks and correlates with.
        **encoder_kwargs: ``Encoder.from_pretrained`` options (pooling, normalize, max_length, dtype,
            layers) when ``model`` is a folder or alias.
    """

    def __init__(self, model, revision: str | None = None, *, device: str | None = None, name: str | None = None,
                 query_prompt: str | None = None, document_prompt: str | None = None,
                 prompts: Mapping[str, str] | None = None, similarity: str = "cosine", **encoder_kwargs):
        if device is not None:
            raise ValueError(f"device={device!r}: embedjax places the model with JAX; select the platform with "
                             "the JAX_PLATFORMS environment variable instead")
        if similarity not in _SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; use one of {_SIMILARITIES}")
        encoder, spec = _as_encoder(model, encoder_kwargs)
        self.model = encoder
        self.model_prompts = _merge_prompts(prompts, query_prompt, document_prompt)
        settings = _encoding_settings(encoder, self.model_prompts, similarity)
        loader_kwargs = None
        if spec is not None:
            loader_kwargs = {"model": spec, "prompts": self.model_prompts, "similarity": similarity,
                             **encoder_kwargs}
        self.mteb_model_meta = model_meta(
            encoder, name=name or _default_name(encoder, spec),
            revision=revision or weights_fingerprint(encoder, settings),
            prompts=self.model_prompts, similarity=similarity, loader_kwargs=loader_kwargs)

    @property
    def encoder(self) -> Encoder:
        return self.model

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs) -> np.ndarray:
        """Embed every text of mteb's DataLoader -> float32 [N, D], rows in loader order.

        Honoured ``encode_kwargs``: ``batch_size`` (default 32, mteb's), ``show_progress_bar``;
        ``precision`` must be absent or ``"float32"`` (embedjax returns float32 embeddings).
        """
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            raise ValueError(f"encode_kwargs precision={precision!r}: MTEBEncoder returns float32 embeddings; "
                             "drop `precision` (compress with embedjax.quant and evaluate with ej.eval instead)")
        texts = dataloader_texts(inputs)
        prompt = resolve_prompt(self.model_prompts, task_metadata.name, task_metadata.type,
                                None if prompt_type is None else str(getattr(prompt_type, "value", prompt_type)))
        emb_nd = self.model.encode(texts, batch_size=int(kwargs.get("batch_size", 32)), prompt=prompt,
                                   show_progress=bool(kwargs.get("show_progress_bar", False)))
        return np.asarray(emb_nd, dtype=np.float32)

    def __repr__(self) -> str:
        meta = self.mteb_model_meta
        return f"MTEBEncoder(name={meta.name!r}, revision={meta.revision!r}, encoder={self.model!r})"


def _load_from_meta(model_name: str, revision: str | None = None, *, model, **kwargs) -> MTEBEncoder:
    """``ModelMeta.loader``: mteb calls it with the meta's name, revision and loader kwargs."""
    return MTEBEncoder(model, revision, name=model_name, **kwargs)


def dataloader_texts(inputs) -> list[str]:
    """All texts of an mteb DataLoader (batches of ``{"text": [str, ...], ...}``), in order."""
    texts: list[str] = []
    for batch in inputs:
        if "text" not in batch:
            raise ValueError(f"MTEBEncoder encodes text, but the mteb batch holds {sorted(batch)}: "
                             "run text tasks only")
        texts.extend(batch["text"])
    return texts


# ----------------------------------------------------------------------------------------------
# Tasks from local data


def _data_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=float).encode()).hexdigest()[:10]


def _metadata(name: str, task_type: str, main_score: str, description: str, revision: str,
              language: str) -> TaskMetadata:
    return TaskMetadata(name=name, description=description, type=task_type, category="t2t",
                        dataset={"path": f"local/{name}", "revision": revision}, eval_splits=["test"],
                        eval_langs=[language], main_score=main_score, modalities=["text"])


class _LocalRetrieval(AbsTaskRetrieval):
    """A retrieval task whose ``load_data`` builds mteb's split from in-memory dicts."""

    def __init__(self, corpus, queries, qrels, **kwargs):
        self._local = (corpus, queries, qrels)
        super().__init__(**kwargs)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        corpus, queries, qrels = self._local
        docs = {"id": [], "title": [], "text": []}
        for doc_id, doc in corpus.items():
            docs["id"].append(doc_id)
            docs["title"].append("" if isinstance(doc, str) else (doc.get("title") or ""))
            docs["text"].append(doc if isinstance(doc, str) else doc["text"])
        split = {"corpus": Dataset.from_dict(docs),
                 "queries": Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
                 "relevant_docs": {q: dict(d) for q, d in qrels.items()},
                 "top_ranked": None}
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class _LocalSTS(AbsTaskSTS):
    """An STS task whose ``load_data`` builds the test split from in-memory lists."""

    def __init__(self, sentences1, sentences2, scores, **kwargs):
        self._local = {"sentence1": list(sentences1), "sentence2": list(sentences2),
                       "score": [float(s) for s in scores]}
        super().__init__(**kwargs)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {"test": Dataset.from_dict(self._local)}}
        self.data_loaded = True


def retrieval_task(corpus: Mapping[str, Mapping[str, str] | str], queries: Mapping[str, str],
                   qrels: Mapping[str, Mapping[str, int]], *, name: str | None = None,
                   k_values: Sequence[int] = (1, 3, 5, 10, 20, 100, 1000), main_score: str = "ndcg_at_10",
                   language: str = "eng-Latn", description: str = "Local retrieval data.") -> AbsTaskRetrieval:
    """An mteb retrieval task (one ``test`` split) over in-memory BEIR data.

    Args:
        corpus: ``{doc_id: {"title", "text"}}`` or ``{doc_id: text}`` (what ``ej.data.read_beir`` returns);
            mteb embeds ``title + " " + text``, as ``ej.eval.document_text`` does.
        queries: ``{query_id: text}``; queries without judgements are dropped by mteb.
        qrels: ``{query_id: {doc_id: grade}}``.
        name: the task name in mteb's results; default ``"LocalRetrieval-<data hash>"``.

    Returns:
        An ``AbsTaskRetrieval`` instance to pass to ``mteb.evaluate``.
    """
    if not corpus or not queries:
        raise ValueError(f"retrieval_task needs documents and queries, got {len(corpus)} and {len(queries)}")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise ValueError(f"qrels judge {len(missing)} query ids absent from `queries` (e.g. {missing[:3]})")
    for doc_id, doc in corpus.items():
        if not isinstance(doc, str) and not isinstance(doc.get("text"), str):
            raise ValueError(f"corpus[{doc_id!r}] has no 'text' string: give {{'title', 'text'}} dicts or strings")
    digest = _data_hash(corpus, queries, qrels)
    name = name or f"LocalRetrieval-{digest}"
    meta = _metadata(name, "Retrieval", main_score, description, digest, language)
    cls = type("LocalRetrievalTask", (_LocalRetrieval,), {"metadata": meta, "k_values": tuple(k_values)})
    return cls(corpus, queries, qrels)


def sts_task(sentences1: Sequence[str], sentences2: Sequence[str], scores, *, name: str | None = None,
             min_score: float = 0.0, max_score: float = 5.0, main_score: str = "cosine_spearman",
             language: str = "eng-Latn", description: str = "Local STS pairs.") -> AbsTaskSTS:
    """An mteb STS task (one ``test`` split) over sentence pairs with gold scores in [min_score, max_score].

    ``ej.data.read_sts(path)`` returns the three arguments; the default name is ``"LocalSTS-<data hash>"``.
    """
    gold = np.asarray(scores, dtype=np.float64)
    if not len(sentences1) == len(sentences2) == len(gold):
        raise ValueError(f"sentences1, sentences2 and scores have {len(sentences1)}, {len(sentences2)} and "
                         f"{len(gold)} items; they must be pairs")
    if len(gold) < 2:
        raise ValueError("an STS task needs at least 2 pairs to correlate")
    if gold.min() < min_score or gold.max() > max_score:
        raise ValueError(f"scores span [{gold.min()}, {gold.max()}], outside [min_score={min_score}, "
                         f"max_score={max_score}]")
    digest = _data_hash(list(sentences1), list(sentences2), gold.tolist())
    name = name or f"LocalSTS-{digest}"
    meta = _metadata(name, "STS", main_score, description, digest, language)
    cls = type("LocalSTSTask", (_LocalSTS,), {"metadata": meta, "min_score": min_score, "max_score": max_score})
    return cls(sentences1, sentences2, gold)
