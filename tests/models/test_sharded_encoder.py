"""Sharded inference: parameters stay split over the mesh by the logical rules, batches split over
the data axes, and 8 fake CPU devices give the embeddings of 1 (float32, different reduction
orders across shards: atol 2e-6 on unit-norm rows)."""
import numpy as np
from jax.sharding import PartitionSpec as P

import embedjax as ej
from embedjax.sharding import make_mesh

TEXTS = ["A man is playing a flute.", "A dog runs in the park with a ball", "Short", "",
         "The quick brown fox jumps over the lazy dog " * 4, "query: sharded inference", "x"]


def test_minilm_on_eight_devices_equals_one(minilm_dir, minilm_encoder):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = ej.Encoder.from_pretrained(minilm_dir, mesh=mesh, rules="fsdp_tensor")
    q_kernel = sharded.params["backbone"]["layers"]["attention"]["q"]["kernel"]  # [layers, embed, heads, kv]
    assert q_kernel.sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded.params["backbone"]["layers"]["mlp"]["mlp_in"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    single = minilm_encoder.encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(sharded.encode(TEXTS, batch_size=3), single, atol=2e-6)


def test_a_decoder_on_eight_devices_equals_one(tmp_path):
    from decoder_fixtures import save_tiny_decoder  # sibling helper

    folder = save_tiny_decoder(tmp_path / "llama", "llama")
    texts = ["the man plays the flute", "a dog runs in the park", "cat"]
    single = ej.Encoder.from_pretrained(folder, pooling="lasttoken").encode(texts)
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    sharded = ej.Encoder.from_pretrained(folder, pooling="lasttoken", mesh=mesh, rules="fsdp")
    assert sharded.params["backbone"]["layers"]["mlp"]["gate"]["kernel"].sharding.spec == P(None, "fsdp", None)
    np.testing.assert_allclose(sharded.encode(texts), single, atol=2e-6)
