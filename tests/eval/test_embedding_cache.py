"""cached_encode: a second call reads the stored embeddings; any change to texts, prompt or weights misses."""
import numpy as np

from embedjax.eval.embedding_cache import cached_encode


class CountingEncoder:
    def __init__(self, scale=1.0):
        self.params = {"w": np.full((2, 3), scale, np.float32)}
        self.calls = 0

    def encode(self, texts, batch_size=64, prompt=None):
        self.calls += 1
        return np.array([[len(t), self.params["w"][0, 0], len(prompt or "")] for t in texts], np.float32)

    def __repr__(self):
        return "CountingEncoder()"


def test_cache_hits_and_misses(tmp_path):
    enc = CountingEncoder()
    first = cached_encode(enc, ["a", "bb"], tmp_path, name="t")
    again = cached_encode(enc, ["a", "bb"], tmp_path, name="t")
    assert enc.calls == 1 and np.array_equal(first, again)
    cached_encode(enc, ["a", "bbb"], tmp_path, name="t")
    cached_encode(enc, ["a", "bb"], tmp_path, name="t", prompt="query: ")
    assert enc.calls == 3
    other = CountingEncoder(scale=2.0)  # same texts, different weights
    assert cached_encode(other, ["a", "bb"], tmp_path, name="t")[0, 1] == 2.0 and other.calls == 1
    assert len(list(tmp_path.glob("t-*.npy"))) == 4 and not list(tmp_path.glob(".*tmp*"))
