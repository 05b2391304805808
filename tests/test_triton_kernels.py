"""What is Triton-specific (CPU: under TRITON_INTERPRET=1, set by conftest); the ops' shared contract
against their float64 references, on every backend, is tests/test_op_contract.py.

Here: the shifted GEMM itself (tiles, symmetric writes, shift errors), full writes of every buffer,
the float64 routing, and the front doors with backend="triton" against backend="torch".
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
from repforget_kernels._ops import CENTERED_GRAM

pytestmark = pytest.mark.skipif(not backend_available("triton", DEVICE)[0], reason="triton cannot run on " + str(DEVICE))

if backend_available("triton", DEVICE)[0]:
    from repforget_kernels import _triton_gemm, triton_cka, triton_fisher

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
    def test_float64_runs_the_composite(self, gen):
        x = _acts(1, 9, 5, torch.float64, gen)
        got, trace = triton_cka._centered_gram_triton(x, False)
        ref, ref_trace = CENTERED_GRAM.composite(x, False)
        assert got.dtype == torch.float64 and torch.equal(got, ref) and torch.equal(trace, ref_trace)


class TestFisherOps:
    def test_per_sample_float64_out(self, gen):
        x, g = randn(2, 5, 7, gen=gen), randn(2, 5, 3, gen=gen)
        out = torch.zeros(3, 7, dtype=torch.float64, device=DEVICE)
        triton_fisher._per_sample_linear_fisher_triton(x, g, None, out)
        # float64 out runs the float64 composite: float64 sums of the float32 inputs
        np.testing.assert_allclose(out.cpu().numpy(), reference.per_sample_linear_fisher_ref(x, g), rtol=TOL[torch.float64])


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
