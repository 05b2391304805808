"""Randomized PCA (Halko, Martinsson & Tropp 2011) and the per-layer PCA similarity and shift.

For X (n, d) with column means mu, the data is centred implicitly, never copied
(Xc Z = X Z - 1 (mu^T Z), Xc^T Q = X^T Q - mu (1^T Q)). Halko's power iterations alternate
Q = orth(Xc Z) and Z = orth(Xc^T Q), two reads of X per iteration; here each iteration applies
the covariance in ONE read of X, row block by row block (each block is used twice while in cache):

    Z = Omega                                         (d, l)  Gaussian, l = k + oversample
    repeat n_iter:  Z = orth(Xc^T (Xc Z))             one pass over X
    Q = orth(Xc Z)                                    (n, l)  one pass
    B = Q^T Xc = U S V^T                              (l, d)  one pass
    components = V^T[:k], singular values S[:k], explained variance = S^2 / (n - 1)

In exact arithmetic Q spans Xc (Xc^T Xc)^q Omega, exactly Halko's basis after q power
iterations, so the result is the same; it costs q + 2 reads of X instead of 2 q + 2. The price
is orthonormalising after each covariance product rather than after each half: directions whose
variance is below float32 eps (float64 eps) times the largest fade, which leaves the top
components untouched. Batched over a leading layer dimension; computed in float32 (float64 for
float64 input); signs fixed so the largest-magnitude entry of each component is positive.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._dispatch import kernel, register
from ._validate import check_rows, check_same_device, compute_dtype

__all__ = ["PCAResult", "randomized_pca", "pca_similarity", "pca_shift"]


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


# --------------------------------------------------------------------------- ops (torch composites)


@register("centered_matmul", "torch")
def _centered_matmul_torch(x, mu, omega):
    """Xc @ Omega without forming Xc.

    Contract: x (L, n, d) any float dtype; mu (L, d) and omega (L, d, l) in the compute dtype
    (float32 or float64) -> (L, n, l) in the compute dtype, = X Omega - 1 (mu^T Omega).
    Cost: n d l multiply-adds, one read of x.
    """
    cd = omega.dtype
    return torch.bmm(x.to(cd), omega) - torch.bmm(mu.unsqueeze(-2), omega)  # (L, n, l)


@register("centered_matmul_t", "torch")
def _centered_matmul_t_torch(x, mu, q):
    """Xc^T @ Q without forming Xc.

    Contract: x (L, n, d) any float dtype; mu (L, d) and q (L, n, l) in the compute dtype
    -> (L, d, l) in the compute dtype, = X^T Q - mu (1^T Q). Cost: n d l multiply-adds.
    """
    cd = q.dtype
    return torch.bmm(x.to(cd).transpose(-1, -2), q) - mu.unsqueeze(-1) * q.sum(-2, keepdim=True)  # (L, d, l)


@register("orthonormalize", "torch")
def _orthonormalize_torch(a):
    """Orthonormal basis of the columns of a (L, m, l), m >= l: -> (L, m, l) (reduced QR's Q)."""
    return torch.linalg.qr(a, mode="reduced").Q


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


def _covariance_times(x3, mu, z, matmul, matmul_t, block: int) -> torch.Tensor:
    """Xc^T (Xc Z) in one pass over x, row block by row block: (L, n, d), (L, d, l) -> (L, d, l)."""
    out = None
    for start in range(0, x3.shape[-2], block):
        xb = x3[:, start:start + block]  # (L, b, d)
        part = matmul_t(xb, mu, matmul(xb, mu, z))  # (L, d, l) = Xc_b^T Xc_b Z
        out = part if out is None else out.add_(part)
    return out


def _total_variance(x3: torch.Tensor, mu: torch.Tensor, block: int) -> torch.Tensor:
    """sum_j var(x_j) = ||X - 1 mu^T||_F^2 / (n - 1), row block by row block (no full copy): -> (L,) float64."""
    total = torch.zeros(x3.shape[0], dtype=torch.float64, device=x3.device)
    for start in range(0, x3.shape[-2], block):
        xb = x3[:, start:start + block].to(mu.dtype) - mu.unsqueeze(-2)  # (L, b, d)
        total += torch.linalg.vector_norm(xb, dim=(-2, -1)).to(torch.float64).square()
    return total / (x3.shape[-2] - 1)


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip rows of v (..., k, d) so each row's largest-magnitude entry is positive."""
    idx = v.abs().argmax(-1, keepdim=True)  # (..., k, 1)
    signs = torch.sign(torch.gather(v, -1, idx))  # (..., k, 1)
    return v * torch.where(signs == 0, torch.ones_like(signs), signs)


def randomized_pca(
    x: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    center: bool = True,
    seed: int = 0,
    backend: Optional[str] = None,
) -> PCAResult:
    """Top-k principal components of x by randomized subspace iteration.

    Args:
        x: (n, d) or (B, n, d), samples as rows; any float dtype (half input computed in float32).
        k: number of components, 1 <= k <= min(n, d).
        oversample: extra random directions p >= 0; the sketch has l = min(k + p, min(n, d)) columns.
        n_iter: power iterations q >= 0, each re-orthonormalised.
        center: subtract column means (implicitly); False treats x as already centred
            (mean is then reported as zeros and the variance as the raw second moment / (n - 1)).
        seed: seeds the Gaussian test matrix (drawn on the CPU, so results agree across devices).
        backend: force a backend.

    Returns:
        :class:`PCAResult`, leading dims of x kept.

    Cost: (2 q + 2) n d l multiply-adds in q + 2 reads of x, q QRs of (d, l), one of (n, l), an SVD of (l, d).
    """
    check_rows(x, "x", min_rows=2)
    _check_k(k, x, "x")
    n, d = x.shape[-2], x.shape[-1]
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    cd = compute_dtype(x)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)  # (L, n, d)
    L = x3.shape[0]
    l = min(k + oversample, n, d)
    mu = x3.mean(-2, dtype=cd) if center else torch.zeros(L, d, dtype=cd, device=x.device)  # (L, d)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(L, d, l, generator=gen, dtype=torch.float64).to(device=x.device, dtype=cd)  # (L, d, l)
    matmul = kernel("centered_matmul", x.device, backend)
    matmul_t = kernel("centered_matmul_t", x.device, backend)
    orth = kernel("orthonormalize", x.device, backend)
    block = _block_rows(x3)
    z = omega  # (L, d, l)
    for _ in range(n_iter):
        z = orth(_covariance_times(x3, mu, z, matmul, matmul_t, block))  # (L, d, l)
    q = orth(matmul(x3, mu, z))  # (L, n, l) orthonormal basis of Xc (Xc^T Xc)^q Omega
    b = matmul_t(x3, mu, q).transpose(-1, -2)  # (L, l, d) = Q^T Xc
    _, s, vt = torch.linalg.svd(b, full_matrices=False)  # s (L, l), vt (L, l, d)
    components = _fix_signs(vt[:, :k])  # (L, k, d)
    s = s[:, :k]  # (L, k)
    var = s.square() / (n - 1)  # (L, k)
    total = _total_variance(x3, mu, block)  # (L,) float64
    if bool((total <= 0).any()):
        raise ValueError(f"x has no variance (every row equal{' after centring' if center else ''}) at batch "
                         f"index {(total <= 0).nonzero().flatten().tolist()}: its principal components are undefined")
    ratio = (var.to(torch.float64) / total.unsqueeze(-1)).to(cd)  # (L, k)
    out = PCAResult(components, s, var, ratio, mu)
    return out if x.dim() == 3 else PCAResult(*(t[0] for t in out))


