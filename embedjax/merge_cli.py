"""``python -m embedjax merge``: merge model folders with `embedjax.merge` and write a folder that
embedjax and sentence-transformers load.

    python -m embedjax merge --method ties --models A B --base BASE --out DIR --density 0.2
    python -m embedjax merge --method slerp --models A B --t 0.4 --out DIR
    python -m embedjax merge --method soup --models A B C --weights 1 1 2 --out DIR
    python -m embedjax merge --method task_arithmetic --models A B --base BASE --lambdas 0.7 0.5 --out DIR
    python -m embedjax merge --method dare --models A B --base BASE --p 0.9 --seed 0 --out DIR
    python -m embedjax merge --method ties --models ADAPTER_A ADAPTER_B --base BASE --lora adapters --rank 16 \
        --density 0.2 --out ADAPTER_DIR          # peft LoRA folders in, a peft LoRA folder out
    python -m embedjax merge --method soup --models ADAPTER_A MODEL_B --base BASE --lora fold --out DIR

Each folder is read whole: its family config, weights, pooling, normalisation and trainable head
(`read_model`). The models must share one architecture (same config, same parameter tree,
pooling, normalisation and head); the output takes the first model's tokenizer, pooling,
normalisation, head type and prompts, and the largest ``max_seq_length`` of the inputs unless
``--max-length`` says otherwise. Merges are per tensor of the transformers checkpoint: a scanned
model's stacked layers are merged layer by layer (`merge.stacked_axes`). Greedy soups and Self
Positioning need a held-out score or a probe loss: they are library functions
(`embedjax.merge.greedy_soup`, `embedjax.merge.self_positioning`), used by experiments/merging.

LoRA adapters: a ``--models`` folder holding ``adapter_config.json`` + ``adapter_model.safetensors``
(peft's files) is a LoRA adapter of ``--base`` (required then, for every method). ``--lora fold``
folds each adapter into the base and writes a model folder; ``--lora adapters`` writes one peft
adapter folder (exact rank concatenation for soup / task arithmetic, truncated SVD to ``--rank``
for SLERP / TIES / DARE, whose relative error per module is in the JSON line). See
`embedjax.merge_lora`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from typing import Any

METHODS = ("soup", "task_arithmetic", "slerp", "ties", "dare")
NEEDS_BASE = {"task_arithmetic", "ties", "dare"}


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A model folder read whole: family ``config``, the encoder's ``params`` tree
    ``{"backbone", "head"}``, its trainable ``head`` module (or None) and pooling ``settings``."""

    path: pathlib.Path
    config: Any
    params: dict
    head: Any
    settings: Any


def read_model(folder: str | os.PathLike) -> ModelFolder:
    """A transformers / sentence-transformers folder (or a packaged alias such as ``minilm``)."""
    from embedjax.convert import hf
    from embedjax.encoder import encoder_params
    from embedjax.models.pretrained import resolve_model_dir

    path = resolve_model_dir(folder)
    config, backbone = hf.load_pretrained(path)
    settings = hf.read_pooling_settings(path)
    head, head_params = hf.read_head(path, settings.pooling)
    return ModelFolder(path, config, encoder_params(backbone, head_params), head, settings)


def layer_stacking(model: ModelFolder):
    """``stacked=`` for the merge functions: per leaf, how many leading axes stack layers."""
    from embedjax import merge
    from embedjax.encoder import abstract_params
    from embedjax.models.registry import family_for_config

    family = family_for_config(model.config)
    return merge.stacked_axes(abstract_params(family.build(model.config), model.head, family))


def check_same_model_kind(models: list[ModelFolder], names: list[str]) -> None:
    """Configs, pooling, normalisation and head types must agree (a clear error names the difference)."""
    ref, ref_name = models[0], names[0]
    ref_fields = dataclasses.asdict(ref.config)
    for model, name in zip(models[1:], names[1:]):
        fields = dataclasses.asdict(model.config)
        differ = sorted(k for k in set(ref_fields) | set(fields) if ref_fields.get(k) != fields.get(k))
        if type(model.config) is not type(ref.config) or differ:
            detail = ", ".join(f"{k}: {ref_fields.get(k)!r} vs {fields.get(k)!r}" for k in differ[:5])
            raise ValueError(f"{name} ({model.path}) has another config than {ref_name} ({ref.path}): {detail or 'family'}"
                             "; merge models of one architecture")
        for what, mine, theirs in (("pooling", model.settings.pooling, ref.settings.pooling),
                                   ("normalisation", model.settings.normalize, ref.settings.normalize),
                                   ("head", type(model.head).__name__, type(ref.head).__name__)):
            if mine != theirs:
                raise ValueError(f"{name} ({model.path}) has {what} {mine!r} but {ref_name} ({ref.path}) has {theirs!r}; "
                                 "merged weights would not mean one thing")


