"""Binding of the CUDA kernels in ``repforget_kernels._C`` (csrc/cuda) to the dispatcher.

The extension carries them only when it was built against a CUDA torch (setup.py adds
csrc/cuda with -DREPFORGET_WITH_CUDA); they appear as ``torch.ops.repforget.cuda_*``.
The wrappers below are listed in :data:`KERNELS`, which the dispatcher registers as backend
"cuda" when it loads the module (this module does not import the dispatcher: no import cycle);
it only routes to them when :func:`available` says the ops exist (``backend_available("cuda", device)``).

Ops:
  square_accumulate: csrc/cuda/square_accumulate.cu, one launch per tensor, 16-byte vector loads.
  histogram: csrc/cuda/histogram.cu, shared-memory privatised bins, one pass.
"""
from __future__ import annotations

import importlib

import torch

__all__ = ["available", "KERNELS"]

_OPS = ("cuda_square_accumulate", "cuda_histogram")


def available() -> tuple[bool, str]:
    """Whether ``repforget_kernels._C`` was built with the CUDA kernels; when not, the reason in words."""
    try:
        importlib.import_module("repforget_kernels._C")
    except ImportError as exc:
        return False, f"repforget_kernels._C is not built ({exc})"
    missing = [op for op in _OPS if not hasattr(torch.ops.repforget, op)]
    if missing:
        return False, f"repforget_kernels._C was built without CUDA kernels (missing torch.ops.repforget.{missing[0]})"
    return True, ""


def _square_accumulate_cuda(accs, grads, scale):
    """CUDA version of the op (contract in ``fisher``): acc += scale * grad.to(acc.dtype)**2 for every pair."""
    torch.ops.repforget.cuda_square_accumulate(list(accs), list(grads), float(scale))


def _histogram_cuda(values, lo, hi, bins, log):
    """CUDA version of the op (contract in ``fisher``): int64 (bins,) counts of values in [lo, hi]."""
    return torch.ops.repforget.cuda_histogram(values, float(lo), float(hi), int(bins), bool(log))


# op name -> the cuda implementation the dispatcher registers
KERNELS = {"square_accumulate": _square_accumulate_cuda, "histogram": _histogram_cuda}
