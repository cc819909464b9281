"""Distillation losses: a student's embeddings or scores towards a teacher's.

s_* are student arrays, t_* teacher arrays; teacher values are constants (wrapped
in stop_gradient) so the same function works when the teacher is computed in the step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from embedjax.losses import validation as val


def embedding_alignment(s_bd, t_bd, *, metric: str = "mse"):
    """Align student embeddings to the teacher's (Reimers & Gurevych 2020, multilingual
    distillation): mean squared error, or mean (1 - cosine) with metric="cosine". Scalar.
    Student and teacher dims must match (project the student first if they differ)."""
    s = val.check_embeddings("s_bd", s_bd).astype(jnp.float32)
    t = lax.stop_gradient(val.check_embeddings("t_bd", t_bd, batch=s.shape[0], dim=s.shape[1]).astype(jnp.float32))
    if metric == "mse":
        return jnp.mean((s - t) ** 2)
    if metric == "cosine":
        cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)).clip(1e-12)
        return jnp.mean(1 - cos)
    raise ValueError(f"metric must be 'mse' or 'cosine', got {metric!r}")


def score_kl(s_scores_bn, t_scores_bn, *, student_temperature: float = 1.0, teacher_temperature: float = 1.0):
    """KL(teacher || student) between per-query score distributions over N candidates
    (RocketQAv2 / in-batch score distillation), averaged over queries. Scalar.

    Scores are e.g. q_bd @ d_bd.T of each model over the same candidates."""
    if s_scores_bn.ndim != 2 or s_scores_bn.shape != t_scores_bn.shape:
        raise ValueError(f"student and teacher scores must both be [B, N]; got {s_scores_bn.shape} and {t_scores_bn.shape}")
    val.check_positive_scalar("student_temperature", student_temperature)
    val.check_positive_scalar("teacher_temperature", teacher_temperature)
    log_p_s = jax.nn.log_softmax(s_scores_bn.astype(jnp.float32) / student_temperature, -1)
    log_p_t = jax.nn.log_softmax(lax.stop_gradient(t_scores_bn.astype(jnp.float32)) / teacher_temperature, -1)
    return jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))


def margin_mse(q_bd, pos_bd, neg_bd, teacher_margin_b):
    """MarginMSE (Hofstätter et al. 2020): MSE between the student's margin
    q.pos - q.neg and the teacher's margin (e.g. from a cross-encoder). Scalar."""
    q = val.check_embeddings("q_bd", q_bd).astype(jnp.float32)
    pos = val.check_embeddings("pos_bd", pos_bd, batch=q.shape[0], dim=q.shape[1]).astype(jnp.float32)
    neg = val.check_embeddings("neg_bd", neg_bd, batch=q.shape[0], dim=q.shape[1]).astype(jnp.float32)
    if teacher_margin_b.shape != (q.shape[0],):
        raise ValueError(f"teacher_margin_b must have shape ({q.shape[0]},), got {tuple(teacher_margin_b.shape)}")
    student = jnp.sum(q * pos, -1) - jnp.sum(q * neg, -1)
    return jnp.mean((student - lax.stop_gradient(teacher_margin_b.astype(jnp.float32))) ** 2)
