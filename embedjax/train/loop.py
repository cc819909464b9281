"""The training run: config -> mesh, model, data, optimizer -> jitted sharded steps,
with logging, evaluation, checkpoints, automatic resume, SIGTERM and NaN handling,
export and a summary.

Everything that can reject the config or the data (unknown keys, a missing or
malformed dataset, a batch size the data-parallel mesh cannot split) runs before
the first byte goes into the workdir, so a refused run leaves nothing behind.

Workdir layout::

    WORKDIR/config.json        the resolved config (written once the checkpoint, if any, accepts it)
    WORKDIR/checkpoints/<step>/  orbax steps (state + data iterator position)
    WORKDIR/metrics.jsonl      per-step and evaluation metrics
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/evals/step_<N>.json  each evaluation
    WORKDIR/export/            the trained model as a sentence-transformers folder
    WORKDIR/summary.json       the final summary (also printed as the last line by the CLI)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np

from embedjax.data.pipeline import DatasetSpec, PackSpec, build_train_data
from embedjax.data.splits import check_disjoint, parse_train_sources
from embedjax.data.tokenization import Tokenizer
from embedjax.train import optim
from embedjax.train.checkpoint import Checkpointer
from embedjax.train.config import validate
from embedjax.train.metrics_log import MetricLog
from embedjax.train.state import create_state, state_shardings, unbox
from embedjax.train.step import batch_shardings, make_embed, make_objective, make_train_step, value_and_grad_fn


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the workdir keeps the last good checkpoint."""


def init_distributed(dist: ml_collections.ConfigDict) -> None:
    """Join a multi-process job when the config asks for one (before any device is touched)."""
    if dist.num_processes == 1 and not dist.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    if dist.cpu_collectives:  # only consulted by the CPU backend; harmless elsewhere
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    if dist.num_processes < 0:  # auto-detect (TPU pods, SLURM)
        jax.distributed.initialize()
        return
    if not dist.coordinator:
        raise ValueError(
            f"distributed.num_processes={dist.num_processes} needs distributed.coordinator (host:port of process 0)"
        )
    jax.distributed.initialize(
        coordinator_address=dist.coordinator, num_processes=dist.num_processes, process_id=dist.process_id
    )


