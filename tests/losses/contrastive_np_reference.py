"""Float64 NumPy formulas of the contrastive losses, written independently of the
JAX code from the definitions in embedjax.losses.contrastive's docstrings."""
import numpy as np


def _prefix(x, dim, similarity):
    x = np.asarray(x, np.float64)[..., :dim]
    if similarity == "cos":
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _lse(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.exp(values - top).sum())


def infonce(q, d, temperature, h=None, group=None, doc=None, hnid=None, bidirectional=False, same_side=False,
            margin=None, gq=None, gd=None, gh=None, guide_margin=0.0, focal_gamma=0.0, similarity="dot",
            dims=None, weights=None):
    n, full = np.shape(q)
    group = np.arange(n) if group is None else np.asarray(group)
    doc = group if doc is None else np.asarray(doc)
    dims = (full,) if dims is None else dims
    weights = (1.0,) * len(dims) if weights is None else weights
    total = 0.0
    for dim, weight in zip(dims, weights):
        Q, Dd = _prefix(q, dim, similarity), _prefix(d, dim, similarity)
        H = None if h is None else _prefix(h, dim, similarity).reshape(-1, dim)
        HID = None if h is None else (np.full(H.shape[0], -(2 ** 31)) if hnid is None else np.ravel(hnid))
        GQ = None if gq is None else np.asarray(gq, np.float64)
        GD = None if gd is None else np.asarray(gd, np.float64)
        GH = None if gh is None else np.asarray(gh, np.float64).reshape(-1, GQ.shape[1])

        def filtered(i, sim, gsim, diag, gdiag):
            if margin is not None and sim > diag - margin:
                return True
            return gq is not None and gsim > gdiag - guide_margin

        def row_loss(a, A, GA, B_, GB, cands):
            """cands: list of (kind, index) for row a; returns -log P(positives)."""
            diag = A[a] @ B_[a]
            gdiag = None if GA is None else GA[a] @ GB[a]
            everything, positives = [], []
            for kind, vec, gvec, is_pos, meta_neg in cands:
                logit = A[a] @ vec / temperature
                if is_pos:
                    positives.append(logit)
                    everything.append(logit)
                elif meta_neg and not filtered(a, A[a] @ vec, None if gvec is None else GA[a] @ gvec, diag, gdiag):
                    everything.append(logit)
            ce = _lse(everything) - _lse(positives)
            return (1 - np.exp(-ce)) ** focal_gamma * ce if focal_gamma else ce

        def g(arr, j):
            return None if arr is None else arr[j]

        q_losses = []
        for i in range(n):
            cands = [("d", Dd[j], g(GD, j), group[i] == group[j], group[i] != group[j] and doc[i] != doc[j])
                     for j in range(n)]
            if H is not None:
                cands += [("h", H[j], g(GH, j), False, HID[j] != doc[i]) for j in range(H.shape[0])]
            if same_side:
                cands += [("q", Q[j], g(GQ, j), False, group[i] != group[j]) for j in range(n)]
            q_losses.append(row_loss(i, Q, GQ, Dd, GD, cands))
        loss = np.mean(q_losses)
        if bidirectional:
            d_losses = []
            for j in range(n):
                cands = [("q", Q[i], g(GQ, i), group[i] == group[j], group[i] != group[j] and doc[i] != doc[j])
                         for i in range(n)]
                if same_side:
                    cands += [("d", Dd[k], g(GD, k), False, group[k] != group[j] and doc[k] != doc[j])
                              for k in range(n)]
                d_losses.append(row_loss(j, Dd, GD, Q, GQ, cands))
            loss = 0.5 * (loss + np.mean(d_losses))
        total += weight * loss
    return total


def siglip(q, d, temperature, bias, h=None, group=None, doc=None, hnid=None, similarity="dot", dims=None,
           weights=None):
    n, full = np.shape(q)
    group = np.arange(n) if group is None else np.asarray(group)
    doc = group if doc is None else np.asarray(doc)
    dims = (full,) if dims is None else dims
    weights = (1.0,) * len(dims) if weights is None else weights
    total = 0.0
    for dim, weight in zip(dims, weights):
        Q, Dd = _prefix(q, dim, similarity), _prefix(d, dim, similarity)
        loss = 0.0
        for i in range(n):
            for j in range(n):
                z = 1.0 if group[i] == group[j] else -1.0
                if z > 0 or doc[i] != doc[j]:
                    loss += np.logaddexp(0.0, -z * (Q[i] @ Dd[j] / temperature + bias))
            if h is not None:
                H = _prefix(h, dim, similarity).reshape(-1, dim)
                ids = np.full(H.shape[0], -(2 ** 31)) if hnid is None else np.ravel(hnid)
                for j in range(H.shape[0]):
                    if ids[j] != doc[i]:
                        loss += np.logaddexp(0.0, Q[i] @ H[j] / temperature + bias)
        total += weight * loss / n
    return total
