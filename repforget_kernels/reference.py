"""Float64 NumPy twins of every metric: the ground truth for tests and the baseline for benchmarks.

Written for clarity, never speed: explicit centring, explicit Gram matrices, full SVDs and
per-sample loops, everything in float64. Never on a hot path. Inputs may be torch tensors
or arrays; outputs are NumPy float64 arrays (or floats).

The PCA twins take ``refine=True`` for float64 inputs: LAPACK's own SVD error is then of the order
of the bound being tested, so the top-k eigenpairs are refined in exact rational arithmetic on the
given values (``_refined_eigenpairs``).

Length: one module because it is the one place the ground truth lives (every metric's twin and every
kernel op's twin, sharing the centring and conversion helpers); tests and benchmarks import it whole.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

__all__ = [
    "to_f64",
    "exact_ints",
    "linear_cka_ref",
    "linear_cka_condition_ref",
    "cka_matrix_ref",
    "centered_gram_ref",
    "hsic_unbiased_ref",
    "pca_ref",
    "exact_residual_ref",
    "pca_similarity_ref",
    "pca_shift_ref",
    "pca_gaps_ref",
    "fisher_accumulate_ref",
    "per_sample_linear_fisher_ref",
    "fisher_histogram_ref",
    "masked_pool_ref",
    "square_accumulate_op_ref",
    "per_sample_linear_fisher_op_ref",
    "histogram_op_ref",
    "shifted_cross_products_op_ref",
    "centered_gram_op_ref",
    "centered_matmul_op_ref",
    "centered_matmul_t_op_ref",
    "column_stats_op_ref",
]


def to_f64(a) -> np.ndarray:
    """Any tensor (bf16 included) or array -> float64 ndarray."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _center(x: np.ndarray) -> np.ndarray:
    """Column-centred rows: first the differences to row 0, then minus their mean. A constant column
    becomes exactly zero (its float64 mean need not equal its value), any other loses nothing."""
    diff = x - x[:1]
    return diff - diff.mean(axis=0, keepdims=True)


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


def _u_centre(k: np.ndarray) -> np.ndarray:
    """U-centred Gram (Szekely-Rizzo) of an (n, n) Gram, by its definition."""
    n = k.shape[0]
    kt = k.copy()
    np.fill_diagonal(kt, 0.0)
    r, s = kt.sum(1), kt.sum()
    u = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def linear_cka_condition_ref(x, y, debiased: bool = False, method: str = "feature") -> dict:
    """The condition factor of linear CKA's accuracy bound (see ``linear_cka``), in float64.

    Returns {"kappa", "self_x", "self_y"}:
    kappa = e_xy / sqrt(h_xx h_yy) + |CKA| (e_xx / h_xx + e_yy / h_yy) / 2, with h the HSIC
    numerators and e the sizes of the terms that round into them (t_a = ||A_c||_F^2):
      feature: e_ab = 2 ||A_c^T B_c||_F sqrt(t_a t_b) [+ debiased: 2 (1 + 2/(n-2)) sum_i |a_i|^2 |b_i|^2
               + 2 t_a t_b / ((n-1)(n-2))], h_ab = n (n - 3) HSIC_u for debiased CKA;
      gram:    e_ab = ||G_a||_F t_b + t_a ||G_b||_F, G the centred (U-centred) Gram, h_ab = <G_a, G_b>.
    A first-order perturbation of each h by at most u e gives |error of CKA| <= u kappa.
    self_a = h_aa / e_aa: how far a's self-HSIC stands above its rounding (0 for constant rows, and
    for debiased CKA rows all equal but one); kappa is inf where a self-HSIC is 0.
    """
    x, y = _center(to_f64(x)), _center(to_f64(y))
    n = x.shape[0]
    t = {"x": float((x * x).sum()), "y": float((y * y).sum())}
    feats = {"x": x, "y": y}
    h, e = {}, {}
    if method == "gram":
        g = {a: (_u_centre if debiased else (lambda k: k))(f @ f.T) for a, f in feats.items()}
        gn = {a: float(np.linalg.norm(m)) for a, m in g.items()}
        for a, b in (("x", "y"), ("x", "x"), ("y", "y")):
            h[a + b] = float((g[a] * g[b]).sum())
            e[a + b] = gn[a] * t[b] + t[a] * gn[b]
    else:
        rows = {a: (f * f).sum(1) for a, f in feats.items()}  # (n,) squared row norms
        for a, b in (("x", "y"), ("x", "x"), ("y", "y")):
            c = float(np.linalg.norm(feats[a].T @ feats[b]))
            e[a + b] = 2 * c * np.sqrt(t[a] * t[b])
            if debiased:
                k, l_ = feats[a] @ feats[a].T, feats[b] @ feats[b].T
                h[a + b] = hsic_unbiased_ref(k, l_) * n * (n - 3)
                e[a + b] += 2 * (1 + 2 / (n - 2)) * float((rows[a] * rows[b]).sum()) + 2 * t[a] * t[b] / ((n - 1) * (n - 2))
            else:
                h[a + b] = c * c
    selfs = {a: (h[a + a] / e[a + a] if e[a + a] > 0 else 0.0) for a in ("x", "y")}
    if min(h["xx"], h["yy"]) <= 0:
        return {"kappa": np.inf, "self_x": max(selfs["x"], 0.0), "self_y": max(selfs["y"], 0.0)}
    cka = h["xy"] / np.sqrt(h["xx"] * h["yy"])
    kappa = e["xy"] / np.sqrt(h["xx"] * h["yy"]) + abs(cka) * (e["xx"] / h["xx"] + e["yy"] / h["yy"]) / 2
    return {"kappa": float(kappa), "self_x": selfs["x"], "self_y": selfs["y"]}


