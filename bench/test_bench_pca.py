"""randomized_pca against torch.pca_lowrank and a full SVD, at recorded subspace error.

Run: pytest bench/test_bench_pca.py --benchmark-json=pca.json && python bench/ratios.py pca.json
Each benchmark stores the largest principal angle (radians) of its top-k subspace against
the exact one in extra_info["subspace_error_rad"], so speed is compared at known accuracy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repforget_kernels import randomized_pca

N, D, K = 8192, 2048, 16


@pytest.fixture(scope="module")
def activations():
    """Activation-like data: a decaying spectrum (no clean gap), a mean offset, noise."""
    g = torch.Generator().manual_seed(0)
    r = 256
    scales = torch.logspace(1, -1, r)  # 10 .. 0.1
    x = (torch.randn(N, r, generator=g) * scales) @ torch.randn(r, D, generator=g) / D**0.5
    return x + 0.01 * torch.randn(N, D, generator=g) + 2.0  # (N, D)


@pytest.fixture(scope="module")
def exact(activations):
    xc = (activations - activations.mean(0)).double().numpy()
    return np.linalg.svd(xc, full_matrices=False)[2][:K]  # (K, D)


def _error(v, exact) -> float:
    """Largest principal angle between span(v) (K, D) and the exact top-K subspace, via its sine."""
    a = np.linalg.qr(np.asarray(v, dtype=np.float64).T)[0]
    b = exact.T
    return float(np.arcsin(min(1.0, np.linalg.norm(a - b @ (b.T @ a), ord=2))))


GROUP = f"randomized_pca n={N} d={D} k={K} fp32"


def test_ours(timed, benchmark, activations, exact):
    benchmark.group = GROUP
    out = timed(lambda: randomized_pca(activations, K), "ours")
    benchmark.extra_info["subspace_error_rad"] = _error(out.components.numpy(), exact)


def test_torch_pca_lowrank(timed, benchmark, activations, exact):
    benchmark.group = GROUP
    torch.manual_seed(0)
    _, _, v = timed(lambda: torch.pca_lowrank(activations, q=K + 10, niter=4), "baseline")
    benchmark.extra_info["subspace_error_rad"] = _error(v[:, :K].T.numpy(), exact)


def test_numpy_full_svd(timed, benchmark, activations, exact):
    benchmark.group = GROUP
    xc = (activations - activations.mean(0)).numpy()
    vt = timed(lambda: np.linalg.svd(xc, full_matrices=False)[2], "baseline", rounds=2)
    benchmark.extra_info["subspace_error_rad"] = _error(vt[:K], exact)
