"""Triton kernels against float64 references (CPU: under TRITON_INTERPRET=1, set by conftest).

What is compared, and how tightly:
- Op level, elementwise: |got - ref| <= tol * ref_abs, where ref is the op computed in float64 on
  the same input values and ref_abs the same sums over absolute values of the terms (the scale of
  the rounding error). tol = TOL[float32] for float32 arithmetic (conftest: 5 sqrt(m) u kappa, m <= 256);
  TOL[bf16/fp16] = 2 u_h + TOL[float32] where the op rounds shifted operands to bf16/fp16 for the
  tensor cores (the CKA GEMMs on half input): each product's two roundings, then float32 sums.
- CKA and PCA level: the bounds the front doors document (conftest.cka_bound, conftest.pca_bounds).
- Every buffer the ops allocate is NaN-poisoned first (``new_output`` patched): a NaN left in a
  result means an element the kernel never wrote.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DEVICE, TOL, cka_bound, pca_bounds, randn
from repforget_kernels import (
    StreamingCKA, cka_matrix, fisher_accumulate_, linear_cka, per_sample_linear_fisher, randomized_pca, reference,
)
from repforget_kernels._dispatch import backend_available
from repforget_kernels.cka import _cka_from_sums, _shifted_cross_products_torch
from repforget_kernels.pca import _centered_matmul_t_torch, _centered_matmul_torch

pytestmark = pytest.mark.skipif(not backend_available("triton", DEVICE)[0], reason="triton cannot run on " + str(DEVICE))

if backend_available("triton", DEVICE)[0]:
    from repforget_kernels import _triton_gemm, triton_cka, triton_fisher, triton_pca

HALF = (torch.bfloat16, torch.float16)
F32 = TOL[torch.float32]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the Triton ops allocate starts as NaN."""
    def nan_output(shape, device, dtype=torch.float32):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(_triton_gemm, "new_output", nan_output)


def _acts(L, n, d, dtype, gen, offset_cols=(1, 4)):
    """(L, n, d) activations with +1e3 offsets in some columns, in ``dtype``."""
    x = randn(L, n, d, gen=gen, dtype=torch.float64)  # (L, n, d)
    for c in offset_cols:
        if c < d:
            x[..., c] += 1e3
    return x.to(dtype)


def _assert_close(got, ref, ref_abs, tol, what):
    got, ref, ref_abs = (torch.as_tensor(t).to(device="cpu", dtype=torch.float64) for t in (got, ref, ref_abs))
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN) or non-finite elements"
    err = (got - ref).abs()
    bound = tol * ref_abs + 1e-300
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the bound tol={tol} * sum|terms|"


