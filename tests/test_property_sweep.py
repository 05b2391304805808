"""Property sweep: every CKA / PCA entry point over random shapes, column offsets (0 to 1e6), scales
(1e-20 to 1e8), dtypes and backends, against the float64 references on the rounded inputs (the PCA
references refined in exact arithmetic for float64 values: conftest.pca_truth).

Each example asserts one of two outcomes:
- a result within the accuracy bound its docstring documents, computed here from the float64
  reference on the same rounded values (the condition factor of ``linear_cka``, the spectral gaps
  of ``randomized_pca``), the working precision and the sizes;
- a ValueError, allowed only where the reference itself finds the input within rounding of
  degenerate (no variance, a self-HSIC at rounding level, a PCA rank below k), and required where
  it is exactly degenerate (constant rows, and for debiased CKA rows all equal but one).

Deterministic (``derandomize=True``; data drawn from seeded generators); Triton runs under the
interpreter on a few small cases only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import DEVICE, assert_pca_fit, available_backends, cka_bound, exact_reference, pca_bounds
from repforget_kernels import StreamingCKA, cka_matrix, linear_cka, pca_shift, pca_similarity, randomized_pca
from repforget_kernels import reference as R
from repforget_kernels._numerics import ZERO_TEST_FACTOR, unit_roundoff

BACKENDS = available_backends()
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SWEEP = dict(derandomize=True, deadline=None, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# An input may raise only if the reference puts its self-HSIC (or PCA variance) within this factor of
# the library's own zero test, and must raise when the reference puts it 100x below the test.
RAISE_MARGIN = 100.0


def _backends(fast: bool) -> list:
    """The backends of one sweep: every CPU backend, or Triton alone (interpreter: few, small cases)."""
    return [b for b in BACKENDS if (b != "triton") == fast]


def _representable(x64: torch.Tensor, dtype: torch.dtype) -> bool:
    """The values fit the dtype without overflow, and the unit-spread part is not below its normal range."""
    info = torch.finfo(dtype)
    return float(x64.abs().max()) < info.max / 4 and float(x64.std()) > info.tiny * 2**12


def _offset_and_scale(draw, gen: torch.Generator, d: int) -> tuple[torch.Tensor, float]:
    """A column offset pattern (d,) float64 (0 to 1e6 on about half the columns, random signs) and a scale."""
    offset = draw(st.sampled_from([0.0, 1.0, 1e2, 1e4, 1e5, 1e6]))
    cols = torch.rand(d, generator=gen) < 0.5  # the columns that carry an offset
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return offset * cols * signs, 10.0 ** draw(st.integers(-20, 8))


@st.composite
def acts(draw, n: int, d: int, *, lead=()):
    """((lead..., n, d) float64 activations: Gaussian rows, column offsets, a global scale; their generator)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(*lead, n, d, generator=gen, dtype=torch.float64)
    offset, scale = _offset_and_scale(draw, gen, d)
    return (z + offset) * scale, gen


