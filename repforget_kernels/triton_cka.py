"""Triton kernels for the cka ops, and the shifted GEMM that the pca ops reuse.

The core is one batched kernel, :func:`shifted_gemm`:

    C[l] = ((A[l] - SA[l]) ga[l]) @ ((B[l] - SB[l]) gb[l])   A (L, M, K), B (L, K, N) any strides, C (L, M, N) float32

where each shift is a vector broadcast along one axis (a per-column mean rounded to float32: the
subtraction is then exact for offset columns) and each scale g a power of two per layer (exact;
keeps products of rows of any magnitude in float32's range); both are applied in the load, so no
centred copy is ever written. The shifted operands are rounded to
the input's half dtype (bf16/fp16) for ``tl.dot`` on the GPU's tensor cores, or kept in float32
("ieee", no TF32) for float32 input; products accumulate in float32. A tile table picks the
output tiles: the full grid, or only the upper triangle for a symmetric product, whose kernel
writes the entries i <= j and mirrors i < j (every element written by the kernel, exactly symmetric).
A split over K (partial buffers, summed after) keeps long reductions parallel.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.dot`` on bf16 operands is wrong and the
interpreter's float32->bf16 cast truncates; there, operands stay float32 holding exactly the
values the GPU would feed its bf16 dot (round-to-nearest-even done with integer ops), so the
CPU tests check the GPU's numerics.

Ops registered here (backend "triton"; float64 inputs go to the torch composite, which is
cuBLAS DGEMM on a GPU):
  shifted_cross_products: three shifted GEMMs (X'^T Y', and one triangle each of X'^T X', Y'^T Y')
    plus two small O(n d) kernels for the sums (row norms, weighted column sums in float64).
  centered_gram: one symmetric shifted GEMM (rounded column means subtracted in the load), then a
    torch row-sum pass (float64) and a centring epilogue kernel (H K H, or U-centring).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, kernel, register
from ._numerics import mean_shift
from .cka import _gram_offsets

__all__ = ["shifted_gemm", "new_output", "dot_code", "num_programs_target"]


# --------------------------------------------------------------------------- host helpers


def new_output(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests replace it with NaN-filled buffers to prove full writes)."""
    return torch.empty(shape, device=device, dtype=dtype)


def dot_code(*dtypes: torch.dtype) -> int:
    """tl.dot operand type for inputs of these dtypes: 1 bf16, 2 fp16 (all inputs that half type), else 0 fp32."""
    if all(d == torch.bfloat16 for d in dtypes):
        return 1
    if all(d == torch.float16 for d in dtypes):
        return 2
    return 0


def num_programs_target(device: torch.device) -> int:
    """About how many programs fill the device: 4 per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=64)
def _tile_table(tiles_m: int, tiles_n: int, symmetric: bool, device: torch.device) -> torch.Tensor:
    """(P, 2) int32 output-tile coordinates: all tiles, or the upper triangle (tn >= tm) when symmetric."""
    tm, tn = torch.meshgrid(torch.arange(tiles_m), torch.arange(tiles_n), indexing="ij")  # (tiles_m, tiles_n)
    keep = tn >= tm if symmetric else torch.ones_like(tm, dtype=torch.bool)
    return torch.stack([tm[keep], tn[keep]], 1).to(device=device, dtype=torch.int32).contiguous()  # (P, 2)


def _gemm_config(code: int, n_cols: int, interpret: bool) -> dict:
    """Block sizes and launch options for the shifted GEMM (dot operand code, output width N)."""
    if interpret:  # small tiles: the tests' odd sizes span several tiles and the interpreter stays quick
        return dict(BM=32, BN=32, BK=16, num_warps=4, num_stages=1)
    bn_cap = 128 if code else 64
    bn = max(16, min(bn_cap, triton.next_power_of_2(n_cols)))
    if code:  # bf16 / fp16 tensor cores
        return dict(BM=128, BN=bn, BK=64, num_warps=8 if bn >= 128 else 4, num_stages=3)
    return dict(BM=64, BN=bn, BK=32, num_warps=4, num_stages=2)


def _split_k(k: int, bk: int, programs: int, device: torch.device) -> int:
    """Number of K splits: enough programs to fill the device, each split at least 4 K-blocks long."""
    want = max(1, num_programs_target(device) // max(programs, 1))
    return max(1, min(want, k // (4 * bk)))


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _round_bf16(v):
    """float32 -> float32 holding the round-to-nearest-even bfloat16 value (finite inputs)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_operand(v, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr):
    """Operand for tl.dot: cast to bf16 (1) / fp16 (2) / fp32 (0); under the interpreter float32 with the same values."""
    if INTERPRET:
        v = v.to(tl.float32)
        if DOT_CODE == 1:
            v = _round_bf16(v)
        elif DOT_CODE == 2:
            v = v.to(tl.float16).to(tl.float32)
    else:
        if DOT_CODE == 1:
            v = v.to(tl.bfloat16)
        elif DOT_CODE == 2:
            v = v.to(tl.float16)
        else:
            v = v.to(tl.float32)
    return v