def _round_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded to the dtype the GPU dot would see (identity for float32 math)."""
    return t.to(dtype).to(torch.float64) if dtype in HALF else t


def _double_centre64(k: torch.Tensor) -> torch.Tensor:
    """H K H of (L, n, n) float64 Grams by row and column means, for the test reference."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _u_center64(k: torch.Tensor) -> torch.Tensor:
    """U-centring of (L, n, n) float64 Grams by its definition (Szekely & Rizzo), for the test reference."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0.0)
    r = k.sum(-1)  # (L, n)
    s = r.sum(-1)  # (L,)
    u = k - r.unsqueeze(-1) / (n - 2) - r.unsqueeze(-2) / (n - 2) + (s / ((n - 1) * (n - 2)))[:, None, None]
    return u.masked_fill(eye, 0.0)


class TestShiftedGemm:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("split_k", [1, 3])
    def test_matches_float64_on_rounded_operands(self, dtype, split_k, gen):
        L, n, d1, d2 = 2, 101, 37, 45
        a, b = _acts(L, n, d1, dtype, gen), _acts(L, n, d2, dtype, gen)
        sa, sb = a.mean(-2, dtype=torch.float32), b.mean(-2, dtype=torch.float32)  # (L, d1), (L, d2)
        got = _triton_gemm.shifted_gemm(a.transpose(1, 2), b, shift_a=sa, shift_a_along="m", shift_b=sb,
                                      shift_b_along="n", split_k=split_k)  # (L, d1, d2)
        # the kernel subtracts in float32, then rounds to the dot dtype: reproduce exactly in float64
        ar = _round_like((a.float() - sa.unsqueeze(1)).double(), dtype)
        br = _round_like((b.float() - sb.unsqueeze(1)).double(), dtype)
        ref = ar.transpose(1, 2) @ br
        _assert_close(got, ref, ar.abs().transpose(1, 2) @ br.abs(), F32, f"gemm {dtype} split {split_k}")

    def test_symmetric_writes_both_triangles(self, gen):
        x = _acts(1, 29, 70, torch.float32, gen)  # 70 columns: 3 x 3 tiles of 32, triangle of 6
        mu = x.mean(-2)
        got = _triton_gemm.shifted_gemm(x.transpose(1, 2), x, shift_a=mu, shift_b=mu, symmetric=True)
        assert torch.equal(got, got.transpose(1, 2))
        xc = (x - mu.unsqueeze(1)).double()
        _assert_close(got, xc.transpose(1, 2) @ xc, xc.abs().transpose(1, 2) @ xc.abs(), F32, "symmetric")

    def test_shift_value_error(self, gen):
        x = _acts(1, 5, 3, torch.float32, gen)
        with pytest.raises(ValueError, match="shift axis must be one of"):
            _triton_gemm.shifted_gemm(x, x.transpose(1, 2), shift_a=x[:, 0], shift_a_along="n")


class TestCkaOps:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("L", [1, 2])
    def test_shifted_cross_products(self, dtype, debiased, L, gen):
        n, dx, dy = 53, 37, 45  # n > d
        x, y = _acts(L, n, dx, dtype, gen), _acts(L, n, dy, dtype, gen, offset_cols=(0,))
        sx, sy = x.mean(-2, dtype=torch.float32), y.mean(-2, dtype=torch.float32)
        gx = torch.tensor([2.0**-3, 2.0**5][:L], dtype=torch.float64, device=DEVICE)  # exact per-layer scales
        gy = None if L == 1 else torch.tensor([2.0**7, 1.0], dtype=torch.float64, device=DEVICE)
        got = triton_cka._shifted_cross_products_triton(x, y, sx, sy, debiased, gx, gy)
        ref = _shifted_cross_products_torch(x.double(), y.double(), sx.double(), sy.double(), debiased, gx, gy)
        xa = ((x.double() - sx.double().unsqueeze(1)) * gx.view(-1, 1, 1)).abs()  # |x'|
        ya = (y.double() - sy.double().unsqueeze(1)).abs() * (1.0 if gy is None else gy.view(-1, 1, 1))
        ref_abs = _shifted_cross_products_torch(xa, ya, torch.zeros_like(sx, dtype=torch.float64),
                                                torch.zeros_like(sy, dtype=torch.float64), debiased)
        assert set(got) == set(ref)
        for key in ref:
            tol = TOL[dtype] if key in ("sxy", "sxx", "syy") else F32  # only the GEMMs round operands to half
            _assert_close(got[key], ref[key], ref_abs[key], tol, f"{key} {dtype}")
        counts = torch.full((L,), float(n), dtype=torch.float64)
        cka = _cka_from_sums({k: v.double().cpu() for k, v in got.items()}, counts, debiased, 2.0**-24)
        np.testing.assert_allclose(cka.numpy(), reference.linear_cka_ref(x, y, debiased), rtol=0,
                                   atol=cka_bound(x, y, debiased=debiased, backend="triton"))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("unbiased", [False, True])
    @pytest.mark.parametrize("scale", [None, 2.0**-12])
    def test_centered_gram(self, dtype, unbiased, scale, gen):
        L, n, d = 2, 45, 77  # n < d
        x = _acts(L, n, d, dtype, gen)
        g = None if scale is None else torch.full((L,), scale, dtype=torch.float64, device=DEVICE)
        got, trace = triton_cka._centered_gram_triton(x, unbiased, g)  # (L, n, n), (L,)
        assert got.dtype == torch.float32 and got.shape == (L, n, n) and trace.dtype == torch.float64
        assert torch.isfinite(got).all() and torch.equal(got, got.transpose(1, 2))
        # reference: float64 Gram of the operands the kernel feeds its dot (shifted by the float32-rounded
        # float64 mean, scaled, rounded to the dot dtype), then centred (H K H) or U-centred exactly
        shift = x.mean(-2, dtype=torch.float64).float().unsqueeze(1)  # (L, 1, d)
        xr = _round_like(((x.float() - shift) * (1.0 if scale is None else scale)).double(), dtype)
        k = xr @ xr.transpose(1, 2)  # (L, n, n)
        ref = _u_center64(k) if unbiased else _double_centre64(k)
        # float32 accumulation of d products, then the centring's float32 subtraction: a few u of the
        # entries of k: TOL[float32] relative to the Frobenius norm of the (uncentred) Gram
        err = torch.linalg.matrix_norm(got.double() - ref) / torch.linalg.matrix_norm(k)  # (L,)
        assert float(err.max()) <= TOL[torch.float32]
        np.testing.assert_allclose(trace.cpu().numpy(), k.diagonal(dim1=1, dim2=2).sum(-1).cpu().numpy(),
                                   rtol=TOL[torch.float32])
        y = _acts(L, n, 19, dtype, gen, offset_cols=())
        k2 = triton_cka._centered_gram_triton(y, unbiased)[0].double()
        cka = (got.double() * k2).sum((-2, -1)) / (torch.linalg.matrix_norm(got.double()) * torch.linalg.matrix_norm(k2))
        np.testing.assert_allclose(cka.cpu().numpy(), reference.linear_cka_ref(x, y, unbiased), rtol=0,
                                   atol=cka_bound(x, y, debiased=unbiased, method="gram", backend="triton"))

    def test_float64_runs_the_composite(self, gen):
        x = _acts(1, 9, 5, torch.float64, gen)
        got, trace = triton_cka._centered_gram_triton(x, False)
        ref, ref_trace = triton_cka.kernel("centered_gram", DEVICE, "torch")(x, False)
        assert got.dtype == torch.float64 and torch.equal(got, ref) and torch.equal(trace, ref_trace)


class TestPcaOps:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("L", [1, 2])
    def test_centered_matmuls(self, dtype, L, gen):
        n, d, l = 150, 37, 9  # n long enough for a split over K in centered_matmul_t
        x = _acts(L, n, d, dtype, gen)
        mu = x.mean(-2, dtype=torch.float32)  # (L, d)
        omega, q = randn(L, d, l, gen=gen), randn(L, n, l, gen=gen)  # float32
        xa = (x.double() - mu.double().unsqueeze(1)).abs()
        got = triton_pca._centered_matmul_triton(x, mu, omega)
        ref = _centered_matmul_torch(x.double(), mu.double(), omega.double())
        _assert_close(got, ref, xa @ omega.double().abs(), F32, f"centered_matmul {dtype}")
        got_t = triton_pca._centered_matmul_t_triton(x, mu, q)
        ref_t = _centered_matmul_t_torch(x.double(), mu.double(), q.double())
        _assert_close(got_t, ref_t, xa.transpose(1, 2) @ q.double().abs(), F32, f"centered_matmul_t {dtype}")


class TestFisherOps:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("B", [1, 3])
    @pytest.mark.parametrize("masked", [False, True])
    def test_per_sample_linear_fisher(self, dtype, B, masked, gen):
        T, n_in, n_out = 11, 37, 45
        x, g = randn(B, T, n_in, gen=gen, dtype=dtype), randn(B, T, n_out, gen=gen, dtype=dtype)
        mask = None
        if masked:
            mask = torch.rand(B, T, generator=gen) > 0.4
            mask[0, :] = False  # a fully masked sample contributes nothing
            mask = mask.to(DEVICE)
        out = randn(n_out, n_in, gen=gen).abs()  # accumulates into existing values
        init = out.clone()
        assert triton_fisher._per_sample_linear_fisher_triton(x, g, mask, out) is None
        ref = reference.per_sample_linear_fisher_ref(x, g, mask) + reference.to_f64(init)
        ref_abs = reference.per_sample_linear_fisher_ref(x.abs(), g.abs(), mask) + reference.to_f64(init)
        _assert_close(out, ref, ref_abs, F32, f"per-sample fisher {dtype}")  # exact operands, float32 sums

    def test_per_sample_float64_out(self, gen):
        x, g = randn(2, 5, 7, gen=gen), randn(2, 5, 3, gen=gen)
        out = torch.zeros(3, 7, dtype=torch.float64, device=DEVICE)
        triton_fisher._per_sample_linear_fisher_triton(x, g, None, out)
        # float64 out runs the float64 composite: float64 sums of the float32 inputs
        np.testing.assert_allclose(out.cpu().numpy(), reference.per_sample_linear_fisher_ref(x, g), rtol=TOL[torch.float64])

    def test_square_accumulate_mixed_list(self, gen):
        shapes = [(1000,), (7, 33), (129,), (3,), (0,), (5, 5)]
        acc_dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32, torch.float64]
        grad_dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
        accs = [randn(*s, gen=gen, dtype=a).abs() for s, a in zip(shapes, acc_dtypes)]
        grads = [randn(*s, gen=gen, dtype=g) for s, g in zip(shapes, grad_dtypes)]
        big = randn(301, gen=gen)
        accs.append(randn(300, gen=gen).abs())
        grads.append(big[1:])  # contiguous but not 16-byte aligned: the unaligned path
        refs = [reference.fisher_accumulate_ref(a, g, 0.37) for a, g in zip(accs, grads)]
        assert triton_fisher._square_accumulate_triton(accs, grads, 0.37) is None
        for i, (a, r) in enumerate(zip(accs, refs)):
            # acc + scale * g^2 of positive terms: three roundings in acc's dtype (the upcast is exact)
            _assert_close(a, r, r, 4 * 2.0**-24 if a.dtype == torch.float32 else 4 * 2.0**-53,
                          f"square_accumulate[{i}] {a.dtype}<-{grads[i].dtype}")


class TestPublicFunctions:
    """backend="triton" agrees with backend="torch" through the public front doors."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("method", ["feature", "gram"])
    @pytest.mark.parametrize("debiased", [False, True])
    def test_linear_cka(self, dtype, method, debiased, gen):
        x, y = _acts(2, 41, 23, dtype, gen), _acts(2, 41, 17, dtype, gen, offset_cols=())
        got = linear_cka(x, y, debiased=debiased, method=method, backend="triton")
        ref = linear_cka(x, y, debiased=debiased, method=method, backend="torch")
        bound = cka_bound(x, y, debiased=debiased, method=method, backend="triton")
        both = bound + cka_bound(x, y, debiased=debiased, method=method, backend="torch")
        np.testing.assert_allclose(got.cpu().numpy(), ref.cpu().numpy(), atol=both, rtol=0)
        np.testing.assert_allclose(got.cpu().numpy(), reference.linear_cka_ref(x, y, debiased), atol=bound, rtol=0)

    def test_cka_matrix(self, gen):
        xs = _acts(3, 23, 19, torch.float32, gen)
        got = cka_matrix(xs, debiased=True, method="gram", backend="triton")
        bound = max(cka_bound(a, b, debiased=True, method="gram", backend="triton") for a in xs for b in xs)
        np.testing.assert_allclose(got.cpu().numpy(), reference.cka_matrix_ref(xs, debiased=True), atol=bound, rtol=0)

    def test_streaming_cka_chunking(self, gen):
        x, y = _acts(2, 60, 13, torch.bfloat16, gen), _acts(2, 60, 11, torch.bfloat16, gen)
        acc = StreamingCKA(layers=2, debiased=True, backend="triton")
        for s in (slice(0, 17), slice(17, 18), slice(18, 60)):
            acc.update(x[:, s], y[:, s])
        np.testing.assert_allclose(acc.compute().cpu().numpy(), reference.linear_cka_ref(x, y, True), rtol=0,
                                   atol=cka_bound(x, y, debiased=True, backend="triton"))

    def test_randomized_pca(self, gen):
        # three well-separated directions over small noise, offsets of 1e3 in two columns
        basis = torch.linalg.qr(randn(29, 3, gen=gen, dtype=torch.float64)).Q  # (29, 3)
        scores = randn(2, 70, 3, gen=gen, dtype=torch.float64) * torch.tensor([10.0, 5.0, 2.5], dtype=torch.float64,
                                                                             device=DEVICE)
        x = (scores @ basis.T + 0.01 * randn(2, 70, 29, gen=gen, dtype=torch.float64)).float()  # (2, 70, 29)
        x[..., 1:3] += 1e3
        got = randomized_pca(x, 3, backend="triton")
        ref = randomized_pca(x, 3, backend="torch")
        for i in range(2):  # both backends within randomized_pca's bounds of the exact fit
            b, exact = pca_bounds(x[i], 3), reference.pca_ref(x[i], 3)
            for j in range(3):
                assert np.abs(got.components[i, j].cpu().numpy() - exact["components"][j]).max() <= b["angle"][j]
                assert np.abs(got.components[i, j].cpu().numpy() - ref.components[i, j].cpu().numpy()).max() <= 2 * b["angle"][j]
            s_tol = (np.array(b["ev"]) / 2 + b["out_u"]) * 2  # each singular value within half the variance bound
            np.testing.assert_array_less(np.abs(got.singular_values[i].cpu().numpy() / ref.singular_values[i].cpu().numpy() - 1), s_tol)

    def test_fisher_front_doors(self, gen):
        x, g = randn(3, 9, 21, gen=gen, dtype=torch.bfloat16), randn(3, 9, 13, gen=gen, dtype=torch.bfloat16)
        mask = (torch.rand(3, 9, generator=gen) > 0.3).to(DEVICE)
        got = per_sample_linear_fisher(x, g, mask=mask, backend="triton")
        ref = per_sample_linear_fisher(x, g, mask=mask, backend="torch")
        # sums of squares (positive): each within F32 relative of the float64 value
        np.testing.assert_allclose(got.cpu().numpy(), ref.cpu().numpy(), rtol=2 * F32, atol=0)
        accs = [torch.zeros(5, 7, device=DEVICE), torch.zeros(33, device=DEVICE)]
        grads = [randn(5, 7, gen=gen, dtype=torch.bfloat16), randn(33, gen=gen, dtype=torch.float16)]
        fisher_accumulate_(accs, grads, scale=0.5, backend="triton")
        for a, gr in zip(accs, grads):
            # 0 + 0.5 g^2 from an exact upcast: the square's and the product's roundings
            np.testing.assert_allclose(a.cpu().numpy(), reference.fisher_accumulate_ref(0.0, gr, 0.5), rtol=2 * 2.0**-24)