def build_mesh(mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    from embedjax.sharding.mesh import make_mesh

    devices = jax.devices()
    if mesh_cfg.num_devices:
        if jax.process_count() > 1:
            raise ValueError("mesh.num_devices selects devices of a single process; leave it 0 in multi-process runs")
        if not 0 < mesh_cfg.num_devices <= len(devices):
            raise ValueError(f"mesh.num_devices={mesh_cfg.num_devices} but {len(devices)} devices are available")
        devices = devices[: mesh_cfg.num_devices]
    spec = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    # Auto axes: the step is one jit with explicit in/out shardings; XLA places the intermediates.
    return make_mesh(spec, devices=devices, axis_type=jax.sharding.AxisType.Auto)


def check_batch_split(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % data_parallel:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the data-parallel size {data_parallel} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {data_parallel}"
        )
    local = batch_size // jax.process_count()
    local_devices = data_parallel // jax.process_count()
    if local_devices and local % local_devices:
        raise ValueError(f"per-process batch {local} does not split over this process's {local_devices} devices")


def model_family(cfg, folder: pathlib.Path):
    """The family the run trains: ``model.family``, else the one the folder's config.json names."""
    from embedjax.convert import hf
    from embedjax.models.registry import family_for_hf_config, get_family

    if cfg.model.family:
        return get_family(cfg.model.family)
    return family_for_hf_config(hf.read_hf_config(folder), str(folder / "config.json"))


def model_config_and_params(cfg, family, folder: pathlib.Path, tokenizer):
    """-> (family config, numpy params or None for random init).

    ``model.config`` holds the family's own fields: replacements of the pretrained config, or the
    architecture of a random one (vocabulary size from the tokenizer, positions from max_length,
    unless given). The family's dataclass rejects fields it does not have.
    """
    from embedjax.convert import hf
    from embedjax.models.registry import family_for_config

    fields = cfg.model.config.to_dict()
    if cfg.model.init == "pretrained":
        config, params = hf.load_pretrained(folder, **fields)
        if family_for_config(config) is not family:
            raise ValueError(f"model.family={family.name!r} but {folder} holds a {family_for_config(config).name} "
                             "model; leave model.family empty to take the folder's")
    elif cfg.model.init == "random":
        fields = {"vocab_size": tokenizer.backend.get_vocab_size(),
                  "max_position_embeddings": max(cfg.model.max_length, 8), **fields}
        config, params = family.config_from_fields(**fields), None
    else:
        raise ValueError(f"model.init={cfg.model.init!r}: use 'pretrained' or 'random'")
    if cfg.model.max_length > config.max_supported_length:
        raise ValueError(f"model.max_length={cfg.model.max_length} exceeds the {config.max_supported_length} "
                         "positions the model supports")
    return config, params


def _model_folder(path: str) -> pathlib.Path:
    from embedjax.models.pretrained import resolve_model_dir

    return pathlib.Path(resolve_model_dir(path))


@contextlib.contextmanager
def sigterm_flag():
    """Yields a one-item list that becomes [True] when SIGTERM arrives (the run then saves and stops)."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _any_process(value: bool) -> bool:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(value))))


def _host_params(params):
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def count_tokens(batch) -> int:
    """Non-padding tokens in a (nested) batch: the sum of every attention mask."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(np.asarray(batch["attention_mask"]).sum())
        return sum(count_tokens(v) for v in batch.values())
    return 0


def _write_json_atomic(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def source_prompts(cfg):
    """``(query prompt, document prompt)`` per data.train source (`embedjax.data.instructions`)."""
    from embedjax.data.instructions import source_prompts as fill

    return fill([s.path for s in parse_train_sources(cfg.data.train)], query_template=cfg.data.query_instruction,
                document_template=cfg.data.document_instruction, tasks=cfg.data.tasks.to_dict())


def check_packing(cfg, family) -> None:
    """``data.pack`` needs a family that reads packed batches and a step that keeps each column whole."""
    if not cfg.data.pack:
        return
    if not family.packs_sequences:
        raise ValueError(f"data.pack=True: the {family.name!r} family does not read packed batches "
                         "(Family.packs_sequences); set data.pack=False")
    if cfg.train.gradcache_sub_batch > 0:
        raise ValueError("data.pack=True does not combine with GradCache (its sub-batches cut the batch by rows, "
                         "and packed rows mix texts): set train.gradcache_sub_batch=0 or data.pack=False")
    if cfg.train.objective == "mntp":
        raise ValueError("data.pack=True applies to the contrastive objective; MNTP predicts over padded rows: "
                         "set data.pack=False")


def prepare_data(cfg, tokenizer, framing=None, shards: int = 1):
    """The run's training data; ``shards``: the data-parallel devices (packed batches pack per device)."""
    prompts = source_prompts(cfg)
    specs = [DatasetSpec(kind=s.kind, path=s.path, weight=s.weight, split=s.split or "test",
                         min_relevance=cfg.data.min_relevance) for s in parse_train_sources(cfg.data.train)]
    kwargs = dict(
        global_batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        num_steps=cfg.train.num_steps,
        num_epochs=0 if cfg.train.num_steps > 0 else cfg.train.num_epochs,
        shuffle=cfg.data.shuffle,
        no_duplicates=cfg.data.no_duplicates,
        num_negatives=cfg.data.num_negatives,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        cache_dir=cfg.data.cache_dir or None,
        download=cfg.data.download,
        max_examples=cfg.data.max_examples,
        pad_to_max_length=cfg.data.pad_to_max_length,
        framing=framing,
        prompts=prompts,
        pool_masks=not cfg.model.include_prompt and any(q or d for q, d in prompts),
        pack=PackSpec(cfg.data.pack_length, shards) if cfg.data.pack else None,
    )
    if jax.process_count() == 1:
        return build_train_data(specs, tokenizer, **kwargs)
    from jax.experimental import multihost_utils

    # Process 0 writes the ArrayRecord files first; the others then find them prepared
    # (or, without a shared filesystem, prepare their own identical copy).
    if jax.process_index() == 0:
        data = build_train_data(specs, tokenizer, **kwargs)
    multihost_utils.sync_global_devices("embedjax_data_prepared")
    if jax.process_index() != 0:
        data = build_train_data(specs, tokenizer, **kwargs)
    return data


def build_objective(cfg, kind: str, model, family, model_config, tokenizer, *, head, lora, pooling: str, mesh):
    """The configured training objective: the contrastive loss of ``train.loss``, or MNTP."""
    from embedjax.models.heads import head_output

    if cfg.train.objective == "mntp":
        from embedjax.train.mntp import make_mntp_objective, mask_token_id

        if head is not None:
            raise ValueError("train.objective='mntp' trains the backbone through its LM head; a pooling head "
                             "(model.head) has nothing to learn there: leave model.head empty")
        special = sorted({*tokenizer.prefix, *tokenizer.suffix, tokenizer.pad_id})
        return make_mntp_objective(model, family, model_config, lora=lora, probability=cfg.train.mntp_probability,
                                   mask_id=mask_token_id(tokenizer, cfg.train.mntp_mask_token), special_ids=special)
    if cfg.train.objective != "contrastive":
        raise ValueError(f"train.objective={cfg.train.objective!r}: use 'contrastive' or 'mntp'")
    per_token = head_output(head) == "tokens"  # a multi-vector head: MaxSim over its token vectors
    return make_objective(
        make_embed(model, pooling=pooling, normalize=cfg.model.normalize, head=head, lora=lora), kind=kind,
        loss=cfg.train.loss,
        cosent_scale=cfg.train.cosent_scale, temperature=cfg.train.temperature, siglip_bias=cfg.train.siglip_bias,
        bidirectional=cfg.train.bidirectional, mask_false_negatives=cfg.train.mask_false_negatives,
        matryoshka_dims=cfg.train.matryoshka_dims, matryoshka_weights=cfg.train.matryoshka_weights,
        layer_dims=cfg.train.layer_dims, layer_dims_weights=cfg.train.layer_dims_weights,
        num_layers=model_config.num_layers, hidden_size=model_config.hidden_size, ring=cfg.train.ring, mesh=mesh,
        similarity="maxsim" if per_token else "cos", reduce_tokens=head.reduce if per_token else None,
        ring_impl=cfg.train.ring_impl, stripe_rows=cfg.train.stripe_rows,
    )


def export_model(cfg, export_dir: pathlib.Path, workdir: pathlib.Path, model_config, host_params, folder, *,
                 pooling: str, head, lora) -> None:
    """The trained model as a sentence-transformers folder (LoRA adapters merged into the weights,
    the training prompts in config_sentence_transformers.json), and with LoRA also the adapters
    alone as a peft folder in WORKDIR/adapter."""
    from embedjax.convert import hf
    from embedjax.data.instructions import export_prompts
    from embedjax.models.lora import merge_encoder_params

    merged = merge_encoder_params(host_params, lora)
    prompts = export_prompts([s.path for s in parse_train_sources(cfg.data.train)], source_prompts(cfg))
    hf.export_pretrained(export_dir, model_config, jax.tree.map(np.asarray, merged["backbone"]), folder,
                         pooling=pooling, normalize=cfg.model.normalize, max_length=cfg.model.max_length,
                         overwrite=True, head=head, head_params=host_params["head"], prompts=prompts,
                         include_prompt=cfg.model.include_prompt)
    if lora is not None:
        from embedjax.convert.peft import save_peft

        save_peft(workdir / "adapter", host_params["lora"], lora, model_config, base_model=str(folder),
                  overwrite=True)


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, log=print) -> dict:
    """Run (or resume) the training described by ``cfg`` in ``workdir``; returns the summary dict."""
    from embedjax.convert import hf
    from embedjax.encoder import Encoder, abstract_params, init_encoder_params
    from embedjax.models.heads import build_head, head_output
    from embedjax.models.lora import LoRAConfig

    validate(cfg)
    eval_overlap = check_disjoint(cfg.data.train, beir=cfg.eval.beir, sts=(cfg.eval.sts, cfg.eval.sts_test),
                                  allow_overlap=cfg.data.allow_eval_overlap)  # before anything runs
    init_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    workdir = pathlib.Path(workdir).absolute()

    # ---- everything that can refuse the run, before anything is written ----
    mesh = build_mesh(cfg.mesh)
    check_batch_split(cfg.train.batch_size, mesh)
    for name, on in (("train.ring", cfg.train.ring), ("train.stripe_rows", cfg.train.stripe_rows)):
        if on and mesh.shape["fsdp"] > 1:
            raise ValueError(f"{name} runs over the data axis only; use mesh.fsdp=1 with it")
    folder = _model_folder(cfg.model.path)
    buckets = tuple(b for b in cfg.data.length_buckets if b < cfg.model.max_length) + (cfg.model.max_length,)
    family = model_family(cfg, folder)
    tokenizer = Tokenizer.from_folder(folder, cfg.model.max_length, buckets if cfg.data.length_buckets else None,
                                      needs=family.tokenizer)
    pooling = cfg.model.pooling or hf.read_pooling_settings(folder).pooling
    model_config, pretrained_params = model_config_and_params(cfg, family, folder, tokenizer)
    model = family.build(model_config, dtype=cfg.model.dtype, remat=cfg.model.remat,
                         scan_unroll=cfg.model.scan_unroll)
    head = build_head(cfg.model.head.to_dict(), pooling=pooling)
    per_token = head_output(head) == "tokens"  # a multi-vector head: framed tokens, MaxSim loss
    lora = LoRAConfig.from_dict(cfg.model.lora.to_dict())
    # With LoRA the backbone is frozen: the optimizer (and its state) holds the adapters and the head.
    trainable = ("head", "lora") if lora is not None else None
    check_packing(cfg, family)
    data = prepare_data(cfg, tokenizer, head.framing if per_token else None,
                        shards=mesh.shape["data"] * mesh.shape["fsdp"])
    num_steps = data.num_steps
    warmup = optim.warmup_steps_for(num_steps, cfg.optim.warmup_ratio, cfg.optim.warmup_steps)
    schedule = optim.learning_rate_schedule(cfg.optim.learning_rate, num_steps, warmup, cfg.optim.schedule)
    tx = optim.adamw(schedule, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
                     eps=cfg.optim.eps, grad_clip=cfg.optim.grad_clip)

    objective = build_objective(cfg, data.kind, model, family, model_config, tokenizer, head=head, lora=lora,
                                pooling=pooling, mesh=mesh)
    abstract_boxed = abstract_params(model, head, family, lora)
    dropout_rng = cfg.train.dropout_rng
    shardings = state_shardings(abstract_boxed, tx, mesh, cfg.mesh.rules, trainable, dropout_rng)
    abstract_state = unbox(jax.eval_shape(lambda p: create_state(p, tx, cfg.seed, trainable, dropout_rng),
                                          abstract_boxed))
    # Trace the objective on the first batch's shapes: loss options the loss rejects fail here.
    first = data.dataset[0]
    jax.eval_shape(value_and_grad_fn(objective, cfg.train.gradcache_sub_batch, trainable), abstract_state.params,
                   jax.tree.map(lambda x: np.concatenate([x] * jax.process_count()), first), jax.random.PRNGKey(0))

    # ---- the workdir ----
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "evals").mkdir(exist_ok=True)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, abstract_state, shardings)
        start = latest
        log(f"resuming from step {latest} of {num_steps} ({checkpointer.directory / str(latest)})")
    else:
        state = jax.jit(
            lambda key, backbone: create_state(init_encoder_params(model, head, family, key, backbone, lora), tx,
                                               cfg.seed, trainable, dropout_rng),
            out_shardings=shardings,
        )(jax.random.PRNGKey(cfg.seed), pretrained_params)
        data_state, start = None, 0
    if is_main:  # only now: a resume its checkpoint refuses keeps the config that wrote the checkpoint
        _write_json_atomic(workdir / "config.json", cfg.to_dict())

    metric_log = MetricLog(workdir, enabled=is_main)
    # Evaluation runs on the training mesh with the parameters sharded as the state holds them.
    encoder = Encoder(model, state.params, tokenizer, pooling=pooling, normalize=cfg.model.normalize,
                      source=str(folder), mesh=mesh, rules=cfg.mesh.rules, head=head, lora=lora,
                      include_prompt=cfg.model.include_prompt)
    from embedjax.train.evaluators import Evaluators

    evaluators = Evaluators(encoder, sts_dev=cfg.eval.sts, sts_test=cfg.eval.sts_test, beir=cfg.eval.beir,
                            max_queries=cfg.eval.max_queries, batch_size=cfg.eval.batch_size)

    def evaluate(step: int, include_test: bool = True) -> dict:
        names = evaluators.names(include_test=include_test)
        if not names:
            return {}
        results = evaluators.run(state.params, names,
                                 per_query_file=workdir / "evals" / f"step_{step}.per_query.json" if is_main else None)
        if is_main:
            metric_log.write(step, results, prefix="eval")
            _write_json_atomic(workdir / "evals" / f"step_{step}.json", results)
        log(f"eval at step {step}: " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(results.items())))
        return results

    if start == 0 and cfg.eval.at_start:
        evaluate(0)

    status = "completed"
    last_loss = float("nan")
    saved_step = latest
    train_seconds, trained_steps, tokens_seen = 0.0, 0, 0
    steady_seconds, steady_steps, seen_shapes = 0.0, 0, set()  # steps whose batch shape was compiled before
    step_fn = None
    iterator = data.iterator(data_state)
    progress = None
    if is_main and cfg.train.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    try:
        with sigterm_flag() as sigterm:
            end = min(num_steps, cfg.train.stop_after) if cfg.train.stop_after > 0 else num_steps
            for step in range(start, end):
                local = next(iterator)
                if step_fn is None:
                    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
                    bsh = batch_shardings(local, mesh, batch_axes)
                    step_fn = make_train_step(objective, tx, schedule, shardings, bsh, mesh,
                                              gradcache_sub_batch=cfg.train.gradcache_sub_batch, trainable=trainable,
                                              dropout_rng=dropout_rng)
                t0 = time.perf_counter()
                batch = jax.tree.map(
                    lambda x, sh: jax.make_array_from_process_local_data(sh, x), local, bsh
                )
                state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t0
                done = step + 1
                last_loss = metrics["loss"]
                # The gradient norm is checked too: a loss can stay finite (e.g. every candidate
                # masked) while NaN weights already poison the gradients.
                if not (math.isfinite(last_loss) and math.isfinite(metrics["grad_norm"])):
                    checkpointer.wait()
                    good = checkpointer.latest_step()
                    raise TrainingDiverged(
                        f"the loss became {last_loss} (gradient norm {metrics['grad_norm']}) at step {done}; "
                        f"training stopped. The last good checkpoint "
                        f"is step {good} in {checkpointer.directory} (None: no checkpoint yet). Lower "
                        "optim.learning_rate, enable optim.grad_clip, or check the data for broken examples"
                    )
                shape_key = tuple(x.shape for x in jax.tree.leaves(local))
                if step > start:  # the first step of a run includes compilation
                    train_seconds += elapsed
                    trained_steps += 1
                    tokens_seen += count_tokens(local) * jax.process_count()
                    if shape_key in seen_shapes:  # no compilation in this step: steady state
                        steady_seconds += elapsed
                        steady_steps += 1
                seen_shapes.add(shape_key)
                pairs_per_s = cfg.train.batch_size * trained_steps / train_seconds if train_seconds else float("nan")
                if done % cfg.train.log_every == 0 or done == num_steps:
                    metric_log.write(done, {**metrics, "pairs_per_s": pairs_per_s, "step_seconds": elapsed})
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", pairs_s=f"{pairs_per_s:.1f}", refresh=False)
                    progress.update(1)
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < num_steps:
                    evaluate(done, include_test=False)
                if done % cfg.checkpoint.every_steps == 0 or done == end:
                    checkpointer.save(done, state, iterator.get_state())
                    saved_step = done
                if _any_process(sigterm[0]):
                    if saved_step != done:
                        checkpointer.save(done, state, iterator.get_state())
                        saved_step = done
                    status = "preempted"
                    log(f"SIGTERM: saved step {done} to {checkpointer.directory}; rerun the same command to resume")
                    break
            else:
                if end < num_steps:
                    status = "stopped_after"
        checkpointer.wait()
    except BaseException:
        metric_log.close()
        raise
    finally:
        if progress is not None:
            progress.close()
        checkpointer.close()

    final_step = int(jax.device_get(state.step))
    summary = {
        "status": status,
        "workdir": str(workdir),
        "step": final_step,
        "num_steps": num_steps,
        "final_loss": last_loss,
        # Steps 2..N (later first-time shapes compile inside them), and only the steps
        # whose shape had been compiled before (steady state).
        "train_pairs_per_s": cfg.train.batch_size * trained_steps / train_seconds if train_seconds else None,
        "train_pairs_per_s_steady": cfg.train.batch_size * steady_steps / steady_seconds if steady_seconds else None,
        "compiled_shapes": len(seen_shapes),
        "train_tokens_per_s_per_device": (tokens_seen / train_seconds / mesh.size) if train_seconds else None,
        "family": family.name,
        "devices": mesh.size,
        "processes": jax.process_count(),
        "checkpoint": str(checkpointer.directory / str(saved_step)) if saved_step is not None else None,
        "metrics_log": str(metric_log.jsonl_path),
        "tensorboard": str(metric_log.tensorboard_dir),
    }
    if eval_overlap:
        summary["eval_overlap"] = eval_overlap
    before = workdir / "evals" / "step_0.json"
    if before.is_file():
        summary["eval_before"] = json.loads(before.read_text())
    if status == "completed":
        if evaluators.names():
            summary["eval_after"] = evaluate(final_step)
        if cfg.export.enabled:
            export_dir = pathlib.Path(cfg.export.dir) if cfg.export.dir else workdir / "export"
            host_params = jax.tree.map(np.asarray, _host_params(state.params))
            if is_main:
                export_model(cfg, export_dir, workdir, model_config, host_params, folder, pooling=pooling, head=head,
                             lora=lora)
            summary["export"] = str(export_dir.absolute())
            if lora is not None:
                summary["adapter"] = str(workdir / "adapter")
    metric_log.close()
    if is_main:
        _write_json_atomic(workdir / "summary.json", summary)
    where = {k: summary[k] for k in ("checkpoint", "metrics_log", "tensorboard", "export") if summary.get(k)}
    log(f"run {status} at step {final_step}/{num_steps}; " + "; ".join(f"{k}: {v}" for k, v in where.items())
        + f"; summary: {workdir / 'summary.json'}")
    return summary
