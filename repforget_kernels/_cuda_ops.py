"""Binding of the CUDA kernels in ``repforget_kernels._C`` to the dispatcher.

Placeholder until the CUDA kernels land: reports them as unavailable.
"""
from __future__ import annotations

__all__ = ["available"]


def available() -> tuple[bool, str]:
    return False, "repforget_kernels._C was built without CUDA kernels"
