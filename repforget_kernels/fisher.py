"""Diagonal Fisher information kernels: accumulation, per-sample linear Fisher, histograms.

    F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2

with log p summed over the unmasked target tokens of sequence s. Three kernel ops carry the
arithmetic (declared with their contracts and torch composites in :mod:`._ops`; the backends'
kernels attach to them):

- ``square_accumulate``: acc += scale * grad**2 over a list of tensors, in float32/float64.
- ``per_sample_linear_fisher``: out += sum_s (sum_t m_st g_st x_st^T)**2 for one nn.Linear,
  without materialising the B per-sample gradients.
- ``histogram``: counts of values in linear or log10-spaced bins.

The model-level estimator built on them is :class:`~repforget_kernels.diagonal_fisher.DiagonalFisher`.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ._dispatch import kernel
from ._ops import HISTOGRAM, PER_SAMPLE_LINEAR_FISHER, SQUARE_ACCUMULATE
from ._validate import as_tensor, check_finite, check_float_tensor, check_same_device, compute_dtype

__all__ = [
    "fisher_accumulate_",
    "per_sample_linear_fisher",
    "fisher_histogram",
    "FisherHistogram",
]

_ACC_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- fisher_accumulate_


def _as_list(obj, name: str) -> tuple[list, bool]:
    """(list of items, whether obj was a sequence) for a tensor or a list/tuple of tensors."""
    if isinstance(obj, torch.Tensor):
        return [obj], False
    if isinstance(obj, (list, tuple)):
        return list(obj), True
    raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(obj).__name__}")


def _check_accumulator(acc, name: str) -> None:
    """An in-place float32/float64 accumulator: TypeError / ValueError naming ``name``."""
    check_float_tensor(acc, name)
    if acc.dtype not in _ACC_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (it accumulates squares), got {acc.dtype}")
    if not acc.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {acc.stride()}")


def fisher_accumulate_(fisher, grad, *, scale: float = 1.0, backend: Optional[str] = None):
    """In place ``fisher += scale * grad**2``; returns ``fisher``.

    Args:
        fisher: float32/float64 contiguous tensor, or a list/tuple of them (updated in place, so
            tensors only).
        grad: tensor(s) of the same shape(s), any float dtype (float16/bfloat16/float32/float64),
            finite; NumPy arrays (anything ``torch.as_tensor`` takes) too. With one ``fisher``
            tensor, ``grad`` is one array (a nested list is read as an array); with a sequence,
            ``grad`` is a sequence of the same length. bf16/fp16 gradients are upcast to fisher's dtype *before* squaring, so
            squares below bf16's range (|g| < ~1e-19) are not lost.
        scale: finite float multiplying every square (e.g. 1 / n_samples).
        backend: force a backend (see ``_dispatch``).

    A list of pairs is one launch of op ``square_accumulate``. Cost: one read of every
    grad, one read-modify-write of every fisher (plus the finiteness check, one read).
    Raises ValueError naming the index of a pair whose shapes, devices or values are wrong.
    """
    accs, seq_a = _as_list(fisher, "fisher")
    seq_g = seq_a and isinstance(grad, (list, tuple))
    grads = list(grad) if seq_g else [grad]
    if seq_a != seq_g or len(accs) != len(grads):
        raise ValueError(
            f"fisher and grad must both be tensors or both sequences of one length, got "
            f"{type(fisher).__name__}[{len(accs)}] and {type(grad).__name__}[{len(grads)}]"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for i, (acc, g) in enumerate(zip(accs, grads)):
        tag = f"[{i}]" if seq_a else ""
        _check_accumulator(acc, f"fisher{tag}")
        grads[i] = g = check_float_tensor(g, f"grad{tag}")
        if g.shape != acc.shape:
            raise ValueError(f"grad{tag} has shape {tuple(g.shape)} but fisher{tag} has shape {tuple(acc.shape)}")
        check_same_device(**{"fisher[0]": accs[0], f"fisher{tag}": acc, f"grad{tag}": g})
        check_finite(g, f"grad{tag}")
    if accs:
        op = kernel(SQUARE_ACCUMULATE, accs[0].device, backend)
        op(accs, [g.contiguous() for g in grads], float(scale))
    return fisher


# --------------------------------------------------------------------------- per_sample_linear_fisher


def _check_mask(mask, shape: tuple, name: str = "mask") -> torch.Tensor:
    """A (B, T) bool mask from bool or integer input, tensor or array (nonzero = keep)."""
    mask = as_tensor(mask, name)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (nonzero = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def per_sample_linear_fisher(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sum over samples of the squared per-sample weight gradient of one nn.Linear.

        F = sum_s G_s * G_s (elementwise),   G_s = sum_t m_st g_st x_st^T   (out, in)

    Args:
        x: (B, T, in) inputs of the layer, any float dtype; (B, in) is read as T = 1.
        grad_out: (B, T, out) (or (B, out)) gradients w.r.t. the layer's output, same B, T.
        mask: optional (B, T) bool/integer, nonzero where a token counts.
        out: optional (out, in) float32/float64 contiguous tensor. The result is ADDED to it
            in place and ``out`` is returned: pass the same tensor across batches to
            accumulate a running sum. It is not zeroed first.
        backend: force a backend.

    Returns:
        (out, in) float32 (float64 when an input is float64, or ``out``'s dtype when given).
    Array inputs: ``x``, ``grad_out`` and ``mask`` may be NumPy arrays (anything ``torch.as_tensor``
    takes); ``out`` is written in place, so it must be a tensor; the result is a tensor.
    Cost: B T in out multiply-adds (T = 1: one GEMM on squared inputs, B in out); the torch
    composite's scratch stays within max(W/2, 1 MiB), W the float32 weight size, plus one
    chunk of upcast inputs, so the B per-sample gradients are never materialised.
    """
    x = check_float_tensor(x, "x")
    grad_out = check_float_tensor(grad_out, "grad_out")
    if x.dim() not in (2, 3) or grad_out.dim() != x.dim() or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            "x and grad_out must be (B, T, in) and (B, T, out) (or (B, in) and (B, out)) with the same B, T; "
            f"got x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)}"
        )
    if mask is not None:
        mask = as_tensor(mask, "mask")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_same_device(x=x, grad_out=grad_out, mask=mask, out=out)
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)  # (B, 1, in), (B, 1, out)
        if mask is not None:
            mask = _check_mask(mask, x.shape[:1]).unsqueeze(1)  # (B, 1)
    if mask is not None:
        mask = _check_mask(mask, x.shape[:2])
    check_finite(x, "x")
    check_finite(grad_out, "grad_out")
    shape = (grad_out.shape[2], x.shape[2])
    if out is None:
        out = torch.zeros(shape, dtype=compute_dtype(x, grad_out), device=x.device)  # (out, in)
    else:
        _check_accumulator(out, "out")
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape (out_features, in_features) = {shape}, got {tuple(out.shape)}")
    op = kernel(PER_SAMPLE_LINEAR_FISHER, x.device, backend)
    op(x.contiguous(), grad_out.contiguous(), None if mask is None else mask.contiguous(), out)
    return out