@triton.jit
def _dot_acc(a, b, acc, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += a @ b with float32 accumulation; float32 operands multiply in full precision (no TF32)."""
    if INTERPRET or DOT_CODE == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _shifted_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, tiles_ptr,
    M, N, K, K_PER_SPLIT,
    s_al, s_am, s_ak, s_bl, s_bk, s_bn, s_sal, s_sbl, s_cs, s_cl, s_cm, s_cn,
    ga_ptr, gb_ptr,
    SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr, SCALE_A: tl.constexpr, SCALE_B: tl.constexpr,
    MIRROR: tl.constexpr, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One (BM, BN) tile of ((A - SA) ga) @ ((B - SB) gb) over one K split of one layer.

    SHIFT_A: 0 none, 1 shift vector along M (sa[l, m]), 2 along K (sa[l, k]); SHIFT_B likewise
    with 1 along N. SCALE_A / SCALE_B: multiply the shifted operand by ga[l] / gb[l] (float32).
    MIRROR (symmetric product, upper-triangle tiles): stores entries i <= j and again i < j at
    (j, i), so the result is exactly symmetric.
    """
    pid = tl.program_id(0)
    lay = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tm = tl.load(tiles_ptr + 2 * pid)
    tn = tl.load(tiles_ptr + 2 * pid + 1)
    rm = tm * BM + tl.arange(0, BM)  # (BM,)
    rn = tn * BN + tl.arange(0, BN)  # (BN,)
    mm = rm < M
    mn = rn < N
    a_rows = a_ptr + lay * s_al + rm[:, None].to(tl.int64) * s_am  # (BM, 1) pointers
    b_cols = b_ptr + lay * s_bl + rn[None, :].to(tl.int64) * s_bn  # (1, BN) pointers
    if SHIFT_A == 1:
        sa_m = tl.load(sa_ptr + lay * s_sal + rm, mask=mm, other=0.0).to(tl.float32)  # (BM,)
    if SHIFT_B == 1:
        sb_n = tl.load(sb_ptr + lay * s_sbl + rn, mask=mn, other=0.0).to(tl.float32)  # (BN,)
    if SCALE_A:
        ga = tl.load(ga_ptr + lay)
    if SCALE_B:
        gb = tl.load(gb_ptr + lay)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)  # (BK,)
        mk = rk < k_hi
        a_mask = mm[:, None] & mk[None, :]
        b_mask = mk[:, None] & mn[None, :]
        a = tl.load(a_rows + rk[None, :].to(tl.int64) * s_ak, mask=a_mask, other=0.0)  # (BM, BK)
        b = tl.load(b_cols + rk[:, None].to(tl.int64) * s_bk, mask=b_mask, other=0.0)  # (BK, BN)
        if SHIFT_A == 1:
            a = tl.where(a_mask, a.to(tl.float32) - sa_m[:, None], 0.0)
        elif SHIFT_A == 2:
            sa_k = tl.load(sa_ptr + lay * s_sal + rk, mask=mk, other=0.0).to(tl.float32)  # (BK,)
            a = tl.where(a_mask, a.to(tl.float32) - sa_k[None, :], 0.0)
        if SHIFT_B == 1:
            b = tl.where(b_mask, b.to(tl.float32) - sb_n[None, :], 0.0)
        elif SHIFT_B == 2:
            sb_k = tl.load(sb_ptr + lay * s_sbl + rk, mask=mk, other=0.0).to(tl.float32)  # (BK,)
            b = tl.where(b_mask, b.to(tl.float32) - sb_k[:, None], 0.0)
        if SCALE_A:
            a = a.to(tl.float32) * ga
        if SCALE_B:
            b = b.to(tl.float32) * gb
        a = _dot_operand(a, DOT_CODE, INTERPRET)
        b = _dot_operand(b, DOT_CODE, INTERPRET)
        acc = _dot_acc(a, b, acc, DOT_CODE, INTERPRET)
    c_base = c_ptr + split.to(tl.int64) * s_cs + lay * s_cl
    c_mask = mm[:, None] & mn[None, :]
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if MIRROR:  # tiles of the upper triangle (BM == BN): keep i <= j, write i < j again at (j, i)
        tl.store(c_base + rm64[:, None] * s_cm + rn64[None, :] * s_cn, acc, mask=c_mask & (rm[:, None] <= rn[None, :]))
        tl.store(c_base + rn64[None, :] * s_cm + rm64[:, None] * s_cn, acc, mask=c_mask & (rm[:, None] < rn[None, :]))
    else:
        tl.store(c_base + rm64[:, None] * s_cm + rn64[None, :] * s_cn, acc, mask=c_mask)


