"""The backend dispatcher: automatic choice, forced backends, clear errors."""
from __future__ import annotations

import pytest
import torch

from repforget_kernels import _dispatch
from repforget_kernels._dispatch import backend_available, kernel, register, resolve_backend

import repforget_kernels.cka  # noqa: F401  (registers the torch composites)


class TestResolve:
    def test_automatic_on_cpu_is_cpp_or_torch(self):
        fn = kernel("centered_gram", torch.device("cpu"))
        ok, _ = backend_available("cpp", torch.device("cpu"))
        want = _dispatch._REGISTRY["centered_gram"].get("cpp") if ok else None
        assert fn is (want or _dispatch._REGISTRY["centered_gram"]["torch"])

    def test_forced_torch_by_argument_and_environment(self, monkeypatch):
        torch_fn = _dispatch._REGISTRY["centered_gram"]["torch"]
        assert kernel("centered_gram", torch.device("cpu"), "torch") is torch_fn
        monkeypatch.setenv("REPFORGET_BACKEND", "torch")
        assert kernel("centered_gram", torch.device("cpu")) is torch_fn

    def test_argument_beats_environment(self, monkeypatch):
        monkeypatch.setenv("REPFORGET_BACKEND", "cuda")  # cannot run on CPU, but the argument wins
        assert resolve_backend("torch", torch.device("cpu")) == "torch"

    def test_forced_backend_without_a_kernel_uses_torch(self, monkeypatch):
        register("test_only_op", "torch")(lambda: "torch")
        monkeypatch.setattr(_dispatch, "backend_available", lambda b, d: (True, ""))
        monkeypatch.setattr(_dispatch, "_load", lambda b: None)
        assert kernel("test_only_op", torch.device("cpu"), "cpp")() == "torch"
        register("test_only_op", "cpp")(lambda: "cpp")
        assert kernel("test_only_op", torch.device("cpu"), "cpp")() == "cpp"

    def test_grad_serves_the_torch_composite_whatever_the_backend(self, monkeypatch):
        torch_fn = _dispatch._REGISTRY["centered_gram"]["torch"]
        for backend in (None, "torch", "cpp"):
            if backend == "cpp" and not backend_available("cpp", torch.device("cpu"))[0]:
                continue
            assert kernel("centered_gram", torch.device("cpu"), backend, grad=True) is torch_fn
        with pytest.raises(ValueError, match="backend='cuda' cannot run here"):  # still validated
            kernel("centered_gram", torch.device("cpu"), "cuda", grad=True)

    def test_needs_grad(self):
        leaf = torch.zeros(2, requires_grad=True)
        assert _dispatch.needs_grad(None, torch.zeros(2), leaf)
        assert not _dispatch.needs_grad(torch.zeros(2), None)
        with torch.no_grad():
            assert not _dispatch.needs_grad(leaf)

    def test_unavailable_backend_is_an_error(self):
        with pytest.raises(ValueError, match="backend='cuda' cannot run here: the cuda backend runs on CUDA tensors"):
            kernel("centered_gram", torch.device("cpu"), "cuda")

    def test_unknown_backend(self, monkeypatch):
        with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cpp', 'triton', 'cuda'\), got 'gpu'"):
            resolve_backend("gpu", torch.device("cpu"))
        monkeypatch.setenv("REPFORGET_BACKEND", "gpu")
        with pytest.raises(ValueError, match="REPFORGET_BACKEND must be one of"):
            resolve_backend(None, torch.device("cpu"))

    def test_register_rejects_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            register("x", "opencl")

    def test_every_op_has_a_torch_composite(self):
        import repforget_kernels  # noqa: F401  (imports every metric module)

        for op in ("shifted_cross_products", "centered_gram", "centered_matmul", "centered_matmul_t",
                   "square_accumulate", "histogram", "per_sample_linear_fisher"):
            assert "torch" in _dispatch.registered(op), op
