"""``train_ctr(cfg, workdir)``: a CTR model on any embedding table, trained row-sparsely, row-sharded.

config -> data (`embedjax.data.ctr`), table sized to ``table.budget`` (`embedjax.tables.build`),
DLRM (`embedjax.ctr.model`) -> jitted steps over a mesh whose ``table_rows`` axes split every row
table -> pruning events and phase switch (pruned methods) -> evaluation -> summary.

Everything that can refuse the run (config keys, unknown fields, a budget the method cannot
meet, ids out of range) happens before the workdir is touched. Workdir layout::

    WORKDIR/config.json           the resolved config
    WORKDIR/checkpoints/<step>/   orbax steps (resumed automatically)
    WORKDIR/metrics.jsonl, tensorboard/
    WORKDIR/predictions.npz       eval-set probabilities, labels and source rows (for paired tests)
    WORKDIR/summary.json          status, AUC and log loss ("eval_after"), memory, the table's layout
"""
from __future__ import annotations

import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from embedjax.ctr import metrics
from embedjax.ctr.config import check_table_options, default_config
from embedjax.ctr.model import DLRM
from embedjax.ctr.step import batch_shardings, make_init_state, make_predict, make_train_step, train_state_shardings
from embedjax.data.ctr import CtrData, load_ctr
from embedjax.tables import build, check_ids, device_bytes, memory_report
from embedjax.tables.sparse import SparseOptimizer, row_sharding_from_rules
from embedjax.train import optim
from embedjax.train.checkpoint import Checkpointer
from embedjax.train.config import validate
from embedjax.train.loop import TrainingDiverged, _write_json_atomic, build_mesh, check_batch_split, sigterm_flag
from embedjax.train.metrics_log import MetricLog

VALIDATION_SEED = 1234  # the tuning hold-out of the training split never moves with the run's seed
PREDICTIONS_FILE = "predictions.npz"


def split_for_run(data: CtrData, validation_fraction: float) -> tuple[dict, dict, str]:
    """(train arrays, evaluation arrays, evaluation split name). With a validation fraction the
    evaluation rows come from the training split and the test split is not used."""
    if validation_fraction == 0.0:
        return data.train, data.test, "test"
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction} must be in [0, 1)")
    n = len(data.train["label"])
    perm = np.random.default_rng(VALIDATION_SEED).permutation(n)
    cut = n - int(round(validation_fraction * n))
    pick = lambda rows: {k: v[np.sort(rows)] for k, v in data.train.items()}  # noqa: E731
    return pick(perm[:cut]), pick(perm[cut:]), "validation"


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: epoch e = step // (N // B) reads a fresh permutation seeded by (seed, e)."""
    per_epoch = num_examples // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[i * batch_size:(i + 1) * batch_size]


