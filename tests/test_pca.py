"""Randomized PCA, PCA similarity and PCA shift against NumPy's full SVD, on every backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repforget_kernels import PCAResult, pca_shift, pca_similarity, randomized_pca
from repforget_kernels import reference as R
from repforget_kernels.pca import METHODS

from repforget_kernels.pca import _cholesky_qr2

from conftest import DTYPE, TOL, assert_pca_fit, pca_bounds, principal_angle, randn

F32 = TOL[torch.float32]


def _gapped(gen, n, d, k, batch=None, dtype=None, decay=0.5):
    """Data whose top-k spectrum is well separated from the rest (a gap of 10x after k), plus a mean offset."""
    lead = () if batch is None else (batch,)
    r = min(n, d)
    u = torch.linalg.qr(randn(*lead, n, r, gen=gen, dtype=torch.float64)).Q  # (..., n, r)
    v = torch.linalg.qr(randn(*lead, d, r, gen=gen, dtype=torch.float64)).Q  # (..., d, r)
    s = torch.cat([10.0 * decay ** torch.arange(k, dtype=torch.float64), 0.05 * decay ** torch.arange(r - k, dtype=torch.float64)])
    x = (u * s) @ v.transpose(-1, -2) + 3.0  # (..., n, d)
    return x.to(dtype or DTYPE)


@pytest.mark.parametrize("method", sorted(METHODS))
class TestRandomizedPCA:
    @pytest.mark.parametrize("n,d,k", [(83, 29, 3), (21, 57, 4), (130, 130, 1), (12, 7, 5)])
    @pytest.mark.parametrize("batch", [None, 1, 2])
    def test_matches_full_svd(self, gen, backend, method, n, d, k, batch):
        x = _gapped(gen, n, d, k, batch)
        got = randomized_pca(x, k, method=method, backend=backend)
        if batch is None:
            assert_pca_fit(got, x, k, method=method)
        for i in range(batch or 0):
            assert_pca_fit(PCAResult(*(t[i] for t in got)), x[i], k, method=method)

    @pytest.mark.parametrize("offset", [1e3, 1e5])
    def test_large_column_offsets(self, gen, backend, method, offset):
        x = _gapped(gen, 90, 26, 3, dtype=torch.float64)
        x[:, :4] += offset  # massive activations: the centring must not lose the subspace
        x = x.to(DTYPE)  # the reference runs on the values given
        assert_pca_fit(randomized_pca(x, 3, method=method, backend=backend), x, 3, method=method)

    def test_shapes_and_dtypes(self, gen, backend, method):
        x = _gapped(gen, 40, 17, 3, batch=3)
        got = randomized_pca(x, 3, method=method, backend=backend)
        assert got.components.shape == (3, 3, 17)
        assert got.singular_values.shape == got.explained_variance.shape == (3, 3)
        assert got.mean.shape == (3, 17)
        want = torch.float64 if DTYPE == torch.float64 else torch.float32
        assert all(t.dtype == want for t in got)
        torch.testing.assert_close(got.explained_variance, got.singular_values**2 / 39)

    def test_deterministic_for_a_seed(self, gen, backend, method):
        x = randn(50, 20, gen=gen)
        a = randomized_pca(x, 5, method=method, n_iter=1, seed=3, backend=backend)
        b = randomized_pca(x, 5, method=method, n_iter=1, seed=3, backend=backend)
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_input(self, gen, backend, method, dtype):
        x = _gapped(gen, 64, 33, 2, dtype=dtype)
        got = randomized_pca(x, 2, method=method, backend=backend)
        assert got.components.dtype == torch.float32
        assert_pca_fit(got, x, 2, method=method)  # reference on the same rounded values, float32 work

    def test_uncentred(self, gen, backend, method):
        x = _gapped(gen, 50, 12, 2) - 3.0
        x = x - x.mean(0)
        got = randomized_pca(x, 2, method=method, center=False, backend=backend)
        ref = R.pca_ref(x, 2)  # x is centred (to rounding), so its uncentred PCA is its PCA
        assert torch.count_nonzero(got.mean) == 0
        assert principal_angle(got.components, ref["components"]) <= pca_bounds(x, 2, method=method)["subspace"]

    def test_oversample_capped_at_rank(self, gen, backend, method):
        x = randn(6, 40, gen=gen)  # 6 rows: rank 5 after centring
        got = randomized_pca(x, 5, method=method, oversample=10, backend=backend)  # capped at 6 columns
        ref, b = R.pca_ref(x, 5), pca_bounds(x, 5, method=method, oversample=10)
        s_rel = np.abs(R.to_f64(got.singular_values) / ref["singular_values"] - 1)
        np.testing.assert_array_less(s_rel, np.array(b["ev"]) / 2 + b["out_u"])  # half the variances' bound
        with pytest.raises(ValueError, match=r"x is numerically rank-deficient at batch index 0: principal direction 6"):
            randomized_pca(x, 6, method=method, oversample=10, backend=backend)


class TestKrylov:
    def test_beats_subspace_iteration_without_a_gap(self, gen):
        """On a slowly decaying spectrum (no gap after k), the block Krylov space of the same passes over x
        holds the top-k subspace better than the subspace iteration's last block (Musco & Musco 2015)."""
        n, d, k = 400, 120, 4
        s = torch.logspace(0, -0.5, d, dtype=torch.float64)  # no clean gap anywhere
        x = (randn(n, d, gen=gen, dtype=torch.float64) * s) @ torch.linalg.qr(randn(d, d, gen=gen,
                                                                                 dtype=torch.float64)).Q
        ref = R.pca_ref(x, k)["components"]
        errors = {m: np.mean([principal_angle(randomized_pca(x, k, method=m, oversample=2, n_iter=3, seed=i)
                                              .components, ref) for i in range(4)]) for m in METHODS}
        assert errors["krylov"] < errors["subspace"]

    @pytest.mark.parametrize("n,d", [(9, 30), (5, 4), (40, 7)])
    def test_space_capped_at_min_n_d(self, gen, n, d):
        """10 blocks of b = 4 would pass the rank bound min(n - 1, d): the exact sketch of that many columns
        runs instead, exact to rounding with no randomized term."""
        x = randn(n, d, gen=gen, dtype=torch.float64)
        got = randomized_pca(x, 2, n_iter=10)
        ref, b = R.pca_ref(x, 2), pca_bounds(x, 2, n_iter=10)
        assert principal_angle(got.components, ref["components"]) <= b["subspace"]
        assert np.all(np.abs(R.to_f64(got.explained_variance) / ref["explained_variance"] - 1) <= np.array(b["ev"]))


