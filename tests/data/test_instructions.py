"""Instruction-aware training: per-source prompts from templates, prompt tokens kept out of pooling
in training batches (include_prompt=False), and the exported folder's prompts behaving the same in
sentence-transformers (encode with prompt_name) as in embedjax (encode_query)."""
import json

import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf
from embedjax.data.instructions import check_template, export_prompts, source_prompts
from embedjax.data.pipeline import DatasetSpec, build_train_data

TEMPLATE = "Instruct: {task}\nQuery:"


def test_prompts_per_source_and_bad_templates():
    prompts = source_prompts(["runs/x/scifact-train.jsonl", "nli/triplets.tsv"], query_template=TEMPLATE,
                             tasks={"scifact-train": "Given a claim, find evidence", "triplets": "Find entailments"})
    assert prompts == [("Instruct: Given a claim, find evidence\nQuery:", None),
                       ("Instruct: Find entailments\nQuery:", None)]
    assert source_prompts(["a.jsonl"]) == [(None, None)]
    assert export_prompts(["scifact.jsonl", "nli.jsonl"], prompts) == {
        "scifact_query": prompts[0][0], "nli_query": prompts[1][0], "query": prompts[0][0]}
    with pytest.raises(ValueError, match=r"data.query_instruction='Instruct: \\nQuery:' has no \{task\} field"):
        source_prompts(["a.jsonl"], query_template="Instruct: \nQuery:", tasks={"a": "x"})
    with pytest.raises(ValueError, match=r"has fields \['name'\] besides \{task\}"):
        check_template("Instruct: {task} {name}", "data.query_instruction")
    with pytest.raises(ValueError, match=r"data.tasks has no task for source\(s\) \['b'\]"):
        source_prompts(["a.jsonl", "b.jsonl"], query_template=TEMPLATE, tasks={"a": "x"})
    with pytest.raises(ValueError, match=r"data.tasks names \['c'\], which are not sources"):
        source_prompts(["a.jsonl"], query_template=TEMPLATE, tasks={"a": "x", "c": "y"})
    with pytest.raises(ValueError, match="data.tasks is set"):
        source_prompts(["a.jsonl"], tasks={"a": "x"})


def test_training_batches_carry_prompts_and_pool_masks(tmp_path, minilm_encoder, data_dir):
    rows = [{"query": f"what is item {i}", "positive": f"item {i} is a thing", "negatives": [f"not item {i}"]}
            for i in range(8)]
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = minilm_encoder.tokenizer
    prompt = "Instruct: find the item\nQuery:"
    data = build_train_data([DatasetSpec("jsonl", str(source))], tokenizer, global_batch_size=4, seed=0, num_steps=2,
                            num_negatives=1, cache_dir=str(tmp_path / "cache"), prompts=[(prompt, None)],
                            pool_masks=True)
    batch = data.dataset[0]
    prompt_ids = tokenizer.prompt_ids(prompt)
    skip = len(tokenizer.prefix) + len(prompt_ids)
    query = batch["query"]
    np.testing.assert_array_equal(query["input_ids"][:, len(tokenizer.prefix):skip],
                                  np.tile(prompt_ids, (4, 1)))  # right padding: the prompt follows [CLS]
    expected = query["attention_mask"].copy()
    expected[:, :skip] = 0
    np.testing.assert_array_equal(query["pool_mask"], expected)
    # documents have no prompt: their pool mask is their attention mask, and it is there on every step
    for column in ("positive", "negatives"):
        np.testing.assert_array_equal(batch[column]["pool_mask"], batch[column]["attention_mask"])
    assert set(data.dataset[1]["query"]) == set(query)


def test_exported_prompts_work_in_sentence_transformers(tmp_path, minilm_dir, minilm_encoder):
    from sentence_transformers import SentenceTransformer

    prompts = export_prompts(["scifact.jsonl"], [("Instruct: Given a claim, find evidence\nQuery:", None)])
    out = hf.export_pretrained(tmp_path / "export", minilm_encoder.config, minilm_encoder.params["backbone"],
                               minilm_dir, pooling="mean", normalize=True, prompts=prompts, include_prompt=False)
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == prompts
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    texts = ["Vitamin D lowers the risk of fractures.", "A man is playing a flute."]
    ours = ej.Encoder.from_pretrained(out)
    assert ours.include_prompt is False and ours.prompts == prompts
    theirs = SentenceTransformer(str(out), device="cpu")
    q_ours, q_theirs = ours.encode_query(texts), theirs.encode(texts, prompt_name="query", convert_to_numpy=True)
    assert np.min(np.sum(q_ours * q_theirs, axis=1)) >= 0.99999
    # the prompt is attended to but not pooled: different from no prompt, and from pooling it
    plain = ours.encode(texts)
    pooled_prompt = ej.Encoder.from_pretrained(out, include_prompt=True).encode_query(texts)
    assert np.max(np.sum(q_ours * plain, axis=1)) < 0.9999 and np.max(np.sum(q_ours * pooled_prompt, axis=1)) < 0.9999
