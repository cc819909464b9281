"""The flash-style ring tile kernels for InfoNCE and SigLIP (Pallas, interpret mode on CPU) against
float64 dense formulas.

Sizes are awkward: 48 anchor rows and 32 keys in blocks of 16 (3 x 2 tiles), embedding dims 20
(padded to one 32-wide chunk) and 150 (two 128-wide chunks, 106 padded columns), padding rows and
keys, rows with no candidate or no positive, duplicate keys (tied logits) and ids shared across
groups (for hard negatives the key's doc id is the negative's own id). The forward runs with a
program per row tile and with one program walking all three. Tolerance: float32 sums of <= 64
terms in a different order against float64, 1e-5 relative to the largest entry.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.kernels import ring_tiles as tiles

R, C, BLOCK = 48, 32, 16
RTOL = 1e-5


def _inputs(seed, d, kind):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(R, d)).astype(np.float32)
    k = rng.normal(size=(C, d)).astype(np.float32)
    k[7] = k[3]                                     # tied logits
    k[20] = a[5]                                    # a key equal to an anchor
    ra = (1.0 / np.linalg.norm(a, axis=1)).astype(np.float32)
    rk = (1.0 / np.linalg.norm(k, axis=1)).astype(np.float32)
    row_group = rng.integers(0, 6, R).astype(np.int32)
    key_group = rng.integers(0, 6, C).astype(np.int32)
    row_doc = rng.integers(0, 10, R).astype(np.int32)
    key_doc = rng.integers(0, 10, C).astype(np.int32)
    row_valid = np.ones(R, bool)
    key_valid = np.ones(C, bool)
    row_valid[-5:] = False                           # padding rows
    key_valid[-3:] = False                           # padding keys
    row_group[9] = 7                                 # no key in its group: candidates, no positive
    return a, k, ra, rk, (row_group, row_doc, row_valid), (key_group, key_doc, key_valid)


def _masks(kind, row_meta, key_meta):
    """(positives or None, candidates) [R, C], written out pair by pair."""
    positive = np.zeros((R, C), bool) if kind == "qd" else None
    candidates = np.zeros((R, C), bool)
    for i in range(R):
        for j in range(C):
            (rg, rd, rv), (kg, kd, kv) = (x[i] for x in row_meta), (x[j] for x in key_meta)
            if not (rv and kv):
                continue
            if kind == "qh":        # kd: the hard negative's own id, never the query's document
                candidates[i, j] = kd != rd
            elif kind == "qq":
                candidates[i, j] = rg != kg
            elif kind == "dd":
                candidates[i, j] = rg != kg and rd != kd
            else:                   # the group's documents are positives; another group's copy of
                positive[i, j] = rg == kg               # the query's own document is no negative
                candidates[i, j] = rg == kg or rd != kd
    return positive, candidates


def _reference(a, k, ra, rk, row_meta, key_meta, scale, shift, kind, g, family="infonce"):
    """float64 statistics per row / key and the gradients of sum(g * statistic). InfoNCE: the lse over
    candidates and over positives; SigLIP: the sum of log(1 + exp(-label * logit)) over candidates."""
    positive, candidates = _masks(kind, row_meta, key_meta)

    def lse(logits, mask, axis):
        filled = jnp.where(mask, logits, -1e30)
        return jnp.where(mask.any(axis), jax.nn.logsumexp(filled, axis=axis), 0.0)

    def stats(a, k, ra, rk, scale, shift):
        logits = (a @ k.T) * ra[:, None] * rk[None, :] * scale + shift
        if family == "siglip":
            labels = np.where(positive, 1.0, -1.0) if positive is not None else -np.ones(logits.shape)
            pair = jnp.where(candidates, jnp.log1p(jnp.exp(-labels * logits)), 0.0)
            return dict(rows_all=pair.sum(1), cols_all=pair.sum(0))
        out = dict(rows_all=lse(logits, candidates, 1), cols_all=lse(logits, candidates, 0))
        if positive is not None:
            out.update(rows_pos=lse(logits, positive, 1), cols_pos=lse(logits, positive, 0))
        return out

    def objective(*args):
        return sum(jnp.sum(g[name] * value) for name, value in stats(*args).items())

    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (a, k, ra, rk, scale, shift)]
        values = {n: np.asarray(v) for n, v in stats(*args).items()}
        grads = jax.grad(objective, argnums=tuple(range(6)))(*args)
        counts = dict(rows_all=np.asarray(candidates.any(1)), cols_all=np.asarray(candidates.any(0)))
        if positive is not None and family == "infonce":
            counts.update(rows_pos=np.asarray(positive.any(1)), cols_pos=np.asarray(positive.any(0)))
    return values, dict(zip(("a", "k", "ra", "rk", "scale", "shift"), (np.asarray(x) for x in grads))), counts


def _close(got, want, what):
    scale = max(np.max(np.abs(want)), 1e-30)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=RTOL * scale, err_msg=what)


def _lse(m, l):
    m, l = np.asarray(m, np.float64), np.asarray(l, np.float64)
    return np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), 0.0)


def _check_statistics(rows, cols, want, nonempty, do_rows, do_cols, has_pos):
    for side, got, on in (("rows", rows, do_rows), ("cols", cols, do_cols)):
        if not on:
            assert got is None
            continue
        for which in ("all", "pos") if has_pos else ("all",):
            lse = _lse(got["m_" + which], got["l_" + which])
            _close(lse, want[f"{side}_{which}"], f"{side} lse over {which}")
            empty = ~nonempty[f"{side}_{which}"]
            assert np.all(np.asarray(got["m_" + which])[empty] == -np.inf)
            assert np.all(np.asarray(got["l_" + which])[empty] == 0)


CASES = [("qd", 20, True, True), ("qd", 150, True, False), ("qh", 20, True, False), ("qq", 20, True, False),
         ("dd", 20, False, True)]


@pytest.mark.parametrize("kind,d,do_rows,do_cols", CASES)
def test_tiles_equal_the_float64_formula(kind, d, do_rows, do_cols):
    a, k, ra, rk, row_meta, key_meta = _inputs(len(kind) + d, d, kind)
    scale, shift = 3.0, 0.25
    rng = np.random.default_rng(d)
    g = {name: rng.normal(size=n) for name, n in (("rows_all", R), ("rows_pos", R), ("cols_all", C), ("cols_pos", C))}
    if not do_rows:
        g["rows_all"], g["rows_pos"] = np.zeros(R), np.zeros(R)
    if not do_cols:
        g["cols_all"], g["cols_pos"] = np.zeros(C), np.zeros(C)
    want, want_grads, nonempty = _reference(a, k, ra, rk, row_meta, key_meta, scale, shift, kind, g)
    has_pos = kind == "qd"
    assert not nonempty["rows_all"][-5:].any() and nonempty["rows_all"][9]   # padding rows have no candidate
    if has_pos:
        assert not nonempty["rows_pos"][9]

    for max_programs in (3, 1):  # a program per row tile, or one walking all three
        rows, cols = tiles.tile_statistics(a, k, ra, rk, row_meta, key_meta, scale, shift, family="infonce",
                                           kind=kind, do_rows=do_rows, do_cols=do_cols, block=BLOCK,
                                           max_programs=max_programs, interpret=True)
        _check_statistics(rows, cols, want, nonempty, do_rows, do_cols, has_pos)

    def saved(side, n):
        out = dict(lse_all=want[f"{side}_all"], g_all=g[f"{side}_all"])
        out.update(lse_pos=want.get(f"{side}_pos", np.zeros(n)), g_pos=g[f"{side}_pos"])
        return {name: jnp.asarray(v, jnp.float32) for name, v in out.items()}

    got = tiles.tile_gradients(a, k, ra, rk, row_meta, key_meta, scale, shift, saved("rows", R), saved("cols", C),
                               family="infonce", kind=kind, do_rows=do_rows, do_cols=do_cols, block=BLOCK,
                               interpret=True)
    _check_gradients(got, want_grads)


def _check_gradients(got, want):
    for name in ("a", "k", "ra", "rk", "scale", "shift"):
        assert np.shape(got[name]) == np.shape(want[name]), name
        _close(got[name], want[name], f"d{name}")
    assert np.abs(want["a"]).max() > 1e-3 and np.abs(want["k"]).max() > 1e-3  # not vacuous


SIGLIP_CASES = [("qd", 20, True, False), ("qh", 150, True, False), ("qd", 20, True, True)]


@pytest.mark.parametrize("kind,d,do_rows,do_cols", SIGLIP_CASES)
def test_sigmoid_tiles_equal_the_float64_formula(kind, d, do_rows, do_cols):
    """SigLIP: per-row (and per-key) sums of the pairs' sigmoid losses, positives labelled +1."""
    a, k, ra, rk, row_meta, key_meta = _inputs(7 + d, d, kind)
    scale, shift = 3.0, -1.5
    rng = np.random.default_rng(d + 1)
    g = dict(rows_all=rng.normal(size=R), cols_all=rng.normal(size=C) if do_cols else np.zeros(C))
    want, want_grads, _ = _reference(a, k, ra, rk, row_meta, key_meta, scale, shift, kind, g, family="siglip")
    rows, cols = tiles.tile_statistics(a, k, ra, rk, row_meta, key_meta, scale, shift, family="siglip", kind=kind,
                                       do_rows=do_rows, do_cols=do_cols, block=BLOCK, max_programs=1, interpret=True)
    assert set(rows) == {"sum"}
    _close(rows["sum"], want["rows_all"], "row sums")
    assert (cols is None) == (not do_cols)
    if do_cols:
        _close(cols["sum"], want["cols_all"], "key sums")
    got = tiles.tile_gradients(a, k, ra, rk, row_meta, key_meta, scale, shift,
                               {"g_sum": jnp.asarray(g["rows_all"], jnp.float32)},
                               {"g_sum": jnp.asarray(g["cols_all"], jnp.float32)}, family="siglip", kind=kind,
                               do_rows=do_rows, do_cols=do_cols, block=BLOCK, interpret=True)
    _check_gradients(got, want_grads)


