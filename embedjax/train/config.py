"""The training config schema, config-file loading and ``--config.key=value`` overrides.

Every experiment file in ``configs/`` starts from `default_config()` and changes
values; the trainer reads every key of the schema. A key outside the schema (a typo
in a file or on the command line) is an error that names the key and the closest
real one, never a silent no-op.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from typing import Any, Iterable

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All keys the trainer reads, with their defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init = "pretrained"  # "pretrained" (weights from model.path) or "random" (architecture below)
    c.model.path = "minilm"  # a sentence-transformers/transformers folder, or "minilm"; also the tokenizer source
    c.model.pooling = ""  # "" = what the folder declares (1_Pooling), else mean/cls/max/...
    c.model.normalize = True
    c.model.max_length = 256
    c.model.dtype = "float32"
    c.model.remat = "none"  # "none", "full", "dots", "dots_no_batch" (embedjax.models.layers.REMAT_POLICIES)
    c.model.scan_unroll = 1  # layers per scan step (model.config's num_layers: fully unrolled)
    # "" = the family model.path's config.json names; else a registered family (bert, llama, qwen2, ...).
    c.model.family = ""
    # The family's own config fields, checked by its dataclass: the architecture of a randomly
    # initialised model (model.init="random"; vocab and positions default from the tokenizer and
    # max_length), or fields replaced in the pretrained config (e.g. attention="bidirectional",
    # hidden_dropout=0.0). A field the family does not have is an error.
    c.model.config = ml_collections.ConfigDict()
    # A trainable head (embedjax.models.heads): {} = none (the pooler alone), else e.g.
    # type="projection", dim=256. Its options are checked by the head.
    c.model.head = ml_collections.ConfigDict()
    # LoRA adapters (embedjax.models.lora): {} = full fine-tuning; else rank=16, alpha=32.0, dropout=0.05,
    # targets=(regexes over kernel paths,). With adapters the backbone is frozen: the optimizer holds
    # the adapters and the head only, and the export merges the adapters into the weights.
    c.model.lora = ml_collections.ConfigDict()
    # False: prompt/instruction tokens are attended to but left out of pooling (training, evaluation,
    # and the exported 1_Pooling/config.json), as sentence-transformers' include_prompt.
    c.model.include_prompt = True

    c.data = ml_collections.ConfigDict()
    # Comma-separated sources "kind:path[:split][@weight]", kind in {sts, beir, jsonl, triplets}, e.g.
    # "beir:scifact:train,triplets:nli/triplets.tsv@0.5"; paths may be relative to EMBEDJAX_DATA_DIR.
    # Grammar, split rules and the leak check: embedjax/data/splits.py.
    c.data.train = "sts:stsb/sts-train.csv"
    c.data.max_examples = 0  # 0 = all; else the first N stored examples of each source
    c.data.cache_dir = ""  # "" = $EMBEDJAX_CACHE_DIR or ~/.cache/embedjax/tfds
    c.data.download = False  # fetch STS-B from its canonical URL when no local copy exists
    c.data.shuffle = True
    c.data.no_duplicates = False
    c.data.num_negatives = 0  # hard negatives per query taken from the dataset (retrieval kinds)
    c.data.length_buckets = ()  # padded lengths to choose from; () = the tokenizer's default ladder
    c.data.pad_to_max_length = False  # True: every batch padded to model.max_length (one compiled shape)
    # True: pack each column's texts end to end into rows (embedjax.data.packing; attention stays
    # within each text, so embeddings equal the padded batch's) instead of padding each text: no
    # compute on padding. Rows hold data.pack_length tokens, or the longest text's length bucket.
    c.data.pack = False
    c.data.pack_length = 64
    c.data.min_relevance = 1
    # True lets a run train on one of its evaluation sets or on evaluation-only data (refused otherwise,
    # before anything runs); the summary then records the overlap under "eval_overlap".
    c.data.allow_eval_overlap = False
    # Instruction templates with a {task} field, filled per source from data.tasks, e.g.
    # query_instruction="Instruct: {task}\nQuery:" and no document_instruction ("" = none). The
    # prompt is tokenized apart from the text (exact boundary) and exported to
    # config_sentence_transformers.json.
    c.data.query_instruction = ""
    c.data.document_instruction = ""
    # source name (a data.train entry's folder or file stem, e.g. "scifact", "triplets") -> task text.
    c.data.tasks = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    # "contrastive" (train.loss on the batch's pairs) or "mntp" (masked next-token prediction over every
    # text column through the tied LM head; needs model.config.attention="bidirectional"). Chain them by
    # starting a contrastive run from an MNTP run's export (model.path).
    c.train.objective = "contrastive"
    c.train.mntp_probability = 0.2  # MNTP: chance that an eligible token is picked (LLM2Vec: 0.2 / 0.8)
    c.train.mntp_mask_token = ""  # MNTP: "" = the tokenizer's mask token, else "_" (LLM2Vec's choice)
    c.train.batch_size = 16  # global, across all processes and devices
    c.train.num_epochs = 1
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.stop_after = 0  # > 0: run only this many steps of the schedule (benchmarks, smoke tests)
    # Graded (sts) pairs: "cosent". Retrieval pairs: "infonce" (softmax over in-batch + hard
    # negatives), "siglip" (sigmoid on every (query, candidate) pair: label +1 for the query's
    # positives, -1 otherwise) or "cosent" (CoSENT over every (query, candidate) cosine of the
    # batch with relevance 1 for the query's positives, 0 otherwise: one ranking over the batch).
    c.train.loss = "cosent"
    c.train.cosent_scale = 20.0  # CoSENT: multiplies cosine differences
    c.train.temperature = 0.05  # infonce and siglip: logits = cosine / temperature
    c.train.siglip_bias = -10.0  # siglip: fixed logit bias added after the temperature (SigLIP's init)
    c.train.bidirectional = False  # infonce only: add the document->query term
    # Drop in-batch negatives that share the positive's document id and hard negatives whose id is
    # the query's positive document (all three retrieval losses); a repeated query gets all its positives.
    c.train.mask_false_negatives = True
    c.train.matryoshka_dims = ()  # increasing, e.g. (64, 128, 256, 384); () = full dimension only
    c.train.matryoshka_weights = ()  # () = all 1
    # (layer, dim) pairs: loss = sum_p w_p * retrieval loss on the L2-normalised first dim
    # coordinates of the embedding pooled (model pooling) from transformer layer `layer`
    # (1..model.num_layers; each text is encoded once). Full product layers x dims = 2D Matryoshka,
    # the diagonal = Starbucks: build them with embedjax.losses.matryoshka.two_d_matryoshka_pairs /
    # starbucks_pairs. Sorted by (layer, dim), no repeats; () = off. Not with matryoshka_dims or ring.
    c.train.layer_dims = ()
    c.train.layer_dims_weights = ()  # one per layer_dims pair; () = all 1
    c.train.ring = False  # memory-tiled ring loss over the data axis (infonce, siglip) instead of the dense one
    # The ring's tiles: "xla" (fori_loop over tiles) or "pallas" (fused kernels, embedjax.kernels.ring_tiles:
    # one Matryoshka prefix, no margin; Triton on a GPU, interpret mode elsewhere).
    c.train.ring_impl = "xla"
    # 0: off. R > 0: InfoNCE over the data axis in stripes of R query rows with the gradients formed
    # in the scoring pass (embedjax.losses.stripes): the dense loss's FLOPs, [R, B(1+K)] logits per
    # device (the ring recomputes its tiles: 8 B^2 d). infonce only, not bidirectional, not with ring.
    c.train.stripe_rows = 0
    # PRNG implementation of the dropout key: "threefry2x32" (JAX's default, the same bits on every
    # backend), "rbg" or "unsafe_rbg" (XLA's RngBitGenerator; see embedjax.train.state.DROPOUT_RNGS).
    c.train.dropout_rng = "threefry2x32"
    c.train.gradcache_sub_batch = 0  # > 0: GradCache, embedding this many rows of the global batch at a time
    c.train.log_every = 1
    c.train.progress = True

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "linear"  # "linear", "cosine" or "constant" after warm-up
    c.optim.warmup_ratio = 0.1
    c.optim.warmup_steps = 0  # > 0 overrides warmup_ratio
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # 0 = all devices; N = the first N (for 1-device comparisons)
    c.mesh.rules = "data_parallel"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only before and after training
    c.eval.at_start = True
    c.eval.sts = "stsb/sts-dev.csv"  # "" = no STS evaluation
    c.eval.sts_test = ""  # evaluated once after training (and at start when at_start)
    # BEIR evaluation sets "folder[:split],...", e.g. "scifact:test,nfcorpus:test,msmarco" ("" = none); a split
    # may be left out when the folder has only one. Test splits and evaluation-only sets are scored only
    # before and after training; other splits (nfcorpus:dev) also every eval.every_steps.
    c.eval.beir = ""
    # > 0: score each BEIR set on a fixed subset of at most this many queries (the same for every run:
    # the smallest sha1 of the query ids); the set is then named "<folder>-<split>-q<N>". The corpus is
    # always encoded whole, which is most of the cost.
    c.eval.max_queries = 0
    c.eval.batch_size = 64

    c.export = ml_collections.ConfigDict()
    c.export.enabled = True
    c.export.dir = ""  # "" = WORKDIR/export

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "" = single process, or JAX's auto-detection when num_processes < 0
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = "gloo"  # CPU collectives for multi-process runs on one machine
    return c


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Keys that existed once, and what replaced them.
REMOVED_KEYS = {
    "data.beir_split": "each source names its split now: data.train='beir:scifact:train', eval.beir='scifact:test'",
}


def _unknown_key_error(key: str, known: Iterable[str], where: str) -> ValueError:
    if key in REMOVED_KEYS:
        return ValueError(f"config key {key!r} in {where} was removed: {REMOVED_KEYS[key]}")
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see embedjax/train/config.py for the keys"
    return ValueError(f"unknown config key {key!r} in {where}{hint}")


# Sections whose keys the schema does not list: a model family's dataclass checks them.
OPEN_SECTIONS = ("model.config.", "model.head.", "model.lora.", "data.tasks.")


def _is_open(key: str) -> bool:
    return key.startswith(OPEN_SECTIONS)


def validate(cfg: ml_collections.ConfigDict, where: str = "the config", schema=default_config) -> None:
    """Every key of ``cfg`` must be a key of ``schema()`` (the text trainer's by default; the CTR trainer
    passes its own), with a value of the schema's type (keys of the text schema's open sections are
    checked later by the model family's config dataclass)."""
    is_open = _is_open if schema is default_config else (lambda key: False)
    schema = _flatten(schema())
    for key, value in _flatten(cfg).items():
        if is_open(key):
            continue
        if key not in schema:
            raise _unknown_key_error(key, schema, where)
        expected = schema[key]
        if isinstance(expected, bool):
            ok = isinstance(value, bool)
        elif isinstance(expected, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(expected, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(expected, tuple):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, type(expected))
        if not ok:
            raise TypeError(
                f"config key {key!r} in {where} is {value!r} ({type(value).__name__}); "
                f"it must be a {type(expected).__name__} like the default {expected!r}"
            )


def _parse_value(raw: str, default: Any, key: str) -> Any:
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}={raw!r}: expected true or false")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{key}={raw!r} is not a valid {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, (list, int, float)):
        value = tuple(value) if isinstance(value, list) else (value,)
    return value


