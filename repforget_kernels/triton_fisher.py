"""Triton kernels for the fisher ops.

per_sample_linear_fisher: one program per (out, in) output tile; for every sample s it builds
the tile of G_s = sum_t m_st g_st x_st^T with tl.dot (float32 accumulator), squares it and adds
it into a second float32 register tile; the result is added into ``out`` once. B x out x in is
never materialised; masked tokens are zeroed in the load. bf16/fp16 inputs feed the tensor cores
as they are (no rounding: the mask only zeroes), float32 input multiplies in float32 (no TF32).
Cost: 2 B T out in flops.

square_accumulate: one launch per (acc dtype, grad dtype) group over a pointer table: an int64
tensor of data_ptrs and sizes, and a block table mapping each program to (tensor, first element);
full blocks load and store unmasked, 16-byte aligned (the tables are cached per tensor list).
Cost: one read of each grad, one read-modify-write of each acc.

float64 ``out`` (per-sample Fisher) runs the torch composite; float64 accs are done here in float64.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._ops import PER_SAMPLE_LINEAR_FISHER, SQUARE_ACCUMULATE, interpreting
from ._triton_gemm import dot_acc, dot_code, dot_operand

__all__: list[str] = []

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _per_sample_fisher_kernel(
    x_ptr, g_ptr, m_ptr, out_ptr, B, T, OUT, IN,
    s_xb, s_xt, s_xi, s_gb, s_gt, s_go, s_mb, s_mt,
    HAS_MASK: tl.constexpr, DOT_CODE: tl.constexpr, INTERPRET: tl.constexpr,
    BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr,
):
    """out[o, i] += sum_s (sum_t m_st g_sto x_sti)^2 for one (BO, BI) tile. Grid (out tiles, in tiles)."""
    ro = tl.program_id(0) * BO + tl.arange(0, BO)  # (BO,)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)  # (BI,)
    mo = ro < OUT
    mi = ri < IN
    g_cols = g_ptr + ro[:, None].to(tl.int64) * s_go  # (BO, 1)
    x_cols = x_ptr + ri[None, :].to(tl.int64) * s_xi  # (1, BI)
    total = tl.zeros((BO, BI), dtype=tl.float32)
    for s in range(0, B):
        gs = tl.zeros((BO, BI), dtype=tl.float32)
        for t0 in range(0, T, BT):
            rt = t0 + tl.arange(0, BT)  # (BT,)
            mt = rt < T
            if HAS_MASK:
                mt = mt & (tl.load(m_ptr + s * s_mb + rt * s_mt, mask=mt, other=0) != 0)
            g = tl.load(g_cols + s * s_gb + rt[None, :].to(tl.int64) * s_gt,
                        mask=mo[:, None] & mt[None, :], other=0.0)  # (BO, BT) = g_s^T tile
            x = tl.load(x_cols + s * s_xb + rt[:, None].to(tl.int64) * s_xt,
                        mask=mt[:, None] & mi[None, :], other=0.0)  # (BT, BI)
            gs = dot_acc(dot_operand(g, DOT_CODE, INTERPRET), dot_operand(x, DOT_CODE, INTERPRET), gs,
                          DOT_CODE, INTERPRET)
        total += gs * gs
    msk = mo[:, None] & mi[None, :]
    ptrs = out_ptr + ro[:, None].to(tl.int64) * IN + ri[None, :]
    prev = tl.load(ptrs, mask=msk, other=0.0)
    tl.store(ptrs, prev + total, mask=msk)


def _fisher_config(code: int, interp: bool) -> dict:
    if interp:
        return dict(BO=32, BI=32, BT=16, num_warps=4, num_stages=1)
    if code:
        return dict(BO=128, BI=128, BT=64, num_warps=8, num_stages=3)
    return dict(BO=64, BI=64, BT=32, num_warps=4, num_stages=2)


@PER_SAMPLE_LINEAR_FISHER.implement("triton")
def _per_sample_linear_fisher_triton(x, grad_out, mask, out):
    """Triton version of the op (contract in ``_ops``): out += sum_s (sum_t m_st g_st x_st^T)**2 in place.

    x (B, T, in), grad_out (B, T, out) any float dtype, mask (B, T) bool or None, out (out, in)
    float32 contiguous; float64 out runs the torch composite. Returns None.
    """
    if out.dtype == torch.float64:
        return PER_SAMPLE_LINEAR_FISHER.composite(x, grad_out, mask, out)
    B, T, n_in = x.shape
    n_out = grad_out.shape[-1]
    interp = interpreting()
    code = dot_code(x.dtype, grad_out.dtype)
    cfg = _fisher_config(code, interp)
    m = x if mask is None else mask.to(torch.uint8)  # (B, T)
    s_mb, s_mt = (0, 0) if mask is None else (m.stride(0), m.stride(1))
    grid = (triton.cdiv(n_out, cfg["BO"]), triton.cdiv(n_in, cfg["BI"]))
    _per_sample_fisher_kernel[grid](
        x, grad_out, m, out, B, T, n_out, n_in,
        x.stride(0), x.stride(1), x.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), s_mb, s_mt,
        HAS_MASK=mask is not None, DOT_CODE=code, INTERPRET=interp,
        BO=cfg["BO"], BI=cfg["BI"], BT=cfg["BT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return None


@triton.jit
def _square_acc_kernel(
    acc_tab, grad_tab, numel_tab, blk_tensor, blk_start, scale_ptr,
    ACC_T: tl.constexpr, GRAD_T: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """acc[e] += scale * grad[e]^2 over one BLOCK of one tensor of the table. Grid (blocks,)."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(numel_tab + t)
    acc_p = tl.load(acc_tab + t).to(tl.pointer_type(ACC_T))
    grad_p = tl.load(grad_tab + t).to(tl.pointer_type(GRAD_T))
    if ALIGNED:  # lets the compiler emit 16-byte vector accesses (start is a multiple of BLOCK)
        acc_p = tl.multiple_of(acc_p, 16)
        grad_p = tl.multiple_of(grad_p, 16)
        start = tl.multiple_of(start, BLOCK)
    scale = tl.load(scale_ptr)
    offs = start + tl.arange(0, BLOCK)  # (BLOCK,) int64
    if start + BLOCK <= n:
        g = tl.load(grad_p + offs).to(ACC_T)
        a = tl.load(acc_p + offs)
        tl.store(acc_p + offs, a + scale * (g * g))
    else:
        msk = offs < n
        g = tl.load(grad_p + offs, mask=msk, other=0.0).to(ACC_T)
        a = tl.load(acc_p + offs, mask=msk, other=0.0)
        tl.store(acc_p + offs, a + scale * (g * g), mask=msk)