def cka_matrix_ref(xs, ys=None, debiased: bool = False) -> np.ndarray:
    """(Lx, Ly) CKA of every layer pair; layers given as a stack or a list of (n, d_i)."""
    ys = xs if ys is None else ys
    return np.array([[linear_cka_ref(a, b, debiased) for b in ys] for a in xs])


def centered_gram_ref(x, unbiased: bool = False) -> np.ndarray:
    """(n, d) -> (n, n): H K H = (H X)(H X)^T with an explicit centring matrix H, or the U-centred Gram
    by its definition. H is applied to the features first: H (X X^T) H would cancel the squares of
    large column offsets in float64 (relative error u |offset|^2 / sigma^2)."""
    x = to_f64(x)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    hx = h @ x
    k = hx @ hx.T
    return _u_centre(k) if unbiased else k


def _signs(v: np.ndarray) -> np.ndarray:
    """(k, 1): the sign of the largest-magnitude entry of each row of v (k, d), 1 for a zero row."""
    idx = np.abs(v).argmax(axis=1)
    signs = np.sign(v[np.arange(v.shape[0]), idx])
    signs[signs == 0] = 1.0
    return signs[:, None]


def _sign_fix(v: np.ndarray) -> np.ndarray:
    """Rows of v flipped so the largest-magnitude entry of each is positive."""
    return v * _signs(v)


def exact_ints(a) -> tuple[np.ndarray, int]:
    """Float64 values as exact integers: (object array of Python ints m, e) with a == m 2^e exactly, one
    exponent e for the whole array (that of the lowest significand bit among its entries)."""
    a = np.asarray(a, dtype=np.float64)
    ratios = [float(v).as_integer_ratio() for v in a.ravel()]  # (p, 2^s) each, exact
    bits = max(q.bit_length() - 1 for _, q in ratios)
    return np.array([p << (bits - q.bit_length() + 1) for p, q in ratios], dtype=object).reshape(a.shape), -bits


def _exact_sum(parts) -> tuple[np.ndarray, int]:
    """The exact sum of float64 arrays of one shape, as ``exact_ints`` gives it: (ints, e)."""
    pairs = [exact_ints(p) for p in parts]
    e = min(pe for _, pe in pairs)
    return sum(m * (1 << (pe - e)) for m, pe in pairs), e


def _split(value: Fraction) -> tuple[float, float]:
    """A rational as (hi, lo): hi its nearest float64, lo the float64 nearest to value - hi."""
    hi = float(value)
    return hi, float(value - Fraction(hi))