def _parse_open_value(raw: str) -> Any:
    """A Python literal when it parses as one (64, 0.1, True, (1, 2)), else the string itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str],
                    schema=default_config) -> ml_collections.ConfigDict:
    """Apply ``key=value`` strings (dotted keys, without the ``--config.`` prefix)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    flat = _flatten(cfg)
    is_open = _is_open if schema is default_config else (lambda key: False)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like --config.KEY=VALUE")
        key, raw = item.split("=", 1)
        if key not in flat and not is_open(key):
            raise _unknown_key_error(key, flat, "the command-line overrides")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _parse_value(raw, flat[key], key) if key in flat else _parse_open_value(raw)
    validate(cfg, "the command-line overrides", schema)
    return cfg


def load_config_module(spec: str, prefix: str = "embedjax_config"):
    """``FILE[:ARG]`` -> (the executed config module, FILE, ARG); a missing FILE is a clear error."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ValueError(f"config file {path_str!r} does not exist; pass --config configs/<name>.py[:ARG]")
    module_spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path_str, arg


def load_config_file(spec: str, schema=default_config) -> ml_collections.ConfigDict:
    """``FILE[:ARG]`` -> the file's ``get_config(ARG)`` (``get_config()`` without ARG), validated against ``schema()``."""
    module, path_str, arg = load_config_module(spec)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path_str!r} defines no get_config(arg) function")
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(f"{path_str}: get_config must return an ml_collections.ConfigDict")
    validate(cfg, path_str, schema)
    return cfg
