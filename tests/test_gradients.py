"""Every metric is differentiable on every backend: torch.autograd.gradcheck in float64.

An input that requires grad (with grad mode on) is served by the torch composites, whatever the
backend asked for; gradcheck compares the analytic gradient with central finite differences
(its default eps 1e-6 and atol 1e-5, rtol 1e-3 are float64's: the metrics are smooth at these
generic inputs, so the difference quotient's O(eps^2) truncation and O(u / eps) rounding are
~1e-10). ``fast_mode`` checks the Jacobian along random directions (u^T J v, numerically and by one
backward) rather than entry by entry: the same test of the backward, at a fraction of the cost.
The randomized PCA is differentiated as the function it computes for a fixed seed.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck as _gradcheck

from conftest import DEVICE
from repforget_kernels import StreamingCKA, cka_matrix, linear_cka, pca_shift, pca_similarity, randomized_pca


def gradcheck(fn, inputs) -> bool:
    """torch.autograd.gradcheck in fast mode (float64 inputs, default tolerances)."""
    return _gradcheck(fn, inputs, fast_mode=True)


def _leaf(*shape, seed: int, shift: float = 0.0) -> torch.Tensor:
    """float64 leaf (requires grad) of standard normal draws plus a shift."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(DEVICE).requires_grad_()


class TestCKAGradients:
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("method", ["feature", "gram"])
    def test_linear_cka(self, backend, debiased, method):
        x, y = _leaf(9, 5, seed=0, shift=3.0), _leaf(9, 4, seed=1)
        assert gradcheck(lambda a, b: linear_cka(a, b, debiased=debiased, method=method, backend=backend), (x, y))

    def test_linear_cka_batched(self, backend):
        x, y = _leaf(2, 8, 3, seed=2), _leaf(2, 8, 6, seed=3)
        assert gradcheck(lambda a, b: linear_cka(a, b, debiased=True, backend=backend), (x, y))

    def test_default_cpu_gram_path_keeps_the_gradient(self):
        # the reproduction: the automatic backend on CPU (cpp Gram kernel when built)
        x = _leaf(12, 20, seed=16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "autograd kernel was not registered" warning either
            linear_cka(x, _leaf(12, 20, seed=17).detach()).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0

    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("method", ["gram", "feature"])
    def test_cka_matrix(self, backend, debiased, method):
        xs, ys = _leaf(3, 8, 4, seed=4), _leaf(2, 8, 3, seed=5)
        assert gradcheck(lambda a, b: cka_matrix(a, b, debiased=debiased, method=method, backend=backend), (xs, ys))
        layers = [_leaf(8, 2, seed=6), _leaf(8, 5, seed=7)]
        assert gradcheck(lambda a, b: cka_matrix([a, b], debiased=debiased, method=method, backend=backend), layers)

    @pytest.mark.parametrize("debiased", [False, True])
    def test_streaming_cka_updates_and_merge(self, backend, debiased):
        x, y = _leaf(10, 4, seed=8, shift=5.0), _leaf(10, 3, seed=9)

        def streamed(a, b):
            s = StreamingCKA(debiased=debiased, backend=backend).update(a[:3], b[:3]).update(a[3:6], b[3:6])
            return s.merge(StreamingCKA(debiased=debiased, backend=backend).update(a[6:], b[6:])).compute()
        assert gradcheck(streamed, (x, y))

    def test_all_reduce_refuses_a_state_with_gradients(self):
        s = StreamingCKA().update(_leaf(5, 2, seed=10), _leaf(5, 3, seed=18).detach())
        with pytest.raises(ValueError, match="all_reduce cannot carry gradients"):
            s.all_reduce()


class TestPCAGradients:
    def test_randomized_pca(self, backend):
        x = _leaf(12, 6, seed=11, shift=2.0)
        for field in ("components", "singular_values", "explained_variance_ratio", "mean"):
            assert gradcheck(lambda a: getattr(randomized_pca(a, 2, backend=backend), field), (x,)), field

    @pytest.mark.parametrize("k", [1, 2])
    def test_pca_similarity(self, backend, k):
        x, y = _leaf(12, 6, seed=12), _leaf(10, 6, seed=13)
        assert gradcheck(lambda a, b: pca_similarity(a, b, k=k, backend=backend), (x, y))

    @pytest.mark.parametrize("normalize", [False, True])
    def test_pca_shift(self, backend, normalize):
        x, y = _leaf(12, 6, seed=14, shift=1.0), _leaf(10, 6, seed=15)
        assert gradcheck(lambda a, b: pca_shift(a, b, k=2, normalize=normalize, backend=backend), (x, y))