def _scaled(num: int, den: int, e: int) -> Fraction:
    """num / den 2^e, exactly."""
    return Fraction(num << e, den) if e >= 0 else Fraction(num, den << -e)


def _exact_mean(x: np.ndarray) -> list[Fraction]:
    """The (d,) column means of (n, d) float64 x, exactly."""
    xi, ex = exact_ints(x)
    return [_scaled(int(c), x.shape[0], ex) for c in xi.sum(axis=0)]


# A refinement step's correction below this (the vectors are unit) ends the iteration: ~1e-24, 1e-8 of u64.
_REFINE_STOP = 2.0**-80
_REFINE_STEPS = 6


def _refined_eigenpairs(x: np.ndarray, k: int) -> dict:
    """Top-k eigenpairs of C = Xc^T Xc for (n, d) float64 x, refined in exact rational arithmetic.

    Xc is centred exactly (n Xc = n X - 1 1^T X, in integers by ``exact_ints``), so C carries no
    rounding. The float64 SVD of ``_center(x)`` gives the start v_i, eigenvalue estimates theta_j and
    basis V (min(n, d) rows). A step computes the residual res = C v - rho v exactly (rho = v^T C v /
    v^T v, the Rayleigh quotient), rounds it, and adds the first-order (Rayleigh-Schrodinger)
    correction delta = sum_{j != i} V_j (V_j^T res) / (rho - theta_j) + (res - V^T V res) / rho (the
    last term the null space of C, eigenvalue 0), computed in float64: its rounding is relative to
    |delta| ~ 1e-14, and v + delta is kept exactly as a sum of float64 parts. The step's error is
    |delta| times eta = max |res_j| / gap (from the float64 V_j, theta_j), so steps repeat until
    |delta| <= _REFINE_STOP (two steps for eta ~ 1e-14); a spectrum too clustered to converge in
    _REFINE_STEPS steps raises ValueError. Cost per step and vector: 2 n d exact integer multiply-adds.

    Returns (k, d) unit components, variances rho / (n - 1), ratios rho / trace(C), singular values
    sqrt(rho) and the (d,) mean, each as (hi, lo) float64 arrays: hi the value's nearest float64, lo
    the float64 nearest to the rest, so hi + lo is within _REFINE_STOP (relative) of the eigenpair.
    """
    n, d = x.shape
    xi, ex = exact_ints(x)  # x = xi 2^ex
    xcn = n * xi - xi.sum(axis=0)  # (n, d) ints: n Xc 2^-ex, exact
    trace = int((xcn * xcn).sum())  # n^2 trace(C) 2^-2ex
    _, s, vt = np.linalg.svd(_center(x), full_matrices=False)  # float64 start: (r,), (r, d)
    theta = s**2  # (r,) eigenvalue estimates of C
    out = {key: np.zeros((2, k, d) if key == "components" else (2, k))
           for key in ("components", "explained_variance", "explained_variance_ratio", "singular_values")}
    for i in range(k):
        parts = [vt[i]]  # the vector, exactly the sum of these float64 arrays
        for _ in range(_REFINE_STEPS):
            vi, ev = _exact_sum(parts)  # v = vi 2^ev
            z = xcn.T.dot(xcn.dot(vi))  # (d,) ints: C v = z 2^(2 ex + ev) / n^2
            num, den = int(vi.dot(z)), int(vi.dot(vi))  # rho = num 2^2ex / (n^2 den)
            if num == 0:
                raise ValueError(f"eigenvalue {i + 1} of the covariance is 0: its direction is undefined")
            rho = float(_scaled(num, n * n * den, 2 * ex))
            res = np.array([float(_scaled(int(t), n * n * den, 2 * ex + ev)) for t in z * den - num * vi])  # (d,)
            gaps = rho - theta  # (r,)
            gaps[i] = np.inf  # no correction along v itself
            w = 1.0 / gaps
            proj = vt @ res  # (r,)
            delta = vt.T @ (w * proj) + (res - vt.T @ proj) / rho  # (d,)
            parts.append(delta)
            if np.linalg.norm(delta) <= _REFINE_STOP:
                break
        else:
            raise ValueError(f"eigenpair {i + 1} did not converge in {_REFINE_STEPS} refinement steps: its "
                             "eigenvalue is too close to another")
        vi, ev = _exact_sum(parts)
        norm2 = _scaled(int(vi.dot(vi)), 1, 2 * ev)  # |v|^2 = 1 + t, t ~ 1e-16
        t = norm2 - 1
        scale = 1 - t / 2 + 3 * t * t / 8  # 1 / sqrt(1 + t) to O(t^3) ~ 1e-48
        comp = [_split(_scaled(int(m), 1, ev) * scale) for m in vi]
        out["components"][:, i] = np.array(comp).T
        rho = _scaled(num, n * n * den, 2 * ex)
        out["explained_variance"][:, i] = _split(rho / (n - 1))
        out["explained_variance_ratio"][:, i] = _split(Fraction(num, den * trace))  # rho / trace(C)
        root = float(rho) ** 0.5
        out["singular_values"][:, i] = (root, float((rho - Fraction(root) ** 2) / (2 * Fraction(root))))
    out["mean"] = np.array([_split(m) for m in _exact_mean(x)]).T  # (2, d)
    return out