def test_merge_partials_equals_one_log_sum_exp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 5)) * 10
    mask = rng.random(x.shape) < 0.5
    mask[:, :, 4] = False                                    # a key no program saw
    masked = np.where(mask, x, -np.inf)
    m_pk = masked.max(1)
    safe = np.where(m_pk == -np.inf, 0, m_pk)
    l_pk = np.exp(masked - safe[:, None]).sum(1)
    m, l = tiles.merge_partials(jnp.asarray(m_pk), jnp.asarray(l_pk))
    flat = masked.transpose(1, 0, 2).reshape(-1, 5)
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(flat).sum(0))
    np.testing.assert_allclose(_lse(m, l)[:4], want[:4], rtol=1e-6)
    assert np.asarray(m)[4] == -np.inf and np.asarray(l)[4] == 0


@pytest.mark.parametrize("block", [8, 24])
def test_blocks_that_triton_cannot_take_are_refused(block):
    a = np.zeros((48, 4), np.float32)
    meta = (np.zeros(48, np.int32),) * 3
    with pytest.raises(ValueError, match="power of two >= 16"):
        tiles.tile_statistics(a, a, np.ones(48), np.ones(48), meta, meta, 1.0, 0.0, family="infonce", kind="qd",
                              do_rows=True, do_cols=False, block=block, interpret=True)
