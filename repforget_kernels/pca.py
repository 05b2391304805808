"""Randomized PCA (block Krylov, Musco & Musco 2015; subspace iteration, Halko, Martinsson & Tropp 2011)
and the per-layer PCA similarity and shift.

For X (n, d) with float64 column means mu = s + r (s rounded to the compute dtype, r the
float64 remainder, at most half an ulp of mu), the data is centred without a full centred copy:
the kernels subtract s from each row block before the product (exact for columns with a large
offset: x and s agree in their leading bits), and the remainder is removed implicitly,
Xc Z = (X - 1 s^T) Z - 1 (r^T Z), Xc^T Q = (X - 1 s^T)^T Q - r (1^T Q); the implicit form
X Z - 1 (mu^T Z) would lose eps |mu| / sigma of relative precision. Halko's power iterations alternate
Q = orth(Xc Z) and Z = orth(Xc^T Q), two reads of X per iteration; here each iteration applies
the covariance in ONE read of X, row block by row block (each block is used twice while in cache):

    Z = Omega                                         (d, l)  Gaussian, l = k + oversample
    repeat n_iter:  Z = orth(Xc^T (Xc Z))             one pass over X
    Q = orth(Xc Z)                                    (n, l)  one pass
    B = Q^T Xc = U S V^T                              (l, d)  one pass
    components = V^T[:k], singular values S[:k], explained variance = S^2 / (n - 1)

In exact arithmetic Q spans Xc (Xc^T Xc)^q Omega, exactly Halko's basis after q power
iterations, so the result is the same; it costs q + 2 reads of X instead of 2 q + 2.

The default, ``method="krylov"``, keeps every block instead of the last (randomized block Krylov
iteration, Musco & Musco 2015) and extracts the components by Rayleigh-Ritz on the covariance
C = Xc^T Xc, reusing the products it already made:

    W_0 = C orth(Omega)                               (d, b)  b = k + oversample, one pass over X
    K_j = orth(W_{j-1} - K K^T W_{j-1})  (twice),  W_j = Xc^T Y_j, Y_j = Xc K_j   j = 1 .. q
    Y = [Y_1 .. Y_q] = U S V^T                        (n, q b); the last block needs only Y_q
    components = (K V)^T[:k], explained variance = S[:k]^2 / (n - 1)

K spans C Omega, C^2 Omega, .., C^q Omega: every power up to the subspace method's, so it converges
like a Chebyshev polynomial of degree q rather than a monomial; on activation-like spectra without a
clean gap it reaches the subspace method's error with a block of k + 2 instead of k + 10 columns, in
q + 1 reads of X and 2 q n d b multiply-adds. The Ritz pairs come from the SVD of Xc K, not from the
eigenvalues of K^T C K, so the accuracy is that of the subspace method's final SVD. The price
is orthonormalising after each covariance product rather than after each half: directions whose
variance is below float32 eps (float64 eps) times the largest fade, which leaves the top
components untouched. Batched over a leading layer dimension; computed in float32 (float64 for
float64 input); signs fixed so the largest-magnitude entry of each component is positive.

Length: one module because both methods share the exact centring (_Centring, the blocked products)
and the spectrum checks, and pca_similarity / pca_shift are thin wrappers over the same fit.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._dispatch import kernel, needs_grad
from ._numerics import ZERO_TEST_FACTOR, scale_from_extrema, shift_from_sums, unit_roundoff
from ._ops import CENTERED_MATMUL, CENTERED_MATMUL_T, COLUMN_STATS
from ._validate import check_finite_by_column_sums, check_rows, check_same_device, compute_dtype

__all__ = ["METHODS", "PCAResult", "randomized_pca", "pca_similarity", "pca_shift"]


class PCAResult(NamedTuple):
    """Top-k principal components of (..., n, d) data; every field float32 (float64 for float64 input).

    components (..., k, d) unit rows; singular_values (..., k) of the centred data;
    explained_variance (..., k) = singular_values**2 / (n - 1);
    explained_variance_ratio (..., k) = explained_variance / total variance; mean (..., d).
    """

    components: torch.Tensor
    singular_values: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mean: torch.Tensor


# --------------------------------------------------------------------------- orthonormalisation


def _cholesky_qr_pass(a: torch.Tensor):
    """One Cholesky-QR pass on a (L, m, l) float64: (Q, ok) with Q = A R^-1, A^T A = R^T R."""
    gram = a.transpose(-1, -2) @ a  # (L, l, l)
    r, info = torch.linalg.cholesky_ex(gram, upper=True)  # (L, l, l) upper, (L,)
    q = torch.linalg.solve_triangular(r, a, upper=True, left=False)  # (L, m, l) = A R^-1
    return q, bool((info == 0).all())


def _cholesky_qr2(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a (L, m, l), m >= l, by CholeskyQR2 in float64.

    Returns (L, m, l) in a's dtype. Cost: 2 (2 m l^2 + l^3 / 3 + m l^2) flops in float64.
    Falls back to Householder QR (torch.linalg.qr) when a Gram matrix is not numerically
    positive definite (rank-deficient or cond(A) beyond ~1e7).
    """
    a64 = a.to(torch.float64)  # (L, m, l)
    q, ok = _cholesky_qr_pass(a64)
    if ok:
        q, ok = _cholesky_qr_pass(q)
    if not ok or not bool(torch.isfinite(q).all()):
        q = torch.linalg.qr(a64, mode="reduced").Q  # (L, m, l)
    return q.to(a.dtype)