def pca_ref(x, k: int, refine: bool = False) -> dict:
    """Exact PCA of (n, d) by full SVD of the centred data.

    Returns components (k, d) with deterministic signs, singular_values (k,),
    explained_variance (k,) = s^2 / (n - 1), explained_variance_ratio (k,), mean (d,).

    refine: the top k refined in exact rational arithmetic (``_refined_eigenpairs``), for float64
    inputs, whose LAPACK SVD is only accurate to ~100 u64 (its bidiagonal QR's deflation threshold):
    each value is then its nearest float64, and each key has a twin ``<key>_lo`` with the rest (hi + lo
    within 2^-80 relative of exact), for comparisons that must not round the reference.
    """
    x = to_f64(x)
    if refine:
        ref = _refined_eigenpairs(x, k)
        signs = _signs(ref["components"][0])  # (k, 1)
        out = {}
        for key, (hi, lo) in ref.items():
            out[key], out[key + "_lo"] = (hi * signs, lo * signs) if key == "components" else (hi, lo)
        return out
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(_center(x), full_matrices=False)
    var = s**2 / (x.shape[0] - 1)
    return {
        "components": _sign_fix(vt[:k]),
        "singular_values": s[:k],
        "explained_variance": var[:k],
        "explained_variance_ratio": var[:k] / var.sum(),
        "mean": mean,
    }


def pca_gaps_ref(x, k: int) -> dict:
    """Spectral quantities of (n, d) that bound PCA's rounding errors (see ``randomized_pca``).

    Returns var (min(n, d),) explained variances (ddof=1), and for the top k: ``component_gap`` (k,)
    = min distance of var_i to var_{i-1} and var_{i+1} (what a single direction's angle depends
    on), ``subspace_gap`` = var_k - var_{k+1} (what the top-k subspace's angle depends on).
    """
    x = to_f64(x)
    s = np.linalg.svd(_center(x), compute_uv=False)
    var = np.concatenate([s**2 / (x.shape[0] - 1), [0.0]])  # var_{min(n,d)+1} = 0
    above = np.concatenate([[np.inf], var[: k - 1]])
    comp = np.minimum(above - var[:k], var[:k] - var[1 : k + 1])
    return {"var": var[:-1], "component_gap": comp, "subspace_gap": float(var[k - 1] - var[k])}


def exact_residual_ref(a_parts, b_parts) -> np.ndarray:
    """A - (A B^T) B for A = sum(a_parts) (k_a, d) and B = sum(b_parts) (k_b, d) with orthonormal rows,
    in exact rational arithmetic on the float64 parts, rounded once: (k_a, d), accurate relative to the
    residual itself (a float64 projection is only accurate to ~u64 absolute)."""
    ai, ea = _exact_sum(a_parts)  # A = ai 2^ea
    bi, eb = _exact_sum(b_parts)  # B = bi 2^eb, eb <= 0 (entries of unit rows)
    resid = ai * (1 << -2 * eb) - ai.dot(bi.T).dot(bi)  # (k_a, d): the residual 2^-(ea + 2 eb)
    return np.array([float(_scaled(int(t), 1, ea + 2 * eb)) for t in resid.ravel()]).reshape(resid.shape)


