"""The shared Triton GEMM pieces: the shifted batched GEMM and the dot helpers every Triton kernel uses.

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

Imported by ``triton_cka`` (cross products and Grams), ``triton_pca`` (centred sketches) and
``triton_fisher`` (the per-sample Fisher's inner GEMMs use :func:`dot_acc` / :func:`dot_operand`).
It registers no op.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._ops import interpreting

__all__ = ["shifted_gemm", "new_output", "dot_code", "num_programs_target", "dot_operand", "dot_acc"]


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
def dot_operand(v, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr):
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
def dot_acc(a, b, acc, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr):
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
        a = dot_operand(a, DOT_CODE, INTERPRET)
        b = dot_operand(b, DOT_CODE, INTERPRET)
        acc = dot_acc(a, b, acc, DOT_CODE, INTERPRET)
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
