"""Image-text LiT on real scans (issue 14's evaluation; `experiments/image_text/run.py` runs it).

    python experiments/image_text/run.py --scale smoke   # this file's "smoke" (2 CPU cores, minutes)
    python experiments/image_text/run.py --scale quick   # "quick": smoke cut short for a shared CPU
    python experiments/image_text/run.py --scale full    # "full" (an accelerator)
    python experiments/image_text/run.py --scale check   # tiny end-to-end run (the runner's test)

A small ViT trained from scratch on scikit-learn's digits (8x8 scans, upscaled to 16x16 by the
image processor, 4x4-pixel patches: a 4x4 grid, 16 patches + a class token) against a LOCKED
all-MiniLM-L6-v2 text tower (LiT): the image tower's pooled class token is projected linearly
into MiniLM's 384-d space; the text side is MiniLM's own normalised sentence embedding, with no
trainable projection. Grid: loss {clip, siglip} x {dense, ring on 8 fake devices}, each over
``seeds``, plus the untrained ViT (chance-level reference).

Sizes (a ViT block is ~2 x 12 d^2 FLOP per token forward plus attention; training ~3x forward):
  smoke  d=48, 2 layers, 17 tokens: ~1.9 MFLOP per image forward, ~6 MFLOP per image trained;
         200 steps of batch 64 (~9 epochs) = 12,800 images ~ 77 GFLOP per run, 4 configs x 5 seeds
         = 20 runs ~ 1.5 TFLOP: minutes on 2 idle cores (~50 steps/s dense), most of it compiling
         the 4 steps; on a CPU shared at nice 19 (~2 s a step) over an hour.
  quick  smoke at 80 steps, lr 3e-3 (8 warmup steps), 3 seeds: 12 runs ~ 0.4 TFLOP.
  full   d=192, 6 layers, 32x32 pixels with 4x4 patches (64 patches): ~200 MFLOP per image forward;
         3,000 steps of batch 1,024 on the same 1,437 training scans (~2,100 epochs: overfitting
         territory; the point of `full` is the shape of a real run, not more digits).
  check  d=32, 1 layer, 6 steps, 2 seeds, 240 training scans (the runner's smoke test).

Keys reach code as keyword arguments: ``data`` -> `prepare_splits`, ``model`` -> `VisionSpec`
(the projection width is the text tower's, 384), ``train`` -> `train_and_evaluate`; ``seeds``,
``losses`` and ``ring_devices`` shape the grid (all in experiments/image_text/run.py).
"""
import ml_collections

SCALES = ("smoke", "quick", "full", "check")


def get_config(arg: str = "smoke"):
    if arg not in SCALES:
        raise ValueError(f"unknown image_text.py argument {arg!r}: use one of {SCALES}")
    c = ml_collections.ConfigDict()
    c.seeds = (0, 1, 2, 3, 4)
    c.losses = ("clip", "siglip")
    c.ring_devices = 8  # ring runs shard the global batch's loss over this many devices
    c.data = ml_collections.ConfigDict(dict(
        split_seed=0,  # stratified 80/20 train / held-out split of the 1,797 scans
        held_out_fraction=0.2,
        image_size=16,  # the processor upscales 8x8 -> image_size x image_size (PIL bicubic)
        max_train_images=0,  # 0: all of the train split (check scale: a stratified subset)
    ))
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=48, num_layers=2, num_heads=4, intermediate_size=192, patch_size=4,
        activation="gelu", layer_norm_eps=1e-6, class_token=True, pooling="cls",
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=200, batch_size=64, learning_rate=1e-3, warmup_steps=20, weight_decay=1e-4,
        eval_every=20,  # held-out zero-shot curve points (measured only, never used to pick a model)
    ))
    if arg == "full":
        c.data.image_size = 32
        c.model.update(hidden_size=192, num_layers=6, num_heads=3, intermediate_size=768, patch_size=4)
        c.train.update(steps=3000, batch_size=1024, learning_rate=5e-4, warmup_steps=300, eval_every=250)
    elif arg == "quick":  # smoke cut to fit a CPU shared at nice 19 (the first complete grid)
        c.seeds = (0, 1, 2)
        c.train.update(steps=80, learning_rate=3e-3, warmup_steps=8)
    elif arg == "check":
        c.seeds = (0, 1)
        c.data.max_train_images = 240
        c.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        c.train.update(steps=6, batch_size=32, warmup_steps=2, eval_every=3)
    return c
