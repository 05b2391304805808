"""Triton kernels for the cka ops, on the shifted GEMM of ``_triton_gemm``.

Kernels attached here (backend "triton"; float64 inputs go to the torch composite, which is
cuBLAS DGEMM on a GPU):
  shifted_cross_products: three shifted GEMMs (X'^T Y', and one triangle each of X'^T X', Y'^T Y')
    plus two small O(n d) kernels for the sums (row norms, weighted column sums in float64).
  centered_gram: one symmetric shifted GEMM (rounded column means subtracted in the load), then a
    torch row-sum pass (float64) and a centring epilogue kernel (H K H, or U-centring).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_gemm as _gemm
from ._numerics import mean_shift
from ._ops import CENTERED_GRAM, SHIFTED_CROSS_PRODUCTS, gram_offsets, interpreting, shifted_cross_product_keys

__all__ = ["row_sqnorms", "weighted_colsums"]


# --------------------------------------------------------------------------- O(n d) sums


@triton.jit
def _row_sqnorm_kernel(
    x_ptr, s_ptr, g_ptr, out_ptr, N, D, s_xl, s_xn, s_xd, s_sl,
    BN: tl.constexpr, BD: tl.constexpr,
):
    """out[l, i] = sum_j ((x[l, i, j] - s[l, j]) g[l])^2, float64 accumulation. Grid (row tiles, L)."""
    lay = tl.program_id(1).to(tl.int64)
    g = tl.load(g_ptr + lay)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    mn = rn < N
    acc = tl.zeros((BN,), dtype=tl.float64)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)  # (BD,)
        md = rd < D
        msk = mn[:, None] & md[None, :]
        v = tl.load(x_ptr + lay * s_xl + rn[:, None].to(tl.int64) * s_xn + rd[None, :] * s_xd, mask=msk, other=0.0)
        sh = tl.load(s_ptr + lay * s_sl + rd, mask=md, other=0.0)
        v = tl.where(msk, (v.to(tl.float32) - sh[None, :]) * g, 0.0)  # (BN, BD)
        acc += tl.sum((v * v).to(tl.float64), axis=1)
    tl.store(out_ptr + lay * N + rn, acc, mask=mn)


@triton.jit
def _weighted_colsum_kernel(
    x_ptr, s_ptr, g_ptr, wa_ptr, wb_ptr, out_ptr, N, D, N_PER_SPLIT, s_xl, s_xn, s_xd, s_sl, L,
    WEIGHTED: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Column sums of x' = (x - s) g over one row split, float64: out[split, l, 0, j] = sum_i x'_ij, and when
    WEIGHTED out[.., 1, j] = sum_i wa_i x'_ij, out[.., 2, j] = sum_i wb_i x'_ij. Grid (column tiles, L, splits)."""
    lay = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rd = tl.program_id(0) * BD + tl.arange(0, BD)  # (BD,)
    md = rd < D
    sh = tl.load(s_ptr + lay * s_sl + rd, mask=md, other=0.0)  # (BD,)
    g = tl.load(g_ptr + lay)
    n_lo = split * N_PER_SPLIT
    n_hi = tl.minimum(N, n_lo + N_PER_SPLIT)
    acc0 = tl.zeros((BD,), dtype=tl.float64)
    acc1 = tl.zeros((BD,), dtype=tl.float64)
    acc2 = tl.zeros((BD,), dtype=tl.float64)
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)  # (BN,)
        mn = rn < n_hi
        msk = mn[:, None] & md[None, :]
        v = tl.load(x_ptr + lay * s_xl + rn[:, None].to(tl.int64) * s_xn + rd[None, :] * s_xd, mask=msk, other=0.0)
        v = tl.where(msk, (v.to(tl.float32) - sh[None, :]) * g, 0.0).to(tl.float64)  # (BN, BD)
        acc0 += tl.sum(v, axis=0)
        if WEIGHTED:
            wa = tl.load(wa_ptr + lay * N + rn, mask=mn, other=0.0)  # (BN,) float64
            wb = tl.load(wb_ptr + lay * N + rn, mask=mn, other=0.0)  # (BN,) float64
            acc1 += tl.sum(wa[:, None] * v, axis=0)
            acc2 += tl.sum(wb[:, None] * v, axis=0)
    base = out_ptr + (split.to(tl.int64) * L + lay) * 3 * D
    tl.store(base + rd, acc0, mask=md)
    if WEIGHTED:
        tl.store(base + D + rd, acc1, mask=md)
        tl.store(base + 2 * D + rd, acc2, mask=md)


