"""The folder a training run exports loads in sentence-transformers and reproduces embedjax."""
import jax
import numpy as np
import orbax.checkpoint as ocp

from embedjax.data.readers import read_sts


def test_exported_run_loads_in_sentence_transformers_with_the_same_embeddings(reference_run, data_dir):
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjax.convert.hf import load_pretrained
    from embedjax.encoder import Encoder
    from embedjax.train.checkpoint import Checkpointer

    workdir, summary, _ = reference_run
    export = summary["export"]
    # The run evaluated its STS slice before and after training and logged both.
    before, after = summary["eval_before"], summary["eval_after"]
    assert set(before) == set(after) and "sts-dev-slice/spearman_cosine" in after
    assert before != after
    s1, s2, _ = read_sts(data_dir / "stsb" / "sts-dev.csv")
    texts = s1[:40] + s2[:40]

    # The exported weights are the trained ones: equal to the final checkpoint's parameters.
    _, exported_params = load_pretrained(export)
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == summary["step"] == 40
    restored = ckpt.manager.restore(40, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ckpt.close()
    for a, b in zip(jax.tree.leaves(exported_params), jax.tree.leaves(restored["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ours = Encoder.from_pretrained(export).encode(texts)
    torch.manual_seed(0)
    reference = SentenceTransformer(export, device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == reference.shape
    cos = np.sum(ours * reference, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.99999, cos.min()
