"""Search over compressed corpora: exact, low-bit, binary two-stage and sharded."""
from embedjax.index.code_index import CodeIndex
from embedjax.index.compressed import check_quantization, matryoshka, search_embeddings

__all__ = ["CodeIndex", "search_embeddings", "check_quantization", "matryoshka"]
