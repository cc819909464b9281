"""Data: readers of the shared formats, tokenization, and the training input pipelines."""
from embedjax.data.readers import DataFormatError, read_beir, read_qrels, read_sts, read_triplets

__all__ = ["DataFormatError", "read_beir", "read_qrels", "read_sts", "read_triplets"]