def merge_params(method: str, models: list, base: dict | None, *, stacked=None, weights=None, lambdas=None,
                 t: float | None = None, density: float | None = None, scale: float | None = None,
                 p: float | None = None, seed: int | None = None, lora: str | None = None, rank: int | None = None):
    """Dispatch to `embedjax.merge` with the options that ``method`` takes (others must be unset).
    ``models`` may hold `LoRAAdapter` objects with ``lora`` "fold" or "adapters" (then ``base`` is
    what they were trained on, for every method)."""
    from embedjax import merge

    given = {"weights": weights, "lambdas": lambdas, "t": t, "density": density, "scale": scale, "p": p,
             "seed": seed}
    takes = {"soup": {"weights"}, "task_arithmetic": {"lambdas"}, "slerp": {"t"},
             "ties": {"weights", "density", "scale"}, "dare": {"lambdas", "p", "seed"}}
    if method not in takes:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    stray = sorted(k for k, v in given.items() if v is not None and k not in takes[method])
    if stray:
        raise ValueError(f"--method {method} does not take {', '.join('--' + s for s in stray)}")
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"--method {method} needs --base (the model the others were fine-tuned from)")
    if method not in NEEDS_BASE and base is not None and lora is None:
        raise ValueError(f"--method {method} does not use --base; drop it")
    if lora == "adapters":
        stacked = None  # each layer's delta is one tensor
    lora_options = {"lora": lora, "rank": rank} if lora is not None else ({"rank": rank} if rank is not None else {})
    base_option = {"base": base} if lora == "fold" else {}  # soup / slerp take base= only to fold into
    if method == "soup":
        return merge.soup(models, weights, **base_option, **lora_options)
    if method == "task_arithmetic":
        return merge.task_arithmetic(base, models, 1.0 if lambdas is None else lambdas, **lora_options)
    if method == "slerp":
        if len(models) != 2 or t is None:
            raise ValueError("--method slerp takes exactly two --models and --t")
        return merge.slerp(models[0], models[1], t, stacked=stacked, **base_option, **lora_options)
    if method == "ties":
        if density is None:
            raise ValueError("--method ties needs --density (the fraction of each task vector kept, e.g. 0.2)")
        return merge.ties(base, models, density, weights, scale=1.0 if scale is None else scale, stacked=stacked,
                          **lora_options)
    if p is None:
        raise ValueError("--method dare needs --p (the drop probability, e.g. 0.9)")
    return merge.dare(base, models, p, 0 if seed is None else seed, 1.0 if lambdas is None else lambdas,
                      **lora_options)


