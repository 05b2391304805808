"""The one backend dispatcher: which implementation of a kernel op serves a call.

The ops and their implementations are declared in :mod:`._ops` (one :class:`~._ops.KernelOp`
each). The public functions in ``cka``, ``pca`` and ``fisher`` never call a kernel directly;
they ask :func:`kernel` for the implementation of an op on the device of their inputs. This
module holds only the order of preference and the forcing:

- CUDA tensors: ``triton`` -> ``cuda`` -> ``torch``
- CPU tensors: ``cpp`` -> ``torch`` (``triton`` too under ``TRITON_INTERPRET=1``
  when forced, for tests)

``backend=`` on a public function, or the environment variable ``REPFORGET_BACKEND``, forces
one. A forced backend serves every op it has a kernel for; ops it has no kernel for run the
torch composite, which exists for every op. A forced backend that cannot run at all on the
inputs' device (the extension was not built, Triton is not installed, ...) raises ValueError.

The compiled backends' kernels are found in the torch dispatcher when this module is imported
(``cpp``: the op has a CPU kernel, ``cuda``: a CUDA kernel), and so are the Triton modules where a
GPU is present (elsewhere the first time a forced Triton backend may serve a call, under the
interpreter). The choice itself then only reads tables, so a call inside ``torch.compile`` traces
without a graph break.

Gradients: the compiled and Triton kernels have no backward. When grad mode is on and an input
requires grad (:func:`needs_grad`), the front doors ask for ``grad=True`` and every op is served
by its torch composite, which autograd differentiates; a forced backend is still checked, and
applies again as soon as no input requires grad.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

from . import _cpp_ops
from ._ops import BACKENDS, OPS, KernelOp, interpreting

__all__ = ["BACKENDS", "kernel", "needs_grad", "backend_available", "resolve_backend", "registered"]

_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_COMPILED_KEYS = {"cpp": "CPU", "cuda": "CUDA"}  # backend -> the dispatch key its compiled kernels use
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_triton_loaded = False


def _attach_compiled_kernels() -> None:
    """kernels["cpp"] / ["cuda"] = torch.ops.repforget.<op> for each op with a compiled CPU / CUDA kernel."""
    for op in OPS.values():
        for backend, key in _COMPILED_KEYS.items():
            if op.has_compiled_kernel(key):
                op.kernels[backend] = op.packet


def _load_triton() -> None:
    """Import the Triton kernel modules (each attaches its kernels to its ops)."""
    global _triton_loaded
    if _triton_loaded:
        return
    _triton_loaded = True
    from . import triton_cka, triton_fisher, triton_pca  # noqa: F401  (imports attach the kernels)


def backend_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``; when not, the reason in words."""
    if backend == "torch":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
        return _cpp_ops.available()
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return _cpp_ops.cuda_available()
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return False, "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return True, ""
        return False, f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got a {device.type} tensor"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: Optional[str], device: torch.device) -> Optional[str]:
    """The forced backend (argument, else ``REPFORGET_BACKEND``), checked for ``device``; None for automatic."""
    forced = backend if backend is not None else (os.environ.get("REPFORGET_BACKEND") or None)
    if forced is None:
        return None
    source = "backend" if backend is not None else "REPFORGET_BACKEND"
    if forced not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {forced!r}")
    ok, why = backend_available(forced, device)
    if not ok:
        raise ValueError(f"{source}={forced!r} cannot run here: {why}")
    return forced


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when grad mode is on and one of ``tensors`` (None entries skipped) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _implementation(op: KernelOp, backend: str) -> Optional[Callable]:
    if backend == "triton":
        _load_triton()
    return op.kernels.get(backend)


def kernel(op: KernelOp, device: torch.device, backend: Optional[str] = None, *, grad: bool = False) -> Callable:
    """The implementation of ``op`` for tensors on ``device``, honouring a forced ``backend``.

    ``grad=True`` (an input needs a gradient): the differentiable torch composite, whatever the
    backend (a forced one is still validated).
    """
    device = torch.device(device)
    forced = resolve_backend(backend, device)
    if grad:
        return op.composite
    if forced is not None:
        return _implementation(op, forced) or op.composite
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if name == "torch":
            break
        if backend_available(name, device)[0]:
            fn = _implementation(op, name)
            if fn is not None:
                return fn
    return op.composite


def registered(op: KernelOp) -> tuple[str, ...]:
    """The backends with an implementation of ``op`` (the Triton modules loaded when Triton is installed)."""
    if _TRITON_INSTALLED:
        _load_triton()
    return tuple(sorted(op.kernels))


_attach_compiled_kernels()
if _TRITON_INSTALLED and torch.cuda.is_available():
    _load_triton()
