"""Linear CKA: one pair, batched, all layer pairs, and streaming over any number of rows.

Samples are rows: X is (n, dx), Y is (n, dy); Xc, Yc are column-centred.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
              = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   Kc = Xc Xc^T, Lc = Yc Yc^T

Debiased CKA replaces each HSIC by the unbiased estimator of Song et al. (2012),
written here in feature space from centred features (it is invariant to a shift
of either input, and centring first keeps its precision under large offsets):

    K~ = K with its diagonal zeroed, k_i = ||xc_i||^2, tr K = sum_i k_i
    HSIC_u(K, L) = [tr(KL) - k.l + trK trL / ((n-1)(n-2)) - 2 k.l / (n-2)] / (n (n-3))
    (with centred features K~ 1 = -k, so 1^T K~ L~ 1 = k.l and 1^T K~ 1 = -tr K)

Every entry point reduces to the same mergeable sums of shifted rows (kernel op
``shifted_cross_products``, declared in :mod:`._ops`) or to centred Gram matrices (op ``centered_gram``);
:func:`_cka_from_sums` turns the sums into CKA for all three front doors.

Numerics (``_numerics``): each input is shifted by its float64 column means rounded to the
compute dtype (the subtraction is exact for columns with a large offset, and the remainder is
removed exactly by the sums' float64 algebra or by centring the Gram, H K H) and scaled by a
power of two, so offsets and magnitudes cost no precision and never over- or underflow. An
input whose self-HSIC is within rounding of zero (given the size of the terms that cancel into
it) makes CKA undefined: ValueError, on every path and backend alike.

Length: one module because the three front doors (linear_cka, cka_matrix, StreamingCKA) share
the sums-to-CKA algebra, the zero-variance test and the exact re-shifting of merged states; split,
every piece would import every other.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._dispatch import kernel, needs_grad
from ._numerics import ZERO_TEST_FACTOR, range_scale, scale_from_extrema, shift_from_sums, unit_roundoff
from ._ops import CENTERED_GRAM, COLUMN_STATS, SHIFTED_CROSS_PRODUCTS, shifted_cross_product_keys
from ._validate import (
    as_tensor, check_finite, check_finite_by_column_sums, check_rows, check_same_device, check_same_rows, compute_dtype,
    require,
)

__all__ = ["linear_cka", "cka_matrix", "StreamingCKA"]


# --------------------------------------------------------------------------- sums -> CKA


# Powers of (scale_x, scale_y) in each sum of shifted-and-scaled rows (to move sums between scales).
_SCALE_POWERS = {"sxy": (1, 1), "sxx": (2, 0), "syy": (0, 2), "sx": (1, 0), "sy": (0, 1), "sa": (2, 0),
                 "sb": (0, 2), "saa": (4, 0), "sbb": (0, 4), "sab": (2, 2), "sax": (3, 0), "sbx": (1, 2),
                 "say": (2, 1), "sby": (0, 3)}


def _frob2(m: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two dims, accumulated in float64: (..., a, b) -> (...)."""
    return torch.linalg.vector_norm(m, dim=(-2, -1), dtype=torch.float64).square()


def _row_norm_products(s: dict, n: torch.Tensor, u: str, v: str) -> torch.Tensor:
    """sum_i ||u_i - mean_u||^2 ||v_i - mean_v||^2 from shifted-row sums, u, v in {"x", "y"}: -> (L,).

    With alpha_i = a_i - 2 u'_i.m + |m|^2, beta_i = b_i - 2 v'_i.p + |p|^2 (m, p the shifted means),
    the sum of alpha_i beta_i expands into the mergeable sums below.
    """
    a, b = ("a" if u == "x" else "b"), ("a" if v == "x" else "b")
    m = s["s" + u] / n.unsqueeze(-1)  # (L, du)
    p = s["s" + v] / n.unsqueeze(-1)  # (L, dv)
    m2, p2 = m.square().sum(-1), p.square().sum(-1)  # (L,)
    sab = s["s" + "".join(sorted(a + b))]  # (L,)
    s_uv = s["s" + u + v] if u + v != "yx" else s["sxy"].transpose(-1, -2)  # (L, du, dv)
    cross = torch.einsum("ld,lde,le->l", m, s_uv.to(torch.float64), p)  # (L,)
    return (
        sab
        - 2 * (m * s["s" + b + u]).sum(-1) + m2 * s["s" + b]
        - 2 * (p * s["s" + a + v]).sum(-1) + p2 * s["s" + a]
        + 4 * cross
        - 2 * m2 * (p * s["s" + v]).sum(-1)
        - 2 * p2 * (m * s["s" + u]).sum(-1)
        + n * m2 * p2
    )


