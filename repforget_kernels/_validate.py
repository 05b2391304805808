"""Input checks shared by every public function.

Each check raises TypeError (wrong kind of object or dtype) or ValueError (wrong
shape, values or device) with a message that names the argument and what it got.

Checks on values (NaN / Inf, zero variance) go through :func:`require`, which inside
``torch.compile`` becomes a runtime assertion instead of a graph break.

Array inputs: every public metric takes a torch.Tensor or anything ``torch.as_tensor`` takes
(NumPy arrays, nested lists of numbers, ...), converted by :func:`as_tensor` alone; results are
tensors whatever the input kind (docs/api.md, "Inputs").
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

__all__ = [
    "FLOAT_DTYPES",
    "as_tensor",
    "check_float_tensor",
    "check_finite",
    "check_finite_by_column_sums",
    "require",
    "check_same_device",
    "check_rows",
    "check_same_rows",
    "compute_dtype",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a torch.Tensor: a tensor is returned as it is, an array-like through ``torch.as_tensor``.

    NumPy arrays keep their dtype (float64 stays float64) and share memory where torch can (a
    read-only array is copied first); nested lists of Python floats become float32 (torch's
    default dtype). Raises TypeError naming ``name`` for strings, None, mappings and arrays of
    non-numbers (object or string dtype), ValueError for ragged nested sequences.
    """
    if isinstance(x, torch.Tensor):
        return x
    if x is None or isinstance(x, (str, bytes, dict)):
        raise TypeError(f"{name} must be a tensor or an array of numbers (torch.Tensor, NumPy array, nested lists), "
                        f"got {type(x).__name__}")
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch warns on (and could not write through) a read-only buffer
    try:
        return torch.as_tensor(x)
    except ValueError as exc:  # nested sequences of unequal lengths
        raise ValueError(f"{name} is not a rectangular array of numbers (ragged nested sequences?): {exc}") from None
    except (TypeError, RuntimeError) as exc:  # object / string arrays, objects torch cannot read
        raise TypeError(f"{name} must be a tensor or an array of numbers (torch.Tensor, NumPy array, nested lists), "
                        f"got {type(x).__name__}: {exc}") from None


def check_float_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a floating tensor (array-likes converted by :func:`as_tensor`), else TypeError naming ``name``."""
    x = as_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    return x


def require(ok: torch.Tensor, message: str, eager_message: Optional[Callable[[], str]] = None) -> None:
    """Raise ValueError unless every element of the boolean tensor ``ok`` is True.

    Eager: one host synchronisation; the error says ``eager_message()`` (text computed from the
    data: counts, indices; run only on failure) or else ``message``. Inside ``torch.compile`` the
    check is ``torch._assert_async(ok, message)``: it stays in the graph (no break) and raises
    RuntimeError with ``message`` when the compiled code runs (on CUDA, a device-side assertion).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
        return
    if not bool(ok.all()):
        raise ValueError(eager_message() if eager_message is not None else message)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (one pass over ``x``)."""
    if x.device.type == "meta" or not x.numel():  # meta tensors carry no values
        return
    lo, hi = torch.aminmax(x)  # one pass, no temporary; NaN and Inf reach the extremes
    require(torch.isfinite(lo) & torch.isfinite(hi), f"{name} contains NaN or Inf values", _count_non_finite(x, name))


def _count_non_finite(x: torch.Tensor, name: str) -> Callable[[], str]:
    """The eager error of the finiteness checks: how many entries of ``x`` are NaN or Inf (counted on failure only)."""
    return lambda: f"{name} contains {int((~torch.isfinite(x)).sum())} NaN or Inf value(s) (shape {tuple(x.shape)})"


def check_finite_by_column_sums(sums: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf, from float64 column sums (or means) of ``x`` already made.

    For half or float32 ``x`` the float64 sums are finite exactly when ``x`` is (NaN and Inf reach the
    sum, and a float64 sum of float32 values cannot overflow), so the check costs no pass over ``x``;
    float64 ``x`` (whose sums can overflow) gets :func:`check_finite`.
    """
    if x.dtype == torch.float64:
        check_finite(x, name)
        return
    require(torch.isfinite(sums), f"{name} contains NaN or Inf values", _count_non_finite(x, name))


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError if the named tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_rows(x, name: str, *, min_rows: int = 2, batched: bool = True, finite: bool = True) -> torch.Tensor:
    """A samples-as-rows matrix as a tensor: floating, (n, d) or (B, n, d) when ``batched``, n >= min_rows, and
    finite unless ``finite=False`` (the caller then checks it, e.g. by :func:`check_finite_by_column_sums`)."""
    x = check_float_tensor(x, name)
    allowed = (2, 3) if batched else (2,)
    if x.dim() not in allowed:
        want = "(n, d) or (B, n, d)" if batched else "(n, d)"
        raise ValueError(f"{name} must be {want} with samples as rows, got shape {tuple(x.shape)}")
    n, d = x.shape[-2], x.shape[-1]
    if n < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got shape {tuple(x.shape)}")
    if d < 1:
        raise ValueError(f"{name} needs at least one feature column, got shape {tuple(x.shape)}")
    if x.dim() == 3 and x.shape[0] < 1:
        raise ValueError(f"{name} has an empty batch dimension, got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x


def check_same_rows(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    """Raise ValueError unless x and y share the row count and the batch shape, and one device."""
    check_same_device(**{xname: x, yname: y})
    if x.dim() != y.dim() or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"{xname} and {yname} must have the same batch and row dimensions, "
            f"got {xname} {tuple(x.shape)} and {yname} {tuple(y.shape)}"
        )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors if t is not None) else torch.float32
