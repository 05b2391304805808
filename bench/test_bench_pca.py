"""randomized_pca against torch.pca_lowrank and a full SVD, at recorded subspace error.

Run: pytest bench/test_bench_pca.py --benchmark-json=pca.json && python bench/ratios.py pca.json
Each benchmark stores the mean principal angle (radians) between its top-k subspace and the
exact one, averaged over 8 random seeds (untimed), in extra_info["subspace_error_rad"], so speed
is compared at known accuracy (one seed alone varies by 2x or more on this spectrum).
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
    """Mean principal angle between span(v) (K, D) and the exact top-K subspace, via the sines."""
    a = np.linalg.qr(np.asarray(v, dtype=np.float64).T)[0]
    b = exact.T
    sines = np.linalg.svd(a - b @ (b.T @ a), compute_uv=False)
    return float(np.arcsin(np.clip(sines, 0.0, 1.0)).mean())


GROUP = f"randomized_pca n={N} d={D} k={K} fp32"
SEEDS = range(8)


def test_ours(timed, benchmark, activations, exact):
    """The default: block Krylov, block k + 2, 4 blocks."""
    benchmark.group = GROUP
    timed(lambda: randomized_pca(activations, K), "ours")
    errors = [_error(randomized_pca(activations, K, seed=s).components.numpy(), exact) for s in SEEDS]
    benchmark.extra_info["subspace_error_rad"] = float(np.mean(errors))


def test_ours_subspace(timed, benchmark, activations, exact):
    """The previous default, kept as method='subspace': k + 10 columns, 4 power iterations."""
    benchmark.group = GROUP
    timed(lambda: randomized_pca(activations, K, method="subspace"), "baseline")
    errors = [_error(randomized_pca(activations, K, method="subspace", seed=s).components.numpy(), exact)
              for s in SEEDS]
    benchmark.extra_info["subspace_error_rad"] = float(np.mean(errors))


def _lowrank_v(activations, seed):
    torch.manual_seed(seed)
    return torch.pca_lowrank(activations, q=K + 10, niter=4)[2][:, :K].T.numpy()


def test_torch_pca_lowrank(timed, benchmark, activations, exact):
    benchmark.group = GROUP
    timed(lambda: torch.pca_lowrank(activations, q=K + 10, niter=4), "baseline")
    errors = [_error(_lowrank_v(activations, s), exact) for s in SEEDS]
    benchmark.extra_info["subspace_error_rad"] = float(np.mean(errors))


def test_numpy_full_svd(timed, benchmark, activations, exact):
    benchmark.group = GROUP
    xc = (activations - activations.mean(0)).numpy()
    vt = timed(lambda: np.linalg.svd(xc, full_matrices=False)[2], "baseline", rounds=2)
    benchmark.extra_info["subspace_error_rad"] = _error(vt[:K], exact)