def _sums_config(interp: bool) -> tuple[int, int]:
    return (16, 32) if interp else (64, 128)


def _layer_scale(x: torch.Tensor, scale) -> torch.Tensor:
    """Per-layer scale (L,) as float32 on x's device (ones for None)."""
    if scale is None:
        return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return scale.to(device=x.device, dtype=torch.float32).contiguous()


def row_sqnorms(x: torch.Tensor, shift: torch.Tensor, scale=None) -> torch.Tensor:
    """||(x_i - shift) scale||^2 for every row: x (L, n, d), shift (L, d) float32, scale (L,) or None -> (L, n) float64.

    Cost: one read of x.
    """
    L, n, d = x.shape
    bn, bd = _sums_config(interpreting())
    shift = shift.contiguous()
    out = _gemm.new_output((L, n), x.device, torch.float64)  # (L, n)
    _row_sqnorm_kernel[(triton.cdiv(n, bn), L)](
        x, shift, _layer_scale(x, scale), out, n, d, x.stride(0), x.stride(1), x.stride(2), shift.stride(0), BN=bn, BD=bd,
    )
    return out


def weighted_colsums(x: torch.Tensor, shift: torch.Tensor, scale=None, wa=None, wb=None) -> torch.Tensor:
    """Column sums of x' = (x - shift) scale (and weighted by wa, wb): -> (L, 3, d) float64 (rows 1, 2 only when weighted).

    x (L, n, d) any float dtype, shift (L, d) float32, scale (L,) or None, wa, wb (L, n) float64.
    Cost: one read of x.
    """
    L, n, d = x.shape
    interp = interpreting()
    bn, bd = _sums_config(interp)
    weighted = wa is not None
    programs = triton.cdiv(d, bd) * L
    splits = max(1, min(_gemm.num_programs_target(x.device) // programs, triton.cdiv(n, 4 * bn)))
    n_per = triton.cdiv(triton.cdiv(n, splits), bn) * bn
    splits = triton.cdiv(n, n_per)
    shift = shift.contiguous()
    wa = wa.contiguous() if weighted else shift
    wb = wb.contiguous() if weighted else shift
    out = _gemm.new_output((splits, L, 3, d), x.device, torch.float64)  # (S, L, 3, d)
    _weighted_colsum_kernel[(triton.cdiv(d, bd), L, splits)](
        x, shift, _layer_scale(x, scale), wa, wb, out, n, d, n_per, x.stride(0), x.stride(1), x.stride(2), shift.stride(0), L,
        WEIGHTED=weighted, BN=bn, BD=bd,
    )
    return out.sum(0)


# --------------------------------------------------------------------------- ops


@SHIFTED_CROSS_PRODUCTS.implement("triton")
def _shifted_cross_products_triton(x, y, shift_x, shift_y, debiased, scale_x=None, scale_y=None):
    """Triton version of the op (contract in ``_ops``).

    X'^T Y' by the shifted GEMM over the tile grid, X'^T X' and Y'^T Y' over one tile triangle
    each (mirrored in the kernel); sx, sy and the debiased extras by two O(n d) kernels (row norms
    a, b in float64, then column sums weighted by 1, a, b in float64); sa, sb, saa, sbb, sab are
    O(n) float64 torch sums of a and b. Shifts and scales are applied in every load.
    float64 input runs the torch composite.
    Cost: n (dx dy + (dx^2 + dy^2) / 2) multiply-adds on tensor cores (bf16/fp16) or in float32.
    """
    if shift_x.dtype == torch.float64:
        return SHIFTED_CROSS_PRODUCTS.composite(x, y, shift_x, shift_y, debiased, scale_x, scale_y)
    xt = x.transpose(-1, -2)  # (L, dx, n) view
    yt = y.transpose(-1, -2)  # (L, dy, n) view
    gx = dict(shift_a=shift_x, shift_a_along="m", scale_a=scale_x)
    gy = dict(shift_a=shift_y, shift_a_along="m", scale_a=scale_y)
    out = {
        "sxy": _gemm.shifted_gemm(xt, y, **gx, shift_b=shift_y, shift_b_along="n", scale_b=scale_y),
        "sxx": _gemm.shifted_gemm(xt, x, **gx, shift_b=shift_x, shift_b_along="n", scale_b=scale_x, symmetric=True),
        "syy": _gemm.shifted_gemm(yt, y, **gy, shift_b=shift_y, shift_b_along="n", scale_b=scale_y, symmetric=True),
    }
    if not debiased:
        out["sx"] = weighted_colsums(x, shift_x, scale_x)[:, 0]  # (L, dx)
        out["sy"] = weighted_colsums(y, shift_y, scale_y)[:, 0]  # (L, dy)
        return [out[k] for k in shifted_cross_product_keys(False)]
    a = row_sqnorms(x, shift_x, scale_x)  # (L, n) float64
    b = row_sqnorms(y, shift_y, scale_y)  # (L, n) float64
    cx = weighted_colsums(x, shift_x, scale_x, a, b).unbind(1)  # 3 x (L, dx)
    cy = weighted_colsums(y, shift_y, scale_y, a, b).unbind(1)  # 3 x (L, dy)
    cx, cy = [c.clone() for c in cx], [c.clone() for c in cy]  # outputs never alias each other
    out.update(
        sx=cx[0], sy=cy[0], sax=cx[1], sbx=cx[2], say=cy[1], sby=cy[2],
        sa=a.sum(-1), sb=b.sum(-1), saa=a.square().sum(-1), sbb=b.square().sum(-1), sab=(a * b).sum(-1),
    )
    return [out[k] for k in shifted_cross_product_keys(True)]


@triton.jit
def _centre_gram_kernel(k_ptr, u_ptr, N, s_kl, s_km, ZERO_DIAG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """In place: K_ij -= u_i + u_j, and K_ii = 0 when ZERO_DIAG. Grid (row tiles, column tiles, L)."""
    lay = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,)
    mm = rm < N
    mn = rn < N
    msk = mm[:, None] & mn[None, :]
    ptrs = k_ptr + lay * s_kl + rm[:, None].to(tl.int64) * s_km + rn[None, :]
    kv = tl.load(ptrs, mask=msk, other=0.0)
    ui = tl.load(u_ptr + lay * N + rm, mask=mm, other=0.0)
    uj = tl.load(u_ptr + lay * N + rn, mask=mn, other=0.0)
    kv = kv - (ui[:, None] + uj[None, :])  # the sum commutes: K stays exactly symmetric
    if ZERO_DIAG:
        kv = tl.where(rm[:, None] == rn[None, :], 0.0, kv)
    tl.store(ptrs, kv, mask=msk)


@CENTERED_GRAM.implement("triton")
def _centered_gram_triton(x, unbiased, scale=None):
    """Triton version of the op (contract in ``_ops``).

    K = X' X'^T with X' = (X - 1 s^T) scale, s the float64 column means rounded to float32,
    subtracted (exactly, for offset columns) and scaled in the load; one tile triangle computed
    (mirrored in the kernel). Then K 1 and diag K by a float64 torch pass, and the centring kernel
    rewrites K in place: K_ij - u_i - u_j (H K H, or U-centring with a zero diagonal).
    float64 input runs the torch composite.
    Cost: n^2 d / 2 multiply-adds + 2 passes over the (L, n, n) result.
    """
    if x.dtype == torch.float64:
        return CENTERED_GRAM.composite(x, unbiased, scale)
    _, shift = mean_shift(x, torch.float32)  # (L, d)
    k = _gemm.shifted_gemm(x, x.transpose(-1, -2), shift_a=shift, shift_a_along="k", shift_b=shift, shift_b_along="k",
                     scale_a=scale, scale_b=scale, symmetric=True)  # (L, n, n)
    L, n, _ = k.shape
    diag = k.diagonal(dim1=-2, dim2=-1).to(torch.float64)  # (L, n)
    u = gram_offsets(k.sum(-1, dtype=torch.float64), diag, unbiased).to(torch.float32).contiguous()  # (L, n)
    bm = 32 if interpreting() else 64
    _centre_gram_kernel[(triton.cdiv(n, bm), triton.cdiv(n, bm), L)](
        k, u, n, k.stride(0), k.stride(1), ZERO_DIAG=bool(unbiased), BM=bm, BN=bm)
    return k, diag.sum(-1)