def write_model(out, ref: ModelFolder, params: dict, *, max_length: int, overwrite: bool = False,
                dtype: str = "float32") -> pathlib.Path:
    """Write ``params`` as a folder shaped like ``ref`` (config, tokenizer, pooling, head, prompts)."""
    import jax
    import numpy as np

    from embedjax.convert import hf

    host = jax.tree.map(np.asarray, params)
    return hf.export_pretrained(out, ref.config, host["backbone"], ref.path, pooling=ref.settings.pooling,
                                normalize=ref.settings.normalize, max_length=max_length, overwrite=overwrite,
                                dtype=dtype, prompts=ref.settings.prompt_dict,
                                include_prompt=ref.settings.include_prompt, head=ref.head,
                                head_params=host["head"] if ref.head is not None else None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--models", nargs="+", required=True, help="model folders (or 'minilm') to merge")
    p.add_argument("--base", default=None, help="the model they were fine-tuned from (task_arithmetic, ties, dare)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="soup / ties: one weight per model")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help="task_arithmetic / dare: one scalar, or one per model (default 1)")
    p.add_argument("--t", type=float, default=None, help="slerp: 0 = the first model, 1 = the second")
    p.add_argument("--density", type=float, default=None, help="ties: fraction of each task vector kept")
    p.add_argument("--scale", type=float, default=None, help="ties: factor on the merged task vector (lambda; default 1)")
    p.add_argument("--p", type=float, default=None, help="dare: probability of dropping a task-vector entry")
    p.add_argument("--seed", type=int, default=None, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--lora", default=None, choices=["fold", "adapters"],
                   help="with LoRA adapter folders in --models: fold them into --base and write a model folder, or "
                        "merge them into one peft adapter folder")
    p.add_argument("--rank", type=int, default=None,
                   help="--lora adapters: rank of the merged adapter (default: exact concatenation for soup / "
                        "task_arithmetic, the largest input rank for slerp / ties / dare)")
    p.add_argument("--whole-leaf", action="store_true",
                   help="treat a scanned model's stacked layers as one tensor (default: layer by layer, as a "
                        "transformers checkpoint is merged)")
    p.add_argument("--max-length", type=int, default=None, help="max_seq_length of the output (default: the largest input's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights on disk")
    p.add_argument("--overwrite", action="store_true")


def _lambdas(values):
    return None if values is None else (values[0] if len(values) == 1 else values)


def is_adapter_folder(folder) -> bool:
    """A peft LoRA folder (``adapter_config.json``), not a model folder."""
    from embedjax.convert.peft import CONFIG_FILE

    return (pathlib.Path(folder) / CONFIG_FILE).is_file()


def main(args) -> dict:
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")
    adapter_flags = [is_adapter_folder(m) for m in args.models]
    if any(adapter_flags):
        first = adapter_flags.index(True)
        if args.base is None:
            raise ValueError(f"--models[{first}] ({args.models[first]}) is a LoRA adapter folder: pass --base, the model "
                             "it was trained on")
        if args.lora is None:
            raise ValueError(f"--models[{first}] ({args.models[first]}) is a LoRA adapter folder: pass --lora fold (fold "
                             "the adapters into --base, write a model) or --lora adapters (write one merged adapter)")
    elif args.lora is not None:
        raise ValueError(f"--lora {args.lora} was given but no --models folder is a LoRA adapter (adapter_config.json)")
    base = read_model(args.base) if args.base else None
    from embedjax.merge_lora import LoRAAdapter

    models = [LoRAAdapter.from_peft(m, base.config, base.params["backbone"]) if flag else read_model(m)
              for m, flag in zip(args.models, adapter_flags)]
    full = [(m, f"--models[{i}]") for i, (m, flag) in enumerate(zip(models, adapter_flags)) if not flag]
    everyone = [m for m, _ in full] + ([base] if base else [])
    names = [n for _, n in full] + (["--base"] if base else [])
    check_same_model_kind(everyone, names)
    ref = base if any(adapter_flags) else models[0]  # the folder whose tokenizer, pooling and head the output takes
    stacked = None if args.whole_leaf or args.lora == "adapters" else layer_stacking(ref)
    merged = merge_params(args.method, [m if flag else m.params for m, flag in zip(models, adapter_flags)],
                          base.params if base else None, stacked=stacked, weights=args.weights,
                          lambdas=_lambdas(args.lambdas), t=args.t, density=args.density, scale=args.scale, p=args.p,
                          seed=args.seed, lora=args.lora, rank=args.rank)
    summary = {"command": "merge", "method": args.method,
               "models": [str(folder) if flag else str(m.path) for folder, m, flag in zip(args.models, models, adapter_flags)],
               "base": str(base.path) if base else None}
    options = {k: getattr(args, k) for k in ("weights", "lambdas", "t", "density", "scale", "p", "seed", "whole_leaf",
                                             "lora", "rank") if getattr(args, k) not in (None, False)}
    if args.lora == "adapters":
        merged = dataclasses.replace(merged, base_model=merged.base_model or str(base.path))
        written = merged.save_peft(out, base.config, overwrite=args.overwrite)
        errors = merged.truncation_error
        return {**summary, "out": str(written), "output": "peft LoRA adapter", "rank": merged.config.rank,
                "truncation_error_max": max(errors.values()) if errors else 0.0,
                "truncation_error": errors, "options": options}
    max_length = args.max_length or max(m.settings.max_length or m.config.max_position_embeddings
                                        for m in ([m for m, _ in full] or [base]))
    written = write_model(out, ref, merged, max_length=max_length, overwrite=args.overwrite, dtype=args.dtype)
    return {**summary, "out": str(written), "max_length": max_length, "options": options}
