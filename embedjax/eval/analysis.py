"""Geometry of an embedding space: rank, alignment/uniformity, isotropy, hubness.

Every function is a pure function of arrays (NumPy or JAX in, JAX scalars or
arrays out) and runs under ``jax.jit``. Shapes use the suffix convention:
``emb_nd`` is N vectors of dimension D, ``scores_qn`` is a query x corpus score
matrix, ``bank_scores_bn`` scores a bank of B reference queries against the
same corpus.

References
- RankMe: Garrido et al., "RankMe: Assessing the downstream performance of
  pretrained self-supervised representations by their rank", ICML 2023.
- Alignment and uniformity: Wang & Isola, "Understanding contrastive
  representation learning through alignment and uniformity on the hypersphere",
  ICML 2020.
- Partition-function isotropy: Mu & Viswanath, "All-but-the-top", ICLR 2018
  (after Arora et al., 2016).
- Hubness as skewness of the k-occurrence distribution: Radovanovic et al.,
  "Hubs in space", JMLR 2010.
- Inverted softmax: Smith et al., "Offline bilingual word vectors, orthogonal
  transformations and the inverted softmax", ICLR 2017; with a query bank and the
  dynamic variant: Bogolin et al., "Cross modal retrieval with querybank
  normalisation", CVPR 2022.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "rankme",
    "alignment",
    "uniformity",
    "mean_cosine",
    "partition_isotropy",
    "k_occurrence",
    "hubness_skewness",
    "inverted_softmax_scores",
    "similarity_histograms",
]


def _as_matrix(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim]; got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one row and one column")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _l2_normalize(x_nd: jax.Array) -> jax.Array:
    # A zero row stays zero instead of becoming NaN.
    norm = jnp.linalg.norm(x_nd, axis=-1, keepdims=True)
    return x_nd / jnp.maximum(norm, jnp.finfo(x_nd.dtype).tiny)


# --------------------------------------------------------------------------- rank


@functools.partial(jax.jit, static_argnames=("eps",))
def _rankme(emb_nd, eps):
    sigma = jnp.linalg.svd(emb_nd, compute_uv=False)
    p = sigma / jnp.sum(sigma) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def rankme(emb_nd, eps: float = 1e-7) -> jax.Array:
    """RankMe effective rank of an embedding matrix.

    exp(entropy of the normalised singular values): p_k = sigma_k / sum(sigma) + eps,
    RankMe = exp(-sum_k p_k log p_k). Lies in [1, min(N, D)]; equals r for a matrix
    with r equal non-zero singular values. Embeddings are used as given (not
    centred, not normalised), as in the paper.
    """
    return _rankme(_as_matrix(emb_nd, "emb_nd"), float(eps))


# -------------------------------------------------------- alignment / uniformity


@functools.partial(jax.jit, static_argnames=("alpha", "normalize"))
def _alignment(x_bd, y_bd, alpha, normalize):
    if normalize:
        x_bd, y_bd = _l2_normalize(x_bd), _l2_normalize(y_bd)
    dist = jnp.linalg.norm(x_bd - y_bd, axis=-1)
    return jnp.mean(dist**alpha)


def alignment(x_bd, y_bd, alpha: float = 2.0, normalize: bool = True) -> jax.Array:
    """Alignment of positive pairs: mean over rows of ||x_i - y_i||_2 ** alpha.

    Lower is better (0 = every positive pair coincides). With normalize=True the
    rows are first projected to the unit sphere, where the metric is defined.
    """
    x_bd, y_bd = _as_matrix(x_bd, "x_bd"), _as_matrix(y_bd, "y_bd")
    if x_bd.shape != y_bd.shape:
        raise ValueError(f"x_bd and y_bd must be row-aligned positive pairs of the same shape; got {x_bd.shape} and {y_bd.shape}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    return _alignment(x_bd, y_bd, float(alpha), bool(normalize))


@functools.partial(jax.jit, static_argnames=("t", "normalize"))
def _uniformity(x_nd, t, normalize):
    if normalize:
        x_nd = _l2_normalize(x_nd)
    n = x_nd.shape[0]
    sq_norm = jnp.sum(x_nd * x_nd, axis=-1)
    # ||a - b||^2 = |a|^2 + |b|^2 - 2ab, clipped at 0 against rounding.
    sq_dist_nn = jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * x_nd @ x_nd.T, 0.0)
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    logits = jnp.where(upper, -t * sq_dist_nn, -jnp.inf)
    num_pairs = n * (n - 1) / 2
    # log-mean-exp over the distinct pairs, stable for large t.
    return jax.nn.logsumexp(logits) - jnp.log(num_pairs)


def uniformity(x_nd, t: float = 2.0, normalize: bool = True) -> jax.Array:
    """Uniformity: log of the mean Gaussian potential exp(-t ||x_i - x_j||^2) over pairs i < j.

    Lower is more uniform. Needs N >= 2; builds the N x N distance matrix, so call
    it on a sample (a few thousand rows) of a large set.
    """
    x_nd = _as_matrix(x_nd, "x_nd")
    if x_nd.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows; got {x_nd.shape[0]}")
    if t <= 0:
        raise ValueError(f"t must be > 0; got {t}")
    return _uniformity(x_nd, float(t), bool(normalize))


# ------------------------------------------------------------------- isotropy


@jax.jit
def _mean_cosine(x_nd):
    u = _l2_normalize(x_nd)
    n = u.shape[0]
    total = jnp.sum(u, axis=0)
    # sum over all ordered pairs (i, j) of u_i.u_j = |sum u|^2; drop the diagonal.
    diagonal = jnp.sum(u * u)
    return (jnp.dot(total, total) - diagonal) / (n * (n - 1))


def mean_cosine(x_nd) -> jax.Array:
    """Mean cosine similarity over distinct pairs i != j (0 for an isotropic set).

    O(N D): uses |sum_i u_i|^2 = sum_{i,j} u_i . u_j for unit rows u_i.
    """
    x_nd = _as_matrix(x_nd, "x_nd")
    if x_nd.shape[0] < 2:
        raise ValueError(f"mean_cosine needs at least 2 rows; got {x_nd.shape[0]}")
    return _mean_cosine(x_nd)


@jax.jit
def _partition_isotropy(x_nd):
    _, eigvecs = jnp.linalg.eigh(x_nd.T @ x_nd)
    directions_cd = jnp.concatenate([eigvecs.T, -eigvecs.T], axis=0)
    log_z_c = jax.nn.logsumexp(directions_cd @ x_nd.T, axis=-1)
    return jnp.exp(jnp.min(log_z_c) - jnp.max(log_z_c))


def partition_isotropy(x_nd) -> jax.Array:
    """Partition-function isotropy I = min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . x_i).

    c ranges over the eigenvectors of X^T X and their negatives (taking both signs
    makes the value independent of the eigen-solver's sign convention). 1 means
    isotropic; values near 0 mean a few dominant directions. Vectors are used as
    given (normalise them first to compare models of different scale).
    """
    return _partition_isotropy(_as_matrix(x_nd, "x_nd"))


# -------------------------------------------------------------------- hubness


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int; got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of corpus items); got {k}")
    return k


@functools.partial(jax.jit, static_argnames=("k",))
def _k_occurrence(scores_qn, k):
    _, top_qk = jax.lax.top_k(scores_qn, k)
    return jnp.zeros((scores_qn.shape[1],), jnp.int32).at[top_qk.reshape(-1)].add(1)


def k_occurrence(scores_qn, k: int) -> jax.Array:
    """N_k: how often each corpus item appears in the top-k of the queries, int32 [N].

    Sums to Q * k. Ties inside the top-k are broken towards the smaller index.
    """
    scores_qn = _as_matrix(scores_qn, "scores_qn")
    return _k_occurrence(scores_qn, _check_k(k, scores_qn.shape[1]))


@jax.jit
def _skewness(counts_n):
    x = counts_n.astype(jnp.float32)
    centred = x - jnp.mean(x)
    m2 = jnp.mean(centred**2)
    m3 = jnp.mean(centred**3)
    # A constant N_k (no hubs at all) has zero variance: report skewness 0, not NaN.
    return jnp.where(m2 > 0, m3 / jnp.maximum(m2, jnp.finfo(x.dtype).tiny) ** 1.5, 0.0)


def hubness_skewness(scores_qn, k: int = 10) -> jax.Array:
    """Hubness: skewness of the k-occurrence distribution, E[(N_k - mu)^3] / sigma^3.

    Population (biased) moments, as scipy.stats.skew(bias=True). Large positive
    values mean a few "hub" items sit in the top-k of many queries.
    """
    return _skewness(k_occurrence(scores_qn, k))


@functools.partial(jax.jit, static_argnames=("dynamic", "activation_k"))
def _inverted_softmax(scores_qn, bank_scores_bn, inv_temperature, dynamic, activation_k):
    # log of exp(s_qn / T) / sum_b exp(s_bn / T): rank-equivalent to the ratio, never overflows.
    log_partition_n = jax.nn.logsumexp(bank_scores_bn * inv_temperature, axis=0)
    normalized_qn = scores_qn * inv_temperature - log_partition_n[None, :]
    if not dynamic:
        return normalized_qn
    # Dynamic inverted softmax: normalise a query only when its own top-1 item is in
    # the activation set (items that are in the top-activation_k of some bank query).
    _, bank_top_bk = jax.lax.top_k(bank_scores_bn, activation_k)
    active_n = jnp.zeros((bank_scores_bn.shape[1],), bool).at[bank_top_bk.reshape(-1)].set(True)
    query_top1_q = jnp.argmax(scores_qn, axis=1)
    use_q = active_n[query_top1_q]
    return jnp.where(use_q[:, None], normalized_qn, scores_qn)


def inverted_softmax_scores(
    scores_qn,
    bank_scores_bn,
    temperature: float,
    *,
    dynamic: bool = False,
    activation_k: int = 1,
) -> jax.Array:
    """Query-bank normalisation of retrieval scores (inverted softmax), float [Q, N].

    Each corpus item n is scored for query q by
        exp(s_qn / T) / sum_b exp(s_bn / T),
    the probability that n would pick q among the bank queries b: an item that is
    close to every query (a hub) gets a large denominator and is pushed down. The
    return value is the *log* of that ratio, s_qn / T - logsumexp_b(s_bn / T), which
    ranks identically and cannot overflow.

    Args:
      scores_qn: similarities of the Q test queries to the N corpus items.
      bank_scores_bn: similarities of B bank queries (e.g. training queries, never
        the test queries themselves) to the same N items.
      temperature: T > 0; the paper-default 1/20 for cosine scores.
      dynamic: QB-Norm's dynamic inverted softmax: queries whose top-1 item is not
        in the activation set keep their raw scores s_qn (the ranking inside one
        query is all that matters, so mixing scales across queries is harmless).
      activation_k: top-k of each bank query that forms the activation set.
    """
    scores_qn = _as_matrix(scores_qn, "scores_qn")
    bank_scores_bn = _as_matrix(bank_scores_bn, "bank_scores_bn")
    if bank_scores_bn.shape[1] != scores_qn.shape[1]:
        raise ValueError(
            "bank_scores_bn must score the same corpus as scores_qn: "
            f"got {bank_scores_bn.shape[1]} and {scores_qn.shape[1]} corpus columns"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if dynamic:
        _check_k(activation_k, bank_scores_bn.shape[1])
    return _inverted_softmax(scores_qn, bank_scores_bn, 1.0 / float(temperature), bool(dynamic), int(activation_k))


# ----------------------------------------------------------------- histograms


def similarity_histograms(
    scores_qn,
    relevant_qn=None,
    *,
    bins: int = 50,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> dict:
    """Histograms of similarity scores, split into relevant and non-relevant pairs.

    Args:
      scores_qn: any score matrix (or a 1-D vector of scores).
      relevant_qn: optional bool mask of the same shape marking relevant pairs.
      bins, value_range: histogram bins over [lo, hi]; scores outside the range
        are counted in no bin (the returned "outside" says how many).

    Returns dict with "edges" [bins + 1], "all" counts [bins], "outside" (count of
    scores outside value_range) and, when relevant_qn is given, "relevant" and
    "non_relevant" counts [bins] (they sum to "all").
    """
    scores = jnp.asarray(scores_qn)
    if scores.size == 0:
        raise ValueError("scores_qn is empty; pass at least one score")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int; got {bins!r}")
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"value_range must be (lo, hi) with lo < hi; got {value_range}")
    scores = scores.astype(jnp.float32)
    edges = jnp.linspace(lo, hi, bins + 1)
    counts_all, _ = jnp.histogram(scores, bins=edges)
    inside = (scores >= lo) & (scores <= hi)
    out = {
        "edges": edges,
        "all": counts_all.astype(jnp.int32),
        "outside": jnp.sum(~inside).astype(jnp.int32),
    }
    if relevant_qn is not None:
        relevant = jnp.asarray(relevant_qn)
        if relevant.shape != scores.shape:
            raise ValueError(f"relevant_qn must have the shape of scores_qn {scores.shape}; got {relevant.shape}")
        relevant = relevant.astype(bool)
        counts_rel, _ = jnp.histogram(scores, bins=edges, weights=relevant.astype(jnp.float32))
        counts_non, _ = jnp.histogram(scores, bins=edges, weights=(~relevant).astype(jnp.float32))
        out["relevant"] = jnp.round(counts_rel).astype(jnp.int32)
        out["non_relevant"] = jnp.round(counts_non).astype(jnp.int32)
    return out