def _cka_from_sums(s: dict, n: torch.Tensor, debiased: bool, u: float, names: tuple = ("x", "y")) -> torch.Tensor:
    """CKA for each layer from the float64 sums of shifted rows (see ``shifted_cross_products``): -> (L,) float64.

    Each HSIC numerator h comes with the size e of the terms that round into it: the centred
    cross-products C = S - n m p^T carry errors of a few u sqrt(tr S'_a tr S'_b) (tr S' = sum of
    squared shifted values, Cauchy-Schwarz), so ||C||_F^2 carries 2 ||C||_F sqrt(tr tr) of them; the
    debiased estimator adds its row-norm and trace terms, (1 + 2/(n-2)) sum a_i b_i and
    2 tr tr / ((n-1)(n-2)). ``u`` is the unit roundoff the sums were computed in.
    """
    nn_ = n.unsqueeze(-1)  # (L, 1)
    m, p = s["sx"] / nn_, s["sy"] / nn_  # (L, dx), (L, dy) shifted means
    nm = (n.unsqueeze(-1) * m).unsqueeze(-1)  # (L, dx, 1)
    np_ = (n.unsqueeze(-1) * p).unsqueeze(-1)  # (L, dy, 1)
    cxy = torch.baddbmm(s["sxy"], nm, p.unsqueeze(-2), alpha=-1)  # (L, dx, dy) = Sxy - n m p^T
    cxx = torch.baddbmm(s["sxx"], nm, m.unsqueeze(-2), alpha=-1)  # (L, dx, dx)
    cyy = torch.baddbmm(s["syy"], np_, p.unsqueeze(-2), alpha=-1)  # (L, dy, dy)
    hxy, hxx, hyy = _frob2(cxy), _frob2(cxx), _frob2(cyy)  # (L,) tr(KL), tr(KK), tr(LL)
    tsx = s["sxx"].diagonal(dim1=-2, dim2=-1).sum(-1)  # (L,) sum of squared shifted values of x
    tsy = s["syy"].diagonal(dim1=-2, dim2=-1).sum(-1)  # (L,)
    exx, eyy = 2 * hxx.sqrt() * tsx, 2 * hyy.sqrt() * tsy  # (L,) rounding scales
    if debiased:
        trk = cxx.diagonal(dim1=-2, dim2=-1).sum(-1)  # (L,)
        trl = cyy.diagonal(dim1=-2, dim2=-1).sum(-1)  # (L,)
        kl = _row_norm_products(s, n, "x", "y")
        kk = _row_norm_products(s, n, "x", "x")
        ll = _row_norm_products(s, n, "y", "y")
        c1, c2 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
        hxy = hxy - kl + trk * trl * c1 - c2 * kl
        hxx = hxx - kk + trk * trk * c1 - c2 * kk
        hyy = hyy - ll + trl * trl * c1 - c2 * ll
        exx = exx + 2 * (1 + c2) * s["saa"] + 2 * c1 * tsx * tsx
        eyy = eyy + 2 * (1 + c2) * s["sbb"] + 2 * c1 * tsy * tsy
    return _ratio(hxy, hxx, hyy, exx, eyy, u, names)


def _ratio(hxy, hxx, hyy, exx, eyy, u: float, names: tuple = ("x", "y")) -> torch.Tensor:
    """hxy / sqrt(hxx hyy), raising where an input's self-HSIC is within rounding of zero (CKA undefined).

    h <= ZERO_TEST_FACTOR * u * e means h is not distinguishable from 0 given the size e of the
    terms that cancel into it (exactly zero for constant rows; for debiased CKA also for rows that are
    all equal but one, whose U-centred Gram is zero). Genuine data sit far above: a centred Gram has
    ||K||_F >= tr K / sqrt(rank). hxx, hyy, exx, eyy may be broadcast views ((Lx, 1), (1, Ly)); the
    error names ``names`` and the flat index.
    """
    why = ("its HSIC is within rounding of zero (all rows equal after centring, or for debiased CKA all rows "
           "equal but one), so CKA is undefined")
    for h, e, name in ((hxx, exx, names[0]), (hyy, eyy, names[1])):
        ok = h.flatten() > ZERO_TEST_FACTOR * u * e.flatten()  # NaN counts as not ok
        require(ok, f"{name} has no variance to compare at some batch/layer index: {why}",
                lambda ok=ok, name=name: f"{name} has no variance to compare at batch/layer index "
                                         f"{(~ok).nonzero().flatten().tolist()}: {why}")
    return hxy / (hxx.sqrt() * hyy.sqrt())