# --------------------------------------------------------------------------- fisher_histogram


class FisherHistogram(tuple):
    """``(counts, edges)`` that also carries ``n_zero``: the exact zeros a log histogram leaves out.

    Unpacks as ``counts, edges = fisher_histogram(...)``; ``counts.sum() + n_zero`` equals the
    number of values, always (``n_zero`` is 0 for a linear histogram).
    """

    def __new__(cls, counts: torch.Tensor, edges: torch.Tensor, n_zero: int):
        self = super().__new__(cls, (counts, edges))
        self.n_zero = int(n_zero)
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.n_zero)

    @property
    def counts(self) -> torch.Tensor:
        return self[0]

    @property
    def edges(self) -> torch.Tensor:
        return self[1]

    def __repr__(self) -> str:
        return f"FisherHistogram(counts={self[0]!r}, edges={self[1]!r}, n_zero={self.n_zero})"


def _pooled_values(values) -> list[tuple[str, torch.Tensor]]:
    """(name, flat contiguous tensor) for a tensor or array, a dict of them or a sequence of them."""
    if isinstance(values, Mapping):
        items = [(f"values[{k!r}]", v) for k, v in values.items()]
    elif isinstance(values, (list, tuple)):
        items = [(f"values[{i}]", v) for i, v in enumerate(values)]
    else:  # one tensor or array (anything else is refused by as_tensor, naming values)
        items = [("values", values)]
    if not items:
        raise ValueError("values is empty: nothing to histogram")
    flat = []
    for name, v in items:
        v = check_float_tensor(v, name)
        check_finite(v, name)
        flat.append((name, v.reshape(-1).contiguous()))  # (numel,)
    check_same_device(**{name: v for name, v in flat})
    if sum(v.numel() for _, v in flat) == 0:
        raise ValueError("values holds no element: nothing to histogram")
    return flat


