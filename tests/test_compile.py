"""The metrics inside ``torch.compile(fullgraph=True)``: no graph break, the same numbers, checks kept.

Training loops that embed the metrics are compiled more and more often. A call of a public function
inside a compiled function must trace without a graph break: the dispatcher's choice only reads
tables, the compiled kernels are torch.library ops with fake implementations (opaque to the
compiler), the torch composites trace as they are, and the value checks become runtime assertions
(``_validate.require``). ``aot_eager`` runs the traced graph through AOTAutograd (fake tensors,
functionalisation) without code generation; one case also goes through Inductor. CPU tensors throughout
(the GPU run of the suite included); Triton kernels, forced under the interpreter, are opaque ops too.
"""
from __future__ import annotations

import pytest
import torch

import repforget_kernels as rk
from conftest import randn
from repforget_kernels._dispatch import backend_available

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on this CPU build
F64 = torch.float64


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


class TestNoGraphBreak:
    @pytest.mark.parametrize("method", ["feature", "gram"])
    @pytest.mark.parametrize("debiased", [False, True])
    def test_linear_cka(self, gen, method, debiased):
        x, y = randn(37, 11, gen=gen, dtype=F64, device="cpu") + 1e3, randn(37, 6, gen=gen, dtype=F64, device="cpu")
        f = _compiled(lambda a, b: rk.linear_cka(a, b, debiased=debiased, method=method))
        torch.testing.assert_close(f(x, y), rk.linear_cka(x, y, debiased=debiased, method=method), rtol=1e-12, atol=1e-14)

    def test_streaming_cka_updates(self, gen):
        xs, ys = randn(3, 20, 9, gen=gen, device="cpu"), randn(3, 20, 5, gen=gen, device="cpu")

        def feed(acc, x, y):
            return acc.update(x, y)

        f = _compiled(feed)
        compiled, eager = rk.StreamingCKA(debiased=True), rk.StreamingCKA(debiased=True)
        for x, y in zip(xs, ys):
            f(compiled, x, y)
            eager.update(x, y)
        assert compiled.n == eager.n == 60
        torch.testing.assert_close(compiled.compute(), eager.compute(), rtol=1e-6, atol=1e-7)

    def test_fisher_accumulate(self, gen):
        grads = [randn(13, 7, gen=gen, device="cpu"), randn(29, gen=gen, device="cpu").to(torch.bfloat16)]
        accs, want = [torch.zeros(13, 7), torch.zeros(29)], [torch.zeros(13, 7), torch.zeros(29)]
        f = _compiled(lambda a, g: rk.fisher_accumulate_(a, g, scale=0.25))
        f(accs, grads)
        rk.fisher_accumulate_(want, grads, scale=0.25)
        for a, w in zip(accs, want):
            torch.testing.assert_close(a, w, rtol=0, atol=0)

    @pytest.mark.parametrize("tokens", [1, 9])
    def test_per_sample_linear_fisher(self, gen, tokens):
        x, g = randn(4, tokens, 10, gen=gen, device="cpu"), randn(4, tokens, 6, gen=gen, device="cpu")
        mask = torch.rand(4, tokens, generator=gen) > 0.3
        f = _compiled(lambda a, b, m: rk.per_sample_linear_fisher(a, b, mask=m))
        torch.testing.assert_close(f(x, g, mask), rk.per_sample_linear_fisher(x, g, mask=mask), rtol=1e-6, atol=1e-7)

    @pytest.mark.skipif(not backend_available("triton", torch.device("cpu"))[0], reason="needs triton (interpreter)")
    def test_triton_kernels_are_opaque_ops(self, gen):
        """A forced Triton backend (here under the interpreter) is one torch.ops node per kernel, not launch code."""
        x, y = randn(33, 10, gen=gen, device="cpu"), randn(33, 7, gen=gen, device="cpu")
        f = _compiled(lambda a, b: rk.linear_cka(a, b, debiased=True, backend="triton"))
        torch.testing.assert_close(f(x, y), rk.linear_cka(x, y, debiased=True, backend="triton"), rtol=1e-6, atol=1e-7)

    def test_inductor(self, gen):
        x, y = randn(40, 8, gen=gen, device="cpu"), randn(40, 5, gen=gen, device="cpu")
        f = _compiled(lambda a, b: rk.linear_cka(a, b, debiased=True), backend="inductor")
        torch.testing.assert_close(f(x, y), rk.linear_cka(x, y, debiased=True), rtol=1e-5, atol=1e-6)


class TestChecksStayInTheGraph:
    def test_non_finite_input_raises(self, gen):
        x, y = randn(12, 4, gen=gen, device="cpu"), randn(12, 3, gen=gen, device="cpu")
        x[3, 1] = float("nan")
        f = _compiled(lambda a, b: rk.linear_cka(a, b))
        with pytest.raises(RuntimeError, match="x contains NaN or Inf values"):
            f(x, y)

    def test_constant_input_raises(self, gen):
        f = _compiled(lambda a, b: rk.linear_cka(a, b))
        with pytest.raises(RuntimeError, match="y has no variance to compare"):
            f(randn(12, 4, gen=gen, device="cpu"), torch.ones(12, 3))

    def test_non_finite_gradient_raises(self):
        f = _compiled(lambda a, g: rk.fisher_accumulate_(a, g))
        with pytest.raises(RuntimeError, match="grad contains NaN or Inf values"):
            f(torch.zeros(3), torch.tensor([1.0, float("inf"), 0.0]))