def _degenerate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Constant rows, or rows all equal but the first (float64, same shape)."""
    x = x.clone()
    if kind == "constant":
        x[..., :, :] = x[..., :1, :]
    elif kind == "one_row":
        x[..., 1:, :] = x[..., 1:2, :]
    return x


# --------------------------------------------------------------------------- CKA


def _check_cka(call, x: torch.Tensor, y: torch.Tensor, debiased: bool, method: str, backend: str,
               dtypes=None) -> None:
    """call() -> CKA of x, y ((n, d), the values given), within the documented bound or a justified ValueError.

    Bound (linear_cka, conftest.cka_bound): 4 (sqrt(m) u_acc + 2 u_op) kappa, plus the result's rounding.
    """
    dtypes = (x.dtype, y.dtype) if dtypes is None else dtypes
    cond = R.linear_cka_condition_ref(x.double(), y.double(), debiased, method)
    selfish = min(cond["self_x"], cond["self_y"])
    zero_test = ZERO_TEST_FACTOR * unit_roundoff(torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32)
    try:
        got = float(call())
    except ValueError as exc:
        assert "no variance" in str(exc), exc
        assert selfish <= RAISE_MARGIN * zero_test, f"raised for a self-HSIC {selfish:.3g} of its rounding scale"
        event("CKA: ValueError")
        return
    assert selfish > zero_test / RAISE_MARGIN, f"no ValueError for a degenerate input (self {selfish:.3g})"
    want = R.linear_cka_ref(x, y, debiased)
    tol = cka_bound(x, y, debiased=debiased, method=method, backend=backend, dtypes=dtypes)
    assert abs(got - want) <= tol, f"CKA {got} vs {want}: error {abs(got - want):.3g} > bound {tol:.3g}"
    event("CKA: compared")


def _pair(draw, n, dx, dy, dtype, lead=()):
    x64, gen = draw(acts(n, dx, lead=lead))
    y64, _ = draw(acts(n, dy, lead=lead))
    y64 = y64 + 0.7 * x64[..., :1] / x64[..., :1].abs().max().clamp_min(1e-300) * y64.abs().max()  # correlated
    kind = draw(st.sampled_from(["none"] * 6 + ["constant", "one_row"]))
    if kind != "none":
        x64 = _degenerate(x64, kind)
    assume(_representable(x64, dtype) and _representable(y64, dtype))
    return x64.to(DEVICE, dtype), y64.to(DEVICE, dtype)


def _cka_case(draw, fast: bool):
    backend = draw(st.sampled_from(_backends(fast)))
    big = 48 if fast else 16
    n = draw(st.integers(4, big))
    dx, dy = draw(st.integers(1, big // 2)), draw(st.integers(1, big // 2))
    dtype = draw(st.sampled_from(DTYPES))
    return backend, n, dx, dy, dtype


def _sweep_linear_cka(data, fast: bool):
    backend, n, dx, dy, dtype = _cka_case(data.draw, fast)
    debiased, method = data.draw(st.booleans()), data.draw(st.sampled_from(["feature", "gram"]))
    batched = data.draw(st.booleans())
    x, y = _pair(data.draw, n, dx, dy, dtype, lead=(2,) if batched else ())
    got = None
    try:
        got = linear_cka(x, y, debiased=debiased, method=method, backend=backend)
    except ValueError:
        pass
    for b in range(2 if batched else 1):
        xb, yb = (x[b], y[b]) if batched else (x, y)
        value = None if got is None else (got[b] if batched else got)

        def call(xb=xb, yb=yb, value=value):
            return linear_cka(xb, yb, debiased=debiased, method=method, backend=backend) if value is None else value
        _check_cka(call, xb, yb, debiased, method, backend)


def _sweep_test(sweep, fast: bool, examples: int):
    """A hypothesis test running ``sweep(data, fast)`` on ``examples`` cases, skipped without its backends."""
    @pytest.mark.skipif(not _backends(fast), reason="no CPU backend" if fast else "triton cannot run here")
    @settings(max_examples=examples, **SWEEP)
    @given(st.data())
    def test(data):
        sweep(data, fast)
    return test


# CPU backends on many cases; Triton (interpreter) on a few small ones
test_linear_cka = _sweep_test(_sweep_linear_cka, True, 150)
test_linear_cka_triton = _sweep_test(_sweep_linear_cka, False, 12)


@pytest.mark.skipif(not _backends(True), reason="no CPU backend")
@settings(max_examples=50, **SWEEP)
@given(st.data())
def test_cka_matrix(data):
    backend, n, dx, _, dtype = _cka_case(data.draw, True)
    debiased, method = data.draw(st.booleans()), data.draw(st.sampled_from(["feature", "gram"]))
    widths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    layers = [data.draw(acts(n, w))[0] for w in widths]
    kind = data.draw(st.sampled_from(["none"] * 4 + ["constant", "one_row"]))
    if kind != "none":
        layers[-1] = _degenerate(layers[-1], kind)
    assume(all(_representable(t, dtype) for t in layers))
    layers = [t.to(DEVICE, dtype) for t in layers]
    try:
        got = cka_matrix(layers, debiased=debiased, method=method, backend=backend)
    except ValueError as exc:
        got = exc
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            value = got if isinstance(got, ValueError) else got[i, j]

            def call(value=value, a=a, b=b):
                if isinstance(value, ValueError):  # the matrix raised: this pair must be undefined or near it
                    return linear_cka(a, b, debiased=debiased, method="feature", backend="torch")
                return value
            _check_cka(call, a, b, debiased, method, backend)


@pytest.mark.skipif(not _backends(True), reason="no CPU backend")
@settings(max_examples=40, **SWEEP)
@given(st.data())
def test_streaming_cka(data):
    backend = data.draw(st.sampled_from(_backends(True)))
    n, dx, dy = data.draw(st.integers(4, 60)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    debiased = data.draw(st.booleans())
    x64, gen = data.draw(acts(n, dx))
    y64 = data.draw(acts(n, dy))[0] + x64[:, :1] * 0.5
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=5))))
    bounds = [0] + cuts + [n]
    dtypes = [data.draw(st.sampled_from(DTYPES[:3])) for _ in bounds[1:]]  # float64 / float32 / bf16 chunks
    chunks = [(x64[a:b], y64[a:b]) for a, b in zip(bounds, bounds[1:])]
    assume(all(_representable(c, dt) for (cx, cy), dt in zip(chunks, dtypes) for c in (cx, cy)
               if c.shape[0] > 1))
    s = StreamingCKA(debiased=debiased, backend=backend)
    rounded = []
    for (cx, cy), dt in zip(chunks, dtypes):
        s.update(cx.to(DEVICE, dt), cy.to(DEVICE, dt))
        rounded.append((cx.to(dt).double(), cy.to(dt).double()))
    xr, yr = torch.cat([r[0] for r in rounded]), torch.cat([r[1] for r in rounded])
    _check_cka(s.compute, xr, yr, debiased, "feature", backend, dtypes=dtypes)


# --------------------------------------------------------------------------- PCA


def _gapped(draw, n: int, d: int, k: int):
    """(n, d) data with a spectral gap after k (singular values 10 2^-i, then 0.01 2^-i), column offsets, a scale."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = min(n, d)
    u = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q  # (n, r)
    v = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q  # (d, r)
    s = torch.cat([10.0 * 0.5 ** torch.arange(k, dtype=torch.float64),
                   0.01 * 0.5 ** torch.arange(r - k, dtype=torch.float64)])  # (r,)
    offset, scale = _offset_and_scale(draw, gen, d)
    return ((u * s) @ v.T + offset) * scale  # (n, d)


