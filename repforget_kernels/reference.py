"""Float64 NumPy twins of every metric: the ground truth for tests and the baseline for benchmarks.

Written for clarity, never speed: explicit centring, explicit Gram matrices, full SVDs and
per-sample loops, everything in float64. Never on a hot path. Inputs may be torch tensors
or arrays; outputs are NumPy float64 arrays (or floats).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "to_f64",
    "linear_cka_ref",
    "cka_matrix_ref",
    "centered_gram_ref",
    "hsic_unbiased_ref",
    "pca_ref",
    "pca_similarity_ref",
    "pca_shift_ref",
    "fisher_accumulate_ref",
    "per_sample_linear_fisher_ref",
    "fisher_histogram_ref",
    "masked_pool_ref",
]


def to_f64(a) -> np.ndarray:
    """Any tensor (bf16 included) or array -> float64 ndarray."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def hsic_unbiased_ref(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC from two (n, n) Gram matrices, n >= 4."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    term1 = np.trace(k @ l)
    term2 = (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ k @ l @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def linear_cka_ref(x, y, debiased: bool = False):
    """Linear CKA of (n, dx), (n, dy) or batched (B, n, d) inputs, via explicit Gram matrices."""
    x, y = to_f64(x), to_f64(y)
    if x.ndim == 3:
        return np.array([linear_cka_ref(a, b, debiased) for a, b in zip(x, y)])
    xc, yc = _center(x), _center(y)
    k, l = xc @ xc.T, yc @ yc.T
    if debiased:
        return hsic_unbiased_ref(k, l) / np.sqrt(hsic_unbiased_ref(k, k) * hsic_unbiased_ref(l, l))
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def cka_matrix_ref(xs, ys=None, debiased: bool = False) -> np.ndarray:
    """(Lx, Ly) CKA of every layer pair; layers given as a stack or a list of (n, d_i)."""
    ys = xs if ys is None else ys
    return np.array([[linear_cka_ref(a, b, debiased) for b in ys] for a in xs])


def centered_gram_ref(x, unbiased: bool = False) -> np.ndarray:
    """(n, d) -> (n, n): H K H with an explicit centring matrix, or the U-centred Gram by its definition."""
    x = to_f64(x)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ (x @ x.T) @ h
    if not unbiased:
        return k
    kt = k.copy()
    np.fill_diagonal(kt, 0.0)
    r, s = kt.sum(1), kt.sum()
    u = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def _sign_fix(v: np.ndarray) -> np.ndarray:
    """Rows of v flipped so the largest-magnitude entry of each is positive."""
    idx = np.abs(v).argmax(axis=1)
    signs = np.sign(v[np.arange(v.shape[0]), idx])
    signs[signs == 0] = 1.0
    return v * signs[:, None]


def pca_ref(x, k: int) -> dict:
    """Exact PCA of (n, d) by full SVD of the centred data.

    Returns components (k, d) with deterministic signs, singular_values (k,),
    explained_variance (k,) = s^2 / (n - 1), explained_variance_ratio (k,), mean (d,).
    """
    x = to_f64(x)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / (x.shape[0] - 1)
    return {
        "components": _sign_fix(vt[:k]),
        "singular_values": s[:k],
        "explained_variance": var[:k],
        "explained_variance_ratio": var[:k] / var.sum(),
        "mean": mean,
    }


def pca_similarity_ref(x_ref, x_upd, k: int = 1, signed: bool = False) -> float:
    """Mean cosine of the principal angles between the top-k PCA subspaces (|cos| for k = 1)."""
    a, b = pca_ref(x_ref, k)["components"], pca_ref(x_upd, k)["components"]
    if signed:
        return float(np.mean(np.sum(a * b, axis=1)))
    return float(np.mean(np.linalg.svd(a @ b.T, compute_uv=False)))


def pca_shift_ref(x_ref, x_upd, k: int = 2, normalize: bool = False) -> np.ndarray:
    """(mean(x_upd) - mean(x_ref)) on x_ref's top-k directions, optionally over sqrt(explained variance)."""
    ref = pca_ref(x_ref, k)
    shift = ref["components"] @ (to_f64(x_upd).mean(axis=0) - ref["mean"])
    return shift / np.sqrt(ref["explained_variance"]) if normalize else shift


def fisher_accumulate_ref(fisher, grad, scale: float = 1.0) -> np.ndarray:
    """fisher + scale * grad**2 in float64."""
    return to_f64(fisher) + scale * to_f64(grad) ** 2


def per_sample_linear_fisher_ref(x, grad_out, mask=None) -> np.ndarray:
    """sum_s (G_s)**2 with G_s = sum_t m_st g_st x_st^T, by an explicit loop over samples: (out, in)."""
    x, g = to_f64(x), to_f64(grad_out)
    m = np.ones(x.shape[:2]) if mask is None else to_f64(mask)
    total = np.zeros((g.shape[2], x.shape[2]))
    for s in range(x.shape[0]):
        gs = (g[s] * m[s][:, None]).T @ x[s]
        total += gs**2
    return total


def fisher_histogram_ref(values, bins: int = 64, log: bool = True):
    """Histogram of values: log10-spaced bins over the positive values when ``log``, else linear.

    Returns (counts, edges, n_zero) with edges in value space (not log space) and n_zero the
    number of zeros left out of a log histogram.
    """
    v = to_f64(values).ravel()
    if log:
        pos = v[v > 0]
        n_zero = int((v == 0).sum())
        lo, hi = np.log10(pos.min()), np.log10(pos.max())
        if hi == lo:
            hi = lo + 1.0
        edges = np.logspace(lo, hi, bins + 1)
        counts = np.histogram(np.log10(pos), bins=bins, range=(lo, hi))[0]
        return counts, edges, n_zero
    lo, hi = v.min(), v.max()
    if hi == lo:
        hi = lo + max(1.0, abs(lo))
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return counts, edges, 0


def masked_pool_ref(hidden, mask, how: str = "mean") -> np.ndarray:
    """(B, T, d) activations -> (B, d): mean over real tokens, the last real token, or token 0."""
    h, m = to_f64(hidden), to_f64(mask).astype(bool)
    rows = []
    for b in range(h.shape[0]):
        real = np.nonzero(m[b])[0]
        if how == "mean":
            rows.append(h[b, real].mean(axis=0))
        elif how == "last":
            rows.append(h[b, real[-1]])
        else:
            rows.append(h[b, 0])
    return np.stack(rows)
