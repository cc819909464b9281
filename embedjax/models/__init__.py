"""Models: the BERT encoder, poolers and the ``Encoder`` wrapper."""
from embedjax.models.bert import BertConfig, BertModel
from embedjax.models.encoder import Encoder, embed_batch
from embedjax.models.poolers import POOLERS, pool, select_layers

__all__ = ["BertConfig", "BertModel", "Encoder", "embed_batch", "POOLERS", "pool", "select_layers"]
