"""Search over compressed corpora: exact, low-bit, binary two-stage, sharded, filtered and inverted-file."""
from embedjax.index.attributes import AttributeFilter, Attributes, Eq, Range
from embedjax.index.code_index import CodeIndex
from embedjax.index.compressed import check_quantization, matryoshka, search_embeddings
from embedjax.index.filtered import selectivity
from embedjax.index.ivf import IVFIndex
from embedjax.index.kmeans import kmeans

__all__ = ["CodeIndex", "IVFIndex", "search_embeddings", "check_quantization", "matryoshka", "Attributes",
           "AttributeFilter", "Eq", "Range", "selectivity", "kmeans"]
