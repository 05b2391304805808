"""Binding of the compiled CPU extension ``repforget_kernels._C`` to the dispatcher.

Placeholder until the C++ kernels land: reports the extension as unavailable.
"""
from __future__ import annotations

__all__ = ["available"]


def available() -> tuple[bool, str]:
    return False, "the C++ extension repforget_kernels._C is not built yet"
