"""Shared fixtures.

Environment knobs (repsim-style reruns of the whole suite):
  REPFORGET_TEST_DEVICE=cuda   run every metric test on CUDA tensors (default: cpu)
  REPFORGET_TEST_DTYPE=float64 run the float32 tests in float64 instead

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run (slowly) on CPU tensors and are tested like every other backend.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from repforget_kernels._dispatch import BACKENDS, backend_available  # noqa: E402

DEVICE = torch.device(os.environ.get("REPFORGET_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("REPFORGET_TEST_DTYPE", "float32"))

# float32 input vs float64 reference; bf16/fp16 input is compared with the reference on the
# same rounded values, so only the accumulation differs.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """Backends that can run on ``device`` in this environment (always includes torch)."""
    return [b for b in BACKENDS if backend_available(b, device)[0]]


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test; tensors are drawn on CPU then moved to DEVICE."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("REPFORGET_TEST_RANDOM") else 1234)


def randn(*shape, gen: torch.Generator, dtype=None, device=None) -> torch.Tensor:
    """Standard normal draws on CPU (reproducible), moved to the test device and dtype."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return t.to(device=device or DEVICE, dtype=dtype or DTYPE)