# --------------------------------------------------------------------------- public API


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _feature_sums(x3, y3, debiased: bool, backend, unscale: bool = False) -> dict:
    """float64 sums of one chunk (op ``shifted_cross_products``) with its shifts (float64) and row counts.

    Each input is shifted by its column means rounded to the compute dtype and scaled by
    ``range_scale``; the sums are returned in those scaled units, or with ``unscale`` in the
    inputs' units (exact: the scales are powers of two). dict of (L, ...) tensors.
    """
    cd = compute_dtype(x3, y3)
    stats = kernel(COLUMN_STATS, x3.device, backend, grad=needs_grad(x3, y3))  # one pass: sums, extrema
    sum_x, lo_x, hi_x = stats(x3)  # (L, dx) each
    sum_y, lo_y, hi_y = stats(y3)  # (L, dy) each
    check_finite_by_column_sums(sum_x, x3, "x")  # the inputs' finiteness from their float64 sums
    check_finite_by_column_sums(sum_y, y3, "y")
    _, shift_x = shift_from_sums(sum_x, x3.shape[-2], cd)  # (L, dx)
    _, shift_y = shift_from_sums(sum_y, y3.shape[-2], cd)  # (L, dy)
    scale_x, scale_y = scale_from_extrema(lo_x, hi_x), scale_from_extrema(lo_y, hi_y)  # (L,) each
    op = kernel(SHIFTED_CROSS_PRODUCTS, x3.device, backend, grad=needs_grad(x3, y3))
    out = op(x3, y3, shift_x, shift_y, debiased, scale_x, scale_y)
    sums = {k: v.to(torch.float64) for k, v in zip(shifted_cross_product_keys(debiased), out)}
    if unscale:
        for k, (px, py) in _SCALE_POWERS.items():
            if k in sums:
                sums[k] = sums[k] / (scale_x**px * scale_y**py).view(-1, *[1] * (sums[k].dim() - 1))
    sums.update(shift_x=shift_x.to(torch.float64), shift_y=shift_y.to(torch.float64),
                n=torch.full((x3.shape[0],), float(x3.shape[-2]), dtype=torch.float64, device=x3.device))
    return sums


def _gram_hsics(kx: torch.Tensor, tx: torch.Tensor, ky: torch.Tensor, ty: torch.Tensor) -> tuple:
    """(hxy, hxx, hyy, exx, eyy) from centred Grams (L, n, n) and their traces (L,): float64 (L,) each.

    A Gram K computed from rows of squared norm tr carries errors of a few u tr in Frobenius norm
    (every entry a few u ||x_i|| ||x_j||, plus the centring terms, of the same size), so ||K||_F^2
    carries 2 ||K||_F tr of them.
    """
    hxx, hyy = _frob2(kx), _frob2(ky)
    hxy = (kx * ky).sum((-2, -1), dtype=torch.float64)
    return hxy, hxx, hyy, 2 * hxx.sqrt() * tx, 2 * hyy.sqrt() * ty


