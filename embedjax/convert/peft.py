"""LoRA adapters <-> peft folders (``adapter_config.json`` + ``adapter_model.safetensors``).

peft stores, for each adapted ``torch.nn.Linear`` (weight ``W [out, in]``), ``lora_A.weight
[r, in]`` and ``lora_B.weight [out, r]`` under ``base_model.model.<module>.``, and the layer adds
``(alpha / r) * B A x``. embedjax's adapters (`embedjax.models.lora`) are ``A [*lead, in, r]`` and
``B [*lead, r, out]`` on the kernel's flattened input/output axes; for every kernel layout the
family tables use (``transpose``, ``heads_in``, ``heads_out``) the HF weight is that flattened
kernel transposed, so ``lora_A.weight = A.T`` and ``lora_B.weight = B.T`` per layer. The module
names come from the family's HF name-map table, never from the family's name.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from embedjax.convert import safetensors_io, tables
from embedjax.jsonfile import read_json_file
from embedjax.models.lora import LoRAConfig, adapter_leaves, path_string
from embedjax.models.registry import family_for_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FACTORED_LAYOUTS = ("transpose", "heads_in", "heads_out")


def _kernel_rules(config) -> dict[tuple[str, ...], list[tables.TensorRule]]:
    """Table rows of kernels, by the module path (kernel path without ``kernel``)."""
    family = family_for_config(config)
    out: dict[tuple[str, ...], list[tables.TensorRule]] = {}
    for rule in family.hf_table(config):
        if rule.flax_path[-1] == "kernel":
            out.setdefault(rule.flax_path[:-1], []).append(rule)
    return out


def _module_name(rule: tables.TensorRule) -> str:
    if not rule.hf_name.endswith(".weight"):
        raise ValueError(f"table row {rule.hf_name} is not a Linear weight; LoRA adapts Linear layers")
    return rule.hf_name[: -len(".weight")]


def _check_layout(rule: tables.TensorRule) -> None:
    if rule.layout not in FACTORED_LAYOUTS:
        raise ValueError(f"{rule.hf_name}: layout {rule.layout!r} is not one whose LoRA factors transpose to peft's "
                         f"(supported: {FACTORED_LAYOUTS})")


def save_peft(folder: str | os.PathLike, adapters, lora: LoRAConfig, config, *, base_model: str = "",
              overwrite: bool = False) -> pathlib.Path:
    """Write ``adapters`` as a peft LoRA folder that ``PeftModel.from_pretrained(AutoModel..., folder)``
    loads; atomic (assembled in a temporary sibling, then renamed)."""
    from embedjax.convert.hf import replace_folder

    out = pathlib.Path(folder)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True")
    rules_by_module = _kernel_rules(config)
    tensors: dict[str, np.ndarray] = {}
    short_names = set()
    for path, a, b in adapter_leaves(adapters):
        rules = rules_by_module.get(path)
        if not rules:
            raise ValueError(f"LoRA adapter at {path_string(path)} has no HF name in the "
                             f"{family_for_config(config).name} table")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for rule in rules:
            _check_layout(rule)
            a_i = a[rule.layer] if rule.layer is not None else a
            b_i = b[rule.layer] if rule.layer is not None else b
            module = _module_name(rule)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
            short_names.add(module.rsplit(".", 1)[-1])
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(short_names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
        safetensors_io.write_file(tmp / WEIGHTS_FILE, tensors)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_adapter_config(folder: pathlib.Path) -> dict:
    path = folder / CONFIG_FILE
    cfg = read_json_file(path, missing=f"a peft adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}; embedjax reads LoRA adapters only")
    refused = {"use_dora": cfg.get("use_dora"), "use_rslora": cfg.get("use_rslora"),
               "fan_in_fan_out": cfg.get("fan_in_fan_out"), "rank_pattern": cfg.get("rank_pattern"),
               "alpha_pattern": cfg.get("alpha_pattern"), "modules_to_save": cfg.get("modules_to_save")}
    set_options = {k: v for k, v in refused.items() if v}
    if set_options:
        raise ValueError(f"{path} sets {sorted(set_options)}, which embedjax's LoRA does not implement (plain LoRA "
                         "with one rank and alpha, scale alpha / r)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg.get('bias')!r}; embedjax's adapters train no biases (use 'none')")
    return cfg


def load_peft(folder: str | os.PathLike, config, backbone=None) -> tuple[dict, LoRAConfig]:
    """``(adapters, LoRAConfig)`` from a peft folder, for a model of ``config``. Tensors naming a
    module the model does not have, or of the wrong shape, are errors listing each (an adapter made
    for another base model fails here). ``backbone`` (optional) checks the kernels exist and sets
    the adapters' dtype to float32 like them."""
    folder = pathlib.Path(folder)
    cfg = _read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (only safetensors adapters are read)")
    family = family_for_config(config)
    base = cfg.get("base_model_name_or_path") or "unnamed"
    raw = safetensors_io.read_file(weights)
    rank = int(cfg.get("r", 8))
    by_module = {_module_name(r): r for rules in _kernel_rules(config).values() for r in rules}
    found: dict[str, dict[str, np.ndarray]] = {}
    problems, unknown = [], set()  # a module is named by its A and its B tensor: list it once
    pattern = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
    for name, value in raw.items():
        stripped = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        for prefix in family.hf_stripped_prefixes:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix):]
                break
        match = pattern.match(stripped)
        if not match:
            problems.append(f"{name}: not a LoRA A/B weight")
            continue
        module, part = match.group("module"), match.group("part")
        if module not in by_module:
            unknown.add(module)
            continue
        found.setdefault(module, {})[part] = np.asarray(value, np.float32)
    if unknown:
        problems.append(f"modules this {family.name} model does not have ({len(unknown)}): "
                        f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}")
    for module, parts in sorted(found.items()):
        out_dim, in_dim = by_module[module].hf_shape
        if set(parts) != {"A", "B"}:
            problems.append(f"{module}: has lora_{'/'.join(sorted(parts))} only; both A and B are needed")
            continue
        if parts["A"].shape != (rank, in_dim):
            problems.append(f"{module}.lora_A: file {parts['A'].shape} vs model (r={rank}, in={in_dim})")
        if parts["B"].shape != (out_dim, rank):
            problems.append(f"{module}.lora_B: file {parts['B'].shape} vs model (out={out_dim}, r={rank})")
    if problems:
        raise ValueError("\n".join([f"the peft adapter {folder} (made for base model {base!r}) does not fit this "
                                    f"{family.name} model:", *[f"  {p}" for p in problems]]))
    if not found:
        raise ValueError(f"the peft adapter {folder} holds no LoRA weights")
    adapters: dict = {}
    targets = []
    for path, rules in sorted(_kernel_rules(config).items()):
        hit = [r for r in rules if _module_name(r) in found]
        if not hit:
            continue
        for rule in hit:
            _check_layout(rule)
        out_dim, in_dim = rules[0].hf_shape
        stacked = rules[0].layer is not None
        count = max(r.layer for r in rules) + 1 if stacked else 1
        a = np.zeros((count, in_dim, rank), np.float32)
        b = np.zeros((count, rank, out_dim), np.float32)  # layers the adapter skips stay exactly zero
        for rule in hit:
            index = rule.layer if stacked else 0
            a[index] = found[_module_name(rule)]["A"].T
            b[index] = found[_module_name(rule)]["B"].T
        node = adapters
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"a": a if stacked else a[0], "b": b if stacked else b[0]}
        targets.append("^" + re.escape(path_string(path + ("kernel",))) + "$")
    if backbone is not None:
        for path, _, _ in adapter_leaves(adapters):
            node = backbone
            for key in path:
                node = node[key]
            if "kernel" not in node:
                raise ValueError(f"the peft adapter targets {path_string(path)}, which has no kernel in the backbone")
    lora = LoRAConfig(rank=rank, alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=tuple(targets))
    return adapters, lora
