"""Free-embedding experiment of "On the Theoretical Limitations of Embedding-Based Retrieval".

Weller et al. (2025) ask how many documents n a d-dimensional single-vector
retriever can hold such that *every* pair of documents is the exact top-2 of some
query. They drop the encoder altogether: query and document vectors are free
parameters, optimised directly on the test task (full batch, Adam, InfoNCE over
all n documents, vectors renormalised to the unit sphere after every step).
The largest n that the optimiser still solves is the "critical n" of d; it grows
polynomially in d, which they fit with a cubic.

This module holds the pure pieces (task construction, loss, exact success
check, one optimisation run, the search for the critical n, the polynomial fit);
``experiments/limit/run.py`` sweeps d and writes the table.

Shapes: ``q_qd`` query vectors, ``d_nd`` document vectors, ``combos_qk`` the k
relevant document ids of each query, ``relevant_qn`` the same as a bool mask.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "top_k_combinations",
    "free_embedding_loss",
    "count_unsolved",
    "FreeEmbeddingRun",
    "optimize_free_embeddings",
    "CriticalNSearch",
    "find_critical_n",
    "fit_polynomial",
]


def top_k_combinations(n: int, k: int = 2) -> np.ndarray:
    """Every k-subset of n documents, one query each: int32 [C(n, k), k], lexicographic."""
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"n and k must be ints; got n={n!r}, k={k!r}")
    if k < 1 or n <= k:
        raise ValueError(f"need 1 <= k < n so that a top-k set leaves other documents out; got n={n}, k={k}")
    combos = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations(range(n), k)), dtype=np.int32, count=math.comb(n, k) * k
    )
    return combos.reshape(-1, k)


def _positive_scores(scores_qn: jax.Array, combos_qk: jax.Array) -> jax.Array:
    return jnp.take_along_axis(scores_qn, combos_qk, axis=1)


def free_embedding_loss(q_qd, d_nd, combos_qk, temperature: float) -> jax.Array:
    """InfoNCE over all documents, averaged over every (query, relevant document) pair.

    loss = -mean_{q, p in combos[q]} log softmax_n(q . d_n / T)[p]: each relevant
    document competes with all n documents (the other relevant one included), as
    in the paper's full-batch setting.
    """
    q_qd, d_nd, combos_qk = jnp.asarray(q_qd), jnp.asarray(d_nd), jnp.asarray(combos_qk)
    logits_qn = (q_qd @ d_nd.T) / temperature
    log_norm_q = jax.nn.logsumexp(logits_qn, axis=1, keepdims=True)
    return -jnp.mean(_positive_scores(logits_qn, combos_qk) - log_norm_q)


def count_unsolved(q_qd, d_nd, combos_qk) -> jax.Array:
    """Number of queries whose top-k is not exactly their k relevant documents (int32).

    A query is solved when its lowest relevant score is strictly above its highest
    non-relevant score, so ties count as failures.
    """
    q_qd, d_nd, combos_qk = jnp.asarray(q_qd), jnp.asarray(d_nd), jnp.asarray(combos_qk)
    scores_qn = q_qd @ d_nd.T
    min_pos_q = jnp.min(_positive_scores(scores_qn, combos_qk), axis=1)
    rows_qk = jnp.broadcast_to(jnp.arange(scores_qn.shape[0])[:, None], combos_qk.shape)
    negatives_qn = scores_qn.at[rows_qk, combos_qk].set(-jnp.inf)
    max_neg_q = jnp.max(negatives_qn, axis=1)
    return jnp.sum(min_pos_q <= max_neg_q).astype(jnp.int32)


def _unit_rows(x):
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@functools.lru_cache(maxsize=16)
def _make_chunk(learning_rate: float, temperature: float, steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """Jitted `steps` Adam updates (renormalising after each), then the exact check."""
    optimizer = optax.adam(learning_rate)
    grad_fn = jax.value_and_grad(lambda p, c: free_embedding_loss(p[0], p[1], c, temperature))

    @jax.jit
    def chunk(params, opt_state, combos_qk):
        def one_step(_, carry):
            params, opt_state, _ = carry
            loss, grads = grad_fn(params, combos_qk)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            q, d = optax.apply_updates(params, updates)
            return (_unit_rows(q), _unit_rows(d)), opt_state, loss

        params, opt_state, loss = jax.lax.fori_loop(0, steps, one_step, (params, opt_state, jnp.float32(0.0)))
        return params, opt_state, loss, count_unsolved(params[0], params[1], combos_qk)

    return optimizer, chunk


@dataclasses.dataclass(frozen=True)
class FreeEmbeddingRun:
    """Outcome of optimising free vectors for (n, d, k): the solved restart, else the best one."""

    n: int
    d: int
    k: int
    solved: bool
    seed: int  # seed of the returned restart
    steps: int  # optimisation steps of the returned restart
    total_steps: int  # summed over every restart tried
    unsolved: int  # queries still wrong at the end of the returned restart
    num_queries: int
    final_loss: float
    seconds: float  # wall time of all restarts
    q_qd: np.ndarray = dataclasses.field(repr=False)
    d_nd: np.ndarray = dataclasses.field(repr=False)


def _optimize_once(combos, n, d, *, learning_rate, temperature, max_steps, patience, check_every, seed):
    key_q, key_d = jax.random.split(jax.random.key(seed))
    params = (
        _unit_rows(jax.random.normal(key_q, (combos.shape[0], d), jnp.float32)),
        _unit_rows(jax.random.normal(key_d, (n, d), jnp.float32)),
    )
    optimizer, chunk = _make_chunk(float(learning_rate), float(temperature), int(check_every))
    opt_state = optimizer.init(params)
    unsolved = int(count_unsolved(params[0], params[1], combos))
    best_unsolved, best_step, steps, loss = unsolved, 0, 0, float("nan")
    while unsolved > 0 and steps < max_steps and steps - best_step < patience:
        params, opt_state, loss_arr, unsolved_arr = chunk(params, opt_state, combos)
        steps += check_every
        loss, unsolved = float(loss_arr), int(unsolved_arr)
        if unsolved < best_unsolved:
            best_unsolved, best_step = unsolved, steps
    return params, steps, unsolved, loss


def optimize_free_embeddings(
    n: int,
    d: int,
    k: int = 2,
    *,
    learning_rate: float = 0.01,
    temperature: float = 0.1,
    max_steps: int = 20_000,
    patience: int = 1_000,
    check_every: int = 50,
    seed: int = 0,
    restarts: int = 1,
) -> FreeEmbeddingRun:
    """Optimise free unit query/document vectors so that every k-subset is some query's top-k.

    Defaults follow the paper (Adam lr 0.01, temperature 0.1, unit vectors after each
    step). A restart stops as soon as every query is solved (checked exactly every
    `check_every` steps), or when the number of unsolved queries has not reached a
    new minimum for `patience` steps, or at `max_steps`. Full-batch gradient descent
    can stall at a saddle where two documents coincide (their queries cannot tell
    them apart, and the symmetric gradient does not separate them), so up to
    `restarts` seeds (seed, seed + 1, ...) are tried until one solves.
    """
    for name, value in (
        ("d", d), ("max_steps", max_steps), ("patience", patience), ("check_every", check_every), ("restarts", restarts),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not (learning_rate > 0 and temperature > 0):
        raise ValueError(f"learning_rate and temperature must be > 0; got {learning_rate}, {temperature}")
    combos = jnp.asarray(top_k_combinations(n, k))
    start = time.perf_counter()
    best, total_steps = None, 0
    for restart_seed in range(seed, seed + restarts):
        params, steps, unsolved, loss = _optimize_once(
            combos, n, d, learning_rate=learning_rate, temperature=temperature, max_steps=max_steps,
            patience=patience, check_every=check_every, seed=restart_seed,
        )
        total_steps += steps
        if best is None or unsolved < best[2]:
            best = (params, steps, unsolved, loss, restart_seed)
        if unsolved == 0:
            break
    params, steps, unsolved, loss, best_seed = best
    q_qd, d_nd = (np.asarray(p) for p in params)
    return FreeEmbeddingRun(
        n=n,
        d=d,
        k=k,
        solved=unsolved == 0,
        seed=best_seed,
        steps=steps,
        total_steps=total_steps,
        unsolved=unsolved,
        num_queries=int(combos.shape[0]),
        final_loss=loss,
        seconds=time.perf_counter() - start,
        q_qd=q_qd,
        d_nd=d_nd,
    )


@dataclasses.dataclass(frozen=True)
class CriticalNSearch:
    """Largest n solved for one d, with every trial that led there."""

    d: int
    k: int
    critical_n: int  # largest n solved (assumes solvability is monotone in n)
    first_failure: int | None  # smallest n that failed (critical_n + 1 when searched to resolution 1)
    trials: tuple[FreeEmbeddingRun, ...]


def find_critical_n(
    d: int,
    k: int = 2,
    *,
    n_start: int | None = None,
    n_max: int = 100_000,
    initial_step: int = 1,
    resolution: int = 1,
    run: Callable[..., FreeEmbeddingRun] = optimize_free_embeddings,
    **run_kwargs,
) -> CriticalNSearch:
    """Largest n for which `run(n, d, k, **run_kwargs)` succeeds: gallop from n_start, then bisect.

    Solvability is monotone in n in exact arithmetic (drop a document and its
    queries from a solution for n to get one for n - 1), so galloping away from
    n_start with steps 1, 2, 4, ... until the outcome flips, then bisecting the
    bracket, finds the boundary in O(log) runs. A start just below the expected
    answer is cheapest: solved runs stop early, failed runs use the whole budget.

    For expensive (large) d, a coarse search saves runs: the gallop starts with
    `initial_step` and bisection stops once the bracket is `resolution` wide, so
    the result is the bracket critical_n <= true value < first_failure.
    """
    for name, value in (("initial_step", initial_step), ("resolution", resolution)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    smallest = k + 1
    lo = min(max(smallest, n_start if n_start is not None else smallest), n_max)
    trials: list[FreeEmbeddingRun] = []

    def attempt(n: int) -> bool:
        result = run(n, d, k, **run_kwargs)
        trials.append(result)
        return bool(result.solved)

    def done(critical: int, failure: int | None) -> CriticalNSearch:
        return CriticalNSearch(d=d, k=k, critical_n=critical, first_failure=failure, trials=tuple(trials))

    step = initial_step
    if attempt(lo):
        hi = None
        while hi is None:
            if lo == n_max:
                return done(lo, None)
            n = min(lo + step, n_max)
            if attempt(n):
                lo, step = n, step * 2
            else:
                hi = n
    else:
        hi = lo
        while True:
            if hi == smallest:
                return done(k, smallest)  # not even k + 1 documents
            n = max(hi - step, smallest)
            if attempt(n):
                lo = n
                break
            hi, step = n, step * 2
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return done(lo, hi)


def fit_polynomial(d_values, n_values, degree: int = 3) -> tuple[np.ndarray, float]:
    """Least-squares polynomial n(d); returns (coefficients lowest power first, r^2)."""
    x = np.asarray(d_values, dtype=np.float64)
    y = np.asarray(n_values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"d_values and n_values must be 1-D and of equal length; got {x.shape} and {y.shape}")
    if x.size <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree} points; got {x.size}")
    coeffs = np.polynomial.polynomial.polyfit(x, y, degree)
    pred = np.polynomial.polynomial.polyval(x, coeffs)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return coeffs, (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0
