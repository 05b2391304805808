"""The backend dispatcher: automatic choice, forced backends, clear errors."""
from __future__ import annotations

import pytest
import torch

from repforget_kernels import _dispatch
from repforget_kernels._dispatch import backend_available, kernel, resolve_backend
from repforget_kernels._ops import CENTERED_GRAM, OPS, KernelOp


class TestResolve:
    def test_automatic_on_cpu_is_cpp_or_torch(self):
        fn = kernel(CENTERED_GRAM, torch.device("cpu"))
        ok, _ = backend_available("cpp", torch.device("cpu"))
        assert fn is (CENTERED_GRAM.kernels["cpp"] if ok else CENTERED_GRAM.composite)
        if ok:  # the compiled CPU kernel of the same op, reached through torch.ops
            assert fn is torch.ops.repforget.centered_gram

    def test_forced_torch_by_argument_and_environment(self, monkeypatch):
        torch_fn = CENTERED_GRAM.composite
        assert kernel(CENTERED_GRAM, torch.device("cpu"), "torch") is torch_fn
        monkeypatch.setenv("REPFORGET_BACKEND", "torch")
        assert kernel(CENTERED_GRAM, torch.device("cpu")) is torch_fn

    def test_argument_beats_environment(self, monkeypatch):
        monkeypatch.setenv("REPFORGET_BACKEND", "cuda")  # cannot run on CPU, but the argument wins
        assert resolve_backend("torch", torch.device("cpu")) == "torch"

    def test_forced_backend_without_a_kernel_uses_torch(self, monkeypatch):
        op = OPS["per_sample_linear_fisher"]  # no compiled CPU kernel
        monkeypatch.setattr(_dispatch, "backend_available", lambda b, d: (True, ""))
        assert kernel(op, torch.device("cpu"), "cpp") is op.composite
        monkeypatch.setitem(op.kernels, "cpp", lambda: "cpp")
        assert kernel(op, torch.device("cpu"), "cpp")() == "cpp"

    def test_grad_serves_the_torch_composite_whatever_the_backend(self, monkeypatch):
        torch_fn = CENTERED_GRAM.composite
        for backend in (None, "torch", "cpp"):
            if backend == "cpp" and not backend_available("cpp", torch.device("cpu"))[0]:
                continue
            assert kernel(CENTERED_GRAM, torch.device("cpu"), backend, grad=True) is torch_fn
        with pytest.raises(ValueError, match="backend='cuda' cannot run here"):  # still validated
            kernel(CENTERED_GRAM, torch.device("cpu"), "cuda", grad=True)

    def test_needs_grad(self):
        leaf = torch.zeros(2, requires_grad=True)
        assert _dispatch.needs_grad(None, torch.zeros(2), leaf)
        assert not _dispatch.needs_grad(torch.zeros(2), None)
        with torch.no_grad():
            assert not _dispatch.needs_grad(leaf)

    def test_unavailable_backend_is_an_error(self):
        with pytest.raises(ValueError, match="backend='cuda' cannot run here: the cuda backend runs on CUDA tensors"):
            kernel(CENTERED_GRAM, torch.device("cpu"), "cuda")

    def test_unknown_backend(self, monkeypatch):
        with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cpp', 'triton', 'cuda'\), got 'gpu'"):
            resolve_backend("gpu", torch.device("cpu"))
        monkeypatch.setenv("REPFORGET_BACKEND", "gpu")
        with pytest.raises(ValueError, match="REPFORGET_BACKEND must be one of"):
            resolve_backend(None, torch.device("cpu"))

    def test_implement_rejects_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            CENTERED_GRAM.implement("opencl")
        with pytest.raises(ValueError, match="backend must be one of"):
            CENTERED_GRAM.implement("torch")  # the composite is the declaration's own

    def test_every_op_has_a_torch_composite(self):
        assert set(OPS) == {"shifted_cross_products", "centered_gram", "centered_matmul", "centered_matmul_t",
                            "square_accumulate", "histogram", "per_sample_linear_fisher", "column_stats"}
        for op in OPS.values():
            assert "torch" in _dispatch.registered(op) and op.kernels["torch"] is op.composite


class TestDeclarations:
    """Each op is one torch.library op: schema, fake, composite registered once, in the repforget namespace."""

    @pytest.mark.parametrize("name", sorted(OPS))
    def test_op_is_a_torch_library_op_with_its_schema(self, name):
        op = OPS[name]
        schema = str(op.packet.default._schema)
        assert schema.startswith(f"repforget::{name}(") and schema == op.schema

    def test_redeclaring_an_op_is_refused(self):
        with pytest.raises(ValueError, match="op 'centered_gram' is already declared"):
            KernelOp("centered_gram", "(Tensor x) -> Tensor", lambda x: x, lambda x: x, lambda x: x)

    def test_op_without_a_compiled_kernel_runs_its_composite_through_torch_ops(self, gen):
        x = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
        mu = x.mean(-2)
        om = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(torch.ops.repforget.centered_matmul(x, mu, om),
                                   OPS["centered_matmul"].composite(x, mu, om), rtol=0, atol=0)
