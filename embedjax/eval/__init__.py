"""Evaluation: STS correlation, retrieval metrics, and (``embedjax.eval.analysis``) embedding analysis."""
import importlib

from embedjax.eval.metrics import retrieval_metrics
from embedjax.eval.retrieval import document_text, retrieval, retrieval_from_embeddings
from embedjax.eval.sts import sts, sts_scores

__all__ = ["document_text", "retrieval", "retrieval_from_embeddings", "retrieval_metrics", "sts", "sts_scores"]


def __getattr__(name):
    if name in {"analysis", "embedding_report", "limit", "querybank", "retention", "significance", "zero_shot"}:
        return importlib.import_module(f"embedjax.eval.{name}")
    raise AttributeError(f"module 'embedjax.eval' has no attribute {name!r}")
