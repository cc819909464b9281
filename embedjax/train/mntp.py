"""MNTP as a training objective (``train.objective="mntp"``): every text column of the training
batches (queries, positives, hard negatives, or both sides of STS pairs) is masked and its picked
tokens predicted through the tied LM head, with bidirectional attention (LLM2Vec's first stage).

The objective has the `Objective` shape of `embedjax.train.step`, with per-row sums in place of
embeddings (``{"<column>/nll": [b], "<column>/count": [b]}``), so plain autodiff, GradCache,
LoRA and the sharded step work unchanged. Chaining: an MNTP run exports its model (adapters
merged); a contrastive run then starts from that folder (``model.path``), as LLM2Vec does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax.losses.mntp import mntp_loss, mntp_mask, mntp_nll
from embedjax.train.step import Objective

DEFAULT_MASK_TOKEN = "_"  # LLM2Vec's mask for tokenizers without one (Llama, Mistral)


def mask_token_id(tokenizer, mask_token: str = "") -> int:
    """The id of ``mask_token`` (empty: the tokenizer's own mask token, else ``"_"``); a token the
    vocabulary does not hold is an error."""
    token = mask_token or tokenizer.mask_token or DEFAULT_MASK_TOKEN
    token_id = tokenizer.backend.token_to_id(token)
    if token_id is None:
        ids = tokenizer.backend.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"MNTP mask token {token!r} is not one token of this vocabulary ({ids}); set "
                             "train.mntp_mask_token to a single token")
        token_id = ids[0]
    return int(token_id)


def tied_lm_head(family, config, backbone):
    """The input embedding table ``[vocab, d]`` the family ties to its LM head (a clear error when
    the family has none or the checkpoint unties it)."""
    path = family.tied_lm_head
    if path is None:
        raise ValueError(f"train.objective='mntp' needs a tied LM head; model family {family.name!r} declares none")
    if not getattr(config, "tie_word_embeddings", True):
        raise ValueError("train.objective='mntp' predicts through the tied LM head, but this checkpoint unties "
                         "its embeddings (tie_word_embeddings=false; embedjax does not load a separate lm_head)")
    node = backbone
    for key in path:
        node = node[key]
    return node


def check_mntp_attention(config) -> None:
    """MNTP trains bidirectional attention: a causal model config is refused."""
    if getattr(config, "attention", "bidirectional") != "bidirectional":
        raise ValueError("train.objective='mntp' trains bidirectional attention; set "
                         "model.config.attention='bidirectional'")


def make_mntp_objective(model, family, config, *, lora=None, probability: float, mask_id: int,
                        special_ids=()) -> Objective:
    """The MNTP objective of a family's model (``lora``: the adapters' `LoRAConfig`)."""
    from embedjax.models.lora import apply_model

    check_mntp_attention(config)
    mntp_mask_args = dict(probability=probability, mask_id=int(mask_id), vocab_size=int(config.vocab_size),
                          special_ids=tuple(int(i) for i in special_ids))
    mntp_mask(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
              **mntp_mask_args)  # refuses a bad probability now

    def column_nll(params, tokens, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        inputs, targets, weights = mntp_mask(mask_rng, tokens["input_ids"], tokens["attention_mask"],
                                             **mntp_mask_args)
        corrupted = {**tokens, "input_ids": inputs}
        hidden_bld, _ = apply_model(model, params, corrupted, lora=lora, deterministic=False,
                                    rngs={"dropout": dropout_rng})
        table = tied_lm_head(family, config, params["backbone"])
        if params.get("lora"):
            table = jax.lax.stop_gradient(table)  # the frozen base: adapters only
        return mntp_nll(hidden_bld, table, targets, weights)

    def embed_columns(params, batch, rng, shared=None):
        out = {}
        columns = sorted(name for name, value in batch.items() if isinstance(value, dict) and "input_ids" in value)
        for i, name in enumerate(columns):
            tokens = batch[name]
            rows = tokens["input_ids"].shape[0]
            flat = {k: v.reshape(-1, v.shape[-1]) for k, v in tokens.items()}  # negatives: [b, k, L]
            nll, count = column_nll(params, flat, jax.random.fold_in(rng, i))
            out[f"{name}/nll"] = nll.reshape(rows, -1).sum(axis=1)
            out[f"{name}/count"] = count.reshape(rows, -1).sum(axis=1)
        return out

    def loss_from_embeddings(sums, batch):
        nll = sum(v for k, v in sums.items() if k.endswith("/nll"))
        count = sum(v for k, v in sums.items() if k.endswith("/count"))
        return mntp_loss(nll, count)

    return Objective(embed_columns, loss_from_embeddings)
