"""How far apart the two parents are: per-tensor cosine between their weights (what SLERP interpolates;
``embedjax.merge.slerp`` falls back to linear interpolation where |cos| > 0.9995), the task vectors'
norms and the cosine between the task vectors. Reads the folders' safetensors (one tensor per layer,
the slices SLERP works on) in float64; writes ``parent_geometry.json`` beside this file.

    python experiments/merging/parent_geometry.py --stsb-parent runs/merging/parents/stsb/export \
        --retrieval-parent runs/merging/parents/retrieval/export_step25
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

SLERP_LINEAR_ABOVE = 0.9995  # embedjax.merge.slerp's fallback threshold on |cos|


def tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from embedjax.models.pretrained import resolve_model_dir

    path = pathlib.Path(resolve_model_dir(folder))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {path}")
    out = {}
    for f in files:
        out.update({k: v.astype(np.float64) for k, v in load_file(f).items()})
    return out


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return float(x.ravel() @ y.ravel() / (nx * ny)) if nx and ny else 1.0


def geometry(base: dict, a: dict, b: dict) -> dict:
    names = sorted(set(base) & set(a) & set(b))
    if not names or set(a) != set(b):
        raise ValueError("the parents must hold the same tensors as each other and share tensors with the base")
    cos = np.array([cosine(a[k], b[k]) for k in names])
    ta = np.concatenate([(a[k] - base[k]).ravel() for k in names])
    tb = np.concatenate([(b[k] - base[k]).ravel() for k in names])
    return {"tensors": len(names),
            "parent_cosine_min": float(cos.min()), "parent_cosine_median": float(np.median(cos)),
            "fraction_linear_in_slerp": float((np.abs(cos) > SLERP_LINEAR_ABOVE).mean()),
            "slerp_linear_above": SLERP_LINEAR_ABOVE,
            "task_vector_norm_stsb": float(np.linalg.norm(ta)), "task_vector_norm_retrieval": float(np.linalg.norm(tb)),
            "task_vector_cosine": cosine(ta, tb),
            "base_norm": float(np.sqrt(sum((base[k] ** 2).sum() for k in names)))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--stsb-parent", required=True)
    parser.add_argument("--retrieval-parent", required=True)
    parser.add_argument("--out", default=str(HERE / "parent_geometry.json"))
    args = parser.parse_args(argv)

    from embedjax import provenance

    record = geometry(tensors(args.base), tensors(args.stsb_parent), tensors(args.retrieval_parent))
    provenance.write_artifact(args.out, {"base": args.base, "stsb_parent": args.stsb_parent,
                                         "retrieval_parent": args.retrieval_parent, **record})
    print(json.dumps(record))


if __name__ == "__main__":
    main()