def pca_similarity_ref(x_ref, x_upd, k: int = 1, signed: bool = False, refine: bool = False) -> float:
    """Mean cosine of the principal angles between the top-k PCA subspaces (|cos| for k = 1).

    refine: both fits refined (``pca_ref``), the signed cosines summed exactly and the principal angles'
    cosines taken as sqrt(1 - sin^2), sin^2 the eigenvalues of E E^T for the exact residual E of one
    basis on the other (``exact_residual_ref``): no LAPACK SVD (its deflation would move cosines near 1
    by up to ~100 u64), so the result is within a few u64 of exact.
    """
    a, b = pca_ref(x_ref, k, refine), pca_ref(x_upd, k, refine)
    if not refine:
        a, b = a["components"], b["components"]
        if signed:
            return float(np.mean(np.sum(a * b, axis=1)))
        return float(np.mean(np.linalg.svd(a @ b.T, compute_uv=False)))
    pa, pb = [a["components"], a["components_lo"]], [b["components"], b["components_lo"]]
    if signed:
        (ai, ea), (bi, eb) = _exact_sum(pa), _exact_sum(pb)
        return float(np.mean([float(_scaled(int(t), 1, ea + eb)) for t in (ai * bi).sum(axis=1)]))
    resid = exact_residual_ref(pa, pb)  # (k, d)
    sin2 = np.clip(np.linalg.eigvalsh(resid @ resid.T), 0.0, 1.0)  # (k,)
    return float(np.mean(np.sqrt(1.0 - sin2)))


def pca_shift_ref(x_ref, x_upd, k: int = 2, normalize: bool = False, refine: bool = False) -> np.ndarray:
    """(mean(x_upd) - mean(x_ref)) on x_ref's top-k directions, optionally over sqrt(explained variance).

    refine: x_ref's fit refined (``pca_ref``), the means and the projection exact, rounded once (then
    divided by the float64 sqrt of the variance: within 2 u64 relative).
    """
    ref = pca_ref(x_ref, k, refine)
    if refine:
        ci, ec = _exact_sum([ref["components"], ref["components_lo"]])
        delta = [mu - mr for mu, mr in zip(_exact_mean(to_f64(x_upd)), _exact_mean(to_f64(x_ref)))]  # (d,)
        shift = np.array([float(sum(int(c) * t for c, t in zip(row, delta)) * _scaled(1, 1, ec)) for row in ci])
    else:
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


# --------------------------------------------------------------------------- kernel op twins
# Each kernel op's contract (repforget_kernels._ops) in float64, on the op's own arguments: a dict of
# named float64 arrays (for an in-place op, the new values of what it updates). Shifts and scales are
# applied as given (the op applies them exactly in the compute dtype).


def _rounded_mean(x: np.ndarray, float64_input: bool) -> np.ndarray:
    """Column means over the rows (axis -2) in float64, rounded to the compute dtype (float32 unless float64 input)."""
    mean = x.mean(axis=-2)
    return mean if float64_input else mean.astype(np.float32).astype(np.float64)


def _scales(scale, layers: int) -> np.ndarray:
    """(L, 1, 1) float64 scale factors from an (L,) tensor or None (1)."""
    return np.ones((layers, 1, 1)) if scale is None else to_f64(scale).reshape(-1, 1, 1)


def square_accumulate_op_ref(accs, grads, scale: float) -> dict:
    """acc + scale * grad**2 for every pair: {"acc[i]": array}."""
    return {f"acc[{i}]": fisher_accumulate_ref(a, g, scale) for i, (a, g) in enumerate(zip(accs, grads))}


def per_sample_linear_fisher_op_ref(x, grad_out, mask, out) -> dict:
    """out + sum_s G_s**2 by the explicit per-sample loop: {"out": (out, in)}."""
    return {"out": to_f64(out) + per_sample_linear_fisher_ref(x, grad_out, mask)}


