"""Every kernel op on every backend this machine can run, against its float64 reference, from one table.

Each row of ``CONTRACTS`` is an op (its declaration in repforget_kernels._ops) with an input generator
(awkward sizes, offsets, one and several layers) and the sizes of the terms that round into each output
(the error is bounded relative to them); the expected values are the op's declared float64 reference
(``KernelOp.reference``, in repforget_kernels.reference). One parametrised test runs every row on every
backend that registers the op and can run on the test device: torch, cpp, triton (under the
interpreter on a CPU machine), cuda (on a GPU), after the style of repsim's metric list and
BackPACK's test problems. What is really backend-specific (build, error messages of the C++ checks,
launch shapes, Hopper PTX) stays in tests/test_cpp_kernels.py, tests/test_triton_kernels.py and
tests/test_cuda_build.py.

Tolerances: TOL of the working precision (conftest), relative to the sum of |terms| of each output
entry; Triton feeds its tensor-core GEMMs bf16 / fp16 operands rounded to that type, so those outputs
get TOL of the half type there (``working_roundoff``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

from conftest import DEVICE, TOL, available_backends, randn
from repforget_kernels import _dispatch
from repforget_kernels._numerics import unit_roundoff
from repforget_kernels._ops import OPS, KernelOp, shifted_cross_product_keys
from repforget_kernels.reference import to_f64

HALF = (torch.float16, torch.bfloat16)
ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Contract(NamedTuple):
    op: KernelOp
    dtypes: tuple
    cases: Callable  # (gen, dtype, backend) -> list of (label, args)
    run: Callable  # (fn, args) -> {name: tensor}
    reference: Callable  # (args, dtype, backend) -> {name: (float64 want, float64 sum of |terms|, tol)}


def _declared(name: str, *args) -> dict:
    """The op's declared float64 reference on ``args``, as float64 tensors."""
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in OPS[name].reference(*args).items()}


def _work_tol(dtype: torch.dtype) -> float:
    return TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]


def _gemm_tol(dtype: torch.dtype, backend: str) -> float:
    """Tolerance of an output that a GEMM of the (shifted) inputs produces."""
    return TOL[dtype] if backend == "triton" and dtype in HALF else _work_tol(dtype)


def _acts(gen, L, n, d, dtype, offset_cols=(1, 4)):
    """(L, n, d) activations with +1e3 offsets in some columns ("massive activations"), in ``dtype``."""
    x = randn(L, n, d, gen=gen, dtype=torch.float64)
    for c in offset_cols:
        if c < d:
            x[..., c] += 1e3
    return x.to(dtype)


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(to_f64(t))


# --------------------------------------------------------------------------- square_accumulate

_SQ_SHAPES = [(37, 13), (1,), (0, 5), (3, 7, 11), (40_001,)]  # 40 001 crosses the parallel chunks


def _sq_cases(gen, dtype, backend):
    cases = []
    for adtype in (torch.float32, torch.float64):
        accs = [randn(*s, gen=gen, dtype=adtype).abs() for s in _SQ_SHAPES]
        grads = [randn(*s, gen=gen, dtype=dtype) for s in _SQ_SHAPES]
        cases.append((f"5 tensors into {adtype}", (accs, grads, 0.37)))
    # 1e-4 squared underflows in fp16, not in the float32 accumulator (the upcast comes first)
    cases.append(("half squares", ([torch.zeros(9, device=DEVICE)], [torch.full((9,), 1e-4, device=DEVICE).to(dtype)], 1.0)))
    if dtype == torch.float32:  # one list mixing accumulator and gradient dtypes, and an unaligned view
        shapes = [(1000,), (7, 33), (129,), (3,), (0,), (5, 5), (300,)]
        adts = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32, torch.float64, torch.float32]
        gdts = [torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, None]
        accs = [randn(*s, gen=gen, dtype=a).abs() for s, a in zip(shapes, adts)]
        grads = [randn(*s, gen=gen, dtype=g) for s, g in zip(shapes[:-1], gdts[:-1])]
        grads.append(randn(301, gen=gen)[1:])  # contiguous but not 16-byte aligned
        cases.append(("mixed dtypes, unaligned", (accs, grads, 0.37)))
    return cases


