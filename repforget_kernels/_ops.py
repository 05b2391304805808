"""The kernel ops, each declared once: schema, contract, fake, torch composite, float64 reference.

An *op* is the unit a backend implements: a fixed contract on tensors that the public functions in
``cka``, ``pca`` and ``fisher`` build on (they never call a kernel directly: :mod:`._dispatch`
chooses the implementation). Each op below is one :class:`KernelOp`, declared with
``torch.library`` in the ``repforget`` namespace:

- its schema (one string) and its contract (the composite's docstring, shared by every backend);
- a fake implementation (output shapes and dtypes only), so ``torch.compile`` traces a call to the
  op without running it;
- the torch composite: the ``torch`` backend, differentiable, and the op's
  ``CompositeExplicitAutograd`` kernel (what ``torch.ops.repforget.<op>`` runs on a device with no
  compiled kernel);
- the float64 reference in :mod:`.reference` it is tested against (tests/test_op_contract.py).

The other backends attach to the same op: the C++ extension registers the op's CPU kernel
(``TORCH_LIBRARY_IMPL(repforget, CPU, m)``, csrc/cpu), a CUDA build its CUDA kernel (csrc/cuda),
and the Triton modules attach theirs with :meth:`KernelOp.implement`. See docs/design.md, "How to
add a kernel".

Length: one module because it is the one place each op is declared; the eight ops' composites,
fakes and declarations are short and grouped by op.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from . import reference
from ._numerics import mean_shift
from ._validate import compute_dtype

__all__ = [
    "LIBRARY", "BACKENDS", "KernelOp", "OPS", "interpreting",
    "SQUARE_ACCUMULATE", "PER_SAMPLE_LINEAR_FISHER", "HISTOGRAM", "CENTERED_GRAM", "SHIFTED_CROSS_PRODUCTS",
    "CENTERED_MATMUL", "CENTERED_MATMUL_T", "COLUMN_STATS", "shifted_cross_product_keys", "column_gram",
]

LIBRARY = "repforget"
BACKENDS = ("torch", "cpp", "triton", "cuda")
_LIB = torch.library.Library(LIBRARY, "DEF")  # kept alive for the process: the ops live as long as it does
OPS: dict[str, "KernelOp"] = {}  # op name -> its declaration, in declaration order


def _define(name: str, signature: str, kernel: Callable, fake: Callable):
    """Define ``repforget::<name><signature>`` with ``kernel`` on every device and ``fake`` for tracing: -> the op."""
    _LIB.define(f"{name}{signature}")
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{LIBRARY}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, LIBRARY), name)


def _no_outputs(*args):
    """The fake of an in-place op: it returns nothing."""
    return None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton kernels run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class KernelOp:
    """One kernel op: ``torch.ops.repforget.<name>`` and the implementations each backend attaches.

    ``composite`` is the torch backend (its docstring is the op's contract); ``fake`` returns empty
    outputs of the right shapes and dtypes; ``reference`` is the float64 NumPy twin of the contract.
    ``kernels`` maps a backend to its implementation: "torch" always; "cpp" / "cuda" when the C++
    extension registered the op's CPU / CUDA kernel (filled by the dispatcher); "triton" when a
    Triton module attached one with :meth:`implement`.
    """

    def __init__(self, name: str, schema: str, composite: Callable, fake: Callable, reference: Callable):
        if name in OPS:
            raise ValueError(f"op {name!r} is already declared")
        self.name, self.schema, self._signature = name, f"{LIBRARY}::{name}{schema}", schema
        self.composite, self.fake, self.reference = composite, fake, reference
        self.kernels: dict[str, Callable] = {"torch": composite}
        # torch.ops.repforget.<name>: runs the kernel registered for its inputs' device (the composite where none)
        self.packet = _define(name, schema, composite, fake)
        OPS[name] = self

    @property
    def qualname(self) -> str:
        return f"{LIBRARY}::{self.name}"

    def has_compiled_kernel(self, dispatch_key: str) -> bool:
        """Whether a compiled kernel is registered for ``dispatch_key`` ("CPU", "CUDA")."""
        return torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, dispatch_key)

    def implement(self, backend: str) -> Callable[[Callable], Callable]:
        """Decorator: attach the Python-launched kernel ``fn`` as ``backend``'s implementation.

        ``fn`` becomes the op ``torch.ops.repforget.<name>_<backend>``: the same schema and fake as this
        op, ``fn`` as its kernel on every device (CUDA, or CPU under the Triton interpreter), so a call
        inside ``torch.compile`` stays one opaque node instead of tracing into the launch code. Triton
        and CUDA both serve CUDA tensors, so the Triton kernel cannot be this op's own CUDA kernel.
        """
        if backend not in BACKENDS or backend == "torch":
            raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

        def deco(fn: Callable) -> Callable:
            self.kernels[backend] = _define(f"{self.name}_{backend}", self._signature, fn, self.fake)
            return fn

        return deco

    def __repr__(self) -> str:
        return f"KernelOp({self.schema})"


# --------------------------------------------------------------------------- square_accumulate

# Elements per group of square_accumulate upcasts.
_UPCAST_GROUP_BYTES = 64 << 20


def _square_accumulate(accs, grads, scale):
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


SQUARE_ACCUMULATE = KernelOp(
    "square_accumulate", "(Tensor(a!)[] accs, Tensor[] grads, float scale) -> ()",
    _square_accumulate, _no_outputs, reference.square_accumulate_op_ref,
)


# --------------------------------------------------------------------------- per_sample_linear_fisher

# Scratch of the per-sample linear Fisher composite: half a float32 weight matrix, at least this.
_SCRATCH_FLOOR_BYTES = 1 << 20


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


def _per_sample_linear_fisher(x, grad_out, mask, out):
    """out += sum_s (sum_t m_st g_st x_st^T)**2 elementwise, in place.

    Contract shared by every backend:
      x (B, T, in), grad_out (B, T, out) any float dtype, contiguous; mask (B, T) bool or None;
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


PER_SAMPLE_LINEAR_FISHER = KernelOp(
    "per_sample_linear_fisher", "(Tensor x, Tensor grad_out, Tensor? mask, Tensor(a!) out) -> ()",
    _per_sample_linear_fisher, _no_outputs, reference.per_sample_linear_fisher_op_ref,
)


# --------------------------------------------------------------------------- histogram

# Elements per pass of the histogram composite.
_HIST_CHUNK = 1 << 20


def _histogram(values, lo, hi, bins, log):
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


def _histogram_fake(values, lo, hi, bins, log):
    return values.new_empty((bins,), dtype=torch.int64)


HISTOGRAM = KernelOp(
    "histogram", "(Tensor values, float lo, float hi, int bins, bool log) -> Tensor",
    _histogram, _histogram_fake, reference.histogram_op_ref,
)


# --------------------------------------------------------------------------- shifted_cross_products

_SUM_KEYS = ("sxy", "sxx", "syy", "sx", "sy")
_DEBIASED_KEYS = ("sa", "sb", "saa", "sbb", "sab", "sax", "sbx", "say", "sby")


def shifted_cross_product_keys(debiased: bool) -> tuple[str, ...]:
    """Names of the outputs of op ``shifted_cross_products``, in order."""
    return _SUM_KEYS + (_DEBIASED_KEYS if debiased else ())


def _shift_and_scale(x: torch.Tensor, shift: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """(x - shift) * scale in shift's dtype: (L, n, d), (L, d), (L,) or None -> (L, n, d).

    One pass, as x * scale - shift * scale: scale is a power of two, so both products are exact (the
    shifted data are scaled into (-1, 1): nothing overflows, and only parts below 2^-149 of the
    range could underflow) and the difference rounds exactly as (x - shift) * scale does.
    """
    if scale is None:
        return x.to(shift.dtype) - shift.unsqueeze(-2)  # (L, n, d)
    sc = scale.to(device=shift.device, dtype=shift.dtype).view(-1, 1, 1)  # (L, 1, 1)
    return torch.addcmul(shift.unsqueeze(-2) * -sc, x.to(shift.dtype), sc)  # (L, n, d)


# Column panels of the symmetric products: 4 (5/8 of the full product's multiply-adds) once a panel
# is at least this wide; narrower products are one bmm.
_GRAM_PANELS, _MIN_PANEL = 4, 256


def column_gram(a: torch.Tensor) -> torch.Tensor:
    """A^T A of each layer, (L, n, d) -> (L, d, d), computing the symmetric product by column panels.

    Panel j (columns j b .. (j + 1) b - 1, b = ceil(d / 4)) is multiplied with the columns from
    j b on only, and its part below the diagonal blocks is mirrored: n d^2 (4 + 1) / 8 multiply-adds
    instead of n d^2, as four GEMMs that stay BLAS-efficient (a BLAS syrk would halve the work, but
    torch exposes none, and SciPy's runs on a second thread pool that contends with torch's). Each
    entry is the same dot product of two columns of length n, accumulated in a's dtype, as in a GEMM.
    d < 2 * 256, or an input that requires grad: one bmm.
    """
    d = a.shape[-1]
    width = -(-d // _GRAM_PANELS)  # ceil(d / panels)
    if a.requires_grad or width < _MIN_PANEL:
        return torch.bmm(a.transpose(-1, -2), a)  # (L, d, d)
    out = a.new_empty((a.shape[0], d, d))  # (L, d, d)
    at = a.transpose(-1, -2)  # (L, d, n)
    for i0 in range(0, d, width):
        i1 = min(i0 + width, d)
        panel = torch.bmm(at[:, i0:i1], a[:, :, i0:])  # (L, i1 - i0, d - i0): rows i0..i1 of the upper part
        out[:, i0:i1, i0:] = panel
        out[:, i1:, i0:i1] = panel[:, :, i1 - i0:].transpose(-1, -2)  # the mirror below the diagonal block
    return out


def _shifted_cross_products(x, y, shift_x, shift_y, debiased, scale_x=None, scale_y=None):
    """Sums over the rows of one chunk, after subtracting a shift from every row and scaling it.

    Contract shared by every backend:
      x (L, n, dx), y (L, n, dy) any float dtype; shift_x (L, dx), shift_y (L, dy) in the
      compute dtype (float32, or float64 for float64 input), subtracted in that dtype (so a shift
      that is the rounded column mean is applied exactly); scale_x, scale_y (L,) float64 powers of
      two or None (1), multiplying the shifted rows before any product (exact; keeps products of
      rows of any magnitude in range).
      Returns a list of tensors named by :func:`shifted_cross_product_keys`: the three product
      matrices in the compute dtype, every other sum in float64. With
      x' = (x - shift_x) scale_x, y' = (y - shift_y) scale_y, a_i = ||x'_i||^2, b_i = ||y'_i||^2:
        sxy (L, dx, dy) = X'^T Y'    sxx (L, dx, dx) = X'^T X'    syy (L, dy, dy) = Y'^T Y'
        sx (L, dx) = sum_i x'_i      sy (L, dy) = sum_i y'_i
      and when ``debiased``: sa, sb, saa, sbb, sab (L,) = sum a, b, a^2, b^2, ab;
        sax, sbx (L, dx) = sum a_i x'_i, sum b_i x'_i;  say, sby (L, dy) = sum a_i y'_i, sum b_i y'_i.
    Cost: n (dx dy + 5 (dx^2 + dy^2) / 8) multiply-adds (the symmetric products by
    :func:`column_gram`; n (dx dy + dx^2 + dy^2) below 512 columns); memory: one shifted copy of x and y.
    """
    cd, f64 = shift_x.dtype, torch.float64
    xs = _shift_and_scale(x, shift_x, scale_x)  # (L, n, dx)
    ys = _shift_and_scale(y, shift_y, scale_y)  # (L, n, dy)
    xt = xs.transpose(-1, -2)  # (L, dx, n)
    out = [
        torch.bmm(xt, ys),  # sxy (L, dx, dy)
        column_gram(xs),  # sxx (L, dx, dx), one triangle
        column_gram(ys),  # syy (L, dy, dy)
        xs.sum(-2).to(f64),  # sx (L, dx) cascade-summed in the compute dtype: shifted values are small
        ys.sum(-2).to(f64),  # sy (L, dy)
    ]
    if debiased:
        a = torch.linalg.vector_norm(xs, dim=-1).square().to(f64)  # (L, n) a_i = ||x'_i||^2
        b = torch.linalg.vector_norm(ys, dim=-1).square().to(f64)  # (L, n)
        ab = torch.stack([a, b], -2).to(cd)  # (L, 2, n): both weight vectors, one read of xs and of ys
        abx = torch.bmm(ab, xs).to(f64)  # (L, 2, dx) rows: sum a_i x'_i, sum b_i x'_i
        aby = torch.bmm(ab, ys).to(f64)  # (L, 2, dy) rows: sum a_i y'_i, sum b_i y'_i
        out += [a.sum(-1), b.sum(-1), a.square().sum(-1), b.square().sum(-1), (a * b).sum(-1),
                abx[:, 0].clone(), abx[:, 1].clone(), aby[:, 0].clone(), aby[:, 1].clone()]  # no aliased outputs
    return out


def _shifted_cross_products_fake(x, y, shift_x, shift_y, debiased, scale_x=None, scale_y=None):
    (L, _, dx), dy = x.shape, y.shape[-1]
    cd, f64 = shift_x.dtype, torch.float64
    out = [x.new_empty((L, dx, dy), dtype=cd), x.new_empty((L, dx, dx), dtype=cd), x.new_empty((L, dy, dy), dtype=cd),
           x.new_empty((L, dx), dtype=f64), x.new_empty((L, dy), dtype=f64)]
    if debiased:
        out += [x.new_empty((L,), dtype=f64) for _ in range(5)]
        out += [x.new_empty((L, d), dtype=f64) for d in (dx, dx, dy, dy)]
    return out


SHIFTED_CROSS_PRODUCTS = KernelOp(
    "shifted_cross_products",
    "(Tensor x, Tensor y, Tensor shift_x, Tensor shift_y, bool debiased, Tensor? scale_x=None, "
    "Tensor? scale_y=None) -> Tensor[]",
    _shifted_cross_products, _shifted_cross_products_fake, reference.shifted_cross_products_op_ref,
)


# --------------------------------------------------------------------------- centered_gram


def gram_offsets(rows: torch.Tensor, diag: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Offsets u (L, n) float64 such that K_ij - u_i - u_j is the centred (unbiased: U-centred, i != j) Gram.

    rows = K 1 and diag = diag K of a Gram of shifted rows, (L, n) float64.
    biased: u_i = r_i / n - s / (2 n^2) with r = K 1 (H K H); unbiased: u_i = r_i/(n-2) - s/(2 (n-1)(n-2))
    with r = K~ 1 (Szekely-Rizzo); s = 1^T r.
    """
    n = rows.shape[-1]
    if unbiased:
        r = rows - diag  # (L, n) = K~ 1
        return r / (n - 2) - r.sum(-1, keepdim=True) / (2 * (n - 1) * (n - 2))
    return rows / n - rows.sum(-1, keepdim=True) / (2 * n * n)


def _centered_gram(x, unbiased, scale=None):
    """Centred (or U-centred) Gram matrices of a stack of layers, and the size of what the centring cancels.

    Contract shared by every backend:
      x (L, n, d) any float dtype; scale (L,) float64 powers of two or None (1).
      Rows x' = (x - s) scale with s the column means (float64, rounded to the compute dtype: the
      shift is then exact in that dtype, no cancellation under large offsets); K = X' X'^T.
      -> (gram (L, n, n) in float32, float64 for float64 input; trace (L,) float64 = tr K = ||X'||_F^2).
      unbiased=False: gram = H K H (doubly centred: exact whatever the shift left in X', never
        built with H); = Xc Xc^T of the column-centred rows.
      unbiased=True: the U-centred Gram of Szekely & Rizzo (invariant to the shift):
        U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) for i != j, U_ii = 0,
        with K~ = K with zero diagonal, r = K~ 1, s = 1^T K~ 1; <U(K), U(L)> / (n(n-3)) = HSIC_u.
    Cost: n^2 d multiply-adds + 2 passes over the (L, n, n) result; memory: the result and one
    shifted copy of x.
    """
    cd = compute_dtype(x)
    _, shift = mean_shift(x, cd)
    xs = _shift_and_scale(x, shift, scale)  # (L, n, d)
    k = torch.bmm(xs, xs.transpose(-1, -2))  # (L, n, n) Gram of the shifted rows
    diag = k.diagonal(dim1=-2, dim2=-1).to(torch.float64)  # (L, n)
    u = gram_offsets(k.sum(-1, dtype=torch.float64), diag, unbiased).to(cd)  # (L, n)
    k = k - u.unsqueeze(-1) - u.unsqueeze(-2)  # (L, n, n), exactly symmetric (the offsets commute)
    if unbiased:
        k.diagonal(dim1=-2, dim2=-1).zero_()
    return k, diag.sum(-1)


def _centered_gram_fake(x, unbiased, scale=None):
    L, n, _ = x.shape
    return x.new_empty((L, n, n), dtype=compute_dtype(x)), x.new_empty((L,), dtype=torch.float64)


CENTERED_GRAM = KernelOp(
    "centered_gram", "(Tensor x, bool unbiased, Tensor? scale=None) -> (Tensor, Tensor)",
    _centered_gram, _centered_gram_fake, reference.centered_gram_op_ref,
)


# --------------------------------------------------------------------------- centered_matmul(_t)


def _centered_matmul(x, mu, omega):
    """Xc @ Omega without cancellation: (X - 1 mu^T) formed block by block (the caller passes row blocks).

    Contract: x (L, n, d) any float dtype; mu (L, d) and omega (L, d, l) in the compute dtype
    (float32 or float64) -> (L, n, l) in the compute dtype, = (X - 1 mu^T) Omega with mu subtracted
    from x in the compute dtype before the product (exact for columns with a large offset when mu
    is their rounded mean; never X Omega - 1 (mu^T Omega), which cancels eps * |mu| / sigma).
    Cost: n d l multiply-adds, one read of x; memory: one shifted copy of x.
    """
    return torch.bmm(x.to(omega.dtype) - mu.unsqueeze(-2), omega)  # (L, n, l)


def _centered_matmul_fake(x, mu, omega):
    return omega.new_empty((x.shape[0], x.shape[1], omega.shape[2]))


CENTERED_MATMUL = KernelOp(
    "centered_matmul", "(Tensor x, Tensor mu, Tensor omega) -> Tensor",
    _centered_matmul, _centered_matmul_fake, reference.centered_matmul_op_ref,
)


def _centered_matmul_t(x, mu, q):
    """Xc^T @ Q without cancellation: (X - 1 mu^T)^T Q.

    Contract: x (L, n, d) any float dtype; mu (L, d) and q (L, n, l) in the compute dtype
    -> (L, d, l) in the compute dtype, mu subtracted from x before the product (as centered_matmul).
    Cost: n d l multiply-adds; memory: one shifted copy of x.
    """
    return torch.bmm((x.to(q.dtype) - mu.unsqueeze(-2)).transpose(-1, -2), q)  # (L, d, l)


def _centered_matmul_t_fake(x, mu, q):
    return q.new_empty((x.shape[0], x.shape[2], q.shape[2]))


CENTERED_MATMUL_T = KernelOp(
    "centered_matmul_t", "(Tensor x, Tensor mu, Tensor q) -> Tensor",
    _centered_matmul_t, _centered_matmul_t_fake, reference.centered_matmul_t_op_ref,
)


# --------------------------------------------------------------------------- column_stats


def _column_stats(x):
    """Column sums in float64 and column extrema of a stack of layers, for the shift and scale of every metric.

    Contract shared by every backend:
      x (L, n, d) any float dtype -> (sum (L, d) float64, min (L, d), max (L, d) in x's dtype).
      sum: the column sums accumulated in float64 (error at most a few hundred u64 sum |x_ij| for any
      summation order used here); min, max exact. NaN in x reaches the sums (the callers check them
      for finiteness); the extrema of a column holding NaN are unspecified.
    Cost: one read of x on a compiled backend; here a float64 copy of x and three reductions.
    """
    return x.sum(-2, dtype=torch.float64), x.amin(-2), x.amax(-2)


def _column_stats_fake(x):
    L, _, d = x.shape
    return x.new_empty((L, d), dtype=torch.float64), x.new_empty((L, d)), x.new_empty((L, d))


COLUMN_STATS = KernelOp(
    "column_stats", "(Tensor x) -> (Tensor, Tensor, Tensor)",
    _column_stats, _column_stats_fake, reference.column_stats_op_ref,
)