def _pca_may_raise(exc: ValueError, xr: np.ndarray, k: int, u: float) -> None:
    """A PCA ValueError is justified when the reference has no variance or a top-k variance near rounding."""
    var = R.pca_gaps_ref(xr, k)["var"]
    msg = str(exc)
    assert "no variance" in msg or "rank-deficient" in msg, msg
    assert var[0] == 0 or var[k - 1] <= RAISE_MARGIN * ZERO_TEST_FACTOR * u * var[0], (msg, var[:k])
    event(f"PCA: ValueError ({'no variance' if 'no variance' in msg else 'rank'})")


def _pca_case(draw, fast: bool):
    backend = draw(st.sampled_from(_backends(fast)))
    big = 40 if fast else 14
    n, d = draw(st.integers(3, big)), draw(st.integers(2, big))
    k = draw(st.integers(1, min(3, n - 1, d)))
    dtype = draw(st.sampled_from(DTYPES))
    return backend, n, d, k, dtype


def _sweep_randomized_pca(data, fast: bool):
    backend, n, d, k, dtype = _pca_case(data.draw, fast)
    x64 = _gapped(data.draw, n, d, k)
    if data.draw(st.sampled_from(["none"] * 7 + ["constant"])) == "constant":
        x64 = _degenerate(x64, "constant")
    assume(_representable(x64, dtype) or float(x64.std()) == 0)
    x = x64.to(DEVICE, dtype)
    xr = R.to_f64(x)
    u = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        got = randomized_pca(x, k, backend=backend)
    except ValueError as exc:
        _pca_may_raise(exc, xr, k, u)
        return
    b = pca_bounds(x, k)
    assert b["var"][k - 1] > ZERO_TEST_FACTOR * u * b["var"][0] / RAISE_MARGIN, "no ValueError for rank < k"
    event("PCA: compared")
    assert_pca_fit(got, x, k, signs=False)  # random data: near-ties of a component's largest entries


