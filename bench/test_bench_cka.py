"""linear_cka, cka_matrix and StreamingCKA against their GEMM floor and published CKA code.

Run: pytest bench/test_bench_cka.py --benchmark-json=cka.json && python bench/ratios.py cka.json
Baselines: the work that cannot be avoided (centring + the GEMMs), the original toolkit's
explicit H = I - 11^T/n (O(n^3)), pytorch-cka and ckatorch (bench-only dependencies), and
the float64 NumPy reference.
"""
from __future__ import annotations

import pytest
import torch

from repforget_kernels import StreamingCKA, _ops, cka_matrix, linear_cka
from repforget_kernels import reference as R


def _data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    x = _data(4096, 1024, seed=1)  # (n, dx)
    y = 0.5 * x + _data(4096, 1024, seed=2)  # (n, dy)
    return x, y


def _feature_gemms(x, y):
    """The floor: centre both inputs, Yc^T Xc, Xc^T Xc, Yc^T Yc."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return yc.T @ xc, xc.T @ xc, yc.T @ yc


def _symmetric_floor(x, y):
    """The floor with symmetric products: centre both inputs, Yc^T Xc, and Xc^T Xc, Yc^T Yc by column panels."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return yc.T @ xc, _ops.column_gram(xc[None]), _ops.column_gram(yc[None])


def _explicit_h(x, y):
    """The original toolkit's approach: n x n centring matrix, three n x n products per Gram."""
    n = x.shape[0]
    h = torch.eye(n) - torch.full((n, n), 1.0 / n)
    kc, lc = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return (kc * lc).sum() / (kc.norm() * lc.norm())


class TestLinearCKA:
    GROUP = "linear_cka n=4096 d=1024 fp32"

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_ours(self, timed, benchmark, pair, debiased):
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        timed(lambda: linear_cka(*pair, debiased=debiased), "ours")

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_gemm_floor(self, timed, benchmark, pair, debiased):
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        timed(lambda: _feature_gemms(*pair), "floor")

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_symmetric_gemm_floor(self, timed, benchmark, pair, debiased):
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        timed(lambda: _symmetric_floor(*pair), "floor")

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_full_products(self, timed, benchmark, pair, debiased, monkeypatch):
        """The previous implementation: X'^T X' and Y'^T Y' as full GEMMs (no column panels)."""
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        monkeypatch.setattr(_ops, "_MIN_PANEL", 1 << 30)
        timed(lambda: linear_cka(*pair, debiased=debiased), "baseline")

    def test_explicit_h(self, timed, benchmark, pair):
        benchmark.group = self.GROUP
        timed(lambda: _explicit_h(*pair), "baseline", rounds=3)

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_pytorch_cka(self, timed, benchmark, pair, debiased):
        cka = pytest.importorskip("cka")
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        # pytorch-cka has one estimator (unbiased HSIC on raw Grams); it is the baseline for both
        timed(lambda: cka.cka_from_features(*pair), "baseline", rounds=3)

    @pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
    def test_ckatorch(self, timed, benchmark, pair, debiased):
        core = pytest.importorskip("ckatorch.core")
        benchmark.group = self.GROUP + (" debiased" if debiased else "")
        timed(lambda: core.cka_base(*pair, unbiased=debiased), "baseline", rounds=3)

    def test_float64_reference(self, timed, benchmark, pair):
        benchmark.group = self.GROUP
        timed(lambda: R.linear_cka_ref(*pair), "baseline", rounds=3)


@pytest.fixture(scope="module")
def layers():
    return _data(32, 1024, 1024, seed=3)  # (L, n, d)


def _gram_floor(xs):
    """The floor: 32 centred Grams (batched GEMM) and one GEMM over the flattened Grams."""
    xc = xs - xs.mean(1, keepdim=True)
    g = torch.bmm(xc, xc.transpose(1, 2)).flatten(1)  # (L, n^2)
    return g @ g.T


class TestCKAMatrix:
    GROUP = "cka_matrix 32x32 layers n=1024 d=1024 fp32"

    def test_ours(self, timed, benchmark, layers):
        benchmark.group = self.GROUP
        timed(lambda: cka_matrix(layers), "ours", rounds=3)

    def test_gemm_floor(self, timed, benchmark, layers):
        benchmark.group = self.GROUP
        timed(lambda: _gram_floor(layers), "floor", rounds=3)

    def test_pytorch_cka(self, timed, benchmark, layers):
        cka = pytest.importorskip("cka")
        benchmark.group = self.GROUP
        timed(lambda: cka.cka_from_features(layers, layers), "baseline", rounds=3)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.parametrize("rows", [262_144, 1_048_576], ids=["256k", "1M"])
def test_streaming_cka_rows_d256(timed, benchmark, rows):
    """1M rows of d=256 in chunks of 8192, generated on the fly: memory must stay flat in n."""
    benchmark.group = "StreamingCKA d=256 (memory flat in n)"
    chunk = 8192
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(256, 256, generator=gen) / 16

    def run():
        s = StreamingCKA(debiased=True)
        for _ in range(rows // chunk):
            x = torch.randn(chunk, 256, generator=gen)
            s.update(x, x @ mix)
        return s.compute()

    before = _rss_mib()
    timed(run, "ours", rounds=2)
    benchmark.extra_info["rss_growth_mib"] = round(_rss_mib() - before, 1)
    benchmark.extra_info["rows"] = rows


@pytest.mark.parametrize("rows", [1_048_576], ids=["1M"])
def test_streaming_cka_products_d256(timed, benchmark, rows):
    """The floor of the 1M-row stream: the same rows generated the same way, and their unavoidable products
    X^T Y, X^T X, Y^T Y per chunk (no centring, no debiased sums)."""
    benchmark.group = "StreamingCKA d=256 (memory flat in n)"
    chunk = 8192
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(256, 256, generator=gen) / 16

    def run():
        for _ in range(rows // chunk):
            x = torch.randn(chunk, 256, generator=gen)
            y = x @ mix
            x.T @ y, x.T @ x, y.T @ y

    timed(run, "floor", rounds=2)