def _sq_run(fn, args):
    accs, grads, scale = args
    work = [a.clone() for a in accs]
    ptrs = [a.data_ptr() for a in work]
    assert fn(work, grads, scale) is None
    assert [a.data_ptr() for a in work] == ptrs  # in place
    return {f"acc[{i}]": a for i, a in enumerate(work)}


def _sq_ref(args, dtype, backend):
    accs, grads, scale = args
    want = _declared("square_accumulate", *args)
    # positive terms, the upcast exact: three roundings in acc's dtype, relative to the result
    return {f"acc[{i}]": (want[f"acc[{i}]"], want[f"acc[{i}]"].abs(), 4 * unit_roundoff(a.dtype))
            for i, a in enumerate(accs)}


# --------------------------------------------------------------------------- histogram


def _hist_cases(gen, dtype, backend):
    cases = []
    for log in (True, False):
        v = randn(70_001, gen=gen, dtype=torch.float64)  # crosses the parallel chunks
        v = (v.square() * 1e-4 if log else v).to(dtype)
        v[::997] = 0
        v64 = to_f64(v)
        kept = v64[v64 > 0] if log else v64  # the range the reference bins over
        cases.append(("log" if log else "linear", (v, float(kept.min()), float(kept.max()), 61, log)))
    return cases


def _hist_run(fn, args):
    counts = fn(*args)
    assert counts.dtype == torch.int64 and counts.shape == (args[3],)
    return {"counts": counts}


def _hist_ref(args, dtype, backend):
    want = _declared("histogram", *args)["counts"]
    return {"counts": (want, torch.ones_like(want), 0.0)}  # counts are exact


# --------------------------------------------------------------------------- centered_gram


def _gram_cases(gen, dtype, backend):
    cases = []
    # n < d and n > d, one and several layers; n across the C++ kernel's 256-row blocks for cpp
    # (Triton's tiles are 32 rows under the interpreter: the small shapes already span several)
    shapes = [(1, 37, 53), (3, 29, 5), (2, 41, 23)] + ([(2, 301, 7), (1, 517, 19)] if backend == "cpp" else [])
    for L, n, d in shapes:
        for unbiased in (False, True):
            cases.append((f"L{L} n{n} d{d} {'u' if unbiased else ''}centred", (_acts(gen, L, n, d, dtype), unbiased, None)))
    for unbiased in (False, True):
        for scale in (2.0**-12, 2.0**9):
            g = torch.full((2,), scale, dtype=torch.float64, device=DEVICE)
            cases.append((f"scale {scale:g}", (_acts(gen, 2, 45, 77, dtype), unbiased, g)))
    return cases


def _gram_run(fn, args):
    k, trace = fn(*args)
    x = args[0]
    assert k.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32) and trace.dtype == torch.float64
    return {"gram": k, "trace": trace}


