"""Backend resolution for CUDA tensors without a GPU: availability is monkeypatched, devices are
torch.device objects (no CUDA tensor is ever made here)."""
from __future__ import annotations

import pytest
import torch

from repforget_kernels import _cpp_ops, _dispatch
from repforget_kernels._ops import OPS

pytest.importorskip("triton", reason="the triton modules attach the kernels routed to here")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
TRITON_OPS = ("shifted_cross_products", "centered_gram", "centered_matmul", "centered_matmul_t",
              "per_sample_linear_fisher", "square_accumulate")
CUDA_OPS = ("square_accumulate", "histogram")  # the ops csrc/cuda/cuda_ops.cpp registers CUDA kernels for


def _pretend(monkeypatch, available: set):
    """backend_available answers yes for (backend, device type) pairs in ``available`` (torch always)."""
    def fake(backend, device):
        device = torch.device(device)
        ok = backend == "torch" or (backend, device.type) in available
        return ok, "" if ok else f"{backend} pretended unavailable on {device.type}"

    monkeypatch.setattr(_dispatch, "backend_available", fake)
    monkeypatch.delenv("REPFORGET_BACKEND", raising=False)
    for name in CUDA_OPS:  # on a machine without a CUDA build, stand-ins for the compiled CUDA kernels
        if "cuda" not in OPS[name].kernels:
            monkeypatch.setitem(OPS[name].kernels, "cuda", lambda *a, name=name: f"cuda {name}")


def _impl(op, backend):
    _dispatch.registered(OPS[op])  # loads the Triton modules
    return OPS[op].kernels[backend]


class TestCudaRouting:
    @pytest.mark.parametrize("op", TRITON_OPS)
    def test_cuda_tensors_prefer_triton(self, monkeypatch, op):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda")})
        assert _dispatch.kernel(OPS[op], CUDA) is _impl(op, "triton")

    def test_histogram_goes_to_the_cuda_kernel(self, monkeypatch):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda")})
        assert _dispatch.kernel(OPS["histogram"], CUDA) is _impl("histogram", "cuda")

    def test_without_triton_square_accumulate_goes_to_cuda(self, monkeypatch):
        _pretend(monkeypatch, {("cuda", "cuda")})
        assert _dispatch.kernel(OPS["square_accumulate"], CUDA) is _impl("square_accumulate", "cuda")
        assert _dispatch.kernel(OPS["centered_gram"], CUDA) is _impl("centered_gram", "torch")

    def test_nothing_compiled_falls_back_to_torch(self, monkeypatch):
        _pretend(monkeypatch, set())
        for op in TRITON_OPS + ("histogram",):
            assert _dispatch.kernel(OPS[op], CUDA) is _impl(op, "torch")


class TestCpuRouting:
    @pytest.mark.parametrize("op", TRITON_OPS)
    def test_cpu_tensors_never_pick_triton_or_cuda(self, monkeypatch, op):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda"), ("triton", "cpu")})
        assert _dispatch.kernel(OPS[op], CPU) is _impl(op, "torch")

    def test_cpu_prefers_cpp_where_it_has_a_kernel(self, monkeypatch):
        _pretend(monkeypatch, {("cpp", "cpu"), ("triton", "cuda")})
        for op in TRITON_OPS + ("histogram",):
            _dispatch.registered(OPS[op])
            want = OPS[op].kernels.get("cpp", OPS[op].composite)
            assert _dispatch.kernel(OPS[op], CPU) is want


class TestOverrides:
    def test_environment_forces_torch_on_cuda(self, monkeypatch):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda")})
        monkeypatch.setenv("REPFORGET_BACKEND", "torch")
        assert _dispatch.kernel(OPS["centered_gram"], CUDA) is _impl("centered_gram", "torch")

    def test_argument_beats_environment(self, monkeypatch):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda")})
        monkeypatch.setenv("REPFORGET_BACKEND", "torch")
        assert _dispatch.kernel(OPS["centered_gram"], CUDA, "triton") is _impl("centered_gram", "triton")

    def test_forced_cuda_serves_its_ops_and_torch_for_the_rest(self, monkeypatch):
        _pretend(monkeypatch, {("triton", "cuda"), ("cuda", "cuda")})
        assert _dispatch.kernel(OPS["square_accumulate"], CUDA, "cuda") is _impl("square_accumulate", "cuda")
        assert _dispatch.kernel(OPS["centered_gram"], CUDA, "cuda") is _impl("centered_gram", "torch")

    def test_forced_unavailable_backend_raises(self, monkeypatch):
        _pretend(monkeypatch, {("triton", "cuda")})
        with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
            _dispatch.kernel(OPS["square_accumulate"], CUDA, "cuda")
        monkeypatch.setenv("REPFORGET_BACKEND", "triton")
        with pytest.raises(ValueError, match="REPFORGET_BACKEND='triton' cannot run here"):
            _dispatch.kernel(OPS["centered_gram"], CPU)


class TestCudaExtensionReport:
    def test_available_explains_itself(self):
        ok, why = _cpp_ops.cuda_available()
        assert ok or ("repforget_kernels._C" in why)