def fisher_histogram(values, *, bins: int = 64, log: bool = True, backend: Optional[str] = None) -> FisherHistogram:
    """Histogram of Fisher values (or any non-negative values), pooled over tensors.

    Args:
        values: a tensor or NumPy array, or a dict / sequence of them (all values pooled; each
            item anything ``torch.as_tensor`` takes), any float dtype, non-negative and finite.
        bins: number of bins (>= 1).
        log: True: bins log10-spaced between the smallest positive value and the maximum;
            exact zeros cannot sit on a log axis, are left out of ``counts`` and counted in
            ``.n_zero``. False: linear bins between the minimum and the maximum.
            A single distinct value v gets the range [v, 10 v] (log) or [v, v + max(1, |v|)] (linear).
        backend: force a backend for op ``histogram``.

    Returns:
        :class:`FisherHistogram` unpacking as (counts int64 (bins,), edges float64 (bins + 1,) in
        value space), with ``counts.sum() + n_zero == numel``. Equals
        ``reference.fisher_histogram_ref``. Cost: one aminmax pass plus one counting pass (plus
        one min pass over a tensor that holds zeros, for log=True).
    Raises ValueError on negative, NaN or Inf values, and for log=True when no value is positive.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    flat = _pooled_values(values)
    lo, hi, numel = math.inf, -math.inf, 0
    for name, v in flat:
        if v.numel() == 0:
            continue
        numel += v.numel()
        vmin, vmax = (float(a) for a in torch.aminmax(v))
        if vmin < 0:
            raise ValueError(f"{name} has negative values (min {vmin:g}); Fisher values are squares, >= 0")
        hi = max(hi, vmax)
        if log:  # the smallest positive value: one more pass only when v holds zeros
            lo = min(lo, vmin if vmin > 0 else float(v.masked_fill(v == 0, math.inf).min()))
        else:
            lo = min(lo, vmin)
    if log and not math.isfinite(lo):
        raise ValueError(f"values are all zero ({numel} of them): a log histogram needs a positive value; use log=False")
    device = flat[0][1].device
    if log:
        a, z = math.log10(lo), math.log10(hi)
        if z == a:
            z = a + 1.0
        edges = torch.logspace(a, z, bins + 1, dtype=torch.float64, device=device)  # (bins + 1,)
        hi = 10.0**z if hi == lo else hi
    else:
        if hi == lo:  # a width that float64 can hold next to lo, however large lo is
            hi = lo + max(1.0, abs(lo))
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=device)  # (bins + 1,)
    op = kernel(HISTOGRAM, device, backend)
    counts = torch.zeros(bins, dtype=torch.int64, device=device)
    for _, v in flat:
        if v.numel():
            counts += op(v, lo, hi, bins, log)
    # Every value lies in [lo, hi] except, for a log histogram, the zeros: they are the rest.
    return FisherHistogram(counts, edges, numel - int(counts.sum()))
