"""Triton kernels for the pca ops (randomized range finder with the centring fused).

    centered_matmul:    X Omega - 1 (mu^T Omega)   = (X - 1 mu^T) Omega   (L, n, l)
    centered_matmul_t:  X^T Q - mu (1^T Q)         = (X - 1 mu^T)^T Q     (L, d, l)

Both are :func:`triton_cka.shifted_gemm` with mu subtracted from X in the load: X is read once
in its own dtype (bf16 activations stay bf16 in memory; the torch composite first writes a
float32 copy), the shifted values and the float32 sketch multiply in float32 (no TF32), and the
long reduction over n of ``centered_matmul_t`` is split over K so a single layer fills the GPU.

``orthonormalize`` is the triton backend's choice of torch ops, not a Triton kernel: CholeskyQR2
(two passes of Gram -> Cholesky -> triangular solve, in float64 so cond(A) up to ~1e7 passes),
which replaces a tall-skinny Householder QR (many small launches on a GPU) by two GEMMs and two
tiny factorisations; it falls back to torch.linalg.qr when a Cholesky factorisation fails.
"""
from __future__ import annotations

import torch

from . import triton_cka as _tc
from ._dispatch import kernel, register

__all__ = ["cholesky_qr2"]


@register("centered_matmul", "triton")
def _centered_matmul_triton(x, mu, omega):
    """Triton version of the op (contract in ``pca._centered_matmul_torch``): (X - 1 mu^T) Omega -> (L, n, l).

    x (L, n, d) any float dtype, mu (L, d), omega (L, d, l) float32; float64 runs the torch composite.
    Cost: 2 L n d l flops, one read of x.
    """
    if omega.dtype == torch.float64:
        return kernel("centered_matmul", x.device, "torch")(x, mu, omega)
    return _tc.shifted_gemm(x, omega, shift_a=mu, shift_a_along="k")  # (L, n, l)


@register("centered_matmul_t", "triton")
def _centered_matmul_t_triton(x, mu, q):
    """Triton version of the op (contract in ``pca._centered_matmul_t_torch``): (X - 1 mu^T)^T Q -> (L, d, l).

    x (L, n, d) any float dtype, mu (L, d), q (L, n, l) float32; float64 runs the torch composite.
    Cost: 2 L n d l flops, one read of x, split over n into float32 partial sums.
    """
    if q.dtype == torch.float64:
        return kernel("centered_matmul_t", x.device, "torch")(x, mu, q)
    return _tc.shifted_gemm(x.transpose(-1, -2), q, shift_a=mu, shift_a_along="m")  # (L, d, l)


def _cholesky_qr_pass(a: torch.Tensor):
    """One Cholesky-QR pass on a (L, m, l) float64: (Q, ok) with Q = A R^-1, A^T A = R^T R."""
    gram = a.transpose(-1, -2) @ a  # (L, l, l)
    r, info = torch.linalg.cholesky_ex(gram, upper=True)  # (L, l, l) upper, (L,)
    q = torch.linalg.solve_triangular(r, a, upper=True, left=False)  # (L, m, l) = A R^-1
    return q, bool((info == 0).all())


def cholesky_qr2(a: torch.Tensor) -> torch.Tensor:
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


@register("orthonormalize", "triton")
def _orthonormalize_triton(a):
    """The triton backend's orthonormalize: CholeskyQR2 in float64 torch ops (see module docstring)."""
    return cholesky_qr2(a)
