"""Export the params of one train checkpoint as a model folder shaped like the base model (config,
tokenizer, pooling), with ``export_info.json`` naming the checkpoint and its step: how the merging experiment gets a parent whose run stopped before its last step
(a run exports only when it completes).

    python experiments/merging/export_checkpoint.py runs/merging/parents/retrieval/checkpoints/25 \
        --out runs/merging/parents/retrieval/export_step25

The checkpoint's ``state`` item is read without a target (host numpy arrays); its ``params`` must be
the encoder tree ``{"backbone": ..., "head": ...}`` of a model with the base's architecture (the
merge checks refuse anything else when the folder is used).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def checkpoint_params(step_dir: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    state_dir = step_dir.absolute() / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir} does not exist: pass a step folder such as WORKDIR/checkpoints/25")
    state = ocp.StandardCheckpointer().restore(state_dir)
    params = state["params"]
    if set(params) != {"backbone", "head"}:
        raise ValueError(f"{state_dir} holds params with keys {sorted(params)}; expected the encoder tree "
                         "{'backbone', 'head'}")
    return params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step folder, WORKDIR/checkpoints/STEP")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default="minilm", help="the folder whose config, tokenizer and pooling to reuse")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)

    from embedjax import merge
    from embedjax.merge_cli import read_model, write_model

    ref = read_model(args.base)
    params = checkpoint_params(pathlib.Path(args.checkpoint))
    merge.check_compatible([ref.params, params], [args.base, args.checkpoint])
    out = write_model(args.out, ref, params, max_length=args.max_length)
    step_dir = pathlib.Path(args.checkpoint)
    config = step_dir.parent.parent / "config.json"  # WORKDIR/config.json, written by the train run
    info = {"checkpoint": str(step_dir), "step": int(step_dir.name),
            "num_steps": json.loads(config.read_text())["train"]["num_steps"] if config.is_file() else None}
    (out / "export_info.json").write_text(json.dumps(info, indent=1) + "\n")  # read by run.py into results.json
    print(json.dumps({**info, "out": str(out)}))


if __name__ == "__main__":
    main()