def _similarity_bound(x, y, k: int, signed: bool = False) -> float:
    """pca_similarity's documented bound: the cosines are 1-Lipschitz in the angle errors of both fits
    (per component for k = 1 or signed, of the top-k subspaces otherwise), plus the output's rounding."""
    bx, by = pca_bounds(x, k), pca_bounds(y, k)
    if k == 1 or signed:
        err = float(np.mean([bx["angle"][i] + by["angle"][i] for i in range(k)]))
    else:
        err = bx["subspace"] + by["subspace"]
    return err + max(bx["out_u"], by["out_u"])


def _shift_bound(x, y, k: int, normalize: bool, want) -> np.ndarray:
    """pca_shift's documented bound: angle_i |mean difference| (+ half the variance's relative error when
    normalised), plus the output's rounding."""
    b = pca_bounds(x, k)
    delta = np.linalg.norm(R.to_f64(y).mean(0) - R.to_f64(x).mean(0))
    tol = []
    for i in range(k):
        scale = 1 / np.sqrt(b["var"][i]) if normalize else 1.0
        tol.append(b["angle"][i] * delta * scale + ((b["ev"][i] / 2 if normalize else 0) + b["out_u"]) * abs(want[i]))
    return np.array(tol)


class TestPCASimilarity:
    def test_identical_and_flipped(self, gen, backend):
        x = _gapped(gen, 60, 25, 3)
        for y, k, signed in ((x, 1, False), (-x, 1, False), (x, 1, True), (x, 3, False)):
            got = pca_similarity(x, y, k=k, signed=signed, backend=backend)
            assert got.dtype == (torch.float64 if DTYPE == torch.float64 else torch.float32)
            assert abs(float(got) - 1.0) <= _similarity_bound(x, y, k, signed)

    @pytest.mark.parametrize("k", [1, 3])
    def test_matches_reference(self, gen, backend, k):
        x = _gapped(gen, 70, 31, 3)
        y = _gapped(gen, 55, 31, 3)  # different row count is allowed
        got = pca_similarity(x, y, k=k, backend=backend)
        assert abs(float(got) - R.pca_similarity_ref(x, y, k)) <= _similarity_bound(x, y, k)
        signed = pca_similarity(x, y, k=k, signed=True, backend=backend)
        assert abs(float(signed) - R.pca_similarity_ref(x, y, k, signed=True)) <= _similarity_bound(x, y, k, True)

    def test_mixed_dtypes(self, gen, backend):
        x = _gapped(gen, 50, 20, 2, dtype=torch.float64)
        got = pca_similarity(x, x.float(), k=2, backend=backend)
        assert got.dtype == torch.float64
        assert abs(float(got) - R.pca_similarity_ref(x, x.float(), 2)) <= _similarity_bound(x, x.float(), 2)

    def test_batched(self, gen, backend):
        x = _gapped(gen, 40, 15, 2, batch=3)
        y = _gapped(gen, 40, 15, 2, batch=3)
        got = pca_similarity(x, y, k=2, backend=backend)
        assert got.shape == (3,)
        for a, b, value in zip(x, y, got):
            assert abs(float(value) - R.pca_similarity_ref(a, b, 2)) <= _similarity_bound(a, b, 2)


class TestPCAShift:
    @pytest.mark.parametrize("normalize", [False, True])
    def test_matches_reference(self, gen, backend, normalize):
        x = _gapped(gen, 70, 22, 2)
        y = x[:50] + 0.3 * randn(50, 22, gen=gen) + 0.7
        got = pca_shift(x, y, k=2, normalize=normalize, backend=backend)
        assert got.shape == (2,)
        want = R.pca_shift_ref(x, y, 2, normalize)
        assert np.all(np.abs(R.to_f64(got) - want) <= _shift_bound(x, y, 2, normalize, want))

    def test_zero_for_same_mean(self, gen, backend):
        x = _gapped(gen, 30, 10, 2)
        got = R.to_f64(pca_shift(x, x, backend=backend))
        # both means are float64 sums of the same values (each within 5 sqrt(n) u64 mean |x_j|), so the
        # shift is at most their difference's norm
        xa = np.abs(R.to_f64(x))
        assert np.abs(got).max() <= np.linalg.norm(2 * 5 * np.sqrt(30) * 2.0**-53 * xa.mean(0))


class TestCholeskyQR2:
    """The orthonormalisation chosen on CUDA, tested on the test device."""

    @pytest.mark.parametrize("rank_deficient", [False, True])
    def test_orthonormalize(self, rank_deficient, gen):
        a = randn(2, 61, 7, gen=gen)  # (L, m, l)
        if rank_deficient:
            a[..., 3] = a[..., 1]  # Cholesky fails: falls back to Householder QR
        q = _cholesky_qr2(a)
        eye = torch.eye(7, dtype=q.dtype, device=q.device)
        # Q is orthonormal in float64, then rounded to float32; Q^T Q sums 61 float32 products: F32
        assert float((q.transpose(1, 2) @ q - eye).abs().max()) < F32
        if not rank_deficient:  # same column space: Q Q^T a = a
            a64 = a.double()
            resid = q.double() @ (q.double().transpose(1, 2) @ a64) - a64
            assert float(resid.abs().max() / a64.abs().max()) < F32  # Q's float32 rounding, 7 columns


class TestBadInput:
    def test_k_out_of_range(self, gen):
        x = randn(5, 8, gen=gen)
        with pytest.raises(ValueError, match=r"k must be in \[1, min\(n, d\)\] = \[1, 5\] for x of shape \(5, 8\), got 6"):
            randomized_pca(x, 6)
        with pytest.raises(ValueError, match="got 0"):
            randomized_pca(x, 0)
        with pytest.raises(TypeError, match="k must be an int"):
            randomized_pca(x, 2.0)

    def test_method(self, gen):
        x = randn(30, 8, gen=gen)
        with pytest.raises(ValueError, match=r"method must be one of \['krylov', 'subspace'\], got 'lanczos'"):
            randomized_pca(x, 2, method="lanczos")
        with pytest.raises(ValueError, match=r"n_iter must be >= 1 for method='krylov'.*got 0"):
            randomized_pca(x, 2, n_iter=0)

    def test_options(self, gen):
        x = randn(5, 8, gen=gen)
        with pytest.raises(ValueError, match="oversample must be a non-negative int"):
            randomized_pca(x, 2, oversample=-1)
        with pytest.raises(ValueError, match="n_iter must be a non-negative int"):
            randomized_pca(x, 2, n_iter=1.5)

    def test_bad_arrays(self, gen):
        with pytest.raises(ValueError, match=r"x must be \(n, d\) or \(B, n, d\)"):
            randomized_pca(randn(5, gen=gen), 1)
        x = randn(5, 3, gen=gen)
        x[0, 0] = float("nan")
        with pytest.raises(ValueError, match="x contains 1 NaN"):
            randomized_pca(x, 1)
        with pytest.raises(TypeError, match="floating dtype"):
            randomized_pca(torch.ones(5, 3, dtype=torch.int32), 1)

    def test_constant_input_is_an_error(self):
        with pytest.raises(ValueError, match=r"x has no variance .* at batch index \[1\]"):
            randomized_pca(torch.stack([torch.randn(6, 4), torch.ones(6, 4)]), 2)

    def test_k_names_the_input_it_does_not_fit(self, gen):
        with pytest.raises(ValueError, match=r"for x_upd of shape \(3, 8\), got 4"):
            pca_similarity(randn(10, 8, gen=gen), randn(3, 8, gen=gen), k=4)
        with pytest.raises(ValueError, match=r"for x_ref of shape \(3, 8\), got 4"):
            pca_shift(randn(3, 8, gen=gen), randn(10, 8, gen=gen), k=4)

    def test_pair_mismatch(self, gen):
        with pytest.raises(ValueError, match=r"feature dimension d .*x_ref \(6, 4\) and x_upd \(6, 5\)"):
            pca_similarity(randn(6, 4, gen=gen), randn(6, 5, gen=gen))
        with pytest.raises(ValueError, match="x_upd needs at least 2 rows"):
            pca_shift(randn(6, 4, gen=gen), randn(1, 4, gen=gen))
