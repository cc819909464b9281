"""Image-text evaluation on real scans (issue 14): a small ViT trained from scratch against a locked
all-MiniLM-L6-v2 (LiT) on scikit-learn's digits; zero-shot top-1 and image<->text recall@1 on a
held-out split; CLIP vs SigLIP loss and the exact ring vs the dense loss, over seeds, with paired
tests; the untrained ViT as the chance-level reference.

    python experiments/image_text/run.py --scale smoke   # configs/image_text.py smoke (2 CPU cores: minutes)
    python experiments/image_text/run.py --scale full    # accelerator sizes
    python experiments/image_text/run.py --scale check --runs /tmp/x --out /tmp/y   # tiny (its test)

Data path (the library's own): the stratified train / held-out split (seed 0, 80/20) is written as
8x8 PNG files + captions.jsonl under RUNS/data/<split> (not committed), built into ArrayRecord by
`embedjax.data.image_builders.prepare_image_captions`, read back with grain (`image_caption_dataset`:
decode + `ImageProcessor` upscaling to the config's size), then cached as arrays (RUNS/data/*.npz):
the step loop samples batches from those arrays. Training never reads the held-out folder.

The text tower is locked, so each distinct caption is embedded once with `embedjax.Encoder` (MiniLM's
normalised mean-pooled embedding) and the objective's text tower is a lookup into that table
(`embedjax.train.two_tower.precomputed_tower`).

Runs are skipped when RUNS/<scale>/<config>/seed<k>.json exists (resumable). Writes (``--out``,
default here): results.json, per_seed/*.json, table.md, zero_shot.png, curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "configs")]  # this checkout's embedjax and configs

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the number word, {n}: the numeral. Several phrasings so the prototypes average over wording.
TEMPLATES = (
    "a photo of the digit {w}",
    "a scan of a handwritten {n}",
    "a handwritten {w}",
    "the number {n}",
    "a blurry image of the digit {w}",
    "a low resolution scan of the number {n}",
    "a picture of a {w}",
    "digit: {n}",
)
NUM_CLASSES = 10
UNTRAINED = "untrained"
METRICS = ("zero_shot_top1", "i2t_r1", "t2i_r1")


def caption_text(label: int, template: int) -> str:
    return TEMPLATES[template].format(w=NUMBER_WORDS[label], n=label)


def all_captions() -> list[str]:
    """Every distinct caption; caption id = label * len(TEMPLATES) + template."""
    return [caption_text(c, t) for c in range(NUM_CLASSES) for t in range(len(TEMPLATES))]


def config_names(losses) -> list[str]:
    return [UNTRAINED] + [f"{loss}-{kind}" for kind in ("dense", "ring") for loss in losses]


# ------------------------------------------------------------------------------------------ data


def split_indices(labels, *, split_seed: int, held_out_fraction: float, max_train_images: int):
    """Stratified ``(train, held_out)`` index arrays of the digits; disjoint by construction (checked)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    train, held_out = train_test_split(np.arange(len(labels)), test_size=held_out_fraction, stratify=labels,
                                       random_state=split_seed)
    if max_train_images:
        train, _ = train_test_split(train, train_size=max_train_images, stratify=labels[train],
                                    random_state=split_seed)
    if set(train.tolist()) & set(held_out.tolist()):
        raise AssertionError("train and held-out splits overlap")
    return np.sort(train), np.sort(held_out)