@functools.lru_cache(maxsize=32)
def _block_tables(key: tuple, block: int, device: torch.device) -> tuple:
    """Device tables for one group; key = ((acc_ptr, grad_ptr, numel), ...). Returns (acc, grad, numel,
    block->tensor, block->start) int64/int32 tensors and whether every pointer is 16-byte aligned."""
    accs = torch.tensor([k[0] for k in key], dtype=torch.int64)  # (P,)
    grads = torch.tensor([k[1] for k in key], dtype=torch.int64)  # (P,)
    numel = torch.tensor([k[2] for k in key], dtype=torch.int64)  # (P,)
    nblk = (numel + block - 1) // block  # (P,)
    owner = torch.repeat_interleave(torch.arange(len(key), dtype=torch.int32), nblk)  # (blocks,)
    first = torch.cumsum(nblk, 0) - nblk  # (P,)
    start = (torch.arange(int(nblk.sum()), dtype=torch.int64) - first[owner.long()]) * block  # (blocks,)
    aligned = all(k[0] % 16 == 0 and k[1] % 16 == 0 for k in key)
    to = dict(device=device)
    return accs.to(**to), grads.to(**to), numel.to(**to), owner.to(**to), start.to(**to), aligned


@SQUARE_ACCUMULATE.implement("triton")
def _square_accumulate_triton(accs, grads, scale):
    """Triton version of the op (contract in ``_ops``): acc += scale * grad.to(acc.dtype)**2 for every pair.

    One launch per (acc dtype, grad dtype) group; the tensors must be contiguous (the contract).
    """
    groups: dict = {}
    for acc, g in zip(accs, grads):
        if acc.numel():
            groups.setdefault((acc.dtype, g.dtype), []).append((acc.data_ptr(), g.data_ptr(), acc.numel()))
    if not groups:
        return None
    device = accs[0].device
    block = 128 if interpreting() else 4096
    for (acc_dtype, grad_dtype), key in groups.items():
        acc_t, grad_t, numel_t, owner, start, aligned = _block_tables(tuple(key), block, device)
        scale_t = torch.full((1,), float(scale), dtype=acc_dtype, device=device)
        _square_acc_kernel[(owner.numel(),)](
            acc_t, grad_t, numel_t, owner, start, scale_t,
            ACC_T=_TL_DTYPES[acc_dtype], GRAD_T=_TL_DTYPES[grad_dtype], ALIGNED=aligned, BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return None
