"""Linear CKA, CKA matrices and streaming CKA against the float64 references, on every backend."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from repforget_kernels import StreamingCKA, cka_matrix, linear_cka
from repforget_kernels import reference as R

from conftest import DTYPE, cka_bound, free_port, gloo_group, randn

# (n, dx, dy): n > d, n < d, odd sizes that are multiples of no block size
SHAPES = [(37, 13, 29), (11, 40, 23), (67, 5, 71)]


def _pair(gen, n, dx, dy, batch=None, dtype=None, offsets=False):
    lead = () if batch is None else (batch,)
    x = randn(*lead, n, dx, gen=gen, dtype=torch.float64)
    y = randn(*lead, n, dy, gen=gen, dtype=torch.float64) + 0.5 * x[..., :1]  # correlated, CKA away from 0
    if offsets:  # LLM "massive activations": a few columns carry a huge constant
        x[..., :3] += 1e3
        y[..., -2:] -= 1e3
    return x.to(dtype or DTYPE), y.to(dtype or DTYPE)


class TestLinearCKA:
    @pytest.mark.parametrize("n,dx,dy", SHAPES)
    @pytest.mark.parametrize("batch", [None, 1, 3])
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("method", ["feature", "gram"])
    def test_matches_reference(self, gen, backend, n, dx, dy, batch, debiased, method):
        x, y = _pair(gen, n, dx, dy, batch)
        got = linear_cka(x, y, debiased=debiased, method=method, backend=backend)
        want = R.linear_cka_ref(x, y, debiased)
        assert got.shape == (() if batch is None else (batch,))
        assert got.dtype == (torch.float64 if DTYPE == torch.float64 else torch.float32)
        tol = cka_bound(x, y, debiased=debiased, method=method, backend=backend)
        np.testing.assert_allclose(R.to_f64(got), want, rtol=0, atol=tol)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("debiased", [False, True])
    def test_half_inputs(self, gen, backend, dtype, debiased):
        x, y = _pair(gen, 45, 19, 33, batch=2, dtype=dtype)
        got = linear_cka(x, y, debiased=debiased, backend=backend)
        assert got.dtype == torch.float32
        # reference on the same rounded values; Triton also rounds the centred operands (u_op in the bound)
        tol = cka_bound(x, y, debiased=debiased, method="feature", backend=backend)
        np.testing.assert_allclose(R.to_f64(got), R.linear_cka_ref(x, y, debiased), rtol=0, atol=tol)

    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("method", ["feature", "gram"])
    def test_large_offsets_keep_precision(self, gen, backend, debiased, method):
        x, y = _pair(gen, 53, 21, 17, offsets=True)
        got = linear_cka(x, y, debiased=debiased, method=method, backend=backend)
        want = R.linear_cka_ref(x, y, debiased)  # on the rounded values: the offsets must cost nothing
        tol = cka_bound(x, y, debiased=debiased, method=method, backend=backend)
        np.testing.assert_allclose(R.to_f64(got), want, rtol=0, atol=tol)

    def test_auto_picks_cheaper_form_and_agrees(self, gen, backend):
        for n, d in ((100, 10), (10, 100)):
            x, y = _pair(gen, n, d, d)
            auto = linear_cka(x, y, backend=backend)
            for method in ("feature", "gram"):
                # both within their bounds of the same reference
                tol = sum(cka_bound(x, y, method=m, backend=backend) for m in ("feature", "gram"))
                torch.testing.assert_close(auto, linear_cka(x, y, method=method, backend=backend), rtol=0, atol=tol)


def _transformed_agrees(tx, y, base_x, debiased: bool, backend: str) -> None:
    """linear_cka(tx, y) equals linear_cka(base_x, y) up to both bounds and the float64 CKA change that
    rounding the transformed input tx to its dtype makes (the transformations are exact invariances)."""
    got = float(linear_cka(tx, y, debiased=debiased, backend=backend))
    base = float(linear_cka(base_x, y, debiased=debiased, backend=backend))
    rounding = abs(R.linear_cka_ref(tx, y, debiased) - R.linear_cka_ref(base_x, y, debiased))
    tol = cka_bound(tx, y, debiased=debiased, backend=backend) + cka_bound(base_x, y, debiased=debiased, backend=backend)
    assert abs(got - base) <= tol + rounding


class TestInvariances:
    @pytest.mark.parametrize("debiased", [False, True])
    def test_orthogonal_and_isotropic_scaling(self, gen, backend, debiased):
        x, y = _pair(gen, 40, 12, 15)
        q = torch.linalg.qr(randn(12, 12, gen=gen, dtype=torch.float64)).Q  # (12, 12) float64
        _transformed_agrees((x.double() @ q).to(x.dtype), y, x, debiased, backend)
        _transformed_agrees((7.5 * x.double()).to(x.dtype), y, x, debiased, backend)
        _transformed_agrees((x.double() + 3.0).to(x.dtype), y, x, debiased, backend)

    @pytest.mark.parametrize("debiased", [False, True])
    def test_self_similarity_is_one(self, gen, backend, debiased):
        x, _ = _pair(gen, 30, 9, 9)
        got = linear_cka(x, x, debiased=debiased, backend=backend)
        assert abs(float(got) - 1.0) <= cka_bound(x, x, debiased=debiased, backend=backend)

    def test_symmetric_and_in_unit_interval(self, gen, backend):
        for n, dx, dy in SHAPES:
            x, y = _pair(gen, n, dx, dy)
            c, c_t = linear_cka(x, y, backend=backend), linear_cka(y, x, backend=backend)
            tol = cka_bound(x, y, backend=backend) + cka_bound(y, x, backend=backend)
            assert abs(float(c) - float(c_t)) <= tol
            assert 0.0 <= float(c) <= 1.0 + cka_bound(x, y, backend=backend)


def _matrix_bounds(xs, ys, debiased: bool, method: str, backend: str) -> np.ndarray:
    """(Lx, Ly) documented bounds of every layer pair (cka_matrix's accuracy is linear_cka's)."""
    return np.array([[cka_bound(a, b, debiased=debiased, method=method, backend=backend) for b in ys] for a in xs])


def _assert_within(got, want, bounds) -> None:
    """|got - want| <= bounds elementwise (arrays of one shape)."""
    err = np.abs(R.to_f64(got) - np.asarray(want))
    assert np.all(err <= bounds), f"errors {err} exceed bounds {bounds}"


class TestCKAMatrix:
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("method", ["gram", "feature"])
    def test_stack_matches_reference(self, gen, backend, debiased, method):
        xs = randn(4, 23, 11, gen=gen)
        ys = randn(3, 23, 7, gen=gen) + xs[:3, :, :1]
        got = cka_matrix(xs, ys, debiased=debiased, method=method, backend=backend)
        assert got.shape == (4, 3)
        _assert_within(got, R.cka_matrix_ref(xs, ys, debiased), _matrix_bounds(xs, ys, debiased, method, backend))

    def test_list_with_different_widths_and_self(self, gen, backend):
        layers = [randn(19, d, gen=gen) for d in (5, 31, 8)]
        got = cka_matrix(layers, backend=backend)
        tol = _matrix_bounds(layers, layers, False, "gram", backend)
        _assert_within(got, R.cka_matrix_ref(layers), tol)
        _assert_within(got.diagonal(), np.ones(3), tol.diagonal())
        # pair (i, j) and (j, i) are the same float64 products and norms: equal up to one float64 rounding
        torch.testing.assert_close(got, got.T, rtol=2.0**-52, atol=0)

    def test_bf16_layers(self, gen, backend):
        xs = randn(3, 29, 13, gen=gen, dtype=torch.bfloat16)
        got = cka_matrix(xs, debiased=True, backend=backend)
        _assert_within(got, R.cka_matrix_ref(xs, None, True), _matrix_bounds(xs, xs, True, "gram", backend))

    def test_offsets(self, gen, backend):
        xs = randn(3, 41, 9, gen=gen, dtype=torch.float64)
        xs[:, :, :2] += 1e3
        xs = xs.to(DTYPE)  # the reference below runs on these rounded values
        got = cka_matrix(xs, debiased=True, backend=backend)
        _assert_within(got, R.cka_matrix_ref(xs, None, True), _matrix_bounds(xs, xs, True, "gram", backend))


def _chunks(n, sizes):
    """Split range(n) into consecutive chunks cycling through ``sizes``."""
    out, i, k = [], 0, 0
    while i < n:
        out.append(slice(i, min(n, i + sizes[k % len(sizes)])))
        i, k = out[-1].stop, k + 1
    return out


class TestStreamingCKA:
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("sizes", [(1,), (7,), (3, 1, 10), (64,)])
    def test_any_chunking_equals_one_shot(self, gen, backend, debiased, sizes):
        x, y = _pair(gen, 47, 14, 9, offsets=True)
        s = StreamingCKA(debiased=debiased, backend=backend)
        for sl in _chunks(47, sizes):
            s.update(x[sl], y[sl])
        assert s.n == 47
        want = R.linear_cka_ref(x, y, debiased)
        tol = cka_bound(x, y, debiased=debiased, backend=backend)  # the feature method's bound
        np.testing.assert_allclose(R.to_f64(s.compute()), want, rtol=0, atol=tol)
        one_shot = linear_cka(x, y, debiased=debiased, method="feature", backend=backend)
        torch.testing.assert_close(s.compute(), one_shot, rtol=0, atol=2 * tol)

    @pytest.mark.parametrize("debiased", [False, True])
    def test_merge_order_does_not_matter(self, gen, backend, debiased):
        x, y = _pair(gen, 60, 8, 12, offsets=True)
        parts = []
        for sl in (slice(0, 5), slice(5, 6), slice(6, 31), slice(31, 60)):
            parts.append(StreamingCKA(debiased=debiased, backend=backend).update(x[sl] * 1.0, y[sl] * 1.0))
        forward = StreamingCKA(debiased=debiased)
        for p in parts:
            forward.merge(p)
        backward = StreamingCKA(debiased=debiased)
        for p in reversed(parts):
            backward.merge(p)
        tree = parts[0].merge(parts[3]).merge(parts[1].merge(parts[2]))
        want = R.linear_cka_ref(x, y, debiased)
        tol = cka_bound(x, y, debiased=debiased, backend=backend)
        for s in (forward, backward, tree):
            assert s.n == 60
            np.testing.assert_allclose(R.to_f64(s.compute()), want, rtol=0, atol=tol)

    def test_merge_across_dtypes_and_large_offsets(self, gen, backend):
        x, y = _pair(gen, 50, 9, 7, dtype=torch.float64)
        x[:, 0] += 12345.678  # an offset float32 cannot hold exactly
        a = StreamingCKA(debiased=True, backend=backend).update(x[:20].float(), y[:20].float())
        b = StreamingCKA(debiased=True, backend=backend).update(x[20:], y[20:])
        merged = a.merge(b)
        assert merged.compute().dtype == torch.float64  # any float64 chunk makes the result float64
        xr, yr = torch.cat([x[:20].float().double(), x[20:]]), torch.cat([y[:20].float().double(), y[20:]])
        want = R.linear_cka_ref(xr, yr, True)  # on the values given (the float32 chunk rounded)
        tol = cka_bound(xr, yr, debiased=True, backend=backend, dtypes=(torch.float32, torch.float64))
        np.testing.assert_allclose(R.to_f64(merged.compute()), want, rtol=0, atol=tol)

    def test_layers_mode_and_state_dict(self, gen, backend):
        x = randn(3, 33, 10, gen=gen)
        y = randn(3, 33, 6, gen=gen) + x[..., :1]
        s = StreamingCKA(layers=3, debiased=True, backend=backend)
        for sl in _chunks(33, (4, 9)):
            s.update(x[:, sl], y[:, sl])
        np.testing.assert_allclose(R.to_f64(s.compute()), R.linear_cka_ref(x, y, True), rtol=0,
                                   atol=cka_bound(x, y, debiased=True, backend=backend))
        restored = StreamingCKA(layers=3, debiased=True).load_state_dict(s.state_dict())
        torch.testing.assert_close(restored.compute(), s.compute())
        with pytest.raises(ValueError, match="state_dict is for StreamingCKA"):
            StreamingCKA(layers=2).load_state_dict(s.state_dict())

    def test_bf16_chunks(self, gen, backend):
        x, y = _pair(gen, 40, 11, 13, dtype=torch.bfloat16)
        s = StreamingCKA(debiased=True, backend=backend)
        for sl in _chunks(40, (6,)):
            s.update(x[sl], y[sl])
        assert s.compute().dtype == torch.float32
        np.testing.assert_allclose(R.to_f64(s.compute()), R.linear_cka_ref(x, y, True), rtol=0,
                                   atol=cka_bound(x, y, debiased=True, backend=backend))

    def test_errors(self, gen):
        s = StreamingCKA()
        with pytest.raises(ValueError, match="before any update"):
            s.compute()
        s.update(randn(1, 4, gen=gen), randn(1, 3, gen=gen))
        with pytest.raises(ValueError, match="at least 2"):
            s.compute()
        with pytest.raises(ValueError, match="do not match the state"):
            s.update(randn(2, 5, gen=gen), randn(2, 3, gen=gen))
        with pytest.raises(ValueError, match=r"must be \(3, n_chunk, d\)"):
            StreamingCKA(layers=3).update(randn(4, 5, gen=gen), randn(4, 5, gen=gen))
        with pytest.raises(ValueError, match="cannot merge"):
            StreamingCKA(debiased=True).merge(s)
        with pytest.raises(ValueError, match="layers must be"):
            StreamingCKA(layers=0)


def _all_reduce_worker(rank, world, port, x, y, out):
    with gloo_group(rank, world, port):
        s = StreamingCKA(layers=2, debiased=True)
        rows = range(rank * 5, x.shape[1], world * 5)  # interleaved chunks of 5 rows; rank 2 of 3 sees none
        for start in rows:
            if rank < 2:
                s.update(x[:, start:start + 5], y[:, start:start + 5])
        s.all_reduce()
        out[rank] = s.compute()


class TestAllReduce:
    def test_three_gloo_ranks_equal_one_process(self, gen):
        x = randn(2, 43, 7, gen=gen, dtype=torch.float32)
        y = randn(2, 43, 5, gen=gen, dtype=torch.float32) + x[..., :1] + 100.0
        world, port = 3, free_port()
        out = torch.multiprocessing.Manager().dict()
        torch.multiprocessing.spawn(_all_reduce_worker, args=(world, port, x, y, out), nprocs=world, join=True)
        seen = torch.cat([torch.arange(s, min(s + 5, 43)) for r in range(2) for s in range(r * 5, 43, world * 5)])
        want = R.linear_cka_ref(x[:, seen].double(), y[:, seen].double(), True)
        tol = cka_bound(x[:, seen], y[:, seen], debiased=True)
        for rank in range(world):
            np.testing.assert_allclose(R.to_f64(out[rank]), want, rtol=0, atol=tol)


class TestBadInput:
    def test_row_mismatch(self, gen):
        with pytest.raises(ValueError, match=r"same batch and row dimensions, got x \(5, 3\) and y \(6, 3\)"):
            linear_cka(randn(5, 3, gen=gen), randn(6, 3, gen=gen))

    def test_one_dimensional(self, gen):
        with pytest.raises(ValueError, match=r"x must be \(n, d\) or \(B, n, d\).*got shape \(5,\)"):
            linear_cka(randn(5, gen=gen), randn(5, 2, gen=gen))

    def test_too_few_rows(self, gen):
        with pytest.raises(ValueError, match=r"x needs at least 2 rows .*got shape \(1, 3\)"):
            linear_cka(randn(1, 3, gen=gen), randn(1, 3, gen=gen))
        with pytest.raises(ValueError, match=r"x needs at least 4 rows .*got shape \(3, 3\)"):
            linear_cka(randn(3, 3, gen=gen), randn(3, 3, gen=gen), debiased=True)

    def test_nan_and_inf(self, gen):
        x = randn(6, 3, gen=gen)
        x[2, 1] = float("nan")
        with pytest.raises(ValueError, match="x contains 1 NaN or Inf"):
            linear_cka(x, randn(6, 2, gen=gen))
        y = randn(6, 2, gen=gen)
        y[0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"ys\[0\] contains 1 NaN or Inf"):
            cka_matrix([randn(6, 2, gen=gen)], [y])

    def test_integer_dtype_and_non_tensor(self):
        with pytest.raises(TypeError, match="x must have a floating dtype"):
            linear_cka(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3))
        with pytest.raises(TypeError, match="y must be a tensor or an array of numbers"):
            linear_cka(torch.ones(4, 3), {"y": 1.0})

    def test_devices_differ(self, gen):
        with pytest.raises(ValueError, match="one device, got x on cpu, y on meta"):
            linear_cka(randn(4, 3, gen=gen, device="cpu"), torch.empty(4, 3, device="meta"))

    def test_constant_input_is_undefined_not_nan(self, gen):  # every backend and dtype: test_precision
        with pytest.raises(ValueError, match="x has no variance"):
            linear_cka(torch.ones(8, 3), randn(8, 3, gen=gen))

    def test_unknown_method_and_backend(self, gen):
        x = randn(6, 3, gen=gen)
        with pytest.raises(ValueError, match="method must be"):
            linear_cka(x, x, method="fast")
        with pytest.raises(ValueError, match="backend must be one of"):
            linear_cka(x, x, backend="opencl")

    @pytest.mark.parametrize("method", ["gram", "feature"])
    def test_cka_matrix_names_the_constant_layer(self, gen, method):
        xs = randn(3, 8, 4, gen=gen)
        xs[2] = 1.0
        with pytest.raises(ValueError, match=r"xs has no variance .* index \[2\]" if method == "gram" else r"\(xs\[0\], xs\[2\]\): y has no variance"):
            cka_matrix(xs, method=method)
        ys = randn(2, 8, 3, gen=gen)
        ys[1] = 0.0
        with pytest.raises(ValueError, match=r"ys has no variance .* index \[1\]" if method == "gram" else r"\(xs\[0\], ys\[1\]\): y has no variance"):
            cka_matrix(randn(3, 8, 4, gen=gen), ys, method=method)

    def test_cka_matrix_layers_disagree(self, gen):
        with pytest.raises(ValueError, match=r"same number of rows: xs\[0\] has shape \(5, 2\), xs\[1\] has shape \(6, 2\)"):
            cka_matrix([randn(5, 2, gen=gen), randn(6, 2, gen=gen)])
        with pytest.raises(ValueError, match="xs is empty"):
            cka_matrix([])

    def test_env_backend_checked(self, gen, monkeypatch):
        monkeypatch.setenv("REPFORGET_BACKEND", "nope")
        with pytest.raises(ValueError, match="REPFORGET_BACKEND must be one of"):
            linear_cka(randn(5, 2, gen=gen), randn(5, 2, gen=gen))