def write_caption_folder(folder: pathlib.Path, images_n88, labels, indices, *, seed: int) -> None:
    """``folder/<index>.png`` (8-bit greyscale, 0..16 scaled to 0..255) + captions.jsonl, one caption
    per image: template ``(rank + seed) % T`` within its class (balanced). Written once, atomically
    (the builder fingerprints file times, so an existing folder is left as it is)."""
    import shutil

    import numpy as np
    from PIL import Image

    if (folder / "captions.jsonl").is_file():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rank = np.zeros(NUM_CLASSES, int)
    lines = []
    for i in indices:
        label = int(labels[i])
        template = int((rank[label] + seed) % len(TEMPLATES))
        rank[label] += 1
        pixels = np.round(images_n88[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(tmp / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"{i:04d}.png", "caption": caption_text(label, template)}))
    (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(folder)


def processor_for(image_size: int):
    from embedjax.data.images import ImageProcessor

    return ImageProcessor.from_dict({"size": {"height": image_size, "width": image_size}, "resample": 3,
                                     "image_mean": 0.5, "image_std": 0.5})


def load_split(folder: pathlib.Path, cache: pathlib.Path, processor, labels) -> dict:
    """The folder through the TFDS builder and grain -> ``{"pixels" [N,H,W,3], "labels", "caption_ids",
    "index"}`` arrays, cached as ``cache`` (.npz)."""
    import numpy as np

    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from embedjax.data.image_builders import image_caption_dataset, prepare_image_captions

    builder = prepare_image_captions(folder, cache_dir=folder.parent / "tfds")
    ids = {text: i for i, text in enumerate(all_captions())}
    rows = [row for row in image_caption_dataset(builder, processor)]
    rows.sort(key=lambda r: r["image_path"])  # TFDS order is its own; fix one
    index = np.asarray([int(r["image_path"].split(".")[0]) for r in rows])
    out = {"pixels": np.stack([r["pixels"] for r in rows]).astype(np.float32), "labels": labels[index],
           "caption_ids": np.asarray([ids[r["caption"]] for r in rows]), "index": index}
    if not np.array_equal(out["caption_ids"] // len(TEMPLATES), out["labels"]):
        raise AssertionError(f"{folder}: a caption names the wrong digit")
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.rename(cache)
    return out


def prepare_splits(runs: pathlib.Path, *, split_seed: int, held_out_fraction: float, image_size: int,
                   max_train_images: int) -> dict:
    """``{"train": arrays, "held_out": arrays, "exact_duplicates": int}`` (see `load_split`)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, held_out = split_indices(labels, split_seed=split_seed, held_out_fraction=held_out_fraction,
                                    max_train_images=max_train_images)
    tag = f"seed{split_seed}-f{held_out_fraction}-n{max_train_images or len(train)}"
    processor = processor_for(image_size)
    out = {}
    for split, indices in (("train", train), ("held_out", held_out)):
        folder = runs / "data" / tag / split
        write_caption_folder(folder, digits.images, labels, indices, seed=split_seed)
        out[split] = load_split(folder, runs / "data" / tag / f"{split}-{image_size}px.npz", processor, labels)
    train_rows = {digits.images[i].tobytes() for i in out["train"]["index"]}
    out["exact_duplicates"] = int(sum(digits.images[i].tobytes() in train_rows for i in out["held_out"]["index"]))
    return out


def caption_table(runs: pathlib.Path):
    """float32 [C*T, 384]: every caption through the locked MiniLM (`Encoder.encode`), cached."""
    import numpy as np

    captions = all_captions()
    path = runs / "data" / "minilm_captions.npz"
    if path.is_file():
        with np.load(path) as z:
            if list(z["captions"]) == captions:
                return z["embeddings"]
    from embedjax import Encoder
    from embedjax.models.pretrained import minilm_path

    embeddings = Encoder.from_pretrained(minilm_path()).encode(captions, batch_size=len(captions))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, captions=np.asarray(captions), embeddings=embeddings)
    tmp.rename(path)
    return embeddings


# ------------------------------------------------------------------------------ model and training


def build_image_tower(model: dict, image_size: int, text_dim: int):
    from embedjax.models.towers.vision import ProjectedImageTower, VisionSpec

    spec = VisionSpec(image_size=image_size, **model)
    return ProjectedImageTower(spec, projection_dim=text_dim)


LOGIT_INIT = {"clip": {"log_scale": 2.6592600369644165},  # log(1 / 0.07), CLIP's init
              "siglip": {"log_scale": 2.302585092994046, "bias": -10.0}}  # log 10 and -10 (SigLIP paper)


def init_params(tower, loss: str, seed: int, image_size: int):
    import jax
    import jax.numpy as jnp
    from flax.linen import meta

    pixels = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    image = meta.unbox(tower.init(jax.random.PRNGKey(seed), pixels)["params"])
    logit = {k: jnp.float32(v) for k, v in LOGIT_INIT[loss].items()}
    return {"text": {}, "image": image, "logit": logit}


def batch_order(num_train: int, batch_size: int, steps: int, seed: int):
    """int [steps, batch_size] row indices: seeded epochs of a permutation, the last partial batch of an
    epoch dropped (every step sees ``batch_size`` distinct images)."""
    import numpy as np

    if batch_size > num_train:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_train} training images")
    rng = np.random.default_rng(seed)
    per_epoch = num_train // batch_size
    rows = []
    while len(rows) < steps:
        perm = rng.permutation(num_train)
        rows += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return np.stack(rows[:steps])


def evaluate(embed_images, params, held_out: dict, text_cd) -> dict:
    """Per-query 0/1 hits on the held-out split: zero-shot top-1 and image->text recall@1 per image,
    text->image recall@1 per distinct held-out caption (see the README for how hits are counted),
    plus the image features. ``embed_images``: jitted ``(image params, pixels, rng) -> [N, D]``."""
    import numpy as np

    from embedjax.eval.zero_shot import class_prototypes, top1_class_hits

    image_nd = np.asarray(embed_images(params["image"], held_out["pixels"], None))
    t = len(TEMPLATES)
    prototypes = class_prototypes(text_cd.reshape(NUM_CLASSES, t, -1))
    pool = np.unique(held_out["caption_ids"])  # the distinct captions of the held-out pairs
    image_ids = [str(i) for i in held_out["index"]]
    labels = held_out["labels"]
    return {
        "per_query": {
            "zero_shot_top1": dict(zip(image_ids, top1_class_hits(image_nd, prototypes, labels, np.arange(10)))),
            "i2t_r1": dict(zip(image_ids, top1_class_hits(image_nd, text_cd[pool], labels, pool // t))),
            "t2i_r1": dict(zip([str(c) for c in pool], top1_class_hits(text_cd[pool], image_nd, pool // t, labels))),
        },
        "features": image_nd,
    }


def train_and_evaluate(data: dict, text_cd, tower, image_fn, embed_images, *, loss: str, mesh, seed: int, image_size: int, steps: int,
                       batch_size: int, learning_rate: float, warmup_steps: int, weight_decay: float,
                       eval_every: int, step_cache: dict) -> dict:
    """Train one seed (``steps=0``: the untrained reference) and evaluate it on the held-out split.
    ``image_fn`` is ``module_tower(tower)`` and ``embed_images`` its jit, made once per process so that
    seeds reuse the compiled programs (``step_cache`` holds the compiled steps)."""
    import jax
    import numpy as np
    import optax
    from tqdm import tqdm

    from embedjax.train import two_tower as tt

    params = init_params(tower, loss, seed, image_size)
    curve = []
    if steps:
        key = (loss, mesh is not None)
        if key not in step_cache:
            objective = tt.TwoTowerObjective(tt.precomputed_tower(text_cd), image_fn, loss=loss, locked=("text",),
                                             mesh=mesh)
            schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps)
            optimizer = tt.make_optimizer(schedule, locked=("text",), weight_decay=weight_decay)
            step_cache[key] = (optimizer, jax.jit(tt.make_train_step(objective, optimizer)))
        optimizer, step = step_cache[key]
        opt_state = optimizer.init(params)
        train = data["train"]
        order = batch_order(len(train["labels"]), batch_size, steps, seed)
        losses = []
        for i in tqdm(range(steps), desc=f"{loss}{'-ring' if mesh is not None else ''} seed {seed}", leave=False):
            rows = order[i]
            batch = {"tokens": train["caption_ids"][rows], "pixels": train["pixels"][rows]}
            params, opt_state, metrics = step(params, opt_state, batch, None)
            losses.append(float(metrics["loss"]))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"{loss} seed {seed}: loss {losses[-1]} at step {i}")
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                hits = evaluate(embed_images, params, data["held_out"], text_cd)["per_query"]["zero_shot_top1"]
                curve.append({"step": i + 1, "loss": losses[-1], "logit_scale": float(metrics["logit_scale"]),
                              "logit_bias": float(metrics["logit_bias"]),
                              "zero_shot_top1": 100 * float(np.mean(list(hits.values())))})
    else:
        losses = []
    result = evaluate(embed_images, params, data["held_out"], text_cd)
    per_query = {m: {q: 100 * v for q, v in table.items()} for m, table in result["per_query"].items()}
    return {"losses": losses, "curve": curve, "per_query": per_query, "features": result["features"],
            "metrics": {m: float(np.mean(list(t.values()))) for m, t in per_query.items()}}


# ------------------------------------------------------------------------------------- the grid


def run_grid(config, runs: pathlib.Path, scale: str, *, train: bool = True) -> list[dict]:
    """Every (config, seed) run, seed by seed (a stopped sweep has whole seeds), skipping runs already
    on disk; returns their records. ``train=False``: only the finished runs."""
    import jax
    import numpy as np

    from embedjax import provenance

    settings = config.to_dict()
    data_kw, model_kw, train_kw = settings["data"], settings["model"], settings["train"]
    data = prepare_splits(runs, **data_kw)
    text_cd = caption_table(runs)
    tower = build_image_tower(model_kw, data_kw["image_size"], text_cd.shape[1])
    mesh = jax.make_mesh((settings["ring_devices"],), ("data",))
    from embedjax.train.two_tower import module_tower

    image_fn = module_tower(tower)
    embed_images = jax.jit(image_fn)
    records, step_cache = [], {}
    for seed in settings["seeds"]:
        for name in config_names(settings["losses"]):
            loss, _, kind = name.partition("-")
            path = runs / scale / name / f"seed{seed}.json"
            if path.is_file():
                records.append(json.loads(path.read_text()))
                continue
            if not train:
                continue
            start = time.time()
            out = train_and_evaluate(
                data, text_cd, tower, image_fn, embed_images, loss="clip" if name == UNTRAINED else loss,
                mesh=mesh if kind == "ring" else None, seed=seed, image_size=data_kw["image_size"],
                step_cache=step_cache, **{**train_kw, "steps": 0 if name == UNTRAINED else train_kw["steps"]})
            record = {**provenance.provenance(), "config": name, "loss": None if name == UNTRAINED else loss, "ring": kind == "ring",
                      "seed": seed, "steps": 0 if name == UNTRAINED else train_kw["steps"],
                      "final_loss": out["losses"][-1] if out["losses"] else None, "losses": out["losses"],
                      "curve": out["curve"], "metrics": out["metrics"], "per_query": out["per_query"],
                      "num_train": int(len(data["train"]["labels"])),
                      "num_held_out": int(len(data["held_out"]["labels"])),
                      "held_out_exact_duplicates_of_train": data["exact_duplicates"],
                      "wall_seconds_under_load": round(time.time() - start, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.with_suffix(".features.npy"), out["features"])
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.rename(path)
            print(json.dumps({"run": name, "seed": seed, **record["metrics"], "final_loss": record["final_loss"]}),
                  flush=True)
            records.append(record)
    return records


def ring_dense_gaps(records: list[dict], runs: pathlib.Path, scale: str) -> list[dict]:
    """Per loss and seed, how far the ring run is from the dense run with the same seed and batches:
    the largest loss difference over all steps, the largest held-out feature difference, and the
    number of held-out images whose zero-shot hit differs."""
    import numpy as np

    by = {(r["config"], r["seed"]): r for r in records}
    gaps = []
    for (name, seed), ring in sorted(by.items()):
        if not ring["ring"]:
            continue
        dense = by.get((name.replace("-ring", "-dense"), seed))
        if dense is None:
            continue
        f_ring = np.load(runs / scale / name / f"seed{seed}.features.npy")
        f_dense = np.load(runs / scale / dense["config"] / f"seed{seed}.features.npy")
        zs_r, zs_d = ring["per_query"]["zero_shot_top1"], dense["per_query"]["zero_shot_top1"]
        gaps.append({"loss": ring["loss"], "seed": seed,
                     "max_abs_loss_diff": float(np.max(np.abs(np.subtract(ring["losses"], dense["losses"])))),
                     "first_step_loss_diff": float(abs(ring["losses"][0] - dense["losses"][0])),
                     "max_abs_feature_diff": float(np.max(np.abs(f_ring - f_dense))),
                     "feature_scale": float(np.max(np.abs(f_dense))),
                     "zero_shot_hits_differing": int(sum(zs_r[q] != zs_d[q] for q in zs_d))})
    return gaps


COMPARISONS = (  # (baseline, value, what it tests)
    ("clip-dense", "siglip-dense", "SigLIP vs CLIP loss (dense)"),
    ("clip-ring", "siglip-ring", "SigLIP vs CLIP loss (ring)"),
    ("clip-dense", "clip-ring", "ring vs dense (CLIP)"),
    ("siglip-dense", "siglip-ring", "ring vs dense (SigLIP)"),
    (UNTRAINED, "clip-dense", "trained vs untrained ViT (CLIP)"),
    (UNTRAINED, "siglip-dense", "trained vs untrained ViT (SigLIP)"),
)


def summarise(records: list[dict], gaps: list[dict]) -> dict:
    """Mean +- std over seeds per config and metric, and paired permutation tests on seed-averaged
    per-query hits (`embedjax.results.paired_test`)."""
    from embedjax import results

    groups: dict = {}
    for r in records:
        groups.setdefault(r["config"], []).append(r)
    table = {}
    for name, members in groups.items():
        row = {"seeds": [m["seed"] for m in members], "num_seeds": len(members)}
        for metric in METRICS:
            values = [m["metrics"][metric] for m in members]
            mean, std = results.mean_std(values)
            row[metric] = {"mean": mean, "std": std, "per_seed": values}
        if members[0]["final_loss"] is not None:
            row["final_loss"] = dict(zip(("mean", "std"), results.mean_std([m["final_loss"] for m in members])))
        table[name] = row
    run_test = results.paired_test_fn("permutation")
    tests = []
    for a, b, what in COMPARISONS:
        if a not in groups or b not in groups:
            continue
        for metric in METRICS:
            out = results.paired_test(run_test, groups[a], metric, groups[b], metric, num_samples=10_000, seed=0)
            tests.append({"comparison": what, "baseline": a, "value": b, "metric": metric, **out})
    return {"configs": table, "paired_tests": tests, "ring_vs_dense": gaps}


def table_markdown(summary: dict, meta: dict) -> str:
    """The README's tables; every row links the part of results.json that holds its figures."""
    lines = [f"Held-out digits: [json](results.json#/meta) {meta['num_held_out']} images and "
             f"{meta['num_t2i_queries']} distinct captions (the t->i queries); {meta['num_train']} training "
             "images. Mean ± std over seeds, each score 0-100.", "",
             "| config | seeds | zero-shot top-1 | i->t R@1 | t->i R@1 | final train loss | artifact |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary["configs"].items():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in METRICS]
        loss = f"{row['final_loss']['mean']:.4f} ± {row['final_loss']['std']:.4f}" if "final_loss" in row else "-"
        lines.append(f"| {name} | {row['num_seeds']} | " + " | ".join(cells) +
                     f" | {loss} | [json](results.json#/configs/{name}) |")
    lines += ["", "Paired permutation tests (10,000 samples) on per-query hits averaged over seeds:", "",
              "| comparison | metric | baseline | value | diff [95% CI] | p | queries | artifact |",
              "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(summary["paired_tests"]):
        lines.append(f"| {t['comparison']} | {t['metric']} | {t['mean_a']:.2f} | {t['mean_b']:.2f} | "
                     f"{t['mean_difference']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}] | {t['p_value']:.4g} | "
                     f"{t['num_queries']} | [json](results.json#/paired_tests/{i}) |")
    lines += ["", "Ring (8 fake devices) vs dense, same seed, initialisation and batches:", "",
              "| loss | seed | max abs loss diff (all steps) | max abs feature diff | feature max | zero-shot hits "
              "differing | artifact |", "|---|---|---|---|---|---|---|"]
    for i, g in enumerate(summary["ring_vs_dense"]):
        lines.append(f"| {g['loss']} | {g['seed']} | {g['max_abs_loss_diff']:.3g} | {g['max_abs_feature_diff']:.3g} | "
                     f"{g['feature_scale']:.3g} | {g['zero_shot_hits_differing']} | "
                     f"[json](results.json#/ring_vs_dense/{i}) |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], summary: dict, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["configs"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for x, name in enumerate(names):
        row = summary["configs"][name]["zero_shot_top1"]
        ax.bar(x, row["mean"], color="#9ab" if name == UNTRAINED else "#48a", alpha=0.8)
        ax.scatter(np.full(len(row["per_seed"]), x) + np.linspace(-0.15, 0.15, len(row["per_seed"])),
                   row["per_seed"], color="k", s=12, zorder=3)
    ax.axhline(10, color="r", ls="--", lw=1, label="chance (10%)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left")
    ax.set_title("LiT on digits: ViT from scratch vs locked MiniLM (dots: seeds)")
    fig.tight_layout()
    fig.savefig(out / "zero_shot.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = {"clip-dense": "#48a", "clip-ring": "#8bd", "siglip-dense": "#c63", "siglip-ring": "#eb8"}
    for r in records:
        if r["config"] == UNTRAINED:
            continue
        steps = [c["step"] for c in r["curve"]]
        label = r["config"] if r["seed"] == records[-1]["seed"] else None
        axes[0].plot(np.arange(1, len(r["losses"]) + 1), r["losses"], color=colours[r["config"]], lw=0.6, alpha=0.7,
                     label=label)
        axes[1].plot(steps, [c["zero_shot_top1"] for c in r["curve"]], color=colours[r["config"]], lw=0.8,
                     alpha=0.8, marker=".", label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (each loss on its own scale)")
    axes[0].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out zero-shot top-1 (%)")
    axes[1].axhline(10, color="r", ls="--", lw=1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["zero_shot.png", "curves.png"]


def caption_cosines(text_cd) -> dict:
    """Mean cosine between the locked caption embeddings: same digit (other template) and other digit
    (how far apart the fixed text targets are; the image tower can only separate what these separate)."""
    import numpy as np

    unit = text_cd / np.linalg.norm(text_cd, axis=1, keepdims=True)
    sims = unit @ unit.T
    label = np.arange(len(text_cd)) // len(TEMPLATES)
    same = (label[:, None] == label[None]) & ~np.eye(len(text_cd), dtype=bool)
    other = label[:, None] != label[None]
    return {"same_digit_mean": float(sims[same].mean()), "other_digit_mean": float(sims[other].mean()),
            "other_digit_max": float(sims[other].max())}


def write_artifacts(records: list[dict], summary: dict, out: pathlib.Path, scale: str, settings: dict,
                    text_cd) -> dict:
    from embedjax import provenance

    out.mkdir(parents=True, exist_ok=True)
    per_seed = out / "per_seed"
    per_seed.mkdir(exist_ok=True)
    for r in records:
        small = {k: v for k, v in r.items() if k != "losses"}
        small["losses_every_10"] = r["losses"][9::10]
        provenance.write_artifact(per_seed / f"{r['config']}_seed{r['seed']}.json", small)
    first = records[0]
    meta = {"scale": scale, "caption_cosines": caption_cosines(text_cd),
            "num_train": first["num_train"], "num_held_out": first["num_held_out"],
            "num_t2i_queries": len(first["per_query"]["t2i_r1"]),
            "held_out_exact_duplicates_of_train": first["held_out_exact_duplicates_of_train"],
            "templates": list(TEMPLATES), "settings": settings}
    provenance.write_artifact(out / "results.json", {"meta": meta, **summary})
    (out / "table.md").write_text(table_markdown(summary, meta))
    plots = plot(records, summary, out)
    return {"meta": meta, "plots": plots}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="smoke", choices=("smoke", "quick", "full", "check"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "image_text"))
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    parser.add_argument("--aggregate-only", action="store_true",
                        help="write the artifacts from the runs already finished, train nothing")
    args = parser.parse_args(argv)
    import image_text as configs

    config = configs.get_config(args.scale)
    flag = f"--xla_force_host_platform_device_count={config.ring_devices}"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax

    if jax.device_count() < config.ring_devices:
        raise RuntimeError(f"the ring runs need {config.ring_devices} devices, jax sees {jax.device_count()}: set "
                           f"XLA_FLAGS={flag} before jax is imported")
    runs = pathlib.Path(args.runs)
    # Compiled steps persist across sittings, so a resumed grid does not recompile (speed only).
    jax.config.update("jax_compilation_cache_dir", str(runs / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    records = run_grid(config, runs, args.scale, train=not args.aggregate_only)
    if not records:
        raise RuntimeError(f"no finished runs under {runs / args.scale}")
    summary = summarise(records, ring_dense_gaps(records, runs, args.scale))
    written = write_artifacts(records, summary, pathlib.Path(args.out), args.scale, config.to_dict(),
                              caption_table(runs))
    brief = {name: round(row["zero_shot_top1"]["mean"], 2) for name, row in summary["configs"].items()}
    result = {"scale": args.scale, "zero_shot_top1_mean": brief, "out": args.out, **written["meta"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
