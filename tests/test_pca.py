"""Randomized PCA, PCA similarity and PCA shift against the exact PCA (NumPy's full SVD; refined in exact arithmetic for float64 values), on every backend."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from repforget_kernels import PCAResult, pca_shift, pca_similarity, randomized_pca
from repforget_kernels import reference as R
from repforget_kernels.pca import METHODS

from repforget_kernels.pca import _cholesky_qr2

from conftest import (DTYPE, TOL, assert_pca_fit, exact_reference, pca_bounds, pca_truth, principal_angle, randn,
                      ref_angle, ref_rel_error)

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
        ref = pca_truth(x, 2)  # x is centred (to rounding), so its uncentred PCA is its PCA
        assert torch.count_nonzero(got.mean) == 0
        assert ref_angle(got.components, ref) <= pca_bounds(x, 2, method=method)["subspace"]

    def test_oversample_capped_at_rank(self, gen, backend, method):
        x = randn(6, 40, gen=gen)  # 6 rows: rank 5 after centring
        got = randomized_pca(x, 5, method=method, oversample=10, backend=backend)  # capped at 6 columns
        ref, b = pca_truth(x, 5), pca_bounds(x, 5, method=method, oversample=10)
        s_rel = ref_rel_error(got.singular_values, ref, "singular_values")
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
        ref, b = pca_truth(x, 2), pca_bounds(x, 2, n_iter=10)
        assert ref_angle(got.components, ref) <= b["subspace"]
        assert np.all(ref_rel_error(got.explained_variance, ref, "explained_variance") <= np.array(b["ev"]))


def _similarity_ref(x, y, k: int, signed: bool = False) -> float:
    """reference.pca_similarity_ref, refined where either input is float64 (``exact_reference``)."""
    return R.pca_similarity_ref(x, y, k, signed, refine=exact_reference(x) or exact_reference(y))


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
        assert abs(float(got) - _similarity_ref(x, y, k)) <= _similarity_bound(x, y, k)
        signed = pca_similarity(x, y, k=k, signed=True, backend=backend)
        assert abs(float(signed) - _similarity_ref(x, y, k, signed=True)) <= _similarity_bound(x, y, k, True)

    def test_mixed_dtypes(self, gen, backend):
        x = _gapped(gen, 50, 20, 2, dtype=torch.float64)
        got = pca_similarity(x, x.float(), k=2, backend=backend)
        assert got.dtype == torch.float64
        assert abs(float(got) - _similarity_ref(x, x.float(), 2)) <= _similarity_bound(x, x.float(), 2)

    def test_batched(self, gen, backend):
        x = _gapped(gen, 40, 15, 2, batch=3)
        y = _gapped(gen, 40, 15, 2, batch=3)
        got = pca_similarity(x, y, k=2, backend=backend)
        assert got.shape == (3,)
        for a, b, value in zip(x, y, got):
            assert abs(float(value) - _similarity_ref(a, b, 2)) <= _similarity_bound(a, b, 2)


class TestPCAShift:
    @pytest.mark.parametrize("normalize", [False, True])
    def test_matches_reference(self, gen, backend, normalize):
        x = _gapped(gen, 70, 22, 2)
        y = x[:50] + 0.3 * randn(50, 22, gen=gen) + 0.7
        got = pca_shift(x, y, k=2, normalize=normalize, backend=backend)
        assert got.shape == (2,)
        want = R.pca_shift_ref(x, y, 2, normalize, refine=exact_reference(x) or exact_reference(y))
        assert np.all(np.abs(R.to_f64(got) - want) <= _shift_bound(x, y, 2, normalize, want))

    def test_zero_for_same_mean(self, gen, backend):
        x = _gapped(gen, 30, 10, 2)
        got = R.to_f64(pca_shift(x, x, backend=backend))
        # both means are float64 sums of the same values (each within 5 sqrt(n) u64 mean |x_j|), so the
        # shift is at most their difference's norm
        xa = np.abs(R.to_f64(x))
        assert np.abs(got).max() <= np.linalg.norm(2 * 5 * np.sqrt(30) * 2.0**-53 * xa.mean(0))


def _mp_truth(x: np.ndarray, k: int, dps: int = 50) -> dict:
    """The top-k PCA of (n, d) float64 x by mpmath at ``dps`` digits: exact centring, eigsy of Xc^T Xc."""
    with mpmath.workdps(dps):
        n, d = x.shape
        rows = mpmath.matrix(x.tolist())
        mean = [mpmath.fsum(rows[i, j] for i in range(n)) / n for j in range(d)]
        xc = mpmath.matrix([[rows[i, j] - mean[j] for j in range(d)] for i in range(n)])
        cov = xc.T * xc
        vals, vecs = mpmath.eigsy(cov)
        top = sorted(range(d), key=lambda j: -vals[j])[:k]
        comps = [[vecs[r, j] for r in range(d)] for j in top]
        for c in comps:  # the sign rule: largest-magnitude entry positive
            big = max(c, key=abs)
            c[:] = [t if big > 0 else -t for t in c]
        return {"components": comps, "explained_variance": [vals[j] / (n - 1) for j in top],
                "explained_variance_ratio": [vals[j] / sum(vals[t] for t in range(d)) for j in top], "mean": mean,
                "dps": dps}


def _mp_distance(ref: dict, key: str, truth: dict) -> float:
    """max |hi + lo - truth| over a refined reference's entries of ``key``, relative to each truth entry's size
    (1 for the unit components), in mpmath."""
    with mpmath.workdps(truth["dps"]):
        hi, lo, want = np.ravel(ref[key]), np.ravel(ref[key + "_lo"]), truth[key]
        want = [t for row in want for t in row] if key == "components" else want
        return float(max(abs(mpmath.mpf(h) + mpmath.mpf(l) - w) / (1 if key == "components" else abs(w))
                         for h, l, w in zip(hi, lo, want)))


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float64 standard normal draws from a torch generator seeded ``seed``."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class TestFloat64Reference:
    """Float64 results are checked against the refined reference (``pca_truth``): LAPACK's float64 SVD, which
    NumPy's reference and the library's last step both run, deflates at ~99 u (``conftest.svd_deflation``),
    so NumPy's own error is of the order of the bound and the two agree only through correlated rounding."""

    SIZES = [(5, 4, 2), (7, 3, 2), (6, 5, 2), (3, 9, 2)]

    def test_ours_within_the_bound_against_the_refined_truth(self):
        # 48 small Gaussian inputs, where the final SVD's deflation dominates the float64 bound. Measured once
        # (OpenBLAS 0.3.31's LAPACK, not asserted: another LAPACK rounds elsewhere): NumPy's own error on the
        # 5 x 4 seed-3 input is 1.1e-14 against a 50-digit SVD, twice the bound's rounding part, which is why
        # the float64 checks use the refined reference and carry the deflation term.
        for n, d, k in self.SIZES:
            for seed in range(12):
                x = _gaussian(n, d, seed)
                assert_pca_fit(randomized_pca(x, k), x, k)  # ours against the refined truth, within the bound

    @pytest.mark.parametrize("n,d,k,seed,offset", [(5, 4, 2, 3, 0.0), (7, 3, 2, 9, 0.0), (4, 6, 3, 1, 1e6),
                                                   (6, 5, 2, 3, 1e-3)])
    def test_refined_reference_against_mpmath(self, n, d, k, seed, offset):
        """The refined reference against a 50-digit mpmath eigensolution of the exactly centred covariance:
        within 1e-30 (its hi + lo holds ~2^-106), where NumPy's is ~1e-14 off."""
        x = _gaussian(n, d, seed).numpy()
        x[:, ::2] += offset  # offset columns (1e6: the centring must be exact; 1e-3: x ~ 1 + 1e-3 noise)
        ref, truth = R.pca_ref(x, k, refine=True), _mp_truth(x, k)
        for key in ("components", "explained_variance", "explained_variance_ratio"):
            assert _mp_distance(ref, key, truth) <= 1e-30, key
        assert _mp_distance(ref, "mean", {"mean": truth["mean"], "dps": 50}) <= 1e-30
        unrefined = R.pca_ref(x, k)
        assert np.abs(unrefined["components"] - ref["components"]).max() > 1e-18  # what the refinement removed

    def test_exact_principal_angle_against_mpmath(self):
        """principal_angle with the reference's remainders: the sine of ours against the truth, within 1e-6
        of its mpmath value relative (float64 QRs would be a few u64 off absolute, ~10% of such an angle)."""
        x = _gaussian(5, 4, 3)
        got, ref, truth = R.to_f64(randomized_pca(x, 2).components), R.pca_ref(x, 2, refine=True), _mp_truth(x.numpy(), 2)
        with mpmath.workdps(50):
            a = mpmath.matrix(got.tolist())  # (2, 4) rows
            t = mpmath.matrix(truth["components"])  # (2, 4) orthonormal rows
            q = mpmath.qr(a.T)[0]  # (4, 4)
            q = q[:, :2]
            resid = q - t.T * (t * q)
            sin = mpmath.sqrt(max(mpmath.eigsy(resid.T * resid)[0]))
        assert abs(np.sin(principal_angle(got, ref["components"], ref["components_lo"])) / float(sin) - 1) <= 1e-6
        assert float(sin) > 1e-15  # a real angle of ~1e-14 (LAPACK's deflation), measured to 6 digits

    def test_similarity_and_shift_against_mpmath(self):
        x, y = _gaussian(6, 5, 3).numpy(), _gaussian(7, 5, 4).numpy()
        tx, ty = _mp_truth(x, 2), _mp_truth(y, 2)
        with mpmath.workdps(50):
            a, b = mpmath.matrix(tx["components"]), mpmath.matrix(ty["components"])
            cos = mpmath.svd_r(a * b.T, compute_uv=False)
            similarity = (cos[0] + cos[1]) / 2
            delta = [mpmath.fsum(y[:, j]) / 7 - tx["mean"][j] for j in range(5)]
            shift = [mpmath.fdot(tx["components"][i], delta) / mpmath.sqrt(tx["explained_variance"][i]) for i in range(2)]
        assert abs(R.pca_similarity_ref(x, y, 2, refine=True) - float(similarity)) <= 4 * 2.0**-53
        signed = mpmath.fsum(mpmath.fdot(tx["components"][i], ty["components"][i]) for i in range(2)) / 2
        assert abs(R.pca_similarity_ref(x, y, 2, signed=True, refine=True) - float(signed)) <= 2.0**-53
        want = np.array([float(s) for s in shift])
        assert np.all(np.abs(R.pca_shift_ref(x, y, 2, normalize=True, refine=True) / want - 1) <= 4 * 2.0**-53)


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