def _adam_moment_bytes(dense_opt_state, key: str) -> int:
    """Bytes of Adam's mu and nu for the ``key`` subtree of the dense parameters."""
    import optax

    total = 0
    for leaf in jax.tree.leaves(dense_opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(leaf, optax.ScaleByAdamState):
            total += device_bytes(leaf.mu[key]) + device_bytes(leaf.nu[key])
    return total


def measured_memory(state) -> dict:
    """What the table's parameters and optimizer state hold on the devices."""
    params = device_bytes(state.params["tables"]) + device_bytes(state.params["dense"]["table"])
    opt = device_bytes(state.opt_state["rows"]) + _adam_moment_bytes(state.opt_state["dense"], "table")
    return {"measured_param_bytes": params, "measured_optimizer_bytes": opt}


def train_ctr(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, log=print) -> dict:
    """Run (or resume) the CTR training of ``cfg`` in ``workdir``; returns the summary dict."""
    validate(cfg, schema=default_config)
    options = check_table_options(cfg)
    workdir = pathlib.Path(workdir).absolute()

    # ---- everything that can refuse the run ----
    mesh = build_mesh(cfg.mesh)
    check_batch_split(cfg.train.batch_size, mesh)
    from embedjax.sharding.rules import get_rules

    rules = tuple(get_rules(cfg.mesh.rules)) + (("table_rows", tuple(cfg.mesh.table_rows) or None),)
    row_sharding = row_sharding_from_rules(mesh, rules)
    data = load_ctr(cfg.data.name, cache_dir=cfg.data.cache_dir or None, min_count=cfg.data.min_count)
    if cfg.data.fields:
        data = data.select_fields(tuple(cfg.data.fields))
    train_arrays, eval_arrays, eval_split = split_for_run(data, cfg.data.validation_fraction)
    method = build(cfg.table.method, data.vocab_sizes, cfg.table.dim, cfg.table.budget,
                   row_multiple=row_sharding.num_shards if row_sharding else 1, init_scale=cfg.table.init_scale,
                   **options)
    for arrays in (train_arrays, eval_arrays):
        check_ids(method, arrays["ids"], data.fields)
    num_train = len(train_arrays["label"])
    per_epoch = num_train // cfg.train.batch_size
    if per_epoch < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} exceeds the {num_train} training examples")
    num_steps = cfg.train.num_steps if cfg.train.num_steps > 0 else cfg.train.num_epochs * per_epoch
    model = DLRM(top_mlp=tuple(cfg.model.top_mlp), bottom_mlp=tuple(cfg.model.bottom_mlp))
    sparse_opt = SparseOptimizer(cfg.optim.sparse, cfg.optim.sparse_learning_rate, eps=cfg.optim.eps)
    schedule = optim.learning_rate_schedule(cfg.optim.dense_learning_rate, num_steps, 0, "constant")
    dense_tx = optim.adamw(schedule, weight_decay=0.0, eps=cfg.optim.eps, grad_clip=0.0)

    init_state = make_init_state(method, model, sparse_opt, dense_tx, num_dense=data.num_dense, seed=cfg.seed)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(cfg.seed))
    shardings = train_state_shardings(abstract, mesh, row_sharding)
    batch_sharding = batch_shardings(mesh)

    # ---- the workdir ----
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(workdir / "config.json", cfg.to_dict())
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, abstract, shardings)
        start = latest
        log(f"resuming from step {latest} of {num_steps}")
    else:
        state = jax.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(cfg.seed))
        start = 0
    metric_log = MetricLog(workdir)
    prune_at = method.pruning_schedule(num_steps)
    prune_fn = None
    if prune_at:
        prune_fn = jax.jit(lambda tables, dense_table, keep: {**tables, **method.prune(tables, dense_table, keep)},
                           out_shardings=shardings.params["tables"])
    step_fns: dict = {}

    def step_fn(phase):
        if phase not in step_fns:
            step_fns[phase] = jax.jit(
                make_train_step(method, model, sparse_opt, dense_tx, phase=phase, row_sharding=row_sharding),
                in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
        return step_fns[phase]

    status, last_loss, saved_step = "completed", float("nan"), latest
    end = min(num_steps, cfg.train.stop_after) if cfg.train.stop_after > 0 else num_steps
    progress = None
    if cfg.train.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=num_steps, initial=start, desc=f"train {method.method}", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        with sigterm_flag() as sigterm:
            for step in range(start, end):
                if step in prune_at:
                    tables = prune_fn(state.params["tables"], state.params["dense"]["table"], prune_at[step])
                    state = state.replace(params={**state.params, "tables": tables})
                rows = batch_indices(num_train, cfg.train.batch_size, cfg.seed, step)
                batch = {k: jax.device_put(train_arrays[k][rows], batch_sharding[k]) for k in batch_sharding}
                state, out = step_fn(method.phase_at(step, num_steps))(state, batch)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == end:
                    out = {k: float(v) for k, v in jax.device_get(out).items()}
                    last_loss = out["loss"]
                    if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])):
                        raise TrainingDiverged(f"the loss became {out['loss']} at step {done}; lower "
                                               "optim.sparse_learning_rate / optim.dense_learning_rate")
                    metric_log.write(done, out)
                    if progress is not None:
                        progress.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                if progress is not None:
                    progress.update(1)
                every = cfg.checkpoint.every_steps
                if (every and done % every == 0) or done == end:
                    checkpointer.save(done, state, {"next_step": done})
                    saved_step = done
                if sigterm[0]:
                    if saved_step != done:
                        checkpointer.save(done, state, {"next_step": done})
                        saved_step = done
                    status = "preempted"
                    log(f"SIGTERM: saved step {done}; rerun the same command to resume")
                    break
            else:
                if end < num_steps:
                    status = "stopped_after"
        checkpointer.wait()
    finally:
        if progress is not None:
            progress.close()
        checkpointer.close()
    train_seconds = time.perf_counter() - t_start

    memory = memory_report(method, sparse_opt)
    memory.update(measured_memory(state))
    summary = {
        "status": status, "workdir": str(workdir), "step": int(jax.device_get(state.step)), "num_steps": num_steps,
        "final_loss": last_loss, "train_seconds": train_seconds, "devices": mesh.size,
        "row_shards": row_sharding.num_shards if row_sharding else 1, "dataset": data.name,
        "fields": list(data.fields), "vocab_sizes": list(data.vocab_sizes), "eval_split": eval_split,
        "table": method.describe(), "memory": memory, "metrics_log": str(metric_log.jsonl_path),
    }
    kept = method.kept(jax.device_get(state.params["tables"]))
    if kept is not None:
        summary["table"]["kept"] = kept
        summary["memory"]["serve_bytes_realised"] = method.serve_bytes(kept)
    if status == "completed":
        probs = predict_all(method, model, state.params, eval_arrays, row_sharding, cfg.eval.batch_size, mesh)
        labels = eval_arrays["label"]
        results = {f"{eval_split}/auc": metrics.auc(labels, probs),
                   f"{eval_split}/logloss": metrics.log_loss(labels, probs)}
        metric_log.write(summary["step"], results, prefix="eval")
        summary["eval_after"] = results
        tmp = workdir / f".{PREDICTIONS_FILE}.tmp.npz"
        np.savez(tmp, prob=probs.astype(np.float32), label=labels.astype(np.int8),
                 source_row=eval_arrays["source_row"])
        os.replace(tmp, workdir / PREDICTIONS_FILE)
        summary["predictions"] = str(workdir / PREDICTIONS_FILE)
        log(f"{method.method} budget {cfg.table.budget:g}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
    metric_log.close()
    _write_json_atomic(workdir / "summary.json", summary)
    return summary


def predict_all(method, model, params, arrays: dict, row_sharding, batch_size: int, mesh) -> np.ndarray:
    """float32 probabilities [N] of every example, in fixed-size batches (the last one padded with id 0)."""
    predict = jax.jit(make_predict(method, model, row_sharding=row_sharding))
    n = len(arrays["label"])
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = min(batch_size, math.ceil(n / data_parallel) * data_parallel)
    batch_size = math.ceil(batch_size / data_parallel) * data_parallel
    out = []
    for start in range(0, n, batch_size):
        ids = arrays["ids"][start:start + batch_size]
        dense = arrays["dense"][start:start + batch_size]
        pad = batch_size - len(ids)
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            dense = np.concatenate([dense, np.zeros((pad, dense.shape[1]), dense.dtype)])
        out.append(np.asarray(jax.device_get(predict(params, ids, dense)))[: batch_size - pad])
    return np.concatenate(out)