def linear_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    debiased: bool = False,
    method: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear CKA between two sets of activations of the same samples.

    Args:
        x: (n, dx) or (B, n, dx), samples as rows; float16/bfloat16/float32/float64.
        y: (n, dy) or (B, n, dy), same n (and B) as ``x``.
        debiased: use the unbiased HSIC estimator (needs n >= 4). Debiased CKA is an
            estimate and can fall slightly below 0 for unrelated inputs.
        method: ``"feature"`` (cost n (dx dy + 5 (dx^2 + dy^2) / 8): the symmetric products by column
            panels once d >= 1021, see ``_ops.column_gram``; memory dx dy),
            ``"gram"`` (cost n^2 (dx + dy), memory n^2) or ``"auto"`` (feature when dx + dy <= n).
        backend: force a backend (see ``repforget_kernels._dispatch``).

    Returns:
        () or (B,) tensor, float32 (float64 for float64 input). Differentiable on every backend
        (an input that requires grad is served by the torch composites).

    Formula: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), HSIC sums in float64.

    Numerics: rows are shifted by their column means rounded to the compute dtype (exact under
    large offsets) and scaled by a power of two (exact; no overflow or underflow for any finite
    input magnitude), so the result does not depend on offsets or scale.

    Accuracy against float64 arithmetic on the same input values:
        |error| <= 4 (sqrt(m) u + 2 u_op) kappa + u_out,
    u the unit roundoff of the accumulation (2^-24 float32, 2^-53 float64), u_op that of the
    operands of the products (u, but 2^-8 / 2^-11 on Triton for bf16 / fp16 input, which its
    tensor-core GEMMs round), m the longest reduction (n for the feature method, max(dx, dy) for
    the Gram method), u_out the rounding of the result to float32 (0 for float64), and kappa the
    condition factor e_xy / sqrt(h_xx h_yy) + |CKA| (e_xx / h_xx + e_yy / h_yy) / 2 of the HSIC
    numerators h and the sizes e of the terms that round into them
    (``reference.linear_cka_condition_ref``): a few for biased CKA; for debiased CKA about
    1 + d / n (feature) or sqrt(rank) (gram) on generic data, large near degenerate input.

    Raises ValueError naming x or y (and the batch index) when its self-HSIC is within rounding of
    zero, so CKA is undefined: constant rows, and for debiased CKA rows all equal but one.

    Array inputs: NumPy arrays and anything ``torch.as_tensor`` takes are accepted as well as tensors; the
    result is a tensor either way (float64 arrays compute in float64).
    """
    min_rows = 4 if debiased else 2
    x = check_rows(x, "x", min_rows=min_rows, finite=False)  # finiteness below, per method
    y = check_rows(y, "y", min_rows=min_rows, finite=False)
    check_same_rows(x, y)
    if method not in ("auto", "gram", "feature"):
        raise ValueError(f"method must be 'auto', 'gram' or 'feature', got {method!r}")
    x3, y3 = _as_batch(x), _as_batch(y)
    n, dx, dy = x3.shape[-2], x3.shape[-1], y3.shape[-1]
    if method == "auto":
        method = "feature" if dx + dy <= n else "gram"
    if method == "feature":
        sums = _feature_sums(x3, y3, debiased, backend)
        cka = _cka_from_sums(sums, sums["n"], debiased, unit_roundoff(compute_dtype(x3, y3)))
    else:
        check_finite(x, "x")
        check_finite(y, "y")
        kx, tx = _layer_gram(x3, debiased, backend)  # (B, n, n), (B,)
        ky, ty = _layer_gram(y3, debiased, backend)
        hxy, hxx, hyy, exx, eyy = _gram_hsics(kx, tx, ky, ty)
        u = max(unit_roundoff(compute_dtype(x3)), unit_roundoff(compute_dtype(y3)))
        cka = _ratio(hxy, hxx, hyy, exx, eyy, u)
    cka = cka.to(compute_dtype(x, y))
    return cka if x.dim() == 3 else cka[0]


def _layer_gram(x3: torch.Tensor, debiased: bool, backend) -> tuple:
    """Op ``centered_gram`` on (L, n, d) rows scaled by ``range_scale``: ((L, n, n), (L,) traces)."""
    op = kernel(CENTERED_GRAM, x3.device, backend, grad=needs_grad(x3))
    return op(x3, debiased, range_scale(x3))


def _stack_layers(xs, name: str, min_rows: int):
    """Check layers: a (L, n, d) tensor (or array) is returned as a tensor, a sequence of (n, d_i) tensors
    (or arrays) as a list of tensors."""
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence):
        xs = as_tensor(xs, name)  # a NumPy (L, n, d) array; TypeError naming ``name`` for non-numbers
    if isinstance(xs, torch.Tensor):
        xs = check_rows(xs, name, min_rows=min_rows)
        if xs.dim() != 3:
            raise ValueError(f"{name} must be (L, n, d) or a sequence of (n, d_i) tensors, got shape {tuple(xs.shape)}")
        return xs
    if len(xs) == 0:
        raise ValueError(f"{name} is empty: give at least one layer")
    layers = []
    for i, t in enumerate(xs):
        t = check_rows(t, f"{name}[{i}]", min_rows=min_rows, batched=False)
        first = layers[0] if layers else t
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"all layers need the same number of rows: {name}[0] has shape {tuple(first.shape)}, "
                f"{name}[{i}] has shape {tuple(t.shape)}"
            )
        check_same_device(**{f"{name}[0]": first, f"{name}[{i}]": t})
        layers.append(t)
    return layers


def _layer_grams(layers, debiased: bool, backend) -> tuple:
    """Centred or U-centred Gram of each layer, flattened, and its trace: ((L, n*n), (L,)).

    A stack, or layers sharing d, go in one call.
    """
    if not isinstance(layers, torch.Tensor) and len({t.shape for t in layers}) == 1:
        layers = torch.stack(layers)
    if isinstance(layers, torch.Tensor):
        k, tr = _layer_gram(layers, debiased, backend)
        return k.flatten(1), tr
    parts = [_layer_gram(t.unsqueeze(0), debiased, backend) for t in layers]
    return torch.cat([k.flatten(1) for k, _ in parts]), torch.cat([tr for _, tr in parts])


def _gram_inner_products(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """All <G_i, G_j>: (Lx, m), (Ly, m) -> (Lx, Ly) float64, accumulated in float64.

    One GEMM per chunk of 2^23 / (Lx + Ly) Gram entries upcast to float64 (at most 64 MiB of copies):
    a float32 GEMM would sum n^2 products in float32, an error growing like n u.
    """
    step = max(1, 2**23 // (gx.shape[0] + gy.shape[0]))
    out = 0
    for start in range(0, gx.shape[1], step):
        a = gx[:, start:start + step].to(torch.float64)  # (Lx, c)
        b = a if gy is gx else gy[:, start:start + step].to(torch.float64)  # (Ly, c)
        out = out + a @ b.T
    return out


def cka_matrix(
    xs: Union[torch.Tensor, Sequence[torch.Tensor]],
    ys: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    *,
    debiased: bool = False,
    method: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """CKA between every layer of ``xs`` and every layer of ``ys``.

    Args:
        xs: (Lx, n, d) tensor or a sequence of Lx tensors (n, d_i), samples as rows.
        ys: likewise (Ly layers, same n); None compares ``xs`` with itself.
        debiased: unbiased HSIC (n >= 4).
        method: ``"gram"``: each layer's centred Gram once (L n^2 d), then all pairs as GEMMs on
            the flattened Grams (Lx Ly n^2, accumulated in float64 by chunks), memory (Lx + Ly) n^2;
            ``"feature"``: cross-products per pair (Lx Ly n dx dy; with ``ys=None`` only the pairs
            i <= j, L (L + 1) / 2, mirrored), memory dx dy;
            ``"auto"``: gram when the Grams fit in 2^28 elements (1 GiB of float32), else feature.
        backend: force a backend.

    Returns:
        (Lx, Ly) tensor, float32 (float64 for float64 input); differentiable on every backend.
        Accuracy as :func:`linear_cka` (each layer is shifted and scaled on its own). Raises
        ValueError naming the layer (xs / ys and its index) whose self-HSIC is within rounding of
        zero (no variance), as :func:`linear_cka`.

    Array inputs: ``xs`` / ``ys`` may be NumPy (L, n, d) arrays or sequences of arrays (anything
    ``torch.as_tensor`` takes); the result is a tensor either way.
    """
    min_rows = 4 if debiased else 2
    lx = _stack_layers(xs, "xs", min_rows)
    ly = lx if ys is None else _stack_layers(ys, "ys", min_rows)
    check_same_rows(lx[0][..., :1], ly[0][..., :1], "xs", "ys")
    if method not in ("auto", "gram", "feature"):
        raise ValueError(f"method must be 'auto', 'gram' or 'feature', got {method!r}")
    n = lx[0].shape[0]
    if method == "auto":
        method = "gram" if (len(lx) + len(ly)) * n * n <= 2**28 else "feature"
    out_dtype = compute_dtype(lx[0], ly[0])
    yname = "xs" if ys is None else "ys"
    if method == "gram":
        gx, tx = _layer_grams(lx, debiased, backend)  # (Lx, n^2), (Lx,)
        gy, ty = (gx, tx) if ys is None else _layer_grams(ly, debiased, backend)  # (Ly, n^2), (Ly,)
        pair = _gram_inner_products(gx, gy)  # (Lx, Ly) float64
        if ys is None:  # the diagonal holds the squared norms, from the same GEMM: CKA(X_i, X_i) = 1 exactly
            nx = ny = pair.diagonal().clone()  # (Lx,)
        else:
            nx = torch.linalg.vector_norm(gx, dim=-1, dtype=torch.float64).square()  # (Lx,)
            ny = torch.linalg.vector_norm(gy, dim=-1, dtype=torch.float64).square()  # (Ly,)
        u = max(unit_roundoff(compute_dtype(t)) for t in (lx[0], ly[0]))
        ex, ey = 2 * nx.clamp_min(0).sqrt() * tx, 2 * ny.clamp_min(0).sqrt() * ty
        return _ratio(pair, nx.unsqueeze(1), ny.unsqueeze(0), ex.unsqueeze(1), ey.unsqueeze(0), u,
                      ("xs", yname)).to(out_dtype)
    pairs = {}  # (i, j) -> CKA; against itself only i <= j (CKA is symmetric), mirrored below
    for i, xi in enumerate(lx):
        for j, yj in enumerate(ly):
            if ys is None and j < i:
                continue
            try:
                pairs[i, j] = linear_cka(xi, yj, debiased=debiased, method="feature", backend=backend).double()
            except ValueError as exc:  # name the layers, not linear_cka's x and y
                raise ValueError(f"layer pair (xs[{i}], {yname}[{j}]): {exc}") from None
    rows = [torch.stack([pairs[(i, j) if (i, j) in pairs else (j, i)] for j in range(len(ly))]) for i in range(len(lx))]
    return torch.stack(rows).to(device=lx[0].device, dtype=out_dtype)


class StreamingCKA:
    """Exact linear CKA over any number of rows, fed in chunks, in O(dx dy) memory.

    Holds mergeable float64 sums of shifted rows (see ``shifted_cross_products``) in the inputs'
    units, about a float64 shift. Each chunk is summed about its own column means rounded to its
    compute dtype (so the shift its kernel subtracts is exactly the one recorded) and scaled by a
    power of two; its sums are unscaled exactly and moved onto the running row-weighted mean of
    the shifts by exact float64 algebra (``_reshift``), as :meth:`merge` and :meth:`all_reduce`
    move two states. The shift thus stays at the data's mean, and :meth:`compute` centres
    exactly at the end. The result equals :func:`linear_cka` (feature method) on all rows seen,
    up to rounding, whatever the chunking, the chunks' dtypes, the merge order or the process
    that saw them.

    Args:
        layers: None for (n_chunk, d) inputs, else the number of layers L for (L, n_chunk, d) inputs.
        debiased: unbiased HSIC (needs n >= 4 rows in total).
        backend: force a backend for the per-chunk sums.

    Accuracy: as :func:`linear_cka` (feature method), u the coarsest unit roundoff of any chunk.
    Gradients: chunks that require grad are summed by the torch composite and :meth:`compute` is
    differentiable through every update and merge; :meth:`all_reduce` refuses such a state.
    Limits: the state is in the inputs' units, so float64 rows whose centred values lie beyond
    ~1e+-70 over- or underflow the debiased fourth-order sums.
    Memory: 8 L (dx dy + dx^2 + dy^2) bytes of float64 state.
    """

    def __init__(self, *, layers: Optional[int] = None, debiased: bool = False, backend: Optional[str] = None):
        if layers is not None and (not isinstance(layers, int) or layers < 1):
            raise ValueError(f"layers must be None or a positive int, got {layers!r}")
        self.layers = layers
        self.debiased = bool(debiased)
        self.backend = backend
        self._state: Optional[dict] = None  # float64 sums + "shift_x", "shift_y", "n"
        self._dtype: Optional[torch.dtype] = None
        self._u = 0.0  # coarsest unit roundoff of the chunks summed so far

    # ----------------------------------------------------------------- feeding
    def _check_chunk(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = check_rows(t, name, min_rows=1, finite=False)  # finiteness from the chunk's means (_feature_sums)
        if self.layers is None and t.dim() != 2:
            raise ValueError(f"{name} must be (n_chunk, d) since layers=None, got shape {tuple(t.shape)}")
        if self.layers is not None and (t.dim() != 3 or t.shape[0] != self.layers):
            raise ValueError(f"{name} must be ({self.layers}, n_chunk, d) since layers={self.layers}, got shape {tuple(t.shape)}")
        return _as_batch(t)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "StreamingCKA":
        """Add a chunk of rows: x (n_chunk, dx) or (L, n_chunk, dx), y likewise with dy. Returns self.

        Chunks may be NumPy arrays (anything ``torch.as_tensor`` takes) as well as tensors."""
        x3, y3 = self._check_chunk(x, "x"), self._check_chunk(y, "y")
        check_same_rows(x3, y3)
        st = self._state
        if st is not None and ((x3.shape[-1], y3.shape[-1]) != (st["sx"].shape[-1], st["sy"].shape[-1])
                               or x3.device != st["sx"].device):
            raise ValueError(
                f"chunk shapes x {tuple(x.shape)}, y {tuple(y.shape)} on {x.device} do not match the state "
                f"(dx={st['sx'].shape[-1]}, dy={st['sy'].shape[-1]}, on {st['sx'].device})"
            )
        chunk = _feature_sums(x3, y3, self.debiased, self.backend, unscale=True)
        self._state = chunk if st is None else _combine(st, chunk, self._sum_keys())
        self._note_dtype(compute_dtype(x3, y3), unit_roundoff(compute_dtype(x3, y3)))
        return self

    # ----------------------------------------------------------------- results
    def compute(self) -> torch.Tensor:
        """CKA over every row seen: () or (L,), float32 (float64 when any chunk was float64)."""
        st = self._require_state("compute")
        n_total = int(st["n"][0])
        need = 4 if self.debiased else 2
        if n_total < need:
            raise ValueError(f"StreamingCKA has seen {n_total} row(s); CKA needs at least {need}")
        cka = _cka_from_sums(st, st["n"], self.debiased, self._u).to(self._dtype)
        return cka if self.layers is not None else cka[0]

    @property
    def n(self) -> int:
        """Rows seen so far."""
        return 0 if self._state is None else int(self._state["n"][0])

    # ----------------------------------------------------------------- merging
    def merge(self, other: "StreamingCKA") -> "StreamingCKA":
        """Add ``other``'s rows into this accumulator (in place); returns self."""
        if not isinstance(other, StreamingCKA):
            raise TypeError(f"other must be a StreamingCKA, got {type(other).__name__}")
        if (other.layers, other.debiased) != (self.layers, self.debiased):
            raise ValueError(
                f"cannot merge StreamingCKA(layers={other.layers}, debiased={other.debiased}) into "
                f"StreamingCKA(layers={self.layers}, debiased={self.debiased})"
            )
        if other._state is None:
            return self
        if self._state is None:
            self._state = {k: v.clone() for k, v in other._state.items()}
        else:
            st, ot = self._state, other._state
            if st["sxy"].shape != ot["sxy"].shape:
                raise ValueError(f"cannot merge states of shapes {tuple(ot['sxy'].shape)} and {tuple(st['sxy'].shape)}")
            self._state = _combine(st, {k: v.to(st["n"].device) for k, v in ot.items()}, self._sum_keys())
        self._note_dtype(other._dtype, other._u)
        return self

    def all_reduce(self, group=None) -> "StreamingCKA":
        """Sum the state over the ranks of ``group`` (torch.distributed); every rank ends with the total.

        Ranks that saw no rows take part with zero sums. All ranks agree on one shift (the
        row-weighted mean of their shifts) before the sums are added. Raises ValueError for a
        state that carries gradients (collectives are not differentiable).
        """
        import torch.distributed as dist

        st = self._state
        if st is not None and any(v.requires_grad for v in st.values()):
            raise ValueError("all_reduce cannot carry gradients (torch.distributed collectives are not "
                             "differentiable): update with detached chunks or under torch.no_grad()")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("all_reduce needs an initialised torch.distributed process group")
        if st is not None:
            dev = st["sx"].device
        else:  # NCCL only moves CUDA tensors
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        meta = torch.zeros(5, dtype=torch.float64, device=dev)
        if st is not None:
            meta[:] = torch.tensor([st["sx"].shape[0], st["sx"].shape[-1], st["sy"].shape[-1],
                                    1.0 if self._dtype == torch.float64 else 0.0, self._u], dtype=torch.float64)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
        layers, dx, dy, wide = (int(v) for v in meta[:4].tolist())
        if layers == 0:
            raise ValueError("all_reduce: no rank has seen any rows")
        if st is None:
            self._state = st = self._empty(layers, dx, dy, dev)
        elif (st["sx"].shape[0], dx, dy) != (layers, st["sx"].shape[-1], st["sy"].shape[-1]):
            raise ValueError(f"all_reduce: ranks hold states of different shapes (this rank: {tuple(st['sxy'].shape)})")
        self._note_dtype(torch.float64 if wide else torch.float32, float(meta[4]))
        # common shift: the row-weighted mean of every rank's shift
        wx = st["shift_x"] * st["n"].unsqueeze(-1)
        wy = st["shift_y"] * st["n"].unsqueeze(-1)
        n_all = st["n"].clone()
        for t in (wx, wy, n_all):
            dist.all_reduce(t, group=group)
        shift_x = wx / n_all.clamp_min(1).unsqueeze(-1)
        shift_y = wy / n_all.clamp_min(1).unsqueeze(-1)
        moved = _reshift(st, st["shift_x"] - shift_x, st["shift_y"] - shift_y, self.debiased)
        for k in self._sum_keys():
            st[k] = moved[k].contiguous()
            dist.all_reduce(st[k], group=group)
        st["shift_x"], st["shift_y"], st["n"] = shift_x, shift_y, n_all
        return self

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Config and float64 state (tensors cloned); loadable with :meth:`load_state_dict`."""
        out = {"layers": self.layers, "debiased": self.debiased,
               "dtype": None if self._dtype is None else str(self._dtype).replace("torch.", ""),
               "unit_roundoff": self._u}
        if self._state is not None:
            out["state"] = {k: v.clone() for k, v in self._state.items()}
        return out

    def load_state_dict(self, state: dict) -> "StreamingCKA":
        """Restore from :meth:`state_dict`; the config must match this instance's."""
        if (state.get("layers"), state.get("debiased")) != (self.layers, self.debiased):
            raise ValueError(
                f"state_dict is for StreamingCKA(layers={state.get('layers')}, debiased={state.get('debiased')}), "
                f"this is StreamingCKA(layers={self.layers}, debiased={self.debiased})"
            )
        self._state = None if "state" not in state else {k: v.clone() for k, v in state["state"].items()}
        self._dtype = None if state.get("dtype") is None else getattr(torch, state["dtype"])
        # states saved before the roundoff was recorded: float32's, the coarsest a chunk is summed in
        self._u = float(state.get("unit_roundoff", unit_roundoff(torch.float32)))
        return self

    # ----------------------------------------------------------------- internals
    def _note_dtype(self, cd: Optional[torch.dtype], u: float) -> None:
        """Result dtype float64 once any float64 chunk arrived; u the coarsest roundoff seen."""
        if self._dtype is None or cd == torch.float64:
            self._dtype = cd
        self._u = max(self._u, u)

    def _sum_keys(self) -> tuple:
        return shifted_cross_product_keys(self.debiased)

    def _empty(self, layers: int, dx: int, dy: int, device) -> dict:
        f64 = dict(dtype=torch.float64, device=device)
        shapes = {"sxy": (layers, dx, dy), "sxx": (layers, dx, dx), "syy": (layers, dy, dy),
                  "sx": (layers, dx), "sy": (layers, dy), "sa": (layers,), "sb": (layers,), "saa": (layers,),
                  "sbb": (layers,), "sab": (layers,), "sax": (layers, dx), "sbx": (layers, dx),
                  "say": (layers, dy), "sby": (layers, dy)}
        st = {k: torch.zeros(shapes[k], **f64) for k in self._sum_keys()}
        st.update(shift_x=torch.zeros(layers, dx, **f64), shift_y=torch.zeros(layers, dy, **f64),
                  n=torch.zeros(layers, **f64))
        return st

    def _require_state(self, what: str) -> dict:
        if self._state is None:
            raise ValueError(f"StreamingCKA.{what}() called before any update()")
        return self._state