def _centre64(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """H K H, or the U-centring of Szekely & Rizzo, of (L, n, n) float64 Grams."""
    if not unbiased:
        return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    n = k.shape[-1]
    k = k.masked_fill(torch.eye(n, dtype=torch.bool), 0.0)
    r, s = k.sum(-1), k.sum((-2, -1))
    out = k - (r.unsqueeze(-1) + r.unsqueeze(-2)) / (n - 2) + (s / ((n - 1) * (n - 2))).view(-1, 1, 1)
    return out.masked_fill(torch.eye(n, dtype=torch.bool), 0.0)


def _gram_ref(args, dtype, backend):
    x, unbiased, scale = args
    want = _declared("centered_gram", *args)
    x64 = _f64(x)
    g = torch.ones(x.shape[0], dtype=torch.float64) if scale is None else scale.cpu()
    shift = x64.mean(-2, keepdim=True).to(torch.float64 if dtype == torch.float64 else torch.float32).double()
    xs = (x64 - shift) * g.view(-1, 1, 1)  # the shifted, scaled rows of the contract (exact)
    if backend == "triton" and dtype in HALF:  # Triton's tensor cores take the operands rounded to the half type
        xs = xs.to(dtype).double()
    k = xs @ xs.transpose(-1, -2)  # (L, n, n)
    if backend == "triton" and dtype in HALF:
        want = {"gram": _centre64(k, unbiased), "trace": k.diagonal(dim1=-2, dim2=-1).sum(-1)}
    size = torch.linalg.matrix_norm(k).view(-1, 1, 1).expand_as(k)  # entries of the uncentred Gram round in
    trace = want["trace"]
    return {"gram": (want["gram"], size, _work_tol(dtype)), "trace": (trace, trace, _work_tol(dtype))}


# --------------------------------------------------------------------------- shifted_cross_products


def _scp_cases(gen, dtype, backend):
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    cases = []
    for L in (1, 2):
        for debiased in (False, True):
            x, y = _acts(gen, L, 53, 37, dtype), _acts(gen, L, 53, 45, dtype, offset_cols=(0,))
            sx, sy = x.mean(-2, dtype=cd), y.mean(-2, dtype=cd)
            gx = torch.tensor([2.0**-3, 2.0**5][:L], dtype=torch.float64, device=DEVICE)
            gy = None if L == 1 else torch.tensor([2.0**7, 1.0], dtype=torch.float64, device=DEVICE)
            cases.append((f"L{L} {'debiased' if debiased else 'biased'}", (x, y, sx, sy, debiased, gx, gy)))
    return cases


def _scp_run(fn, args):
    return dict(zip(shifted_cross_product_keys(args[4]), fn(*args)))


def _scp_ref(args, dtype, backend):
    x, y, sx, sy, debiased, gx, gy = args
    want = _declared("shifted_cross_products", *args)
    d = dict(dtype=torch.float64)
    xa = ((x.to(**d) - sx.to(**d).unsqueeze(1)) * (1.0 if gx is None else gx.cpu().view(-1, 1, 1))).abs()
    ya = ((y.to(**d) - sy.to(**d).unsqueeze(1)) * (1.0 if gy is None else gy.cpu().view(-1, 1, 1))).abs()
    sizes = _declared("shifted_cross_products", xa, ya, torch.zeros_like(sx, **d), torch.zeros_like(sy, **d), debiased)
    return {k: (want[k], sizes[k], _gemm_tol(dtype, backend) if k in ("sxy", "sxx", "syy") else _work_tol(dtype))
            for k in want}


# --------------------------------------------------------------------------- centered_matmul(_t)


def _cm_cases(gen, dtype, backend, transposed: bool):
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    cases = []
    for L in (1, 2):
        n, d, l = 150, 37, 9  # n long enough for a split over K in centered_matmul_t
        x = _acts(gen, L, n, d, dtype)
        mu = x.mean(-2, dtype=cd)
        other = randn(L, n if transposed else d, l, gen=gen, dtype=cd)
        cases.append((f"L{L}", (x, mu, other)))
    return cases


def _cm_run(fn, args):
    return {"out": fn(*args)}


def _cm_ref(transposed: bool):
    name = "centered_matmul_t" if transposed else "centered_matmul"

    def ref(args, dtype, backend):
        x, mu, other = (_f64(t) for t in args)
        size = _declared(name, (x - mu.unsqueeze(-2)).abs(), torch.zeros_like(mu), other.abs())["out"]
        # the shifted values multiply the float32 sketch in float32 on every backend (no half operands)
        return {"out": (_declared(name, *args)["out"], size, _work_tol(dtype))}
    return ref


# --------------------------------------------------------------------------- per_sample_linear_fisher


def _psf_cases(gen, dtype, backend):
    cases = []
    for b, t, n_in, n_out in [(3, 11, 37, 45), (1, 11, 37, 45), (2, 1, 33, 40), (5, 13, 8, 3)]:
        x, g = randn(b, t, n_in, gen=gen, dtype=dtype), randn(b, t, n_out, gen=gen, dtype=dtype)
        mask = torch.rand(b, t, generator=gen) > 0.4
        mask[0, :] = False  # a fully masked sample contributes nothing
        mask = mask.to(DEVICE)
        adtype = torch.float64 if dtype == torch.float64 else torch.float32
        out = randn(n_out, n_in, gen=gen, dtype=adtype).abs()
        cases.append((f"B{b} T{t} {n_in}->{n_out} masked", (x, g, mask, out)))
        cases.append((f"B{b} T{t} {n_in}->{n_out}", (x, g, None, torch.zeros_like(out))))
    return cases


def _psf_run(fn, args):
    x, g, mask, out = args
    work = out.clone()
    assert fn(x, g, mask, work) is None  # added into ``out`` in place
    return {"out": work}


def _psf_ref(args, dtype, backend):
    x, g, mask, out = args
    want = _declared("per_sample_linear_fisher", *args)["out"]
    size = _declared("per_sample_linear_fisher", x.abs(), g.abs(), mask, out)["out"]
    # G_s: float32 (float64) sums of T products of exact (input-dtype) operands, squared and summed
    return {"out": (want, size, _work_tol(dtype))}


# --------------------------------------------------------------------------- column_stats


def _cs_cases(gen, dtype, backend):
    # rows across the C++ kernel's 256-row blocks and its per-thread split; one layer, several; offsets
    return [(f"L{L} n{n} d{d}", (_acts(gen, L, n, d, dtype),)) for L, n, d in [(1, 1, 5), (3, 29, 7), (2, 601, 33)]]


def _cs_run(fn, args):
    total, lo, hi = fn(*args)
    assert total.dtype == torch.float64 and lo.dtype == hi.dtype == args[0].dtype
    return {"sum": total, "min": lo, "max": hi}


def _cs_ref(args, dtype, backend):
    (x,) = args
    want = _declared("column_stats", x)
    n = x.shape[1]
    size = _f64(x).abs().sum(1)  # sum |x_ij|: recursive float64 summation errs by at most (n - 1) u64 of it
    return {"sum": (want["sum"], size, max(n - 1, 1) * unit_roundoff(torch.float64)),
            "min": (want["min"], torch.ones_like(want["min"]), 0.0), "max": (want["max"], torch.ones_like(want["max"]), 0.0)}


CONTRACTS = [
    Contract(OPS["square_accumulate"], ALL_FLOATS, _sq_cases, _sq_run, _sq_ref),
    Contract(OPS["histogram"], ALL_FLOATS, _hist_cases, _hist_run, _hist_ref),
    Contract(OPS["centered_gram"], ALL_FLOATS, _gram_cases, _gram_run, _gram_ref),
    Contract(OPS["shifted_cross_products"], ALL_FLOATS, _scp_cases, _scp_run, _scp_ref),
    Contract(OPS["centered_matmul"], ALL_FLOATS, lambda gen, dt, b: _cm_cases(gen, dt, b, False), _cm_run, _cm_ref(False)),
    Contract(OPS["centered_matmul_t"], ALL_FLOATS, lambda gen, dt, b: _cm_cases(gen, dt, b, True), _cm_run, _cm_ref(True)),
    Contract(OPS["per_sample_linear_fisher"], ALL_FLOATS, _psf_cases, _psf_run, _psf_ref),
    Contract(OPS["column_stats"], ALL_FLOATS, _cs_cases, _cs_run, _cs_ref),
]


def _pairs():
    """(contract, backend) for every backend that registers the op and runs on the test device."""
    out = []
    for c in CONTRACTS:
        for b in available_backends():
            if b in _dispatch.registered(c.op):
                out.append(pytest.param(c, b, id=f"{c.op.name}-{b}"))
    return out


class TestOpContract:
    def test_table_covers_every_declared_op(self):
        assert {c.op.name for c in CONTRACTS} == set(OPS)

    @pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op.name)
    def test_declaration_passes_opcheck(self, contract, gen):
        """Schema (mutations declared), fake (shapes, dtypes, strides) and AOT tracing of the op as declared,
        against the kernel torch.ops.repforget.<op> runs here (compiled where registered, else the composite)."""
        for label, args in contract.cases(gen, torch.float32, "torch")[:2]:
            torch.library.opcheck(contract.op.packet.default, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    @pytest.mark.parametrize("contract,backend", _pairs())
    @pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
    def test_matches_float64_reference(self, contract, backend, dtype, gen, two_threads):
        if dtype not in contract.dtypes:
            pytest.skip(f"{contract.op.name} takes no {dtype}")
        fn = _dispatch.kernel(contract.op, DEVICE, backend)
        for label, args in contract.cases(gen, dtype, backend):
            got = contract.run(fn, args)
            want = contract.reference(args, dtype, backend)
            assert set(got) == set(want), label
            for name, (ref, size, tol) in want.items():
                g = _f64(got[name])
                assert g.shape == ref.shape, f"{label} {name}: shape {tuple(g.shape)} != {tuple(ref.shape)}"
                assert torch.isfinite(g).all(), f"{label} {name}: non-finite (unwritten) entries"
                err = (g - ref).abs()
                worst = float((err / (tol * size.abs() + 1e-300)).max()) if err.numel() else 0.0
                assert worst <= 1.0, f"{contract.op.name}/{backend} {label} {name}: error {worst:.2f}x the bound (tol {tol:g})"


class TestColumnGram:
    """The symmetric products by column panels (_ops.column_gram) against float64, at awkward splits."""

    @pytest.mark.parametrize("L,n,d,min_panel", [(1, 29, 1030, None), (2, 301, 37, 1), (1, 5, 13, 2), (3, 64, 8, 1)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
    def test_matches_float64(self, gen, monkeypatch, L, n, d, min_panel, dtype):
        from repforget_kernels import _ops

        if min_panel is not None:  # panels as narrow as this: d not a multiple of the panel width
            monkeypatch.setattr(_ops, "_MIN_PANEL", min_panel)
        a = randn(L, n, d, gen=gen, dtype=dtype)
        assert -(-d // _ops._GRAM_PANELS) >= _ops._MIN_PANEL  # the panel path runs
        got = _f64(_ops.column_gram(a))
        a64 = _f64(a)
        want = a64.transpose(-1, -2) @ a64
        size = a64.abs().transpose(-1, -2) @ a64.abs()
        assert float(((got - want).abs() / (_work_tol(dtype) * size)).max()) <= 1.0

    @pytest.mark.parametrize("dtype", HALF + (torch.float32,), ids=str)
    def test_panels_inside_the_cross_products(self, gen, monkeypatch, dtype):
        """bf16 / fp16 input reaches the panels as the shifted float32 rows: the composite against its reference."""
        from repforget_kernels import _ops

        monkeypatch.setattr(_ops, "_MIN_PANEL", 3)  # 4 panels of 11 columns, the last one 8
        x, y = _acts(gen, 2, 29, 41, dtype), _acts(gen, 2, 29, 13, dtype)
        args = (x, y, x.mean(-2, dtype=torch.float32), y.mean(-2, dtype=torch.float32), True, None, None)
        got = _scp_run(OPS["shifted_cross_products"].composite, args)
        for name, (want, size, tol) in _scp_ref(args, dtype, "torch").items():
            assert float(((_f64(got[name]) - want).abs() / (tol * size.abs() + 1e-300)).max()) <= 1.0, name

    def test_grad_takes_one_bmm(self, gen):
        from repforget_kernels import _ops

        a = randn(1, 40, 1100, gen=gen, dtype=torch.float64).requires_grad_()
        _ops.column_gram(a).sum().backward()
        torch.testing.assert_close(a.grad, 2 * a.detach() @ torch.ones(1100, 1100, dtype=torch.float64))
