"""Diagonal Fisher information: accumulation, per-sample linear Fisher, model-level Fisher, histograms.

    F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2

with log p summed over the unmasked target tokens of sequence s. Three ops
carry the arithmetic, each with a torch composite registered here and compiled twins in
other backends (same contract, see each composite's docstring):

- ``square_accumulate``: acc += scale * grad**2 over a list of tensors, in float32/float64.
- ``per_sample_linear_fisher``: out += sum_s (sum_t m_st g_st x_st^T)**2 for one nn.Linear,
  without materialising the B per-sample gradients.
- ``histogram``: counts of values in linear or log10-spaced bins.

:class:`DiagonalFisher` runs ONE forward and ONE backward per batch and rebuilds the
per-sample squared gradients per module type from captured inputs and output gradients.
"""
from __future__ import annotations

import math
import sys
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ._dispatch import kernel, register
from ._validate import as_tensor, check_finite, check_float_tensor, check_same_device, compute_dtype

__all__ = [
    "fisher_accumulate_",
    "per_sample_linear_fisher",
    "DiagonalFisher",
    "fisher_histogram",
    "FisherHistogram",
]

_ACC_DTYPES = (torch.float32, torch.float64)
# Scratch of the per-sample linear Fisher composite: half a float32 weight matrix, at least this.
_SCRATCH_FLOOR_BYTES = 1 << 20
# Elements per pass of the histogram composite and per group of square_accumulate upcasts.
_HIST_CHUNK = 1 << 20
_UPCAST_GROUP_BYTES = 64 << 20


# --------------------------------------------------------------------------- ops (torch composites)


@register("square_accumulate", "torch")
def _square_accumulate_torch(accs, grads, scale):
    """In place, for every pair: acc += scale * grad.to(acc.dtype)**2.

    Contract shared by every backend:
      accs: list of float32/float64 contiguous tensors; grads: list of tensors of the same
      shapes, any float dtype, contiguous, on the same device. Returns None.
      The square is taken after the upcast, so bf16/fp16 gradients never underflow.
    Cost: one read of each grad and one read-modify-write of each acc; the upcast copies are
    made in groups of at most 64 MiB (none when grad already has acc's dtype).
    """
    group_a, group_g, nbytes = [], [], 0
    for acc, g in zip(accs, grads):
        g_up = g if g.dtype == acc.dtype else g.to(acc.dtype)  # same shape as acc
        group_a.append(acc)
        group_g.append(g_up)
        nbytes += g_up.numel() * g_up.element_size() if g_up is not g else 0
        if nbytes >= _UPCAST_GROUP_BYTES:
            torch._foreach_addcmul_(group_a, group_g, group_g, value=scale)
            group_a, group_g, nbytes = [], [], 0
    if group_a:
        torch._foreach_addcmul_(group_a, group_g, group_g, value=scale)


