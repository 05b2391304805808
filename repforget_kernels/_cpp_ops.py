"""Loading of the compiled extension ``repforget_kernels._C`` (the cpp and cuda backends).

Importing ``_C`` registers compiled kernels of the ops declared in :mod:`._ops`: the CPU kernels
of csrc/cpu (``TORCH_LIBRARY_IMPL(repforget, CPU, m)``) and, in a build against a CUDA torch,
the CUDA kernels of csrc/cuda (``TORCH_LIBRARY_IMPL(repforget, CUDA, m)``). The dispatcher then
finds them by dispatch key; nothing here lists them.

If the extension cannot be imported (not built, or built against another torch), one warning
says why and how to build it, and :func:`available` reports the reason: the dispatcher then
serves every op with the torch composite.
"""
from __future__ import annotations

import importlib
import warnings

from ._ops import OPS

__all__ = ["available", "cuda_available", "BUILD_HINT"]

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"


def _import_extension() -> tuple[bool, str]:
    """Import ``repforget_kernels._C``: (True, "") or (False, why)."""
    try:
        importlib.import_module("repforget_kernels._C")
    except (ImportError, OSError) as exc:
        return False, f"the C++ extension repforget_kernels._C could not be imported ({exc}); {BUILD_HINT}"
    return True, ""


_OK, _REASON = _import_extension()


def available() -> tuple[bool, str]:
    """Whether the compiled CPU kernels can run: (True, "") or (False, the reason in words)."""
    return _OK, _REASON


def _cuda_kernels() -> tuple[bool, str]:
    if not _OK:
        return False, _REASON
    if not any(op.has_compiled_kernel("CUDA") for op in OPS.values()):
        return False, "repforget_kernels._C was built without CUDA kernels (torch without CUDA, or no CUDA toolkit)"
    return True, ""


_CUDA_OK, _CUDA_REASON = _cuda_kernels()


def cuda_available() -> tuple[bool, str]:
    """Whether ``_C`` carries CUDA kernels (a build against a CUDA torch): (True, "") or (False, why)."""
    return _CUDA_OK, _CUDA_REASON


if not _OK:
    warnings.warn(f"repforget_kernels: C++ CPU kernels unavailable, using the torch composites: {_REASON}",
                  RuntimeWarning, stacklevel=2)
