"""A tiny sentence-transformers folder for the bench smoke tests: MiniLM's tokenizer and modules
on a 2-layer, 16-wide random BERT, so that both libraries load, encode and train it in seconds."""
import json
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory, minilm_dir):
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-st-model")
    for item in minilm_dir.iterdir():
        if item.name in ("model.safetensors", "config.json", "README.md", ".gitattributes"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy)(item, folder / item.name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = 16
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder
