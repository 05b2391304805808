"""Precision and degenerate input (issue 8, item 5), on every backend, against float64 on the same values.

Each tolerance is the bound the function documents (conftest.cka_bound, conftest.pca_bounds: the
condition factors come from the float64 reference on the rounded input). Degenerate inputs must raise
ValueError naming the input, the same on every backend.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from repforget_kernels import StreamingCKA, cka_matrix, linear_cka, pca_shift, pca_similarity, randomized_pca
from repforget_kernels import reference as R

from conftest import DEVICE, cka_bound, pca_bounds

U32 = 2.0**-24


def _offset_pair(offset: float, n: int = 300, dx: int = 16, dy: int = 12, seed: int = 0):
    """float32 (n, dx), (n, dy) correlated rows with column offsets of +-offset on a few columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = torch.randn(n, dy, generator=g, dtype=torch.float64) + 0.5 * x[:, :1]
    x[:, :3] += offset
    y[:, -2:] -= offset
    return x.float().to(DEVICE), y.float().to(DEVICE)


class TestOffsets:
    @pytest.mark.parametrize("offset", [1e5, 1e6])
    @pytest.mark.parametrize("method", ["gram", "feature"])
    def test_biased_cka_float32(self, backend, offset, method):
        x, y = _offset_pair(offset)
        want = R.linear_cka_ref(x, y)
        got = float(linear_cka(x, y, method=method, backend=backend))
        assert abs(got - want) <= cka_bound(x, y, method=method, backend=backend)

    @pytest.mark.parametrize("offset", [1e5, 1e6])
    def test_cka_matrix_float32(self, backend, offset):
        x, y = _offset_pair(offset, dy=16)
        got = cka_matrix(torch.stack([x, y]), backend=backend)  # gram method (pairs accumulated in float64)
        want = R.linear_cka_ref(x, y)
        assert abs(float(got[0, 1]) - want) <= cka_bound(x, y, method="gram", backend=backend)

    @pytest.mark.parametrize("offset", [1e5, 1e6])
    def test_randomized_pca_float32(self, backend, offset):
        g = torch.Generator().manual_seed(1)
        basis = torch.linalg.qr(torch.randn(26, 3, generator=g, dtype=torch.float64)).Q  # (26, 3)
        scores = torch.randn(90, 3, generator=g, dtype=torch.float64) * torch.tensor([6.0, 3.0, 1.5], dtype=torch.float64)
        x = scores @ basis.T + 0.01 * torch.randn(90, 26, generator=g, dtype=torch.float64)  # (90, 26)
        x[:, :4] += offset
        x = x.float().to(DEVICE)
        got = randomized_pca(x, 3, backend=backend)
        ref, b = R.pca_ref(x, 3), pca_bounds(x, 3)
        rel = np.abs(R.to_f64(got.explained_variance) / ref["explained_variance"] - 1)
        assert np.all(rel <= np.array(b["ev"]) + b["out_u"])