def _shift_arg(shift, along: str, names: tuple, a: torch.Tensor):
    """(pointer tensor, layer stride, SHIFT code) for an optional shift vector (L, len) along one axis."""
    if shift is None:
        return a, 0, 0
    if along not in names:
        raise ValueError(f"shift axis must be one of {names}, got {along!r}")
    shift = shift.contiguous()
    return shift, shift.stride(0), 1 if along == names[0] else 2


def _scale_arg(scale, a: torch.Tensor):
    """(pointer tensor, SCALE flag) for an optional per-layer scale (L,): float32 on a's device."""
    if scale is None:
        return a, False
    return scale.to(device=a.device, dtype=torch.float32).contiguous(), True


def shifted_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    shift_a: torch.Tensor | None = None,
    shift_a_along: str = "m",
    shift_b: torch.Tensor | None = None,
    shift_b_along: str = "n",
    scale_a: torch.Tensor | None = None,
    scale_b: torch.Tensor | None = None,
    symmetric: bool = False,
    split_k: int | None = None,
) -> torch.Tensor:
    """((A - SA) ga) @ ((B - SB) gb) for a stack of layers, shifts and scales applied in the load: -> (L, M, N) float32.

    Args:
        a: (L, M, K) any strides, float16/bfloat16/float32. b: (L, K, N) likewise.
        shift_a: (L, M) (``shift_a_along="m"``) or (L, K) (``"k"``), subtracted from every A entry
            of that row / column; shift_b: (L, N) (``"n"``) or (L, K) (``"k"``).
        scale_a, scale_b: (L,) per-layer factors (powers of two: exact) multiplying the shifted
            operands, or None.
        symmetric: the product is symmetric (B - SB = (A - SA)^T): only the upper tile triangle is
            computed, its strict upper part mirrored (the result is exactly symmetric).
        split_k: K splits (partial sums added after); None picks one that fills the device.

    Cost: 2 L M N K flops (about half when symmetric); reads A and B once per output tile row/column.
    Operands are rounded to bf16/fp16 when both inputs have that dtype, float32 otherwise.
    """
    L, M, K = a.shape
    N = b.shape[-1]
    interp = interpreting()
    code = dot_code(a.dtype, b.dtype)
    cfg = _gemm_config(code, N, interp)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    if symmetric:
        bn = bm
    tiles = _tile_table(triton.cdiv(M, bm), triton.cdiv(N, bn), symmetric, a.device)
    if split_k is None:
        split_k = _split_k(K, bk, tiles.shape[0] * L, a.device)
    k_per = triton.cdiv(triton.cdiv(K, split_k), bk) * bk
    split_k = triton.cdiv(K, k_per)
    out = new_output((split_k, L, M, N), a.device)  # (S, L, M, N)
    sa, s_sal, shift_a_code = _shift_arg(shift_a, shift_a_along, ("m", "k"), a)
    sb, s_sbl, shift_b_code = _shift_arg(shift_b, shift_b_along, ("n", "k"), b)
    ga, scale_a_on = _scale_arg(scale_a, a)
    gb, scale_b_on = _scale_arg(scale_b, b)
    grid = (tiles.shape[0], L, split_k)
    _shifted_gemm_kernel[grid](
        a, b, sa, sb, out, tiles,
        M, N, K, k_per,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2), s_sal, s_sbl,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), ga, gb,
        SHIFT_A=shift_a_code, SHIFT_B=shift_b_code, SCALE_A=scale_a_on, SCALE_B=scale_b_on,
        MIRROR=symmetric, DOT_CODE=code, INTERPRET=interp,
        BM=bm, BN=bn, BK=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out[0] if split_k == 1 else out.sum(0)


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
    out = new_output((L, n), x.device, torch.float64)  # (L, n)
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
    splits = max(1, min(num_programs_target(x.device) // programs, triton.cdiv(n, 4 * bn)))
    n_per = triton.cdiv(triton.cdiv(n, splits), bn) * bn
    splits = triton.cdiv(n, n_per)
    shift = shift.contiguous()
    wa = wa.contiguous() if weighted else shift
    wb = wb.contiguous() if weighted else shift
    out = new_output((splits, L, 3, d), x.device, torch.float64)  # (S, L, 3, d)
    _weighted_colsum_kernel[(triton.cdiv(d, bd), L, splits)](
        x, shift, _layer_scale(x, scale), wa, wb, out, n, d, n_per, x.stride(0), x.stride(1), x.stride(2), shift.stride(0), L,
        WEIGHTED=weighted, BN=bn, BD=bd,
    )
    return out.sum(0)


# --------------------------------------------------------------------------- ops


@register("shifted_cross_products", "triton")
def _shifted_cross_products_triton(x, y, shift_x, shift_y, debiased, scale_x=None, scale_y=None):
    """Triton version of the op (contract in ``cka._shifted_cross_products_torch``).

    X'^T Y' by the shifted GEMM over the tile grid, X'^T X' and Y'^T Y' over one tile triangle
    each (mirrored in the kernel); sx, sy and the debiased extras by two O(n d) kernels (row norms
    a, b in float64, then column sums weighted by 1, a, b in float64); sa, sb, saa, sbb, sab are
    O(n) float64 torch sums of a and b. Shifts and scales are applied in every load.
    float64 input runs the torch composite.
    Cost: n (dx dy + (dx^2 + dy^2) / 2) multiply-adds on tensor cores (bf16/fp16) or in float32.
    """
    if shift_x.dtype == torch.float64:
        return kernel("shifted_cross_products", x.device, "torch")(x, y, shift_x, shift_y, debiased, scale_x, scale_y)
    xt = x.transpose(-1, -2)  # (L, dx, n) view
    yt = y.transpose(-1, -2)  # (L, dy, n) view
    gx = dict(shift_a=shift_x, shift_a_along="m", scale_a=scale_x)
    gy = dict(shift_a=shift_y, shift_a_along="m", scale_a=scale_y)
    out = {
        "sxy": shifted_gemm(xt, y, **gx, shift_b=shift_y, shift_b_along="n", scale_b=scale_y),
        "sxx": shifted_gemm(xt, x, **gx, shift_b=shift_x, shift_b_along="n", scale_b=scale_x, symmetric=True),
        "syy": shifted_gemm(yt, y, **gy, shift_b=shift_y, shift_b_along="n", scale_b=scale_y, symmetric=True),
    }
    if not debiased:
        out["sx"] = weighted_colsums(x, shift_x, scale_x)[:, 0]  # (L, dx)
        out["sy"] = weighted_colsums(y, shift_y, scale_y)[:, 0]  # (L, dy)
        return out
    a = row_sqnorms(x, shift_x, scale_x)  # (L, n) float64
    b = row_sqnorms(y, shift_y, scale_y)  # (L, n) float64
    cx = weighted_colsums(x, shift_x, scale_x, a, b)  # (L, 3, dx)
    cy = weighted_colsums(y, shift_y, scale_y, a, b)  # (L, 3, dy)
    out.update(
        sx=cx[:, 0], sy=cy[:, 0], sax=cx[:, 1], sbx=cx[:, 2], say=cy[:, 1], sby=cy[:, 2],
        sa=a.sum(-1), sb=b.sum(-1), saa=a.square().sum(-1), sbb=b.square().sum(-1), sab=(a * b).sum(-1),
    )
    return out


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


@register("centered_gram", "triton")
def _centered_gram_triton(x, unbiased, scale=None):
    """Triton version of the op (contract in ``cka._centered_gram_torch``).

    K = X' X'^T with X' = (X - 1 s^T) scale, s the float64 column means rounded to float32,
    subtracted (exactly, for offset columns) and scaled in the load; one tile triangle computed
    (mirrored in the kernel). Then K 1 and diag K by a float64 torch pass, and the centring kernel
    rewrites K in place: K_ij - u_i - u_j (H K H, or U-centring with a zero diagonal).
    float64 input runs the torch composite.
    Cost: n^2 d / 2 multiply-adds + 2 passes over the (L, n, n) result.
    """
    if x.dtype == torch.float64:
        return kernel("centered_gram", x.device, "torch")(x, unbiased, scale)
    _, shift = mean_shift(x, torch.float32)  # (L, d)
    k = shifted_gemm(x, x.transpose(-1, -2), shift_a=shift, shift_a_along="k", shift_b=shift, shift_b_along="k",
                     scale_a=scale, scale_b=scale, symmetric=True)  # (L, n, n)
    L, n, _ = k.shape
    diag = k.diagonal(dim1=-2, dim2=-1).to(torch.float64)  # (L, n)
    u = _gram_offsets(k.sum(-1, dtype=torch.float64), diag, unbiased).to(torch.float32).contiguous()  # (L, n)
    bm = 32 if interpreting() else 64
    _centre_gram_kernel[(triton.cdiv(n, bm), triton.cdiv(n, bm), L)](
        k, u, n, k.stride(0), k.stride(1), ZERO_DIAG=bool(unbiased), BM=bm, BN=bm)
    return k, diag.sum(-1)
