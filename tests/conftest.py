"""Shared fixtures.

Environment knobs (repsim-style reruns of the whole suite):
  REPFORGET_TEST_DEVICE=cuda   run every metric test on CUDA tensors (default: cpu)
  REPFORGET_TEST_DTYPE=float64 run the float32 tests in float64 instead

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run (slowly) on CPU tensors and are tested like every other backend.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from repforget_kernels._dispatch import BACKENDS, backend_available  # noqa: E402
from repforget_kernels._numerics import unit_roundoff  # noqa: E402

DEVICE = torch.device(os.environ.get("REPFORGET_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("REPFORGET_TEST_DTYPE", "float32"))

# --------------------------------------------------------------------------- tolerances
#
# Every comparison is against float64 arithmetic on the values actually given (the rounded input,
# ``x.to(dtype).double()``), so only the working precision of the path under test differs:
#
# TOL[float32] / TOL[float64] bound the relative error (to the sum of |terms|) of a sum or inner
#   product of m <= TOL_M terms in that working precision (u = 2^-24 / 2^-53), for a quantity whose
#   condition number is at most TOL_KAPPA: lambda sqrt(m) u kappa with lambda = 5, the probabilistic
#   rounding-error bound of Higham & Mary (2019), which holds with probability >= 1 - 2 exp(-lambda^2/2)
#   ~ 1 - 7e-6 per quantity for independent roundings (the worst case m u is never approached by
#   blocked or pairwise sums). TOL_M = 256 covers the reductions of the op-level tests.
# TOL[bfloat16] / TOL[float16] add the first-order error of a product of two operands each rounded once
#   to that type (2 u_h, u_h = 2^-8 / 2^-11): the Triton tensor-core paths round their centred operands.
# Metric-level tests use the bounds the functions document instead (``cka_bound``, ``pca_bounds``),
#   whose condition factors are computed from the float64 reference on the same rounded input.
TOL_LAMBDA, TOL_M, TOL_KAPPA = 5.0, 256, 2.0
TOL = {dt: TOL_LAMBDA * math.sqrt(TOL_M) * unit_roundoff(dt) * TOL_KAPPA for dt in (torch.float32, torch.float64)}
TOL.update({dt: 2 * unit_roundoff(dt) + TOL[torch.float32] for dt in (torch.bfloat16, torch.float16)})
HALF = (torch.bfloat16, torch.float16)


def working_roundoff(dtypes, backend: str) -> tuple[float, float]:
    """(u of the accumulation, u of the operands fed to the products) for inputs of these dtypes on ``backend``.

    Every path accumulates in float32 (float64 when all inputs are float64); Triton feeds its dot the
    centred bf16 / fp16 operands rounded to that type, every other path the exact upcast values.
    """
    u_acc = unit_roundoff(torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32)
    u_op = max(unit_roundoff(d) if backend == "triton" and d in HALF else u_acc for d in dtypes)
    return u_acc, u_op


def cka_bound(x, y, *, debiased: bool = False, method: str = "feature", backend: str = "torch",
              m: Optional[int] = None, dtypes=None) -> float:
    """The accuracy bound linear_cka documents, for inputs x, y (n, d) or (B, n, d) (max over B).

    4 (sqrt(m) u_acc + 2 u_op) kappa + u_out, kappa = reference.linear_cka_condition_ref on the given
    (rounded) values, m the longest reduction (n for the feature method, max d for the Gram method),
    u_out the rounding of the result to float32. ``dtypes``: the dtypes the values were given in, when
    x, y are their float64 copies (StreamingCKA chunks of several dtypes).
    """
    from repforget_kernels import reference as R

    dtypes = (x.dtype, y.dtype) if dtypes is None else tuple(dtypes)
    u_acc, u_op = working_roundoff(dtypes, backend)
    xr, yr = x.double(), y.double()
    if m is None:
        m = xr.shape[-2] if method == "feature" else max(xr.shape[-1], yr.shape[-1])
    pairs = list(zip(xr, yr)) if xr.dim() == 3 else [(xr, yr)]
    kappa = max(R.linear_cka_condition_ref(a, b, debiased, method)["kappa"] for a, b in pairs)
    out_u = 0.0 if all(d == torch.float64 for d in dtypes) else unit_roundoff(torch.float32)
    return 4 * (math.sqrt(m) * u_acc + 2 * u_op) * kappa + out_u


def svd_deflation(dtype: torch.dtype) -> float:
    """tau = max(10, min(100, u^(-1/8))) u: LAPACK's bidiagonal QR (xBDSQR, which xGESDD runs on blocks of
    up to 25 columns) sets an off-diagonal entry to zero once it is at most tau times its diagonal
    neighbour (dbdsqr.f: TOL = TOLMUL * EPS, TOLMUL = MAX(10, MIN(100, EPS**(-1/8)))); 98.7 u in float64,
    10 u in float32 (u of ``dtype``). Larger blocks' divide-and-conquer merges deflate at 8 u of the
    largest entry (dlasd2.f), below tau."""
    u = unit_roundoff(dtype)
    return max(10.0, min(100.0, u ** -0.125)) * u


def pca_bounds(x, k: int, *, method: str = "krylov", oversample=None, n_iter: int = 4) -> dict:
    """The accuracy bounds randomized_pca documents for (n, d) input x (its rounded values), in float64.

    eps = 4 u (sqrt(n) + sqrt(d)) (u of the compute dtype; krylov: times sqrt(q l)); angle_i =
    eps var_1 / component_gap_i and subspace = eps var_1 / subspace_gap (Davis-Kahan), ev_i = eps var_1 / var_i (Weyl), each plus the
    randomized term 10 sqrt(d) (var_{l+1} / var_i)^e, e = q + 1/2 (subspace) or q (krylov), l the
    block's columns; out_u the rounding of float32 results.

    Plus the final SVD's deflation (``svd_deflation``): the m - 1 off-diagonal entries it may set to
    zero, each at most tau sigma_1, lie in disjoint blocks of the final coordinates, so the SVD is exact
    for its input plus a perturbation of 2-norm at most delta = sqrt(m - 1) tau sigma_1 (sigma_i =
    sqrt((n - 1) var_i), m the singular values it computes: l, or room for the exact sketch, or
    min(n, q l) for krylov's SVD of Xc K). That adds delta / (sigma_i - sigma_j) to angle_i (Wedin's
    theorem, sigma_j the nearest neighbour; sigma_k - sigma_{k+1} for the subspace) and
    2 delta / sigma_i + (delta / sigma_i)^2 to ev_i (Weyl). In float64 this term dominates: a 5 x 4
    Gaussian (seed 3) has LAPACK's own error at 2x eps var_1 / gap.

    The comparisons this bounds are against ``reference.pca_ref`` with ``refine=True`` for float64
    input (``exact_reference``), whose own error (2^-80 relative) is negligible; for float32 work the
    float64 reference's error (~100 u64 sigma_1 / gap) is below 1e-7 of the float32 bound.
    """
    from repforget_kernels.pca import METHODS
    from repforget_kernels import reference as R

    xr = x.double().cpu().numpy()
    n, d = xr.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = unit_roundoff(cd)
    g = R.pca_gaps_ref(xr, k)
    var = g["var"]
    l = min(k + (METHODS[method]["oversample"] if oversample is None else oversample), n, d)
    room = max(min(n - 1, d), l)  # krylov: the row space's dimension; its space has min(q l, room) directions
    full = method == "krylov" and n_iter * l >= room
    eps = 4 * u * (math.sqrt(n) + math.sqrt(d)) * (math.sqrt(n_iter * l) if method == "krylov" and not full else 1.0)
    tail = var[l] if l < len(var) else 0.0
    power = n_iter + 0.5 if method == "subspace" else n_iter
    if full:
        tail = 0.0  # krylov then runs the exact sketch of the whole row space
    rand = [10 * math.sqrt(d) * (tail / var[i]) ** power for i in range(k)]
    m = room if full else (min(n, n_iter * l) if method == "krylov" else l)  # singular values of the final SVD
    sig = np.sqrt(np.concatenate([var, [0.0]]))  # sigma / sqrt(n - 1), with sigma_{min(n, d) + 1} = 0
    delta = math.sqrt(m - 1) * svd_deflation(cd) * sig[0]
    near = [min(sig[i - 1] - sig[i] if i else np.inf, sig[i] - sig[i + 1]) for i in range(k)]
    deflation = {"angle": [delta / near[i] for i in range(k)], "subspace": delta / (sig[k - 1] - sig[k]),
                 "ev": [2 * delta / sig[i] + (delta / sig[i]) ** 2 for i in range(k)]}
    return {
        "var": var,
        "angle": [eps * var[0] / g["component_gap"][i] + rand[i] + deflation["angle"][i] for i in range(k)],
        "subspace": eps * var[0] / g["subspace_gap"] + rand[-1] + deflation["subspace"],
        "ev": [eps * var[0] / var[i] + rand[i] + deflation["ev"][i] for i in range(k)],
        "deflation": deflation,  # the SVD deflation's share of each bound
        "out_u": 0.0 if x.dtype == torch.float64 else unit_roundoff(torch.float32),
        "u": u,
    }


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """Backends that can run on ``device`` in this environment (always includes torch)."""
    return [b for b in BACKENDS if backend_available(b, device)[0]]


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture
def two_threads():
    """Run the test body with 2 intra-op threads (the C++ kernels' per-thread bins / tiles get merged)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test; tensors are drawn on CPU then moved to DEVICE."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("REPFORGET_TEST_RANDOM") else 1234)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """Inside a spawned test worker: one thread, a gloo process group of ``world`` ranks on ``port``, destroyed on exit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free local TCP port, for the rendezvous of test process groups."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def randn(*shape, gen: torch.Generator, dtype=None, device=None) -> torch.Tensor:
    """Standard normal draws on CPU (reproducible), moved to the test device and dtype."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return t.to(device=device or DEVICE, dtype=dtype or DTYPE)


def exact_reference(x) -> bool:
    """Whether PCA results on x are checked against the refined (exact rational) reference: float64 values,
    where LAPACK's float64 SVD error is of the order of the bound (see ``pca_bounds``)."""
    return getattr(x, "dtype", None) in (torch.float64, np.float64)


def principal_angle(a, b, b_lo=None) -> float:
    """Largest principal angle (radians) between the row spaces of a (k, d) and b (k, d).

    Computed from the sine (the residual of a's rows after projecting on b's orthonormalised
    rows), which stays accurate for tiny angles where arccos of a cosine near 1 does not.
    b_lo: b's float64 remainders (a refined reference, ``reference.pca_ref(refine=True)``, whose rows
    b + b_lo are orthonormal to 2^-80): the residual is then exact rational arithmetic, rounded once,
    and the sine sigma_max(L^-1 R) (a a^T = L L^T) is accurate to a few u64 relative to itself, where
    the float64 QRs' own error is a few u64 absolute, of the order of the float64 bounds.
    """
    from repforget_kernels.reference import exact_residual_ref, to_f64

    a = to_f64(a).reshape(-1, to_f64(a).shape[-1])  # (k, d)
    if b_lo is not None:
        resid = exact_residual_ref([a], [to_f64(b).reshape(-1, a.shape[-1]), to_f64(b_lo).reshape(-1, a.shape[-1])])
        chol = np.linalg.cholesky(a @ a.T)  # (k, k)
        sin = np.linalg.norm(np.linalg.solve(chol, resid), ord=2)
        return float(np.arcsin(min(sin, 1.0)))
    a = np.linalg.qr(a.T)[0]  # (d, k)
    b = np.linalg.qr(to_f64(b).reshape(-1, to_f64(b).shape[-1]).T)[0]  # (d, k)
    sin = np.linalg.norm(a - b @ (b.T @ a), ord=2)
    return float(np.arcsin(min(sin, 1.0)))


def pca_truth(x, k: int) -> dict:
    """``reference.pca_ref`` of x's values, refined (exact rational arithmetic) when they are float64."""
    from repforget_kernels import reference as R

    return R.pca_ref(x, k, refine=exact_reference(x))


def ref_angle(a, ref: dict, rows: slice = slice(None)) -> float:
    """principal_angle between a (the rows ``rows`` of a result's components) and those of ``ref``
    (``pca_truth``), exact in the reference's remainders where it has them."""
    lo = ref.get("components_lo")
    return principal_angle(a, ref["components"][rows], None if lo is None else lo[rows])


def ref_rel_error(got, ref: dict, key: str) -> np.ndarray:
    """|got / ref[key] - 1| elementwise, as |(got - hi) - lo| / hi with the reference's remainder lo (0 when
    unrefined): got - hi is exact near hi (Sterbenz), so the reference is not rounded into the error."""
    from repforget_kernels.reference import to_f64

    hi = ref[key]
    return np.abs((to_f64(got) - hi) - ref.get(key + "_lo", 0.0)) / np.abs(hi)


def assert_pca_fit(got, x, k: int, *, signs: bool = True, method: str = "krylov") -> None:
    """One randomized_pca result for (n, d) x against the exact PCA of the same values (``pca_truth``),
    within the bounds randomized_pca documents (``pca_bounds``).

    signs: also compare the sign-fixed vectors (|v - v_ref|_inf <= 2 sin(angle / 2) <= angle), which
    a near-tie between a component's two largest entries would make ambiguous.
    """
    from repforget_kernels import reference as R

    ref, b = pca_truth(x, k), pca_bounds(x, k, method=method)
    comps = R.to_f64(got.components)
    assert ref_angle(comps, ref) <= b["subspace"]
    for i in range(k):
        assert ref_angle(comps[i:i + 1], ref, slice(i, i + 1)) <= b["angle"][i], i
        if signs:
            assert np.abs((comps[i] - ref["components"][i]) - ref.get("components_lo", 0 * comps)[i]).max() \
                <= b["angle"][i], i
    ev_tol = np.array(b["ev"]) + b["out_u"]
    assert np.all(ref_rel_error(got.explained_variance, ref, "explained_variance") <= ev_tol)
    assert np.all(ref_rel_error(got.explained_variance_ratio, ref, "explained_variance_ratio") <= ev_tol + b["out_u"])
    # the mean: a float64 sum (error <= 5 sqrt(n) u64 mean |x_j|), rounded once to the output dtype
    xa = np.abs(R.to_f64(x))
    mean_tol = b["out_u"] * np.abs(ref["mean"]) + 5 * math.sqrt(xa.shape[0]) * 2.0**-53 * xa.mean(0)
    assert np.all(np.abs((R.to_f64(got.mean) - ref["mean"]) - ref.get("mean_lo", 0.0)) <= mean_tol)


# --------------------------------------------------------------------------- driver: small benchmark and model

# The embedded benchmark and model at test size, built by the same code as the demo's.
SMALL_BENCHMARK = dict(entities=20, holdout_entities=4, utility_train=20, utility=4, unrelated=12)
SMALL_TINY = {"architecture": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64},
              "recipe": {"lr": 1e-2, "batch_size": 16, "epochs": 40, "warmup_steps": 50, "check_every": 4,
                         "goal": 0.98, "target": 0.9},
              "vocab_size": 512}


