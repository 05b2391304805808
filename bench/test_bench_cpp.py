"""Compiled CPU kernels (repforget_kernels._C) against the torch composites of the same ops.

Each group times one op twice in the same run, the torch composite (the baseline) and the
C++ kernel, on realistic CPU sizes; the ratio of the two means is what counts. A kernel that
does not beat its composite is deleted from csrc/cpu (the project's rule).

Run: OMP_NUM_THREADS=2 pytest bench/test_bench_cpp.py --benchmark-group-by=group
On a shared machine, OMP_NUM_THREADS=1 with --benchmark-timer=time.process_time gives steadier
ratios (CPU time is not inflated by other processes' load).
"""
from __future__ import annotations

import pytest
import torch

from repforget_kernels import _cpp_ops
from repforget_kernels._dispatch import kernel
from repforget_kernels._ops import OPS

CPU = torch.device("cpu")
BACKENDS = ("torch", "cpp")

pytestmark = pytest.mark.skipif(not _cpp_ops.available()[0], reason=_cpp_ops.available()[1] or "cpp unavailable")


def _op(name: str, backend: str):
    return kernel(OPS[name], CPU, backend)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def grads_bf16():
    """16M bf16 gradient entries in 4 tensors (a few layers' worth) and float32 accumulators."""
    g = [torch.randn(4 * 1024 * 1024, generator=_gen()).to(torch.bfloat16) for _ in range(4)]  # 4 x (4M,)
    return g, [torch.zeros(t.shape, dtype=torch.float32) for t in g]


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_accumulate_16m_bf16(benchmark, backend, grads_bf16):
    benchmark.group = "square_accumulate 16M bf16 -> fp32"
    grads, accs = grads_bf16
    op = _op("square_accumulate", backend)
    benchmark.pedantic(op, args=(accs, grads, 0.5), rounds=10, warmup_rounds=1)


@pytest.fixture(scope="module")
def fisher_values():
    """16M float32 Fisher-like values spanning many decades, a few zeros."""
    v = torch.randn(16 * 1024 * 1024, generator=_gen()).square_().mul_(1e-6)  # (16M,)
    v[::1000] = 0.0
    return v


@pytest.mark.parametrize("log", [True, False], ids=["log", "linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_16m(benchmark, backend, log, fisher_values):
    benchmark.group = f"histogram 16M fp32 {'log' if log else 'linear'}"
    pos = fisher_values[fisher_values > 0]
    lo, hi = float(pos.min()), float(pos.max())
    op = _op("histogram", backend)
    benchmark.pedantic(op, args=(fisher_values, lo, hi, 64, log), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("d", [256, 1024])
@pytest.mark.parametrize("unbiased", [True, False], ids=["ucentred", "centred"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_gram_n2048(benchmark, backend, unbiased, d):
    benchmark.group = f"centered_gram n2048 d{d} {'unbiased' if unbiased else 'biased'}"
    x = torch.randn(1, 2048, d, generator=_gen())  # (L, n, d)
    op = _op("centered_gram", backend)
    benchmark.pedantic(op, args=(x, unbiased), rounds=5, warmup_rounds=1)