def histogram_op_ref(values, lo: float, hi: float, bins: int, log: bool) -> dict:
    """Counts in ``bins`` equal (log10-spaced when ``log``) bins over [lo, hi], by the op's bin formula:
    floor(t bins), t the position in [0, 1]; hi in the last bin; values outside not counted. {"counts": (bins,)}."""
    v = to_f64(values).ravel()
    keep = (v >= lo) & (v <= hi) & ((v > 0) if log else True)
    v = v[keep]
    a, z = (np.log10(lo), np.log10(hi)) if log else (lo, hi)
    t = ((np.log10(v) if log else v) - a) / (z - a)
    idx = np.clip(np.floor(t * bins).astype(np.int64), 0, bins - 1)
    return {"counts": np.bincount(idx, minlength=bins).astype(np.float64)}


def shifted_cross_products_op_ref(x, y, shift_x, shift_y, debiased: bool, scale_x=None, scale_y=None) -> dict:
    """The sums of shifted and scaled rows x' = (x - shift_x) scale_x, y' likewise, by their definitions."""
    x, y = to_f64(x), to_f64(y)
    xs = (x - to_f64(shift_x)[:, None, :]) * _scales(scale_x, x.shape[0])  # (L, n, dx)
    ys = (y - to_f64(shift_y)[:, None, :]) * _scales(scale_y, y.shape[0])  # (L, n, dy)
    xt = np.swapaxes(xs, -1, -2)
    out = {"sxy": xt @ ys, "sxx": xt @ xs, "syy": np.swapaxes(ys, -1, -2) @ ys, "sx": xs.sum(1), "sy": ys.sum(1)}
    if debiased:
        a, b = (xs**2).sum(-1), (ys**2).sum(-1)  # (L, n) squared row norms
        out.update(sa=a.sum(-1), sb=b.sum(-1), saa=(a**2).sum(-1), sbb=(b**2).sum(-1), sab=(a * b).sum(-1),
                   sax=np.einsum("ln,lnd->ld", a, xs), sbx=np.einsum("ln,lnd->ld", b, xs),
                   say=np.einsum("ln,lnd->ld", a, ys), sby=np.einsum("ln,lnd->ld", b, ys))
    return out


def centered_gram_op_ref(x, unbiased: bool, scale=None) -> dict:
    """{"gram": (L, n, n) H K H (U-centred when ``unbiased``), "trace": (L,) tr K} for K = X' X'^T,
    X' = (X - 1 s^T) scale, s the column means rounded to the compute dtype."""
    float64_input = str(getattr(x, "dtype", "")) in ("torch.float64", "float64")  # tensor or array
    x = to_f64(x)
    xs = (x - _rounded_mean(x, float64_input)[:, None, :]) * _scales(scale, x.shape[0])  # (L, n, d)
    k = xs @ np.swapaxes(xs, -1, -2)  # (L, n, n)
    n = k.shape[-1]
    if unbiased:
        gram = np.stack([_u_centre(kl) for kl in k])
    else:
        h = np.eye(n) - np.ones((n, n)) / n
        gram = h @ k @ h
    return {"gram": gram, "trace": np.trace(k, axis1=-2, axis2=-1)}


def centered_matmul_op_ref(x, mu, omega) -> dict:
    """{"out": (X - 1 mu^T) Omega}: (L, n, d), (L, d), (L, d, l) -> (L, n, l)."""
    return {"out": (to_f64(x) - to_f64(mu)[:, None, :]) @ to_f64(omega)}


def centered_matmul_t_op_ref(x, mu, q) -> dict:
    """{"out": (X - 1 mu^T)^T Q}: (L, n, d), (L, d), (L, n, l) -> (L, d, l)."""
    return {"out": np.swapaxes(to_f64(x) - to_f64(mu)[:, None, :], -1, -2) @ to_f64(q)}


def column_stats_op_ref(x) -> dict:
    """{"sum": (L, d) column sums, "min", "max": (L, d) column extrema} of (L, n, d) x, in float64."""
    x = to_f64(x)
    return {"sum": x.sum(axis=1), "min": x.min(axis=1), "max": x.max(axis=1)}