def small_benchmark() -> dict:
    """The embedded benchmark at test size: 20 entities (2 forget entities), 4 holdout, small utility sets."""
    from repforget_kernels.driver.benchmark import BenchmarkConfig, make_benchmark

    return make_benchmark(0, BenchmarkConfig(**SMALL_BENCHMARK))


def random_small_model():
    """(untrained small Qwen2, its tokenizer, the small benchmark): instant and seeded."""
    from transformers import Qwen2ForCausalLM

    from repforget_kernels.driver.pretrain import build_tokenizer, tiny_config

    corpus = small_benchmark()
    tok = build_tokenizer(corpus, SMALL_TINY["vocab_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_config(len(tok), SMALL_TINY["architecture"])).eval()
    return model, tok, corpus


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Cache directory of pretrained small models, kept across pytest sessions (REPFORGET_TEST_CACHE overrides).

    Models are keyed by corpus, seed, variant and recipe inside it, so each pretrains once.
    """
    env = os.environ.get("REPFORGET_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp().parent / "repforget-tiny-cache"


def load_small(cache: Path, variant: str = "original"):
    """(model, tokenizer, info) of a small pretrained variant (original, other_seed, retain_oracle, random_init)."""
    from repforget_kernels.driver.models import load_model

    return load_model("tiny", cache_dir=cache, corpus=small_benchmark(), variant=variant, progress=False,
                      tiny_options=SMALL_TINY)


@pytest.fixture(scope="session")
def tiny(tiny_cache):
    """(model, tokenizer, corpus): the small model pretrained on the small benchmark (forget and retain EM >= 0.9)."""
    model, tok, _ = load_small(tiny_cache)
    return model, tok, small_benchmark()
