"""Triton kernels for the pca ops (randomized range finder with the centring fused).

    centered_matmul:    X Omega - 1 (mu^T Omega)   = (X - 1 mu^T) Omega   (L, n, l)
    centered_matmul_t:  X^T Q - mu (1^T Q)         = (X - 1 mu^T)^T Q     (L, d, l)

Both are :func:`_triton_gemm.shifted_gemm` with mu subtracted from X in the load: X is read once
in its own dtype (bf16 activations stay bf16 in memory; the torch composite first writes a
float32 copy), the shifted values and the float32 sketch multiply in float32 (no TF32), and the
long reduction over n of ``centered_matmul_t`` is split over K so a single layer fills the GPU.

The orthonormalisation between the products is plain torch (``pca._orthonormalize``).
"""
from __future__ import annotations

import torch

from . import _triton_gemm as _gemm
from ._ops import CENTERED_MATMUL, CENTERED_MATMUL_T

__all__: list[str] = []  # the module only attaches kernels to ops


@CENTERED_MATMUL.implement("triton")
def _centered_matmul_triton(x, mu, omega):
    """Triton version of the op (contract in ``_ops``): (X - 1 mu^T) Omega -> (L, n, l).

    x (L, n, d) any float dtype, mu (L, d), omega (L, d, l) float32; float64 runs the torch composite.
    Cost: 2 L n d l flops, one read of x.
    """
    if omega.dtype == torch.float64:
        return CENTERED_MATMUL.composite(x, mu, omega)
    return _gemm.shifted_gemm(x, omega, shift_a=mu, shift_a_along="k")  # (L, n, l)


@CENTERED_MATMUL_T.implement("triton")
def _centered_matmul_t_triton(x, mu, q):
    """Triton version of the op (contract in ``_ops``): (X - 1 mu^T)^T Q -> (L, d, l).

    x (L, n, d) any float dtype, mu (L, d), q (L, n, l) float32; float64 runs the torch composite.
    Cost: 2 L n d l flops, one read of x, split over n into float32 partial sums.
    """
    if q.dtype == torch.float64:
        return CENTERED_MATMUL_T.composite(x, mu, q)
    return _gemm.shifted_gemm(x.transpose(-1, -2), q, shift_a=mu, shift_a_along="m")  # (L, d, l)