class TestDegenerate:
    @pytest.mark.parametrize("method", ["gram", "feature"])
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_constant_input_raises(self, backend, method, debiased, dtype):
        const = torch.full((9, 4), 0.1, dtype=dtype, device=DEVICE)  # 0.1: its float64 mean is not exactly 0.1
        other = torch.randn(9, 3, generator=torch.Generator().manual_seed(2), dtype=dtype).to(DEVICE)
        with pytest.raises(ValueError, match=r"x has no variance to compare at batch/layer index \[0\]"):
            linear_cka(const, other, debiased=debiased, method=method, backend=backend)
        with pytest.raises(ValueError, match=r"y has no variance"):
            linear_cka(other, const, debiased=debiased, method=method, backend=backend)

    @pytest.mark.parametrize("method", ["gram", "feature"])
    def test_cka_matrix_constant_layer_is_not_one(self, backend, method):
        layers = torch.stack([torch.full((9, 4), 0.1), torch.randn(9, 4, generator=torch.Generator().manual_seed(3))]).to(DEVICE)
        want = r"xs has no variance .* index \[0\]" if method == "gram" else r"\(xs\[0\], xs\[0\]\): x has no variance"
        with pytest.raises(ValueError, match=want):
            cka_matrix(layers, method=method, backend=backend)

    @pytest.mark.parametrize("method", ["gram", "feature"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_debiased_one_distinct_row_raises(self, backend, method, dtype):
        # rows all equal but one: U-centring annihilates the rank-one Gram, the debiased self-HSIC is 0
        g = torch.Generator().manual_seed(4)
        x = torch.randn(10, 5, generator=g, dtype=torch.float64)
        x[1:] = x[1] + 100.0
        y = torch.randn(10, 5, generator=g, dtype=torch.float64)
        with pytest.raises(ValueError, match="x has no variance"):
            linear_cka(x.to(DEVICE, dtype), y.to(DEVICE, dtype), debiased=True, method=method, backend=backend)
        # biased CKA of the same rows is defined (a rank-one centred Gram)
        xr, yr = x.to(DEVICE, dtype), y.to(DEVICE, dtype)
        got = float(linear_cka(xr, yr, method=method, backend=backend))
        assert abs(got - R.linear_cka_ref(xr, yr)) <= cka_bound(xr, yr, method=method, backend=backend)

    def test_streaming_constant_rows_raise(self, backend):
        s = StreamingCKA(debiased=True, backend=backend)
        g = torch.Generator().manual_seed(10)
        for _ in range(3):
            s.update(torch.full((4, 3), 1e6 + 0.5, device=DEVICE), torch.randn(4, 2, generator=g).to(DEVICE))
        with pytest.raises(ValueError, match="x has no variance"):
            s.compute()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_pca_constant_and_identical_rows_raise(self, backend, dtype):
        g = torch.Generator().manual_seed(5)
        rows = torch.randn(1, 6, generator=g, dtype=torch.float64).repeat(20, 1)
        other = torch.randn(20, 6, generator=g).to(DEVICE, dtype)
        for x in (torch.full((20, 6), 3.3, dtype=dtype, device=DEVICE), rows.to(DEVICE, dtype)):
            with pytest.raises(ValueError, match=r"x has no variance .* at batch index \[0\]"):
                randomized_pca(x, 2, backend=backend)
            with pytest.raises(ValueError, match="x_ref has no variance"):
                pca_similarity(x, other, backend=backend)
            with pytest.raises(ValueError, match="x_upd has no variance"):
                pca_similarity(other, x, backend=backend)
            with pytest.raises(ValueError, match="x_ref has no variance"):
                pca_shift(x, other, backend=backend)

    @pytest.mark.parametrize("normalize", [False, True])
    def test_pca_shift_rank_deficient_reference_names_the_direction(self, backend, normalize):
        g = torch.Generator().manual_seed(6)
        x_ref = (torch.randn(20, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 6, generator=g, dtype=torch.float64)).float().to(DEVICE)
        with pytest.raises(ValueError, match=r"x_ref is numerically rank-deficient at batch index 0: principal direction 2"):
            pca_shift(x_ref, torch.randn(20, 6, generator=g).to(DEVICE), k=2, normalize=normalize, backend=backend)
        got = pca_shift(x_ref, x_ref + 1.0, k=1, normalize=normalize, backend=backend)  # k = 1 is defined
        want = R.pca_shift_ref(x_ref, x_ref + 1.0, 1, normalize)
        # shift = v . 1: error <= angle |1| + u |shift| (pca_shift's bound), angle from the rank-one gap
        b = pca_bounds(x_ref, 1)
        scale = 1 / math.sqrt(b["var"][0]) if normalize else 1.0
        tol = b["angle"][0] * math.sqrt(6) * scale + (b["ev"][0] / 2 if normalize else 0) * abs(want[0]) + U32 * abs(want[0])
        assert abs(float(got[0]) - want[0]) <= tol


class TestScale:
    @pytest.mark.parametrize("scale", [1e8, 1e9, 1e-18, 1e-24])
    @pytest.mark.parametrize("debiased", [False, True])
    def test_cka_of_scaled_float32(self, backend, scale, debiased):
        g = torch.Generator().manual_seed(7)
        # n = 120: the Gram-pair products (n d x^2)^2 of x ~ 1e8 overflow float32 unless rows are scaled first
        base = torch.randn(120, 16, generator=g, dtype=torch.float64)
        other = base + torch.randn(120, 16, generator=g, dtype=torch.float64)
        xs = (torch.stack([base, other]) * scale).float().to(DEVICE)  # (2, 120, 16)
        x, y = xs[0], xs[1]
        want = R.linear_cka_ref(x, y, debiased)
        got = cka_matrix(xs, debiased=debiased, backend=backend)
        assert abs(float(got[0, 1]) - want) <= cka_bound(x, y, debiased=debiased, method="gram", backend=backend)
        for method in ("gram", "feature"):
            got = float(linear_cka(x, y, debiased=debiased, method=method, backend=backend))
            assert abs(got - want) <= cka_bound(x, y, debiased=debiased, method=method, backend=backend)

    @pytest.mark.parametrize("scale", [1e8, 1e-20])
    def test_pca_of_scaled_float32(self, backend, scale):
        g = torch.Generator().manual_seed(8)
        x = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.tensor([8.0, 4.0] + [0.5] * 6, dtype=torch.float64)
        xf = (x * scale).float().to(DEVICE)
        got = randomized_pca(xf, 2, backend=backend)
        ref, b = R.pca_ref(xf, 2), pca_bounds(xf, 2)
        ev = np.array(b["ev"])  # relative bound of the variances; singular values: half of it
        s_rel = np.abs(R.to_f64(got.singular_values) / ref["singular_values"] - 1)
        assert np.all(s_rel <= ev / 2 + b["out_u"])
        ratio_err = np.abs(R.to_f64(got.explained_variance_ratio) - ref["explained_variance_ratio"])
        assert np.all(ratio_err <= (ev + 2 * b["out_u"]) * ref["explained_variance_ratio"])


class TestStreamingMixedDtypes:
    @pytest.mark.parametrize("float64_first", [True, False])
    @pytest.mark.parametrize("debiased", [False, True])
    def test_float64_and_float32_chunks_with_offsets(self, backend, float64_first, debiased):
        g = torch.Generator().manual_seed(9)
        # spread 0.1 next to offsets of 1e6 (float32 ulp 0.0625): a shift rounded to float32 for the
        # float32 chunk but recorded in float64 would move its rows by up to 0.03
        x = 0.1 * torch.randn(2000, 8, generator=g, dtype=torch.float64) + 1e6
        y = 0.1 * torch.randn(2000, 6, generator=g, dtype=torch.float64) + 0.5 * x[:, :1] - 1.5e6
        dtypes = (torch.float64, torch.float32) if float64_first else (torch.float32, torch.float64)
        s = StreamingCKA(debiased=debiased, backend=backend)
        for rows, dtype in zip((slice(0, 1000), slice(1000, 2000)), dtypes):  # the 1000 + 1000 rows
            s.update(x[rows].to(DEVICE, dtype), y[rows].to(DEVICE, dtype))
        xr = torch.cat([x[:1000].to(dtypes[0]).double(), x[1000:].to(dtypes[1]).double()])  # the values given
        yr = torch.cat([y[:1000].to(dtypes[0]).double(), y[1000:].to(dtypes[1]).double()])
        got = s.compute()
        assert got.dtype == torch.float64
        want = R.linear_cka_ref(xr, yr, debiased)
        assert abs(float(got) - want) <= cka_bound(xr, yr, debiased=debiased, backend=backend, dtypes=dtypes)