def _orthonormalize(a: torch.Tensor, cholesky: bool) -> torch.Tensor:
    """Orthonormal basis of the columns of a (L, m, l), m >= l: -> (L, m, l).

    ``cholesky``: :func:`_cholesky_qr2` (chosen on CUDA: two GEMMs and two tiny factorisations
    replace a tall-skinny Householder QR's many small launches); else the reduced QR's Q.
    Plain torch either way, so no backend registers it.
    """
    return _cholesky_qr2(a) if cholesky else torch.linalg.qr(a, mode="reduced").Q


# --------------------------------------------------------------------------- public API


def _check_k(k, x: torch.Tensor, name: str) -> None:
    """k must be an int in [1, min(n, d)] of ``x`` (named ``name`` in the error)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    n, d = x.shape[-2], x.shape[-1]
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must be in [1, min(n, d)] = [1, {min(n, d)}] for {name} of shape {tuple(x.shape)}, got {k}")


def _block_rows(x3: torch.Tensor) -> int:
    """Rows per block so one block of x stays in cache between its two products (4 MiB CPU, 32 MiB GPU)."""
    budget = (32 if x3.is_cuda else 4) * 2**20
    return max(1, budget // (x3.shape[0] * x3.shape[-1] * x3.element_size()))


class _Centring(NamedTuple):
    """How x is centred: x' = x - 1 shift^T (in the kernels, exact for offset columns) - 1 rem^T (here).

    shift (L, d) and rem (L, d) in the compute dtype; scale (L, 1, 1) a power of two bringing the
    centred values to about 1, applied to the sketch so products of rows stay in range.
    """

    shift: torch.Tensor
    rem: torch.Tensor
    scale: torch.Tensor


def _times(x3, c: _Centring, z, matmul, block: int) -> torch.Tensor:
    """(X - 1 mean^T) Z, row block by row block: (L, n, d), (L, d, l) -> (L, n, l)."""
    rz = c.rem.unsqueeze(-2) @ z  # (L, 1, l)
    return torch.cat([matmul(x3[:, i:i + block], c.shift, z) - rz for i in range(0, x3.shape[-2], block)], -2)


def _t_times(xb, c: _Centring, q, matmul_t) -> torch.Tensor:
    """(Xb - 1 mean^T)^T Q for one row block: (L, b, d), (L, b, l) -> (L, d, l)."""
    return matmul_t(xb, c.shift, q) - c.rem.unsqueeze(-1) * q.sum(-2, keepdim=True)


def _covariance_times(x3, c: _Centring, z, matmul, matmul_t, block: int, keep: bool = False):
    """scale^2 Xc^T (Xc Z) in one pass over x, row block by row block: (L, n, d), (L, d, l) -> (L, d, l);
    with ``keep``, also the intermediate scale^2 Xc Z (L, n, l)."""
    out, kept = 0, []
    zs = z * c.scale  # (L, d, l)
    rz = c.rem.unsqueeze(-2) @ zs  # (L, 1, l)
    for start in range(0, x3.shape[-2], block):
        xb = x3[:, start:start + block]  # (L, b, d)
        yb = (matmul(xb, c.shift, zs) - rz) * c.scale  # (L, b, l)
        out = out + _t_times(xb, c, yb, matmul_t)  # (L, d, l)
        if keep:
            kept.append(yb)
    return (out, torch.cat(kept, -2)) if keep else out


def _total_variance(x3: torch.Tensor, c: _Centring, block: int) -> torch.Tensor:
    """sum_j var(x_j) = ||X - 1 mean^T||_F^2 / (n - 1), row block by row block (no full copy): -> (L,) float64.

    ||X - 1 s^T||^2 is summed in float64 from the exact shifted values, then n |rem|^2 removed
    (the shifted columns have mean rem).
    """
    n = x3.shape[-2]
    total = 0
    for start in range(0, n, block):
        xb = x3[:, start:start + block].to(c.shift.dtype) - c.shift.unsqueeze(-2)  # (L, b, d)
        total = total + torch.linalg.vector_norm(xb, dim=(-2, -1), dtype=torch.float64).square()
    return (total - n * c.rem.to(torch.float64).square().sum(-1)) / (n - 1)


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip rows of v (..., k, d) so each row's largest-magnitude entry is positive."""
    idx = v.abs().argmax(-1, keepdim=True)  # (..., k, 1)
    signs = torch.sign(torch.gather(v, -1, idx))  # (..., k, 1)
    return v * torch.where(signs == 0, torch.ones_like(signs), signs)


