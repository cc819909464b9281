"""grain input pipelines: prepared datasets -> tokenized, per-process global-batch slices.

The pipeline is a `grain.MapDataset` over *steps*: element ``t`` is the batch of
training step ``t`` (a `BatchPlan` decides which dataset and which examples), read
from the ArrayRecord sources, tokenized and cut down to this process's rows. Because
element ``t`` depends only on ``(seed, t)``, the iterator state saved in a
checkpoint (grain's ``get_state()``: the next step) makes a resumed run see exactly
the batches an uninterrupted run would have seen, and 1 process or N processes
see the same global batch.

Every process tokenizes the whole global batch (cheap next to the model) so that
the padded length bucket — the array shape — is the same in all processes, then
keeps rows ``[p * B / P, (p + 1) * B / P)``, which is the slice that
`jax.make_array_from_process_local_data` expects for a batch sharded over devices
ordered by process.

Batch layouts (numpy, leading dimension = this process's rows ``b``):

- ``"sts"``: ``{"a": tokens, "b": tokens, "score": float32 [b]}`` (both sides padded to one length)
- retrieval (``"beir"``, ``"jsonl"``, ``"triplets"``): ``{"query": tokens, "positive": tokens,
  "query_id": int32 [b], "positive_id": int32 [b]}`` plus, with ``num_negatives=k > 0``,
  ``"negatives": tokens [b, k, L]`` and ``"negative_ids": int32 [b, k]``

where ``tokens`` is ``{"input_ids", "attention_mask", "token_type_ids"}`` int32 [b, L].

With packing (``pack``, `embedjax.data.packing`) every column is a packed token batch instead: the
retrieval columns each pack their texts (negatives flattened to b * k texts, pair-major), and an
``"sts"`` batch is ``{"texts": packed (a_0, b_0, a_1, b_1, ...), "score": float32 [b]}``, both sides
in one batch as they go through one forward pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import grain
import numpy as np

from embedjax.data import builders, packing
from embedjax.data.mixing import BatchPlan
from embedjax.data.samplers import EpochBatches
from embedjax.data.tokenization import bucket_length


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One training source: ``kind`` in {"sts", "beir", "jsonl", "triplets"}, a path, a mixing weight, and for
    ``beir`` the qrels ``split`` (`embedjax.data.splits.parse_train_sources` resolves it from the config)."""

    kind: str
    path: str
    weight: float = 1.0
    split: str = "test"
    min_relevance: int = 1


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Packing settings: rows of ``row_length`` tokens (a batch whose longest text is longer gets
    rows of that text's length bucket), texts split into ``shards`` groups (the data-parallel devices)."""

    row_length: int
    shards: int = 1

    def __post_init__(self):
        if self.row_length < 2 or self.shards < 1:
            raise ValueError(f"packing needs row_length >= 2 and shards >= 1, got {self.row_length} and {self.shards}")


def text_id(value: str) -> int:
    """A stable non-negative int32 for a document/query id (for false-negative masks)."""
    return int(hashlib.sha1(value.encode("utf-8")).hexdigest()[:8], 16) & 0x7FFFFFFF


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_keys(record: dict, kind: str) -> frozenset:
    """The texts of one example (what the no-duplicates sampler keeps apart)."""
    if kind == builders.STS_KIND:
        return frozenset((_decode(record["sentence1"]), _decode(record["sentence2"])))
    return frozenset(
        [_decode(record["query"]), _decode(record["positive"])] + [_decode(n) for n in record["negatives"]]
    )


class BatchLoader:
    """Step plan element ``(dataset, indices)`` -> this process's tokenized rows of that global batch."""

    def __init__(self, sources, kind: str, tokenizer, *, num_negatives: int, process_index: int,
                 process_count: int, pad_to_max_length: bool = False, framing=None, prompts=None,
                 pool_masks: bool = False, pack: PackSpec | None = None):
        if pack is not None and (framing is not None or pad_to_max_length):
            raise ValueError("data.pack packs texts into rows of their own lengths; it does not combine with "
                             "data.pad_to_max_length or a multi-vector head's framing: turn one of them off")
        if pack is not None and pack.shards % process_count:
            raise ValueError(f"{pack.shards} packing shards (data-parallel devices) do not split evenly over "
                             f"{process_count} processes")
        self.pack = pack
        self.sources = sources
        # A late-interaction framing (`embedjax.data.late_interaction`): queries and documents get
        # their markers, query expansion and skiplist, and every column a pool_mask of scored tokens.
        self.framing = framing
        # (query prompt, document prompt) per source, None = no prompt; STS pairs take the query prompt.
        self.prompts = list(prompts) if prompts is not None else [(None, None)] * len(sources)
        # True: every column carries a pool_mask leaving its prompt out of pooling (include_prompt=False),
        # present on every step so the batch structure (and the compiled step) never changes.
        self.pool_masks = pool_masks
        # None: pad each column to its length bucket; max_length: one shape for every step (one compile).
        self.pad_length = tokenizer.max_length if pad_to_max_length else None
        self.kind = kind
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.process_index = process_index
        self.process_count = process_count

    def _rows(self, global_rows: int) -> slice:
        local = global_rows // self.process_count
        return slice(self.process_index * local, (self.process_index + 1) * local)

    def _pad(self, ids, prompt: str | None, length: int | None = None) -> dict:
        padded = self.tokenizer.pad(ids, length=length or self.pad_length)
        if self.pool_masks:
            skip = self.tokenizer.pool_skip(prompt) if prompt else 0
            mask = padded["attention_mask"]
            padded["pool_mask"] = mask * (np.cumsum(mask, axis=1) > skip)
        return padded

    def _packed(self, ids, prompt: str | None) -> dict:
        """This process's shards of the packed batch of ``ids`` (all the global batch's texts)."""
        row_length = max(self.pack.row_length, bucket_length(max(map(len, ids)), self.tokenizer.buckets))
        skip = self.tokenizer.pool_skip(prompt) if (self.pool_masks and prompt) else 0
        packed = packing.pack(ids, row_length=row_length, pad_id=self.tokenizer.pad_id, shards=self.pack.shards,
                              token_type_ids=self.tokenizer.token_type_ids, pool_skip=skip)
        count = self.pack.shards // self.process_count
        return packing.shard_slice(packed, self.pack.shards, self.process_index * count, count)

    def _tokens(self, texts: Sequence[str], rows: slice, side: str = "document", prompt: str | None = None) -> dict:
        if self.pack is not None:
            return self._packed(self.tokenizer.token_ids(texts, prompt=prompt), prompt)
        if self.framing is None:
            padded = self._pad(self.tokenizer.token_ids(texts, prompt=prompt), prompt)
        else:
            from embedjax.data import late_interaction

            if prompt:
                raise ValueError("instruction prompts (data.query_instruction / document_instruction) and a "
                                 "multi-vector head's framing cannot be combined; leave the instructions empty")
            ids = late_interaction.framed_ids(self.tokenizer, texts, side, self.framing)
            length = self.framing.document_length if (self.pad_length and side == "document") else None
            padded = late_interaction.frame(self.tokenizer, ids, side, self.framing, length=length)
        return {name: array[rows] for name, array in padded.items()}

    def __call__(self, planned: tuple[int, np.ndarray]) -> dict:
        dataset, indices = planned
        source = self.sources[dataset]
        query_prompt, document_prompt = self.prompts[dataset]
        records = [source[int(i)] for i in indices]
        rows = self._rows(len(records))
        if self.kind == builders.STS_KIND:
            # Both sides share one padded length, so the step can embed them as one [2b, L] batch
            # and the number of compiled shapes stays the number of buckets.
            ids_a = self.tokenizer.token_ids([_decode(r["sentence1"]) for r in records], prompt=query_prompt)
            ids_b = self.tokenizer.token_ids([_decode(r["sentence2"]) for r in records], prompt=query_prompt)
            score = np.asarray([r["score"] for r in records], dtype=np.float32)[rows]
            if self.pack is not None:
                pairs = [text for pair in zip(ids_a, ids_b) for text in pair]
                return {"texts": self._packed(pairs, query_prompt), "score": score}
            length = self.pad_length or bucket_length(max(map(len, ids_a + ids_b)), self.tokenizer.buckets)
            return {
                "a": {k: v[rows] for k, v in self._pad(ids_a, query_prompt, length).items()},
                "b": {k: v[rows] for k, v in self._pad(ids_b, query_prompt, length).items()},
                "score": score,
            }
        batch = {
            "query": self._tokens([_decode(r["query"]) for r in records], rows, side="query", prompt=query_prompt),
            "positive": self._tokens([_decode(r["positive"]) for r in records], rows, prompt=document_prompt),
            "query_id": np.asarray([text_id(_decode(r["query_id"])) for r in records], np.int32)[rows],
            "positive_id": np.asarray([text_id(_decode(r["positive_id"])) for r in records], np.int32)[rows],
        }
        k = self.num_negatives
        if k:
            negatives, negative_ids = [], []
            for r in records:
                if len(r["negatives"]) < k:
                    raise ValueError(
                        f"an example of query {_decode(r['query_id'])!r} has {len(r['negatives'])} hard negatives "
                        f"but the config asks for num_negatives={k}: mine more negatives or lower num_negatives"
                    )
                negatives += [_decode(n) for n in r["negatives"][:k]]
                negative_ids += [text_id(_decode(n)) for n in r["negative_ids"][:k]]
            flat = self._tokens(negatives, slice(None), prompt=document_prompt)
            batch["negatives"] = flat if self.pack is not None else {
                name: array.reshape(len(records), k, -1)[rows] for name, array in flat.items()
            }
            batch["negative_ids"] = np.asarray(negative_ids, np.int32).reshape(len(records), k)[rows]
        return batch


@dataclasses.dataclass
class TrainData:
    """A checkpointable iterator of per-process batches plus what the loop needs to know."""

    dataset: grain.MapDataset
    kind: str
    num_steps: int
    global_batch_size: int
    local_batch_size: int
    dataset_sizes: tuple[int, ...]
    steps_per_epoch: int
    plan: BatchPlan | None = None  # step -> (dataset, example indices): what each step reads
    sources: tuple = ()  # the ArrayRecord readers the plan indexes

    def iterator(self, start_state: dict | None = None, *, prefetch: int = 4):
        """A grain iterator; ``start_state`` is a ``get_state()`` dict saved with a checkpoint."""
        it = iter(self.dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
        if start_state is not None:
            it.set_state(start_state)
        return it


def _dataset_kind(specs: Sequence[DatasetSpec]) -> str:
    kinds = {builders.STS_KIND if s.kind == builders.STS_KIND else "retrieval" for s in specs}
    if len(kinds) != 1:
        raise ValueError(
            f"datasets {[s.path for s in specs]} mix graded pairs (sts) with retrieval pairs; one run trains "
            "one loss, so mix datasets of one kind only"
        )
    return builders.STS_KIND if kinds == {builders.STS_KIND} else "retrieval"


def build_train_data(
    specs: Sequence[DatasetSpec],
    tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    num_steps: int = 0,
    num_epochs: int = 0,
    shuffle: bool = True,
    no_duplicates: bool = False,
    num_negatives: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    cache_dir: str | None = None,
    download: bool = False,
    max_examples: int = 0,
    pad_to_max_length: bool = False,
    framing=None,
    prompts=None,
    pool_masks: bool = False,
    pack: PackSpec | None = None,
) -> TrainData:
    """Prepare every source (ArrayRecord via TFDS) and return the step-indexed pipeline.

    Exactly one of ``num_steps`` and ``num_epochs`` is positive; epochs need a single
    dataset (a mixture has no common epoch). ``max_examples > 0`` keeps the first that
    many stored examples of each source (a fixed pseudo-random slice: TFDS stores
    records in hashed-key order). ``pad_to_max_length`` pads every batch to the
    tokenizer's max length instead of its length bucket (one compiled step shape).
    ``framing`` (a multi-vector head's `LateInteractionFraming`) frames queries and documents
    for late interaction.
    ``prompts``: ``(query prompt, document prompt)`` per source (`embedjax.data.instructions`);
    ``pool_masks``: give every column a ``pool_mask`` that leaves the prompt out of pooling.
    ``pack``: pack each column's texts into rows (`PackSpec`, `embedjax.data.packing`).
    """
    if not specs:
        raise ValueError("no training datasets given: set config.data.train to at least one source")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} processes; "
            "pick a multiple of the process count"
        )
    if (num_steps > 0) == (num_epochs > 0):
        raise ValueError(f"set exactly one of num_steps ({num_steps}) and num_epochs ({num_epochs}) to a positive value")
    if num_epochs and len(specs) > 1:
        raise ValueError("a mixture of datasets has no common epoch: give num_steps instead of num_epochs")
    if num_negatives < 0:
        raise ValueError(f"num_negatives={num_negatives} must be >= 0")
    kind = _dataset_kind(specs)
    if kind == builders.STS_KIND and num_negatives:
        raise ValueError("num_negatives applies to retrieval datasets, not graded STS pairs; set it to 0")
    sources, epoch_batches = [], []
    for i, spec in enumerate(specs):
        builder = builders.prepare(
            spec.kind, spec.path, cache_dir=cache_dir, split=spec.split, min_relevance=spec.min_relevance,
            download=download,
        )
        source = builders.data_source(builder)
        size = min(len(source), max_examples) if max_examples > 0 else len(source)
        keys = [example_keys(source[j], kind) for j in range(size)] if no_duplicates else None
        sources.append(source)
        # Each dataset shuffles with its own stream so that adding a dataset leaves the others' order alone.
        epoch_batches.append(EpochBatches(size, global_batch_size, seed + 1000 * i, shuffle=shuffle, keys=keys))
    steps_per_epoch = len(epoch_batches[0].batches(0))
    if num_epochs:
        num_steps = epoch_batches[0].steps_in_epochs(num_epochs)
    plan = BatchPlan(epoch_batches, [s.weight for s in specs], num_steps, seed)
    loader = BatchLoader(
        sources, kind, tokenizer, num_negatives=num_negatives, process_index=process_index,
        process_count=process_count, pad_to_max_length=pad_to_max_length, framing=framing, prompts=prompts,
        pool_masks=pool_masks, pack=pack,
    )
    dataset = grain.MapDataset.source(plan).map(loader)
    return TrainData(
        dataset=dataset,
        kind=kind,
        num_steps=num_steps,
        global_batch_size=global_batch_size,
        local_batch_size=global_batch_size // process_count,
        dataset_sizes=tuple(b.num_examples for b in epoch_batches),
        steps_per_epoch=steps_per_epoch,
        plan=plan,
        sources=tuple(sources),
    )
