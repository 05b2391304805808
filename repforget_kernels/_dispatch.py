"""The one backend dispatcher.

Every compiled or Triton kernel implements an *op*: a private function with a
fixed contract (documented where the op's torch composite is registered). The
public functions in ``cka``, ``pca`` and ``fisher`` never call a kernel
directly; they ask :func:`kernel` for the implementation of an op on the
device of their inputs.

Backends, in order of preference:

- CUDA tensors: ``triton`` -> ``cuda`` -> ``torch``
- CPU tensors: ``cpp`` -> ``torch`` (``triton`` too under ``TRITON_INTERPRET=1``
  when forced, for tests)

``backend=`` on a public function, or the environment variable
``REPFORGET_BACKEND``, forces one. A forced backend serves every op it has a
kernel for; ops it has no kernel for run the torch composite, which exists for
every op. A forced backend that cannot run at all on the inputs' device (the
extension was not built, Triton is not installed, ...) raises ValueError.

Gradients: the compiled and Triton kernels have no backward. When grad mode is on and
an input requires grad (:func:`needs_grad`), the front doors ask for ``grad=True`` and
every op is served by its torch composite, which autograd differentiates; a forced
backend is still checked, and applies again as soon as no input requires grad.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch

__all__ = [
    "BACKENDS", "register", "kernel", "needs_grad", "backend_available", "resolve_backend", "registered", "interpreting",
]

BACKENDS = ("torch", "cpp", "triton", "cuda")
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# Modules holding each backend's kernels; each must import cleanly even when its backend cannot
# run here (it then offers nothing or reports unavailability). The compiled backends' modules list
# their kernels in ``KERNELS`` (registered by :func:`_load`; they never import this module), the
# Triton modules register theirs with :func:`register` as they are imported.
_BACKEND_MODULES = {
    "cpp": ("repforget_kernels._cpp_ops",),
    "cuda": ("repforget_kernels._cuda_ops",),
    "triton": (
        "repforget_kernels.triton_cka",
        "repforget_kernels.triton_pca",
        "repforget_kernels.triton_fisher",
    ),
}
_REGISTRY: dict[str, dict[str, Callable]] = {}
_loaded: set[str] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: record ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _load(backend: str) -> None:
    if backend in _loaded or backend == "torch":
        return
    _loaded.add(backend)
    for module in _BACKEND_MODULES[backend]:
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:  # the backend's toolchain is missing: it registers nothing
            if not exc.name or not exc.name.startswith("repforget_kernels"):
                continue
            raise
        for op, fn in getattr(loaded, "KERNELS", {}).items():
            register(op, backend)(fn)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton kernels run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``; when not, the reason in words."""
    if backend == "torch":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
        from . import _cpp_ops

        return _cpp_ops.available()
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        from . import _cuda_ops

        return _cuda_ops.available()
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
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


def kernel(op: str, device: torch.device, backend: Optional[str] = None, *, grad: bool = False) -> Callable:
    """The implementation of ``op`` for tensors on ``device``, honouring a forced ``backend``.

    ``grad=True`` (an input needs a gradient): the differentiable torch composite, whatever the
    backend (a forced one is still validated).
    """
    device = torch.device(device)
    forced = resolve_backend(backend, device)
    if grad:
        return _REGISTRY[op]["torch"]
    if forced is not None:
        _load(forced)
        return _REGISTRY[op].get(forced) or _REGISTRY[op]["torch"]
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if name == "torch":
            break
        if backend_available(name, device)[0]:
            _load(name)
            if name in _REGISTRY.get(op, {}):
                return _REGISTRY[op][name]
    return _REGISTRY[op]["torch"]


def registered(op: str) -> tuple[str, ...]:
    """The backends with a kernel for ``op`` (after loading every backend module that imports here)."""
    for name in ("cpp", "cuda", "triton"):
        try:
            _load(name)
        except Exception:  # pragma: no cover - a broken backend module shows in its own tests
            pass
    return tuple(sorted(_REGISTRY.get(op, {})))
