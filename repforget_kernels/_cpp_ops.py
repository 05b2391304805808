"""Binding of the compiled CPU extension ``repforget_kernels._C`` to the dispatcher.

Importing ``_C`` registers the ops ``torch.ops.repforget.*`` (csrc/cpu); this module
lists a thin wrapper for each in :data:`KERNELS`, which the dispatcher registers as backend
"cpp" when it loads the module (this module does not import the dispatcher: no import cycle).
The wrappers keep the op contracts of the torch composites (cka.py, fisher.py): inputs are made
contiguous only where they are not, and in-place outputs that are not contiguous are computed in
a contiguous copy and written back.

If the extension cannot be imported (not built, or built against another torch), one
warning says why and how to build it, :data:`KERNELS` is empty, and :func:`available`
reports the reason: the dispatcher then serves every op with the torch composite.
"""
from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["available", "BUILD_HINT", "KERNELS"]

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


def _square_accumulate_cpp(accs, grads, scale):
    """Contract of fisher._square_accumulate_torch: acc += scale * grad.to(acc.dtype)**2, one fused pass."""
    accs, grads = list(accs), [g.contiguous() for g in grads]
    if not accs:
        return
    strided = [i for i, a in enumerate(accs) if not a.is_contiguous()]
    work = [a.contiguous() for a in accs]  # the accs themselves where contiguous
    torch.ops.repforget.square_accumulate(work, grads, float(scale))
    for i in strided:
        accs[i].copy_(work[i])


def _histogram_cpp(values, lo, hi, bins, log):
    """Contract of fisher._histogram_torch: (N,) -> int64 (bins,), one pass, thread-private bins."""
    return torch.ops.repforget.histogram(values.contiguous(), float(lo), float(hi), int(bins), bool(log))


def _centered_gram_cpp(x, unbiased, scale=None):
    """Contract of cka._centered_gram_torch: (L, n, d) -> ((L, n, n), (L,) traces); centred in float64,
    upper-triangle blocks, (U-)centred in the same pass."""
    scale = None if scale is None else scale.to(torch.float64).contiguous()
    return torch.ops.repforget.centered_gram(x.contiguous(), bool(unbiased), scale)


# op name -> the cpp implementation the dispatcher registers; empty when the extension is missing
KERNELS = {
    "square_accumulate": _square_accumulate_cpp,
    "histogram": _histogram_cpp,
    "centered_gram": _centered_gram_cpp,
} if _OK else {}

if not _OK:
    warnings.warn(f"repforget_kernels: C++ CPU kernels unavailable, using the torch composites: {_REASON}",
                  RuntimeWarning, stacklevel=2)