def _plan_chunks(b: int, t: int, n_in: int, n_out: int, elem: int) -> tuple[int, int]:
    """(samples per chunk, weight rows per block) for the per-sample linear Fisher composite.

    The scratch per-sample gradient block (c, rows, n_in) stays within
    max(W/2, 1 MiB) bytes, W = n_out * n_in * elem, so peak memory beyond the inputs and
    ``out`` is at most that plus one chunk of upcast / masked inputs (c T (n_in + n_out) elem).
    Small layers batch several samples per GEMM; large ones take one sample and row blocks.
    """
    w = n_out * n_in * elem
    budget = max(w // 2, _SCRATCH_FLOOR_BYTES)
    if w <= budget:
        return max(1, min(b, budget // w)), n_out
    return 1, max(1, min(n_out, budget // (n_in * elem)))


@register("per_sample_linear_fisher", "torch")
def _per_sample_linear_fisher_torch(x, grad_out, mask, out):
    """out += sum_s (sum_t m_st g_st x_st^T)**2 elementwise, in place.

    Contract shared by every backend:
      x (B, T, in), grad_out (B, T, out) any float dtype; mask (B, T) bool or None;
      out (out, in) float32/float64 contiguous. Computed in out's dtype (bf16/fp16 inputs
      upcast first). Never materialises B x out x in. Returns None.
    Cost: B T in out multiply-adds (the per-sample GEMMs) + B in out for the squares;
    scratch as in :func:`_plan_chunks`.
    """
    b, t, n_in = x.shape
    n_out = grad_out.shape[2]
    cd = out.dtype
    if t == 1:  # (g x^T)**2 = g**2 (x**2)^T: the sum over samples is one GEMM
        g2 = grad_out[:, 0].to(cd).square()  # (B, out)
        if mask is not None:
            g2 = g2 * mask[:, 0].unsqueeze(-1).to(cd)  # (B, out)
        out.addmm_(g2.T, x[:, 0].to(cd).square())
        return
    c, rows = _plan_chunks(b, t, n_in, n_out, torch.finfo(cd).bits // 8)
    buf = torch.empty(c * rows * n_in, dtype=cd, device=out.device)  # scratch, reused by every chunk
    for s0 in range(0, b, c):
        xc = x[s0 : s0 + c].to(cd)  # (c', T, in)
        gc = grad_out[s0 : s0 + c].to(cd)  # (c', T, out)
        if mask is not None:
            gc = gc * mask[s0 : s0 + c].unsqueeze(-1).to(cd)  # (c', T, out)
        if c > 1:
            g_s = torch.bmm(gc.transpose(1, 2), xc, out=buf[: xc.shape[0] * n_out * n_in].view(-1, n_out, n_in))
            g_s.square_()  # (c', out, in) squared per-sample gradients
            ones = torch.ones(1, g_s.shape[0], dtype=cd, device=out.device)  # (1, c')
            out.view(1, -1).addmm_(ones, g_s.view(g_s.shape[0], -1))
            continue
        for r0 in range(0, n_out, rows):
            nr = min(rows, n_out - r0)
            g_blk = torch.mm(gc[0, :, r0 : r0 + nr].T, xc[0], out=buf[: nr * n_in].view(nr, n_in))  # (rows, in)
            out[r0 : r0 + nr].addcmul_(g_blk, g_blk)


@register("histogram", "torch")
def _histogram_torch(values, lo, hi, bins, log):
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (log10-spaced when ``log``).

    Contract shared by every backend:
      values (N,) contiguous any float dtype; lo < hi floats (lo > 0 when log); -> int64 (bins,).
      Bin of v: floor(t * bins), t = (v - lo) / (hi - lo), or when log
      t = (log10 v - log10 lo) / (log10 hi - log10 lo), t in float64; v == hi goes in the last
      bin; v outside [lo, hi] (and v <= 0 when log) is not counted.
    Cost: one pass over ``values`` in chunks of 2^20 (one float64 chunk of scratch).
    """
    counts = torch.zeros(bins, dtype=torch.int64, device=values.device)
    a, z = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
    for c0 in range(0, values.numel(), _HIST_CHUNK):
        v = values[c0 : c0 + _HIST_CHUNK].to(torch.float64)  # (chunk,)
        keep = (v >= lo) & (v <= hi)  # (chunk,)
        if log:
            keep &= v > 0
        v = v[keep]
        tv = ((v.log10() if log else v) - a) / (z - a)  # (kept,) in [0, 1]
        idx = (tv * bins).floor().to(torch.int64).clamp_(0, bins - 1)  # (kept,)
        counts += torch.bincount(idx, minlength=bins)
    return counts


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
        op = kernel("square_accumulate", accs[0].device, backend)
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
    op = kernel("per_sample_linear_fisher", x.device, backend)
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
    op = kernel("histogram", device, backend)
    counts = torch.zeros(bins, dtype=torch.int64, device=device)
    for _, v in flat:
        if v.numel():
            counts += op(v, lo, hi, bins, log)
    # Every value lies in [lo, hi] except, for a log histogram, the zeros: they are the rest.
    return FisherHistogram(counts, edges, numel - int(counts.sum()))


# --------------------------------------------------------------------------- DiagonalFisher: helpers


def _module_kind(module: nn.Module) -> str:
    """"linear" / "embedding" / "conv1d" (transformers' GPT-2 Conv1D: y = x W + b, W (in, out)) for
    the stock layers with their own forward, else "generic"."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward:
        return "conv1d"
    if (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    ):
        return "embedding"
    return "generic"


def _param_strategy(roles: set) -> str:
    """How a parameter's per-sample gradients are rebuilt, from the set of its uses' roles."""
    if roles == {"linear.weight"}:
        return "linear"
    if roles == {"conv1d.weight"}:
        return "conv1d"
    if roles in ({"linear.bias"}, {"conv1d.bias"}):
        return "bias"
    if roles == {"embedding.weight"}:
        return "embedding"
    if roles == {"linear.weight", "embedding.weight"}:
        return "tied"
    if roles and all(r.startswith("generic.") for r in roles):
        return "generic"
    return "loop"


class _Call:
    """One call of a hooked module during the batch forward: its captured input and output gradient."""

    __slots__ = ("module", "kind", "x", "args", "kwargs", "g", "immediate")

    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind
        self.x = self.args = self.kwargs = self.g = None
        self.immediate = False


def _capture_inputs(call: _Call, args: tuple, kwargs: dict, b: int) -> bool:
    """Store the call's inputs reshaped per sample; False when the batch is not their first dim."""
    if call.kind in ("linear", "conv1d", "embedding"):
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != b:
            return False
        if call.kind != "embedding":
            call.x = x.detach().reshape(b, -1, x.shape[-1])  # (B, T, in)
        else:
            call.x = x.detach().reshape(b, -1)  # (B, T) ids
        return True
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return False
    if any(isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != b) for a in args):
        return False
    call.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    call.kwargs = dict(kwargs)
    return True


def _targets(input_ids, attention_mask, labels) -> torch.Tensor:
    """(B, T-1) next-token targets, -100 where not counted.

    Position t predicts token t+1; it counts when tokens t and t+1 are both real
    (attention_mask) and, if labels are given, labels[t+1] != -100.
    """
    real = attention_mask != 0  # (B, T)
    valid = real[:, :-1] & real[:, 1:]  # (B, T-1)
    tgt = input_ids[:, 1:] if labels is None else labels[:, 1:]  # (B, T-1)
    valid &= tgt != -100
    return torch.where(valid, tgt, torch.full_like(tgt, -100))


def _sequence_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum over counted positions of log softmax(logits)[target]; logits (B, T, V), targets (B, T-1)."""
    b, t1 = targets.shape
    lg = logits[:, :-1]  # (B, T-1, V)
    lg = lg.to(torch.promote_types(lg.dtype, torch.float32)).reshape(b * t1, -1)  # (B (T-1), V)
    nll = nn.functional.cross_entropy(lg, targets.reshape(-1), ignore_index=-100, reduction="none")  # (B (T-1),)
    return -nll.view(b, t1).sum(1)


def _embedding_rows(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx, cd):
    """Per-sample embedding gradient rows as segment sums over (sample, id) keys.

    ids (B, T), g (B, T, d) -> (keys (K,) = s * V + id sorted, rows (K, d) = sum_{t: id_st = id} g_st).
    Positions with padding_idx get no gradient (as in nn.Embedding). Memory: K <= B T rows.
    """
    b = ids.shape[0]
    keys = torch.arange(b, device=ids.device).unsqueeze(1) * num_embeddings + ids  # (B, T)
    gg = g.reshape(b, ids.shape[1], -1)  # (B, T, d)
    if padding_idx is not None:
        keep = ids != padding_idx  # (B, T)
        keys, gg = keys[keep], gg[keep]  # (n,), (n, d)
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)  # (K,), (n,)
    rows = torch.zeros(uniq.numel(), gg.shape[-1], dtype=cd, device=g.device)  # (K, d)
    rows.index_add_(0, inv, gg.reshape(-1, gg.shape[-1]).to(cd))
    return uniq, rows


def _grad_leaves(t: torch.Tensor) -> list:
    """The leaf tensors requiring grad that ``t`` depends on (a walk of its autograd graph).

    Parameters are frozen during the update, so these are the roots made by the forward hooks
    and any leaf another hook created (e.g. transformers' enable_input_require_grads); the
    backward runs to all of them, so every hooked output gradient is computed.
    """
    leaves, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            leaves.append(fn.variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def _generic_per_sample(call: _Call, attrs: list) -> dict:
    """Exact per-sample gradients of a module's direct parameters: {attr: (B, *param.shape)}.

    vmap over samples of the vjp of functional_call(module, params, input_s) with cotangent
    grad_out_s (each sample run as a batch of one). Materialises B copies of these params only.
    """
    module = call.module
    params = {a: module._parameters[a].detach() for a in attrs}
    pos = [i for i, a in enumerate(call.args) if isinstance(a, torch.Tensor)]

    def one(g_s, *tensors_s):
        args = list(call.args)
        for i, a in zip(pos, tensors_s):
            args[i] = a.unsqueeze(0)

        def f(p):
            return torch.func.functional_call(module, p, tuple(args), call.kwargs)

        _, vjp_fn = torch.func.vjp(f, params)
        return vjp_fn(g_s.unsqueeze(0))[0]

    return torch.func.vmap(one)(call.g, *[call.args[i] for i in pos])


# --------------------------------------------------------------------------- DiagonalFisher


class DiagonalFisher:
    """Diagonal Fisher information of a causal LM, accumulated over batches.

        F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2,
        log p(y_s | x_s) = sum_{t counted} log softmax(logits_{s,t})[y_{s,t+1}]

    Args:
        model: any causal LM returning ``.logits`` (B, T, V) (a ``transformers`` model or a
            module returning logits first). Computed in eval mode (no dropout); the mode, the
            parameters' ``requires_grad`` and their ``.grad`` are left as they were.
        params: parameter names to estimate (from ``model.named_parameters()``; tied weights
            appear once); None: every parameter that requires grad.
        labels: ``"data"``: the batch's next tokens (empirical Fisher). ``"model"``: at each
            counted position the target is sampled from the model's own predictive distribution
            (true Fisher, one Monte Carlo sample), with a generator seeded by ``seed``.
        per_sample: True: exact per-sample squares, equal to a loop of per-sequence backward
            passes. False: the square of each batch's SUMMED gradient, divided by N at the end,
            (1/N) sum_batches (sum_{s in b} g_s)^2, with g_s the gradient of sequence s's summed
            log-likelihood over the same counted tokens as per_sample=True (padding excluded),
            accumulated in float32 or better. It is biased upward by (B - 1) (E g)^2 per
            parameter (the squared mean gradient; zero in expectation only for labels="model",
            where it is unbiased but noisier) and depends on the batch size; B = 1 gives the
            per-sample value. This is not the original toolkit's estimator (that one squares the
            batch-MEAN gradient of a loss that supervises padding, accumulated in bf16); it is
            kept to show what squaring batch gradients does, not to reproduce published numbers.
        seed: seed of the sampling generator for labels="model".
        backend: force a backend for the fisher ops.

    ``update(batch)``: ``batch`` is a dict with ``input_ids`` (B, T) (T >= 2), optional
    ``attention_mask`` (B, T) (default all ones), optional ``labels`` (B, T) aligned with
    input_ids as in transformers (shifted inside: token t+1 is predicted at position t; -100 is
    ignored). Position t counts when tokens t and t+1 are both real, so padding (left or right)
    never enters the loss. Any other key is passed to the model's forward (e.g. ``position_ids``
    (B, T): GPT-2's position embedding is only covered by the hooks when its ids carry the batch;
    with the default (1, T) ids it falls back to the loop). Tensors are moved to the model's device.

    ``compute()`` -> {name: tensor shaped like the parameter, float32 (float64 for a float64
    parameter)} = the accumulated squares divided by N, the number of sequences seen that have at
    least one counted target token (a sequence whose labels are all -100, or whose mask leaves no
    counted position, contributes no gradient and is not counted).

    How per_sample=True is computed: ONE forward and ONE backward of the batch-summed
    log-likelihood, with parameters frozen so the backward computes no weight gradients.
    Forward hooks capture each parameter-owning module's input, tensor hooks its output
    gradient, and the per-sample squares are rebuilt per module type:
      - nn.Linear weight: :func:`per_sample_linear_fisher`; bias: sum_s (sum_t g_st)^2; the same
        for transformers' Conv1D (GPT-2), whose weight is stored transposed.
      - nn.Embedding: segment sums of output gradients over (sample, token id) keys.
      - a weight shared by Linear and Embedding uses (tied embeddings / lm_head): the uses'
        per-sample gradients are summed before squaring, exactly, via the cross term
        2 sum_s E_s * L_s on the rows each sample touches.
      - any other module with direct parameters (RMSNorm, LayerNorm, ...): torch.func vmap
        over samples of the vjp of the module (B copies of that module's parameters only).
      - everything the hooks cannot cover exactly (parameters shared across other kinds of
        modules, modules whose inputs do not carry the batch first, tensors in keyword
        arguments, modules run under no_grad (reentrant checkpointing), modules torch.func
        cannot transform) falls back to an exact loop of per-sequence backward passes for just
        those parameters. Parameters used outside their owning module's forward (e.g. a
        ``module.weight`` read directly by a parent) cannot be seen by hooks and are NOT detected.
    Cost: about one forward + backward of the batch (1.2x of it measured on a small Llama),
    vs B per-sequence ones for the loop; the multiply-adds equal the loop's (the per-sample
    GEMMs replace the weight-gradient GEMMs), so the gain is batched-GEMM efficiency and less
    Python overhead (1.6-2x the loop on 1-2 CPU threads; more where launches dominate).
    Gradient checkpointing: transformers only checkpoints in training mode and the update runs
    in eval mode, so nothing is recomputed; non-reentrant checkpointing elsewhere is harmless
    (the hooks are removed before the backward and the output-gradient hooks sit on the
    original tensors). If an update raises midway the estimator refuses further use.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Optional[Sequence[str]] = None,
        labels: str = "data",
        per_sample: bool = True,
        seed: int = 0,
        backend: Optional[str] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if labels not in ("data", "model"):
            raise ValueError(f"labels must be 'data' or 'model', got {labels!r}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            if isinstance(params, str):
                raise TypeError("params must be a sequence of parameter names, got a single str")
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"params has names that are not parameters of model: {unknown[:5]}")
        if not names:
            raise ValueError("no parameter to estimate (params is empty or nothing requires grad)")
        self.model, self.labels, self.per_sample, self.seed, self.backend = model, labels, bool(per_sample), seed, backend
        self._params = {n: named[n] for n in names}
        self._fisher = {n: torch.zeros(p.shape, dtype=compute_dtype(p), device=p.device) for n, p in self._params.items()}
        self._n = 0
        self._broken = False
        self._writing = False  # set from the first write into the sums until the update completes
        self._gen: Optional[torch.Generator] = None
        self._uses, self._strategy = self._plan()
        self._module_names: dict = {}
        for n, us in self._uses.items():
            for m, _, _ in us:
                self._module_names.setdefault(m, []).append(n)

    # ----------------------------------------------------------------- planning

    def _plan(self) -> tuple[dict, dict]:
        """uses: {name: [(module, attr, kind)]}; strategy: {name: see _param_strategy}."""
        by_id = {id(p): n for n, p in self._params.items()}
        uses: dict = {n: [] for n in self._params}
        for module in self.model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in by_id:
                    uses[by_id[id(p)]].append((module, attr, _module_kind(module)))
        strategy = {}
        for n, us in uses.items():
            roles = {f"{k}.{a}" for _, a, k in us}
            strategy[n] = _param_strategy(roles)
        return uses, strategy

    @property
    def n_sequences(self) -> int:
        """Sequences accumulated so far that had at least one counted target (the divisor of :meth:`compute`)."""
        return self._n

    # ----------------------------------------------------------------- batch handling

    def _prepare(self, batch) -> tuple[dict, torch.Tensor]:
        """(forward kwargs moved to the model's device, targets (B, T-1) with -100 where not counted)."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"batch must be a dict with 'input_ids', got {type(batch).__name__}")
        device = next(iter(self._params.values())).device
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 2 or ids.shape[1] < 2:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"input_ids must be an integer (B, T) tensor with T >= 2, got {got}")
        if ids.shape[0] == 0:
            raise ValueError(f"input_ids holds no sequence (B = 0, shape {tuple(ids.shape)}): give at least one")
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        labels = batch.get("labels")
        for key, t in (("attention_mask", am), ("labels", labels)):
            if t is not None and (
                not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.shape != ids.shape
            ):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{key} must be an integer or bool tensor shaped like input_ids {tuple(ids.shape)}, got {got}")
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
        inputs["attention_mask"] = am.to(device)
        if hasattr(getattr(self.model, "config", None), "use_cache"):
            inputs["use_cache"] = False
        targets = _targets(ids.to(device), am.to(device), None if labels is None else labels.to(device))
        return inputs, targets

    def _logits(self, inputs: dict) -> torch.Tensor:
        out = self.model(**inputs)
        if isinstance(out, torch.Tensor):
            return out  # (B, T, V)
        return out.logits if hasattr(out, "logits") else out[0]  # (B, T, V)

    def _sample_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at the counted positions."""
        if self._gen is None:
            self._gen = torch.Generator(device=logits.device).manual_seed(self.seed)
        b, t1 = targets.shape
        probs = logits[:, :-1].detach().float().softmax(-1).reshape(b * t1, -1)  # (B (T-1), V)
        drawn = torch.multinomial(probs, 1, generator=self._gen).view(b, t1)  # (B, T-1)
        return torch.where(targets != -100, drawn, targets)

    @staticmethod
    def _slice(inputs: dict, s: int, b: int) -> dict:
        return {k: (v[s : s + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v) for k, v in inputs.items()}

    # ----------------------------------------------------------------- public

    def update(self, batch) -> "DiagonalFisher":
        """Accumulate one batch (see the class docstring); returns self."""
        if self._broken:
            raise RuntimeError("an earlier update failed midway; this DiagonalFisher is inconsistent, create a new one")
        inputs, targets = self._prepare(batch)
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                if self.per_sample:
                    self._update_per_sample(inputs, targets)
                else:
                    self._update_batch_square(inputs, targets)
        except BaseException:
            self._broken = self._writing  # only a failure after the first write leaves partial sums
            raise
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
        self._writing = False
        self._n += int((targets != -100).any(1).sum())  # sequences with a counted target token
        return self

    def compute(self) -> dict:
        """{name: accumulated squares / sequences seen}, float32 (float64 for float64 params)."""
        return dict(self.iter_compute())

    def iter_compute(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The pairs of :meth:`compute` one parameter at a time, in ``params`` order: only one result
        tensor exists at a time (beside the float32 sums), where ``compute`` holds a second copy of them all."""
        if self._broken:
            raise RuntimeError("an earlier update failed midway; this DiagonalFisher is inconsistent, create a new one")
        if self._n == 0:
            raise ValueError("no sequence seen yet with a counted target token: call update(batch) first")
        n = self._n
        return ((name, f / n) for name, f in self._fisher.items())

    # ----------------------------------------------------------------- estimators

    def _update_batch_square(self, inputs: dict, targets: torch.Tensor) -> None:
        names = list(self._params)
        params = [self._params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        logits = self._logits(inputs)
        if self.labels == "model":
            targets = self._sample_targets(logits, targets)
        total = _sequence_log_likelihood(logits, targets).sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
        self._writing = True
        pairs = [(self._fisher[n], g) for n, g in zip(names, grads) if g is not None]
        if pairs:
            fisher_accumulate_([a for a, _ in pairs], [g for _, g in pairs], backend=self.backend)

    def _update_loop(self, names: list, inputs: dict, targets: torch.Tensor) -> None:
        """Exact per-sequence backward passes for ``names`` only (the fallback)."""
        params = [self._params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        b = targets.shape[0]
        for s in range(b):
            ll = _sequence_log_likelihood(self._logits(self._slice(inputs, s, b)), targets[s : s + 1]).sum()
            grads = torch.autograd.grad(ll, params, allow_unused=True)
            pairs = [(self._fisher[n], g) for n, g in zip(names, grads) if g is not None]
            if pairs:
                fisher_accumulate_([a for a, _ in pairs], [g for _, g in pairs], backend=self.backend)
        for p in params:
            p.requires_grad_(False)

    def _update_per_sample(self, inputs: dict, targets: torch.Tensor) -> None:
        b = targets.shape[0]
        hooked = {}
        for n, strat in self._strategy.items():
            if strat != "loop":
                for module, _, kind in self._uses[n]:
                    hooked[module] = kind
        calls: dict = {m: [] for m in hooked}
        bad: set = set()
        roots: list = []

        def forward_hook(module, args, kwargs, output):
            call = _Call(module, hooked[module])
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.dim()
                    and output.shape[0] == b and _capture_inputs(call, args, kwargs, b)):
                bad.add(module)
                return None
            calls[module].append(call)
            if output.grad_fn is not None:
                output.register_hook(lambda g, call=call: self._on_grad(call, g))
                return None
            leaf = output.detach().requires_grad_(True)
            roots.append((leaf, call))
            return leaf.clone()  # a non-leaf, so the model may still modify it in place

        handles = [m.register_forward_hook(forward_hook, with_kwargs=True) for m in hooked]
        try:
            logits = self._logits(inputs)
            if self.labels == "model":
                targets = self._sample_targets(logits, targets)
            total = _sequence_log_likelihood(logits, targets).sum()
        finally:
            for h in handles:
                h.remove()
        loop = {n for n, s in self._strategy.items() if s == "loop" or any(m in bad for m, _, _ in self._uses[n])}
        self._mark_immediate(calls, loop)
        self._writing = True
        if total.requires_grad:
            leaves = _grad_leaves(total)  # our roots, plus leaves made by others' hooks (input require-grads)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            by_leaf = {id(leaf): call for leaf, call in roots}
            for leaf, g in zip(leaves, grads):
                if g is not None and id(leaf) in by_leaf:
                    self._on_grad(by_leaf[id(leaf)], g)
        del logits, total
        loop |= self._rebuild(calls, loop)
        if loop:
            self._update_loop(sorted(loop), inputs, targets)

    # ----------------------------------------------------------------- rebuilding per-sample squares

    def _mark_immediate(self, calls: dict, loop: set) -> None:
        """Linear modules called once whose requested params are theirs alone: processed in their hook."""
        for module, cs in calls.items():
            if len(cs) != 1 or cs[0].kind not in ("linear", "conv1d"):
                continue
            names = self._names_of(module)
            if names and all(n not in loop and len(self._uses[n]) == 1 for n in names):
                cs[0].immediate = True

    def _names_of(self, module: nn.Module) -> list:
        return self._module_names.get(module, [])

    def _on_grad(self, call: _Call, g: torch.Tensor) -> None:
        call.g = g.detach()
        if call.immediate:
            for n in self._names_of(call.module):
                self._linear_param(n, [call])
            call.x = call.g = None

    @staticmethod
    def _pending(uses: list, calls: dict) -> list:
        """The calls of a parameter's modules that have an output gradient and were not done in a hook."""
        return [c for m, _, _ in uses for c in calls[m] if c.g is not None and not c.immediate]

    def _linear_param(self, n: str, cs: list) -> None:
        """Weight or bias squares of a Linear parameter; the tokens of all its calls are concatenated,
        so per-sample gradients of every use are summed before squaring."""
        if not cs:
            return
        attr = self._uses[n][0][1]
        acc = self._fisher[n]
        g = torch.cat([c.g.reshape(c.x.shape[0], -1, c.g.shape[-1]) for c in cs], dim=1)  # (B, T', out)
        if attr == "weight":
            x = torch.cat([c.x for c in cs], dim=1)  # (B, T', in)
            if cs[0].kind == "conv1d":  # W (in, out): G_s = sum_t x_st g_st^T, the roles swapped
                per_sample_linear_fisher(g, x, out=acc, backend=self.backend)
            else:
                per_sample_linear_fisher(x, g, out=acc, backend=self.backend)
        else:
            acc.add_(g.sum(1, dtype=acc.dtype).square().sum(0))  # sum_s (sum_t g_st)^2

    def _embedding_param(self, n: str, cs: list):
        """Embedding squares; returns (keys, rows) of the per-sample gradient rows for a tied cross term."""
        module = self._uses[n][0][0]
        acc = self._fisher[n]
        ids = torch.cat([c.x for c in cs], dim=1)  # (B, T')
        g = torch.cat([c.g.reshape(c.x.shape[0], c.x.shape[1], -1) for c in cs], dim=1)  # (B, T', d)
        keys, rows = _embedding_rows(ids, g, module.num_embeddings, module.padding_idx, acc.dtype)
        acc.index_add_(0, keys % module.num_embeddings, rows.square())
        return keys, rows

    def _tied_param(self, n: str, cs: list) -> None:
        """Weight shared by Linear (lm_head) and Embedding uses: sum_s (L_s + E_s)^2 =
        sum_s L_s^2 + sum_s E_s^2 + 2 sum_s E_s * L_s, the cross term on the rows sample s touches."""
        lin = [c for c in cs if c.kind == "linear"]
        emb = [c for c in cs if c.kind == "embedding"]
        if lin:
            self._linear_param(n, lin)
        if not emb:
            return
        keys, e_rows = self._embedding_param(n, emb)
        if not lin:
            return
        acc = self._fisher[n]
        v_count = next(m.num_embeddings for m, _, k in self._uses[n] if k == "embedding")
        x = torch.cat([c.x for c in lin], dim=1)  # (B, T', d)
        g = torch.cat([c.g.reshape(c.x.shape[0], -1, c.g.shape[-1]) for c in lin], dim=1)  # (B, T', V)
        sizes = torch.bincount(keys // v_count, minlength=x.shape[0]).tolist()
        ids = keys % v_count  # (K,)
        l_rows = torch.cat(
            [g[s][:, v].T.to(acc.dtype) @ x[s].to(acc.dtype) for s, v in enumerate(ids.split(sizes))]
        )  # (K, d): rows of sum_t g_st x_st^T at the ids sample s uses
        acc.index_add_(0, ids, 2 * e_rows * l_rows)

    def _generic_params(self, names: list, calls: dict) -> set:
        """Exact per-sample squares by torch.func for parameters of generic modules; returns failures."""
        failed = set()
        for n in names:
            per = None
            try:
                for module, attr, _ in self._uses[n]:
                    for c in calls[module]:
                        if c.g is None:
                            continue
                        ps = _generic_per_sample(c, [attr])[attr]  # (B, *shape)
                        per = ps.to(self._fisher[n].dtype) if per is None else per + ps
            except Exception:  # noqa: BLE001 - a module torch.func cannot transform: the exact loop instead
                failed.add(n)
                continue
            if per is not None:
                self._fisher[n].add_(per.square().sum(0))
        return failed

    def _rebuild(self, calls: dict, loop: set) -> set:
        """Accumulate every hooked parameter not already done in a hook; returns names that need the loop."""
        generic = []
        for n, strat in self._strategy.items():
            if n in loop:
                continue
            cs = self._pending(self._uses[n], calls)
            if strat in ("linear", "conv1d", "bias"):
                self._linear_param(n, cs)
            elif strat == "embedding":
                if cs:
                    self._embedding_param(n, cs)
            elif strat == "tied":
                self._tied_param(n, cs)
            elif strat == "generic":
                generic.append(n)
        return self._generic_params(generic, calls)
