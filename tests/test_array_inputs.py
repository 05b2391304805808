"""Every public metric takes NumPy arrays (and anything torch.as_tensor takes) as well as tensors.

One table of the public functions drives every test: the result for NumPy input equals, exactly, the
result for the same values as CPU tensors, and it is a tensor (or a tuple of tensors) of the same dtype;
float64 arrays stay float64; ragged lists, object arrays and strings are refused naming the argument.
NumPy lives on the CPU, so these tests run on CPU tensors whatever REPFORGET_TEST_DEVICE says.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

from repforget_kernels import (
    StreamingCKA,
    cka_matrix,
    fisher_accumulate_,
    fisher_histogram,
    linear_cka,
    pca_shift,
    pca_similarity,
    per_sample_linear_fisher,
    pool_tokens,
    randomized_pca,
)


class Case(NamedTuple):
    name: str
    call: Callable  # (*inputs) -> result
    inputs: Callable  # np.random.Generator -> list of float64 arrays (the first is the one made bad)
    first_arg: str  # the name the errors must give for the first input


def _rows(rng, *shape):
    return rng.standard_normal(shape) + 3.0  # an offset, so centring matters


def _streaming(x, y):
    return StreamingCKA().update(x[:5], y[:5]).update(x[5:], y[5:]).compute()


def _accumulate(grad):
    acc = torch.full((4, 3), 0.25, dtype=torch.float64)  # the table's grad shape
    return fisher_accumulate_(acc, grad, scale=0.5)


CASES = [
    Case("linear_cka", lambda x, y: linear_cka(x, y), lambda r: [_rows(r, 11, 3), _rows(r, 11, 4)], "x"),
    Case("linear_cka_debiased_gram", lambda x, y: linear_cka(x, y, debiased=True, method="gram"),
         lambda r: [_rows(r, 2, 9, 5), _rows(r, 2, 9, 4)], "x"),
    Case("cka_matrix_stack", lambda xs, ys: cka_matrix(xs, ys), lambda r: [_rows(r, 3, 8, 2), _rows(r, 2, 8, 3)], "xs"),
    Case("cka_matrix_feature", lambda xs, ys: cka_matrix(xs, ys, method="feature"),
         lambda r: [_rows(r, 2, 8, 2), _rows(r, 2, 8, 3)], "xs"),
    Case("StreamingCKA.update", _streaming, lambda r: [_rows(r, 12, 3), _rows(r, 12, 2)], "x"),
    Case("randomized_pca", lambda x: randomized_pca(x, 2), lambda r: [_rows(r, 13, 5)], "x"),
    Case("pca_similarity", lambda a, b: pca_similarity(a, b, k=2), lambda r: [_rows(r, 10, 4), _rows(r, 12, 4)], "x_ref"),
    Case("pca_shift", lambda a, b: pca_shift(a, b, k=2, normalize=True),
         lambda r: [_rows(r, 10, 4), _rows(r, 12, 4)], "x_ref"),
    Case("fisher_accumulate_", _accumulate, lambda r: [r.standard_normal((4, 3))], "grad"),
    Case("per_sample_linear_fisher", lambda x, g, m: per_sample_linear_fisher(x, g, mask=m),
         lambda r: [r.standard_normal((2, 3, 4)), r.standard_normal((2, 3, 5)), np.array([[1, 1, 0], [1, 0, 0]])], "x"),
    Case("fisher_histogram", lambda v: fisher_histogram(v, bins=7), lambda r: [r.random(50) + 0.1], "values"),
    Case("pool_tokens", lambda h, m: pool_tokens(h, m), lambda r: [_rows(r, 2, 4, 3), np.array([[1, 1, 1, 0], [0, 1, 1, 1]])],
         "hidden"),
]
IDS = [c.name for c in CASES]


def _tensors(result) -> list:
    """The tensors of a result: itself, or the fields of a tuple result (PCAResult, FisherHistogram)."""
    return [result] if isinstance(result, torch.Tensor) else list(result)


def _as_torch(a):
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _cast(a, dtype):
    return a.astype(dtype) if a.dtype.kind == "f" else a  # masks stay integer


@pytest.mark.parametrize("case", CASES, ids=IDS)
class TestNumpyInputs:
    @pytest.mark.parametrize("dtype", [np.float64, np.float32])
    def test_same_result_as_tensors(self, case, dtype):
        arrays = [_cast(a, dtype) for a in case.inputs(np.random.default_rng(3))]
        got = case.call(*arrays)
        want = case.call(*[_as_torch(a) for a in arrays])
        assert type(got) is type(want)
        got_t, want_t = _tensors(got), _tensors(want)
        assert len(got_t) == len(want_t)
        for g, w in zip(got_t, want_t):
            assert isinstance(g, torch.Tensor)
            assert g.dtype == w.dtype and g.device == w.device
            assert torch.equal(g, w)

    def test_float64_stays_float64(self, case):
        got = _tensors(case.call(*case.inputs(np.random.default_rng(4))))
        floats = [t for t in got if t.dtype.is_floating_point]
        assert floats and all(t.dtype == torch.float64 for t in floats)

    def test_nested_lists(self, case):
        arrays = case.inputs(np.random.default_rng(5))
        got = case.call(arrays[0].tolist(), *arrays[1:])
        want = case.call(torch.tensor(arrays[0].tolist()), *[_as_torch(a) for a in arrays[1:]])
        for g, w in zip(_tensors(got), _tensors(want)):
            assert torch.equal(g, w)

    def test_ragged_list_is_refused(self, case):
        rest = case.inputs(np.random.default_rng(6))[1:]
        ragged = [[[1.0, 2.0], [3.0]], [[4.0, 5.0], [6.0, 7.0]]]  # ragged inside one layer for cka_matrix too
        with pytest.raises(ValueError, match=rf"{case.first_arg}\S* is not a rectangular array"):
            case.call(ragged, *rest)

    @pytest.mark.parametrize("bad", [np.array([1.0, "a", None], dtype=object), np.array(["a", "b"]), "abc"],
                             ids=["object", "strings", "str"])
    def test_non_numbers_are_refused(self, case, bad):
        rest = case.inputs(np.random.default_rng(7))[1:]
        with pytest.raises(TypeError, match=rf"{case.first_arg}\S* must be a tensor or an array of numbers"):
            case.call(bad, *rest)