def randomized_pca(
    x: torch.Tensor,
    k: int,
    *,
    method: str = "krylov",
    oversample: Optional[int] = None,
    n_iter: Optional[int] = None,
    center: bool = True,
    seed: int = 0,
    backend: Optional[str] = None,
) -> PCAResult:
    """Top-k principal components of x by randomized block Krylov or subspace iteration.

    Args:
        x: (n, d) or (B, n, d), samples as rows; any float dtype (half input computed in float32).
        k: number of components, 1 <= k <= min(n, d).
        method: ``"krylov"`` (default: Rayleigh-Ritz on the block Krylov space of the covariance) or
            ``"subspace"`` (Halko et al.'s subspace iteration, the last block only); see the module docstring.
        oversample: extra random directions p >= 0 (default 2 for krylov, 10 for subspace); the block has
            b = min(k + p, min(n, d)) columns.
        n_iter: power iterations q >= 0 (subspace) or Krylov blocks q >= 1 (krylov), default 4, each block
            re-orthonormalised. Where krylov's q b directions would reach the rank bound r = min(n - 1, d)
            of centred data (min(n, d) uncentred), a sketch of r columns already spans the data: it runs the
            subspace method with l = r and no iteration instead, exact to rounding.
        center: subtract column means (implicitly); False treats x as already centred
            (mean is then reported as zeros and the variance as the raw second moment / (n - 1)).
        seed: seeds the Gaussian test matrix (drawn on the CPU, so results agree across devices).
        backend: force a backend.

    Returns:
        :class:`PCAResult`, leading dims of x kept. Differentiable on every backend (an input that
        requires grad runs the torch composites; the gradient is that of this randomized estimate
        for the fixed seed, defined where the top-l spectrum has no ties).

    Numerics: rows are centred by their float64 means, split into a shift rounded to the compute
    dtype (subtracted in the kernels before any product: exact under large column offsets) and a
    float64 remainder (removed by a rank-one correction), and the sketch is scaled by a power of
    two, so the result depends neither on offsets nor on the data's magnitude.

    Accuracy against a float64 SVD of the same input values, with eps = 4 u (sqrt(n) + sqrt(d))
    (u = 2^-24 for float32 work, half input included; 2^-53 for float64; krylov: times sqrt(m), m = q b
    the dimension of its space, for the rounding of the product Xc K of m columns and of its SVD mapped
    back through K, where the subspace method's SVD of the projection Q^T Xc needs no such factor) and r_i =
    10 sqrt(d) (var_{l+1} / var_i)^(q + 1/2) the randomized term of the subspace method with l = b
    columns (krylov: exponent q, its space holding the subspace method's last block, in practice far
    smaller; 0 where it runs the exact sketch), negligible once the iterations have separated the top
    k: the angle of component i is at most
    eps var_1 / gap_i + r_i, gap_i its variance's distance to its neighbours'; that of the top-k
    subspace eps var_1 / (var_k - var_{k+1}) + r_k; the relative error of explained variance i
    eps var_1 / var_i + r_i (the ratio's the same, the singular value's half); plus the final SVD's
    deflation: LAPACK's bidiagonal QR (xBDSQR, inside xGESDD) zeroes an off-diagonal entry once it is at
    most tau = max(10, min(100, u^(-1/8))) u times its diagonal neighbour (98.7 u in float64, 10 u in
    float32), so that SVD of m values is exact for its input plus a perturbation of 2-norm at most
    delta = sqrt(m - 1) tau sigma_1 (the m - 1 zeroed entries lie in disjoint blocks), which adds
    delta / |sigma_i - sigma_j| to the angle of component i (Wedin; sigma the singular values of the
    centred data, sigma_j the nearest neighbour's, sigma_k - sigma_{k+1} for the subspace) and
    2 delta / sigma_i to the relative error of variance i (Weyl); m = b (subspace), min(n, q b)
    (krylov), the rank bound r (exact sketch). In float64 this term dominates eps. Plus the rounding
    of results to float32. Ties (no gap) leave the components undefined, as in exact arithmetic.

    Raises ValueError when x has no variance (its centred rows within the float64 mean's rounding
    of zero: constant rows) or is numerically rank-deficient for this k: a requested component's
    variance is at most 64 u var_1 (a covariance product in the working precision cannot resolve
    it, so its direction is undefined); the error names the input, the batch index and the
    direction.

    Cost: krylov 2 q n d b multiply-adds in q + 1 reads of x, 2 q QRs of (d, b), an SVD of (n, q b), and
    memory for Xc K (n, q b); subspace (2 q + 2) n d b in q + 2 reads, q QRs of (d, b), one of (n, b), an SVD
    of (b, d).

    Array inputs: NumPy arrays and anything ``torch.as_tensor`` takes are accepted as well as tensors; the
    result is of tensors either way (float64 arrays compute in float64).
    """
    return _fit(x, k, "x", method=method, oversample=oversample, n_iter=n_iter, center=center, seed=seed,
                backend=backend)[0]