def _check_pair(x_ref: torch.Tensor, x_upd: torch.Tensor, k: int, fit_upd: bool) -> None:
    """Both inputs checked and named; k checked against x_ref (and x_upd when its PCA is fitted too)."""
    check_rows(x_ref, "x_ref", min_rows=2)
    check_rows(x_upd, "x_upd", min_rows=2)
    _check_k(k, x_ref, "x_ref")
    if fit_upd:
        _check_k(k, x_upd, "x_upd")
    check_same_device(x_ref=x_ref, x_upd=x_upd)
    if x_ref.dim() != x_upd.dim() or x_ref.shape[-1] != x_upd.shape[-1] or x_ref.shape[:-2] != x_upd.shape[:-2]:
        raise ValueError(
            "x_ref and x_upd must share the batch dimension and the feature dimension d "
            f"(row counts may differ), got x_ref {tuple(x_ref.shape)} and x_upd {tuple(x_upd.shape)}"
        )


def pca_similarity(
    x_ref: torch.Tensor,
    x_upd: torch.Tensor,
    *,
    k: int = 1,
    signed: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
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

    Returns:
        () or (B,) tensor, float32 (float64 for float64 input).
    """
    _check_pair(x_ref, x_upd, k, fit_upd=True)
    opts = dict(oversample=oversample, n_iter=n_iter, seed=seed, backend=backend)
    cd = compute_dtype(x_ref, x_upd)
    a = randomized_pca(x_ref, k, **opts).components.to(cd)  # (..., k, d)
    b = randomized_pca(x_upd, k, **opts).components.to(cd)  # (..., k, d)
    if signed:
        return (a * b).sum(-1).mean(-1)
    return torch.linalg.svdvals(a @ b.transpose(-1, -2)).mean(-1)  # (...,)


def pca_shift(
    x_ref: torch.Tensor,
    x_upd: torch.Tensor,
    *,
    k: int = 2,
    normalize: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Shift of the mean activation along the reference's principal directions: (dPC1, ..., dPCk).

    shift_i = v_i . (mean(x_upd) - mean(x_ref)), v_i the i-th principal direction of x_ref;
    ``normalize=True`` divides by sqrt(explained_variance_i) of x_ref (ddof=1), so shifts
    read in reference standard deviations and compare across layers.

    Args: x_ref (n1, d) or (B, n1, d); x_upd (n2, d) or (B, n2, d); k as in :func:`randomized_pca`.
    Returns: (k,) or (B, k), float32 (float64 for float64 input).
    """
    _check_pair(x_ref, x_upd, k, fit_upd=False)
    ref = randomized_pca(x_ref, k, oversample=oversample, n_iter=n_iter, seed=seed, backend=backend)
    delta = x_upd.mean(-2, dtype=ref.mean.dtype) - ref.mean  # (..., d)
    shift = (ref.components @ delta.unsqueeze(-1)).squeeze(-1)  # (..., k)
    if normalize:
        if bool((ref.explained_variance <= 0).any()):
            raise ValueError("normalize=True but x_ref has zero variance along a principal direction")
        shift = shift / ref.explained_variance.sqrt()
    return shift
