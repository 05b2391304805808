"""The compiled CPU kernels (repforget_kernels._C, backend "cpp") op by op.

What is specific to the C++ kernels; the ops' shared contract against their float64 references,
on every backend, is tests/test_op_contract.py. Here: the C++ argument checks and their messages,
strided inputs and outputs, the histogram's edge values and threshold-table path, exact structure
of the Grams (symmetry, zero row sums, exact scaling), large offsets, agreement with the torch
composite where the two must match exactly. Two threads are used where a kernel merges per-thread
results. The last class checks the missing-extension path: one warning, then the torch
composites serve.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import TOL, randn
from repforget_kernels import _cpp_ops, _dispatch
from repforget_kernels._ops import OPS
from repforget_kernels.reference import (
    centered_gram_ref,
    fisher_accumulate_ref,
    to_f64,
)

CPU = torch.device("cpu")
ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
needs_extension = pytest.mark.skipif(
    not _cpp_ops.available()[0], reason=f"C++ extension not built: {_cpp_ops.available()[1]}"
)


def cpp(op: str):
    return _dispatch.kernel(OPS[op], CPU, "cpp")


def composite(op: str):
    return _dispatch.kernel(OPS[op], CPU, "torch")


def max_rel_diff(got, want) -> float:
    """max |got - want| / max |want| in float64."""
    got, want = to_f64(got), to_f64(want)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


# --------------------------------------------------------------------------- square_accumulate


@needs_extension
class TestSquareAccumulate:
    SHAPES = [(37, 13), (1,), (0, 5), (3, 7, 11), (40_001,)]

    def test_strided_accumulator_is_updated_in_place(self, gen):
        base = torch.zeros(6, 8)
        acc = base.t()  # (8, 6), not contiguous
        g = randn(8, 6, gen=gen)
        cpp("square_accumulate")([acc], [g], 1.0)
        assert max_rel_diff(base.t(), fisher_accumulate_ref(torch.zeros(8, 6), g)) < TOL[torch.float32]

    def test_empty_lists(self):
        assert cpp("square_accumulate")([], [], 1.0) is None

    def test_shape_mismatch(self):
        with pytest.raises(RuntimeError, match=r"accs\[0\] has shape \[3\] but grads\[0\] has shape \[4\]"):
            cpp("square_accumulate")([torch.zeros(3)], [torch.zeros(4)], 1.0)

    def test_accumulator_dtype(self):
        with pytest.raises(RuntimeError, match=r"accs\[0\] must be float32 or float64, got BFloat16"):
            cpp("square_accumulate")([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], 1.0)

    def test_grad_dtype(self):
        with pytest.raises(RuntimeError, match=r"grads\[0\] must have a floating dtype, got Long"):
            cpp("square_accumulate")([torch.zeros(3)], [torch.zeros(3, dtype=torch.int64)], 1.0)

    def test_list_lengths(self):
        with pytest.raises(RuntimeError, match="same length, got 2 and 1"):
            torch.ops.repforget.square_accumulate([torch.zeros(3), torch.zeros(3)], [torch.zeros(3)], 1.0)


# --------------------------------------------------------------------------- histogram


@needs_extension
class TestHistogram:
    @pytest.mark.parametrize("dtype", ALL_FLOATS)
    @pytest.mark.parametrize("log", [True, False], ids=["log", "linear"])
    def test_equals_composite(self, gen, dtype, log, two_threads):
        v = randn(50_003, gen=gen, dtype=dtype)
        v = v.abs() if log else v
        lo, hi = (1e-3, 2.0) if log else (-1.5, 2.25)
        torch.testing.assert_close(cpp("histogram")(v, lo, hi, 17, log), composite("histogram")(v, lo, hi, 17, log))

    def test_edge_values_linear(self):
        v = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75, -1e-9, 1.0 + 1e-9, float("nan"), float("inf"), -float("inf")],
                         dtype=torch.float64)
        got = cpp("histogram")(v, 0.0, 1.0, 4, False)
        # 0 and 0.25 open bins 0 and 1, 0.5 bin 2, 0.75 and hi (=1.0) the last bin; the rest is outside
        assert got.tolist() == [1, 1, 1, 2]

    def test_edge_values_log(self):
        v = torch.tensor([1e-3, 2e-3, 2e-2, 0.5, 1.0, 0.0, -1.0, 9.99e-4, 1.01, float("nan")], dtype=torch.float64)
        got = cpp("histogram")(v, 1e-3, 1.0, 3, True)
        # decades [1e-3, 1e-2), [1e-2, 1e-1), [1e-1, 1]: lo in bin 0, hi in the last; zeros, negatives, outside dropped
        assert got.tolist() == [2, 1, 2]

    @pytest.mark.parametrize("log", [True, False], ids=["log", "linear"])
    def test_edge_values_many(self, gen, log, two_threads):
        """Enough values for the threshold-table path: edges, bin boundaries and outsiders, mixed in.

        The table path must give exactly the per-value definition, which the kernel applies to
        small inputs (chunks of 4000 here); linear bins must also equal the composite exactly (for
        log bins the two may differ on values exactly at an edge: torch's log10 is not libm's).
        """
        lo, hi, bins = (1e-3, 10.0, 8) if log else (0.0, 1.0, 8)
        edges = np.logspace(-3, 1, bins + 1) if log else np.linspace(lo, hi, bins + 1)
        special = [lo, hi, -0.0, 0.0, -1.0, float("nan"), float("inf"), hi * (1 + 1e-15), lo * (1 - 1e-15)]
        special += list(edges) + list(np.nextafter(edges, np.inf)) + list(np.nextafter(edges, -np.inf))
        v = torch.cat([torch.tensor(special, dtype=torch.float64).repeat(2000),
                       randn(30_011, gen=gen, dtype=torch.float64).abs() * (3.0 if log else 0.6)])  # (N,)
        v = v[torch.randperm(v.numel(), generator=gen)]
        got = cpp("histogram")(v, lo, hi, bins, log)
        by_value = sum(cpp("histogram")(c, lo, hi, bins, log) for c in v.split(4000))
        assert torch.equal(got, by_value)
        if not log:
            assert torch.equal(got, composite("histogram")(v, lo, hi, bins, log))
        assert int(got.sum()) == int(((v >= lo) & (v <= hi) & ((v > 0) if log else True)).sum())

    def test_single_bin_counts_everything_in_range(self, gen):
        v = randn(1000, gen=gen)
        got = cpp("histogram")(v, -1.0, 1.0, 1, False)
        assert got.tolist() == [int(((v >= -1) & (v <= 1)).sum())]

    def test_empty_values(self):
        assert cpp("histogram")(torch.zeros(0), 0.0, 1.0, 5, False).tolist() == [0] * 5

    def test_strided_values(self, gen):
        v = randn(200, 2, gen=gen)[:, 1]  # (200,), stride 2
        torch.testing.assert_close(cpp("histogram")(v, -2.0, 2.0, 9, False), composite("histogram")(v, -2.0, 2.0, 9, False))

    @pytest.mark.parametrize(
        "lo,hi,bins,log,message",
        [
            (1.0, 1.0, 4, False, "need finite lo < hi, got lo=1 hi=1"),
            (0.0, 1.0, 4, True, "log bins need lo > 0, got lo=0"),
            (0.0, 1.0, 0, False, "bins must be >= 1, got 0"),
            (0.0, float("inf"), 4, False, "need finite lo < hi"),
        ],
    )
    def test_bad_arguments(self, lo, hi, bins, log, message):
        with pytest.raises(RuntimeError, match=message):
            cpp("histogram")(torch.ones(3), lo, hi, bins, log)

    def test_values_must_be_1d(self):
        with pytest.raises(RuntimeError, match=r"values must be 1-D, got shape \[2, 2\]"):
            cpp("histogram")(torch.ones(2, 2), 0.0, 1.0, 3, False)


# --------------------------------------------------------------------------- centered_gram


@needs_extension
class TestCenteredGram:
    # (L, n, d): n < d and n > d, n across the 256-row blocks, L = 1 and L > 1
    SHAPES = [(1, 37, 53), (3, 29, 5), (2, 301, 7), (1, 517, 19)]

    @pytest.mark.parametrize("unbiased", [False, True], ids=["centred", "ucentred"])
    def test_exact_structure(self, gen, unbiased):
        got = cpp("centered_gram")(randn(1, 300, 9, gen=gen), unbiased)[0][0]
        assert torch.equal(got, got.T)  # mirrored blocks: exactly symmetric
        if unbiased:
            assert torch.all(got.diagonal() == 0)
        # K 1 = 0 (H K H and U-centring alike): every entry is K_ij - u_i - u_j, three terms of size
        # <= max |K| each rounded once (4 u max |K| with the GEMM's own), so a row sum of 300 of them is
        # at most 300 * 12 u max |K| (worst case, u = 2^-24)
        assert float(got.double().sum(1).abs().max()) <= 300 * 12 * 2.0**-24 * float(got.abs().max())

    @pytest.mark.parametrize("unbiased", [False, True], ids=["centred", "ucentred"])
    @pytest.mark.parametrize("offset", [1e3, 1e6])
    def test_large_offsets_keep_precision(self, gen, unbiased, offset):
        x = randn(1, 83, 31, gen=gen, dtype=torch.float64)
        x[..., :3] += offset  # "massive activations"
        got, _ = cpp("centered_gram")(x.float(), unbiased)
        # centred in float64 and rounded once: the offset costs nothing, float32 work only
        assert max_rel_diff(got[0], centered_gram_ref(x[0].float(), unbiased)) < TOL[torch.float32]

    @pytest.mark.parametrize("unbiased", [False, True], ids=["centred", "ucentred"])
    def test_scale_is_exact(self, gen, unbiased):
        x = randn(2, 40, 9, gen=gen, dtype=torch.float64)
        scale = torch.tensor([2.0**-70, 2.0**40], dtype=torch.float64)
        got, trace = cpp("centered_gram")(x, unbiased, scale)
        plain, plain_trace = cpp("centered_gram")(x, unbiased)
        # a power of two only moves exponents: every entry is the unscaled one times scale^2, exactly
        assert torch.equal(got, plain * scale.square().view(2, 1, 1))
        assert torch.equal(trace, plain_trace * scale.square())

    @pytest.mark.parametrize("unbiased", [False, True], ids=["centred", "ucentred"])
    def test_constant_float64_columns_centre_to_zero(self, unbiased):
        # the float64 mean of 7 copies of 0.1 is not exactly 0.1; the doubly centred Gram is zero anyway,
        # to rounding of the tiny residual rows (entries of size |x - mean|^2 d ~ (u 0.1)^2)
        x = torch.full((1, 7, 5), 0.1, dtype=torch.float64)
        got, trace = cpp("centered_gram")(x, unbiased)
        assert float(got.abs().max()) <= 16 * 2.0**-53 * float(trace[0])

    @pytest.mark.parametrize("unbiased", [False, True], ids=["centred", "ucentred"])
    def test_equals_composite(self, gen, unbiased):
        x = randn(2, 270, 33, gen=gen)
        want, want_trace = composite("centered_gram")(x, unbiased)
        got, trace = cpp("centered_gram")(x, unbiased)
        # both are float32 Grams of the same rows (float64- vs float32-centred): TOL[float32] of max |K| apart
        torch.testing.assert_close(got, want, rtol=0, atol=TOL[torch.float32] * float(want.abs().max()))
        torch.testing.assert_close(trace, want_trace, rtol=TOL[torch.float32], atol=0)

    def test_strided_input(self, gen):
        x = randn(1, 12, 40, gen=gen).transpose(1, 2)  # (1, 40, 12) non-contiguous
        assert max_rel_diff(cpp("centered_gram")(x, True)[0][0], centered_gram_ref(x[0], True)) < TOL[torch.float32]

    def test_bad_input(self):
        with pytest.raises(RuntimeError, match=r"x must be \(L, n, d\), got shape \[3, 4\]"):
            cpp("centered_gram")(torch.zeros(3, 4), False)
        with pytest.raises(RuntimeError, match="at least 3 rows for unbiased=1"):
            cpp("centered_gram")(torch.zeros(1, 2, 4), True)
        with pytest.raises(RuntimeError, match="x must have a floating dtype, got Int"):
            cpp("centered_gram")(torch.zeros(1, 5, 4, dtype=torch.int32), False)
        with pytest.raises(RuntimeError, match=r"scale must be a floating CPU tensor of shape \[1\]"):
            torch.ops.repforget.centered_gram(torch.zeros(1, 5, 4), False, torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------- missing extension


class TestMissingExtension:
    def test_warns_once_and_falls_back_to_torch(self, monkeypatch):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, "repforget_kernels._C", None)  # `import repforget_kernels._C` now fails
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                importlib.reload(_cpp_ops)
                ok, why = _cpp_ops.available()
                ops = {op: _dispatch.kernel(OPS[op], CPU) for op in ("square_accumulate", "histogram", "centered_gram")}
                ops_again = {op: _dispatch.kernel(OPS[op], CPU) for op in ops}
            assert not ok
            assert "repforget_kernels._C" in why and "pip install --no-build-isolation -e ." in why
            messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]
            for op in ops:
                assert ops[op] is ops_again[op] is composite(op)
            with pytest.raises(ValueError, match="backend='cpp' cannot run here"):
                _dispatch.kernel(OPS["histogram"], CPU, "cpp")
            v = torch.tensor([0.1, 0.6, 1.0])
            assert ops["histogram"](v, 0.0, 1.0, 2, False).tolist() == [1, 2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.reload(_cpp_ops)  # back to the real state of this build
        assert _cpp_ops.available()[0] == (importlib.util.find_spec("repforget_kernels._C") is not None)