METHODS = {"krylov": {"oversample": 2, "n_iter": 4}, "subspace": {"oversample": 10, "n_iter": 4}}


def _options(method, oversample, n_iter) -> tuple:
    """(oversample, n_iter) with the method's defaults filled in; ValueError naming a bad option."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    oversample = METHODS[method]["oversample"] if oversample is None else oversample
    n_iter = METHODS[method]["n_iter"] if n_iter is None else n_iter
    for opt, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{opt} must be a non-negative int, got {v!r}")
    if method == "krylov" and n_iter < 1:
        raise ValueError(f"n_iter must be >= 1 for method='krylov' (its space is C Omega .. C^q Omega), got {n_iter}")
    return oversample, n_iter


def _fit(x, k, name, *, method, oversample, n_iter, center, seed, backend) -> tuple:
    """randomized_pca of ``x`` (named ``name`` in errors): (PCAResult, mean float64 (..., d), variances float64 (..., k))."""
    x = check_rows(x, name, min_rows=2, finite=False)  # finiteness from the column sums below
    _check_k(k, x, name)
    n, d = x.shape[-2], x.shape[-1]
    oversample, n_iter = _options(method, oversample, n_iter)
    cd = compute_dtype(x)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # (L, n, d)
    L = x3.shape[0]
    l = min(k + oversample, n, d)
    sums, lo, hi = kernel(COLUMN_STATS, x.device, backend, grad=needs_grad(x))(x3)  # one pass: (L, d) each
    check_finite_by_column_sums(sums, x3, name)
    if center:
        mean, shift = shift_from_sums(sums, n, cd)  # (L, d) float64, (L, d) cd
    else:
        mean = torch.zeros(L, d, dtype=torch.float64, device=x.device)  # (L, d)
        shift = mean.to(cd)
    c = _Centring(shift, (mean.detach() - shift.to(torch.float64)).to(cd),
                  scale_from_extrema(lo, hi, centred=center).to(cd).view(L, 1, 1))
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(L, d, l, generator=gen, dtype=torch.float64).to(device=x.device, dtype=cd)  # (L, d, l)
    grad = needs_grad(x)
    matmul = kernel(CENTERED_MATMUL, x.device, backend, grad=grad)
    matmul_t = kernel(CENTERED_MATMUL_T, x.device, backend, grad=grad)
    cholesky = x.device.type == "cuda" and not grad  # Householder QR where autograd differentiates

    def orth(a: torch.Tensor) -> torch.Tensor:
        return _orthonormalize(a, cholesky)

    block = _block_rows(x3)
    room = max(min(n - 1 if center else n, d), l)  # the centred row space's dimension bound
    if method == "krylov" and n_iter * l >= room:  # the space would hold the whole row space: a sketch of room
        # columns already does (Q = orth(Xc Omega) spans range(Xc)), with no iteration and the subspace
        # method's final SVD
        method, n_iter = "subspace", 0
        omega = torch.randn(L, d, room, generator=gen, dtype=torch.float64).to(omega)  # (L, d, room)
    if method == "krylov":
        vt, s = _krylov(x3, c, omega, n_iter, matmul, matmul_t, orth, block, gen)
        s64 = s[:, :k].to(torch.float64) / c.scale.view(L, 1).to(torch.float64) ** 2  # (L, k) unscaled, exact
    else:
        vt, s = _subspace(x3, c, omega, n_iter, matmul, matmul_t, orth, block)
        s64 = s[:, :k].to(torch.float64) / c.scale.view(L, 1).to(torch.float64)  # (L, k) unscaled, exact
    components = _fix_signs(vt[:, :k])  # (L, k, d)
    var = s64.square() / (n - 1)  # (L, k) float64
    total = _total_variance(x3, c, block)  # (L,) float64
    # the float64 mean is exact to ~u64 |mean| (so is a constant float64 column's centring): no variance
    # when the centred rows are within that of zero, i.e. (n - 1) total <= n (64 u64)^2 |mean|^2
    floor = n * (ZERO_TEST_FACTOR * unit_roundoff(torch.float64)) ** 2 * mean.detach().square().sum(-1)  # (L,)
    _check_spectrum(total * (n - 1) <= floor, var, unit_roundoff(cd), name, center)
    out = PCAResult(components, s64.to(cd), var.to(cd), (var / total.unsqueeze(-1)).to(cd), mean.to(cd))
    if x.dim() == 2:
        out, mean, var = PCAResult(*(t[0] for t in out)), mean[0], var[0]
    return out, mean, var


def _subspace(x3, c: _Centring, omega, n_iter: int, matmul, matmul_t, orth, block: int) -> tuple:
    """Halko's subspace iteration in covariance form: -> (vt (L, l, d), singular values (L, l) of scale Xc)."""
    n = x3.shape[-2]
    z = omega  # (L, d, l)
    for _ in range(n_iter):
        z = orth(_covariance_times(x3, c, z, matmul, matmul_t, block))  # (L, d, l)
    q = orth(_times(x3, c, z * c.scale, matmul, block))  # (L, n, l) orthonormal basis of Xc (Xc^T Xc)^q Omega
    b = sum(_t_times(x3[:, i:i + block], c, q[:, i:i + block], matmul_t) for i in range(0, n, block))  # (L, d, l)
    _, s, vt = torch.linalg.svd(b.transpose(-1, -2) * c.scale, full_matrices=False)  # s (L, l), vt (L, l, d)
    return vt, s