def _combine(a: dict, b: dict, keys: tuple) -> dict:
    """Two states (sums about their own shifts) as one, about their row-weighted mean shift: a new dict.

    Both are moved exactly (float64 algebra, :func:`_reshift`) onto the common shift, then added;
    neither input is modified.
    """
    debiased = "sa" in keys
    n = a["n"] + b["n"]  # (L,)
    wb = (b["n"] / n).unsqueeze(-1)  # (L, 1)
    shift_x = a["shift_x"] + (b["shift_x"] - a["shift_x"]) * wb  # (L, dx)
    shift_y = a["shift_y"] + (b["shift_y"] - a["shift_y"]) * wb  # (L, dy)
    ma = _reshift(a, a["shift_x"] - shift_x, a["shift_y"] - shift_y, debiased)
    mb = _reshift(b, b["shift_x"] - shift_x, b["shift_y"] - shift_y, debiased)
    out = {k: ma[k] + mb[k] for k in keys}
    out.update(shift_x=shift_x, shift_y=shift_y, n=n)
    return out


def _reshift(st: dict, dx_: torch.Tensor, dy_: torch.Tensor, debiased: bool) -> dict:
    """Sums of rows shifted by c, re-expressed for the shift c - d: x' -> x' + d (exact algebra, float64).

    To move sums from shift c_old to c_new, pass d = c_old - c_new.

    With u = x' + d, v = y' + e, a -> a + 2 x'.d + |d|^2 (likewise b); every sum is a polynomial
    in the old sums. Returns a new dict with the moved sums.
    """
    d, e, n = dx_.to(torch.float64), dy_.to(torch.float64), st["n"]
    sx, sy, sxx, syy, sxy = st["sx"], st["sy"], st["sxx"], st["syy"], st["sxy"]
    nd, ne = n.unsqueeze(-1) * d, n.unsqueeze(-1) * e  # (L, dx), (L, dy)
    out = {
        "sx": sx + nd,
        "sy": sy + ne,
        "sxy": sxy + sx.unsqueeze(-1) * e.unsqueeze(-2) + d.unsqueeze(-1) * (sy + ne).unsqueeze(-2),
        "sxx": sxx + sx.unsqueeze(-1) * d.unsqueeze(-2) + d.unsqueeze(-1) * (sx + nd).unsqueeze(-2),
        "syy": syy + sy.unsqueeze(-1) * e.unsqueeze(-2) + e.unsqueeze(-1) * (sy + ne).unsqueeze(-2),
    }
    if not debiased:
        return out
    c, f = d.square().sum(-1), e.square().sum(-1)  # (L,) |d|^2, |e|^2
    sxd, sye = (sx * d).sum(-1), (sy * e).sum(-1)  # (L,) sum x'.d, sum y'.e
    xxd = torch.einsum("lij,lj->li", sxx, d)  # (L, dx) sum x' (x'.d)
    yye = torch.einsum("lij,lj->li", syy, e)  # (L, dy) sum y' (y'.e)
    xye = torch.einsum("lij,lj->li", sxy, e)  # (L, dx) sum x' (y'.e)
    yxd = torch.einsum("lij,li->lj", sxy, d)  # (L, dy) sum y' (x'.d)
    dxxd, eyye = (d * xxd).sum(-1), (e * yye).sum(-1)  # (L,) sum (x'.d)^2, sum (y'.e)^2
    dxye = (d * xye).sum(-1)  # (L,) sum (x'.d)(y'.e)
    sa, sb = st["sa"], st["sb"]
    sax_d, sby_e = (st["sax"] * d).sum(-1), (st["sby"] * e).sum(-1)  # sum a (x'.d), sum b (y'.e)
    say_e, sbx_d = (st["say"] * e).sum(-1), (st["sbx"] * d).sum(-1)  # sum a (y'.e), sum b (x'.d)
    # new row norms: a + 2w + c with w = x'.d ; b + 2z + f with z = y'.e
    out["sa"] = sa + 2 * sxd + n * c
    out["sb"] = sb + 2 * sye + n * f
    out["saa"] = st["saa"] + 4 * sax_d + 4 * dxxd + 2 * c * sa + 4 * c * sxd + n * c * c
    out["sbb"] = st["sbb"] + 4 * sby_e + 4 * eyye + 2 * f * sb + 4 * f * sye + n * f * f
    out["sab"] = (st["sab"] + 2 * say_e + f * sa + 2 * sbx_d + 4 * dxye + 2 * f * sxd
                  + c * sb + 2 * c * sye + n * c * f)
    # sum (a + 2w + c)(x' + d) and the like
    a_new, b_new = out["sa"], out["sb"]
    out["sax"] = st["sax"] + 2 * xxd + c.unsqueeze(-1) * sx + a_new.unsqueeze(-1) * d
    out["sbx"] = st["sbx"] + 2 * xye + f.unsqueeze(-1) * sx + b_new.unsqueeze(-1) * d
    out["say"] = st["say"] + 2 * yxd + c.unsqueeze(-1) * sy + a_new.unsqueeze(-1) * e
    out["sby"] = st["sby"] + 2 * yye + f.unsqueeze(-1) * sy + b_new.unsqueeze(-1) * e
    return out