test_randomized_pca = _sweep_test(_sweep_randomized_pca, True, 80)
test_randomized_pca_triton = _sweep_test(_sweep_randomized_pca, False, 6)


def _pca_pair(data):
    backend, n, d, k, dtype = _pca_case(data.draw, True)
    x64 = _gapped(data.draw, n, d, k)
    n2 = data.draw(st.integers(max(3, k + 1), n + 5))
    y64 = _gapped(data.draw, n2, d, k)
    assume(_representable(x64, dtype) and _representable(y64, dtype))
    return backend, k, dtype, x64.to(DEVICE, dtype), y64.to(DEVICE, dtype)


@pytest.mark.skipif(not _backends(True), reason="no CPU backend")
@settings(max_examples=50, **SWEEP)
@given(st.data())
def test_pca_similarity(data):
    backend, k, dtype, x, y = _pca_pair(data)
    xr, yr = R.to_f64(x), R.to_f64(y)
    u = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        got = float(pca_similarity(x, y, k=k, backend=backend))
    except ValueError as exc:
        _pca_may_raise(exc, xr if "x_ref" in str(exc) else yr, k, u)
        return
    bx, by = pca_bounds(x, k), pca_bounds(y, k)
    out_u = bx["out_u"]
    # cosines of principal angles are 1-Lipschitz in the subspaces' own angle errors
    tol = (bx["angle"][0] + by["angle"][0]) if k == 1 else (bx["subspace"] + by["subspace"])
    event("PCA: compared")
    assert abs(got - R.pca_similarity_ref(xr, yr, k, refine=exact_reference(x))) <= tol + out_u


@pytest.mark.skipif(not _backends(True), reason="no CPU backend")
@settings(max_examples=50, **SWEEP)
@given(st.data())
def test_pca_shift(data):
    backend, k, dtype, x, y = _pca_pair(data)
    normalize = data.draw(st.booleans())
    xr, yr = R.to_f64(x), R.to_f64(y)
    u = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        got = R.to_f64(pca_shift(x, y, k=k, normalize=normalize, backend=backend))
    except ValueError as exc:
        assert "x_ref" in str(exc)
        _pca_may_raise(exc, xr, k, u)
        return
    b = pca_bounds(x, k)
    event("PCA: compared")
    want = R.pca_shift_ref(xr, yr, k, normalize, refine=exact_reference(x))
    delta = np.linalg.norm(yr.mean(0) - xr.mean(0))  # |mean difference|
    out_u = b["out_u"]
    comps = R.pca_ref(xr, k)["components"]
    for i in range(k):
        scale_i = 1.0 / math.sqrt(b["var"][i]) if normalize else 1.0
        tol = b["angle"][i] * delta * scale_i + (b["ev"][i] / 2 if normalize else 0.0) * abs(want[i]) + out_u * abs(want[i])
        top2 = np.sort(np.abs(comps[i]))[-2:]
        if top2[1] - top2[0] <= 2 * b["angle"][i]:  # the sign rule's largest entry is a tie: the sign is undefined
            event("PCA shift: sign tie, compared unsigned")
            got_i, want_i = abs(got[i]), abs(want[i])
        else:
            got_i, want_i = got[i], want[i]
        assert abs(got_i - want_i) <= tol + 1e-300, (i, got[i], want[i], tol)