def _project_out(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the orthonormal columns of basis, twice (CGS2): (L, d, b), (L, d, m)."""
    for _ in range(2):
        w = w - basis @ (basis.transpose(-1, -2) @ w)
    return w


def _next_block(image, basis: Optional[torch.Tensor], noise, orth) -> torch.Tensor:
    """The next orthonormal Krylov block (L, d, b) from image = C K_j (L, d, b): its part outside basis (L, d, m).

    Where C K_j lies (nearly) inside span(basis) (the data's rank reached, or directions converged),
    the residual is rounding noise and a QR would complete it with arbitrary columns that may lie
    inside the basis again; ``noise`` (L, d, b), Gaussian times u |image|_F / sqrt(d b), is added so
    that such columns become random directions outside the basis (a perturbation at the level of the
    projection's own rounding), and the block is projected out once more after its QR.
    """
    w = image if basis is None else _project_out(image, basis)
    size = torch.linalg.matrix_norm(image).view(-1, 1, 1) / math.sqrt(noise.shape[-2] * noise.shape[-1])
    w = w + noise * size  # (L, d, b), |noise|_F about u |image|_F
    q = orth(w)
    return q if basis is None else orth(_project_out(q, basis))


def _krylov(x3, c: _Centring, omega, depth: int, matmul, matmul_t, orth, block: int, gen) -> tuple:
    """Block Krylov iteration with Rayleigh-Ritz, in depth + 1/2 passes over x: -> (vt (L, m, d), the
    singular values (L, m) of scale^2 Xc K, decreasing), m = depth b (the caller keeps m below the rank
    bound min(n - 1, d), handing larger spaces to the exact sketch).

    The Ritz pairs of C on span K come from the SVD of Xc K = U S V^T (components (K V)^T, variances
    S^2 / (n - 1)) rather than from K^T C K, so the squared matrix's rounding never enters; Xc K_j is the
    intermediate of the pass that makes C K_j, kept, and the last block needs only that half pass.
    """
    u = unit_roundoff(omega.dtype)
    image = _covariance_times(x3, c, orth(omega), matmul, matmul_t, block)  # (L, d, b) scale^2 C Omega
    blocks, rows = [], []  # K_j, and scale^2 Xc K_j
    for j in range(depth):
        noise = u * torch.randn(omega.shape, generator=gen, dtype=torch.float64).to(omega)  # (L, d, b)
        blocks.append(_next_block(image, torch.cat(blocks, -1) if blocks else None, noise, orth))  # (L, d, b)
        if j == depth - 1:
            rows.append(_times(x3, c, blocks[-1] * c.scale, matmul, block) * c.scale)  # (L, n, b)
        else:
            image, y = _covariance_times(x3, c, blocks[-1], matmul, matmul_t, block, keep=True)  # (L, d/n, b)
            rows.append(y)
    _, s, vt = torch.linalg.svd(torch.cat(rows, -1), full_matrices=False)  # s (L, m), vt (L, m, m)
    return vt @ torch.cat(blocks, -1).transpose(-1, -2), s  # (L, m, d) Ritz vectors, (L, m)


def _check_spectrum(flat: torch.Tensor, var: torch.Tensor, u: float, name: str, center: bool) -> None:
    """ValueError naming ``name`` where x has no variance (``flat`` (L,) bool), or a requested component's
    variance is within rounding of zero (<= ZERO_TEST_FACTOR u var_1): var (L, k) float64."""
    with torch.no_grad():
        if bool(flat.any()):
            raise ValueError(f"{name} has no variance (every row equal{' after centring' if center else ''}) at batch "
                             f"index {flat.nonzero().flatten().tolist()}: its principal components are undefined")
        tiny = var <= ZERO_TEST_FACTOR * u * var[:, :1]  # (L, k)
        if bool(tiny.any()):
            b, i = (int(t) for t in tiny.nonzero()[0])
            raise ValueError(
                f"{name} is numerically rank-deficient at batch index {b}: principal direction {i + 1} has variance "
                f"{float(var[b, i]):.3g}, within rounding of zero (<= {ZERO_TEST_FACTOR:g} u var_1 = "
                f"{ZERO_TEST_FACTOR * u * float(var[b, 0]):.3g}), so it is undefined; use k <= {i}"
            )


def _check_pair(x_ref, x_upd, k: int, fit_upd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs checked, named and returned as tensors; k checked against x_ref (and x_upd when its
    PCA is fitted too)."""
    x_ref = check_rows(x_ref, "x_ref", min_rows=2)
    x_upd = check_rows(x_upd, "x_upd", min_rows=2)
    _check_k(k, x_ref, "x_ref")
    if fit_upd:
        _check_k(k, x_upd, "x_upd")
    check_same_device(x_ref=x_ref, x_upd=x_upd)
    if x_ref.dim() != x_upd.dim() or x_ref.shape[-1] != x_upd.shape[-1] or x_ref.shape[:-2] != x_upd.shape[:-2]:
        raise ValueError(
            "x_ref and x_upd must share the batch dimension and the feature dimension d "
            f"(row counts may differ), got x_ref {tuple(x_ref.shape)} and x_upd {tuple(x_upd.shape)}"
        )
    return x_ref, x_upd


def pca_similarity(
    x_ref: torch.Tensor,
    x_upd: torch.Tensor,
    *,
    k: int = 1,
    signed: bool = False,
    method: str = "krylov",
    oversample: Optional[int] = None,
    n_iter: Optional[int] = None,
    seed: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Similarity of the top-k principal subspaces of two activation sets, each PCA fitted on its own data.

    Args:
        x_ref: (n1, d) or (B, n1, d) reference activations.
        x_upd: (n2, d) or (B, n2, d) updated-model activations (same d and B).
        k: subspace size, 1 <= k <= min(n, d) of both.
        signed: False -> mean cosine of the k principal angles (singular values of
            V_ref V_upd^T; |cos| of the first directions for k = 1), in [0, 1] and sign-free.
            True -> mean of the signed cosines of matching components, as the original toolkit
            reported for k = 1; sign-ambiguous, for comparison only.
        method, oversample, n_iter, seed, backend: as in :func:`randomized_pca`, for both fits.

    Returns:
        () or (B,) tensor, float32 (float64 for float64 input); differentiable on every backend.

    Accuracy: the cosines are 1-Lipschitz in the principal angles, so the error is at most the sum of
    the two fits' angle bounds (:func:`randomized_pca`). Raises ValueError naming x_ref or x_upd when
    it has no variance or is rank-deficient for this k (see :func:`randomized_pca`).

    Array inputs: NumPy arrays and anything ``torch.as_tensor`` takes are accepted as well as tensors; the
    result is a tensor either way (float64 arrays compute in float64).
    """
    x_ref, x_upd = _check_pair(x_ref, x_upd, k, fit_upd=True)
    opts = dict(method=method, oversample=oversample, n_iter=n_iter, center=True, seed=seed, backend=backend)
    cd = compute_dtype(x_ref, x_upd)
    a = _fit(x_ref, k, "x_ref", **opts)[0].components.to(cd)  # (..., k, d)
    b = _fit(x_upd, k, "x_upd", **opts)[0].components.to(cd)  # (..., k, d)
    if signed:
        return (a * b).sum(-1).mean(-1)
    return torch.linalg.svdvals(a @ b.transpose(-1, -2)).mean(-1)  # (...,)


def pca_shift(
    x_ref: torch.Tensor,
    x_upd: torch.Tensor,
    *,
    k: int = 2,
    normalize: bool = False,
    method: str = "krylov",
    oversample: Optional[int] = None,
    n_iter: Optional[int] = None,
    seed: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Shift of the mean activation along the reference's principal directions: (dPC1, ..., dPCk).

    shift_i = v_i . (mean(x_upd) - mean(x_ref)), v_i the i-th principal direction of x_ref;
    ``normalize=True`` divides by sqrt(explained_variance_i) of x_ref (ddof=1), so shifts
    read in reference standard deviations and compare across layers. The means, their difference,
    the projection and the division are float64 (no cancellation under large offsets), rounded once.

    Args: x_ref (n1, d) or (B, n1, d); x_upd (n2, d) or (B, n2, d); k, method, oversample, n_iter, seed and
    backend as in :func:`randomized_pca`.
    Returns: (k,) or (B, k), float32 (float64 for float64 input); differentiable on every backend.

    Accuracy: |error_i| <= angle_i |mean difference| + u |shift_i| (angle_i the bound of
    :func:`randomized_pca`), relative error of the normalisation at most half that of the variance.
    Raises ValueError naming x_ref and the direction when x_ref is rank-deficient for this k (a
    variance within rounding of zero, which ``normalize`` would divide by), or has no variance.

    Array inputs: NumPy arrays and anything ``torch.as_tensor`` takes are accepted as well as tensors; the
    result is a tensor either way (float64 arrays compute in float64).
    """
    x_ref, x_upd = _check_pair(x_ref, x_upd, k, fit_upd=False)
    ref, mean_ref, var = _fit(x_ref, k, "x_ref", method=method, oversample=oversample, n_iter=n_iter, center=True,
                              seed=seed, backend=backend)
    delta = x_upd.mean(-2, dtype=torch.float64) - mean_ref  # (..., d) float64
    shift = (ref.components.to(torch.float64) @ delta.unsqueeze(-1)).squeeze(-1)  # (..., k)
    if normalize:
        shift = shift / var.sqrt()
    return shift.to(ref.mean.dtype)
