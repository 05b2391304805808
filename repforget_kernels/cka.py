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

Every entry point reduces to the same mergeable sums of shifted rows (one op,
``shifted_cross_products``) or to centred Gram matrices (op ``centered_gram``);
:func:`_cka_from_sums` turns the sums into CKA for all three front doors.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._dispatch import kernel, register
from ._validate import check_rows, check_same_device, check_same_rows, compute_dtype

__all__ = ["linear_cka", "cka_matrix", "StreamingCKA"]

_SUM_KEYS = ("sxy", "sxx", "syy", "sx", "sy")
_DEBIASED_KEYS = ("sa", "sb", "saa", "sbb", "sab", "sax", "sbx", "say", "sby")


# --------------------------------------------------------------------------- ops (torch composites)


@register("shifted_cross_products", "torch")
def _shifted_cross_products_torch(x, y, shift_x, shift_y, debiased):
    """Sums over the rows of one chunk, after subtracting a shift from every row.

    Contract shared by every backend:
      x (L, n, dx), y (L, n, dy) any float dtype; shift_x (L, dx), shift_y (L, dy) in the
      compute dtype (float32, or float64 for float64 input).
      Returns a dict of tensors in float32 or wider (float64 for float64 input), with
      x' = x - shift_x, y' = y - shift_y, a_i = ||x'_i||^2, b_i = ||y'_i||^2:
        sxy (L, dx, dy) = X'^T Y'    sxx (L, dx, dx) = X'^T X'    syy (L, dy, dy) = Y'^T Y'
        sx (L, dx) = sum_i x'_i      sy (L, dy) = sum_i y'_i
      and when ``debiased``: sa, sb, saa, sbb, sab (L,) = sum a, b, a^2, b^2, ab;
        sax, sbx (L, dx) = sum a_i x'_i, sum b_i x'_i;  say, sby (L, dy) = sum a_i y'_i, sum b_i y'_i.
    Cost: n (dx dy + dx^2 + dy^2) multiply-adds; memory: one shifted copy of x and y.
    """
    cd = shift_x.dtype
    xs = x.to(cd) - shift_x.unsqueeze(-2)  # (L, n, dx)
    ys = y.to(cd) - shift_y.unsqueeze(-2)  # (L, n, dy)
    xt = xs.transpose(-1, -2)  # (L, dx, n)
    out = {
        "sxy": torch.bmm(xt, ys),  # (L, dx, dy)
        "sxx": torch.bmm(xt, xs),  # (L, dx, dx)
        "syy": torch.bmm(ys.transpose(-1, -2), ys),  # (L, dy, dy)
        "sx": xs.sum(-2),  # (L, dx) cascade-summed in the compute dtype: shifted values are small
        "sy": ys.sum(-2),  # (L, dy)
    }
    if debiased:
        a = torch.linalg.vector_norm(xs, dim=-1).square().to(torch.float64)  # (L, n) a_i = ||x'_i||^2
        b = torch.linalg.vector_norm(ys, dim=-1).square().to(torch.float64)  # (L, n)
        ab = torch.stack([a, b], -2).to(cd)  # (L, 2, n): both weight vectors, one read of xs and of ys
        abx = torch.bmm(ab, xs)  # (L, 2, dx) rows: sum a_i x'_i, sum b_i x'_i
        aby = torch.bmm(ab, ys)  # (L, 2, dy) rows: sum a_i y'_i, sum b_i y'_i
        out.update(
            sa=a.sum(-1), sb=b.sum(-1), saa=a.square().sum(-1), sbb=b.square().sum(-1), sab=(a * b).sum(-1),
            sax=abx[:, 0], sbx=abx[:, 1], say=aby[:, 0], sby=aby[:, 1],
        )
    return out


@register("centered_gram", "torch")
def _centered_gram_torch(x, unbiased):
    """Centred (or U-centred) Gram matrices of a stack of layers.

    Contract shared by every backend:
      x (L, n, d) any float dtype -> (L, n, n) in float32 (float64 for float64 input).
      unbiased=False: Kc = Xc Xc^T (equal to H K H, never built that way).
      unbiased=True: the U-centred Gram of Szekely & Rizzo, from centred features:
        U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) for i != j, U_ii = 0,
        with K~ = K with zero diagonal, r = K~ 1, s = 1^T K~ 1; <U(K), U(L)> / (n(n-3)) = HSIC_u.
    Cost: n^2 d multiply-adds (+ O(n^2) for U-centring); memory: the (L, n, n) result.
    """
    cd = compute_dtype(x)
    xc = x.to(cd)
    xc = xc - xc.mean(-2, keepdim=True)  # (L, n, d)
    k = torch.bmm(xc, xc.transpose(-1, -2))  # (L, n, n)
    if unbiased:
        n = k.shape[-1]
        k.diagonal(dim1=-2, dim2=-1).zero_()
        r = k.sum(-1, dtype=torch.float64)  # (L, n)
        s = r.sum(-1, keepdim=True)  # (L, 1)
        r_n = (r / (n - 2)).to(cd)  # (L, n)
        k -= r_n.unsqueeze(-1)
        k -= r_n.unsqueeze(-2)
        k += (s / ((n - 1) * (n - 2))).to(cd).unsqueeze(-1)
        k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


# --------------------------------------------------------------------------- sums -> CKA


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


def _cka_from_sums(s: dict, n: torch.Tensor, debiased: bool) -> torch.Tensor:
    """CKA for each layer from the float64 sums of shifted rows (see ``shifted_cross_products``): -> (L,) float64."""
    nn_ = n.unsqueeze(-1)  # (L, 1)
    m, p = s["sx"] / nn_, s["sy"] / nn_  # (L, dx), (L, dy) shifted means
    nm = (n.unsqueeze(-1) * m).unsqueeze(-1)  # (L, dx, 1)
    np_ = (n.unsqueeze(-1) * p).unsqueeze(-1)  # (L, dy, 1)
    cxy = torch.baddbmm(s["sxy"], nm, p.unsqueeze(-2), alpha=-1)  # (L, dx, dy) = Sxy - n m p^T
    cxx = torch.baddbmm(s["sxx"], nm, m.unsqueeze(-2), alpha=-1)  # (L, dx, dx)
    cyy = torch.baddbmm(s["syy"], np_, p.unsqueeze(-2), alpha=-1)  # (L, dy, dy)
    hxy, hxx, hyy = _frob2(cxy), _frob2(cxx), _frob2(cyy)  # (L,) tr(KL), tr(KK), tr(LL)
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
    return _ratio(hxy, hxx, hyy)


def _ratio(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor, names: tuple = ("x", "y")) -> torch.Tensor:
    """hxy / sqrt(hxx hyy), raising where an input has no variance (CKA undefined).

    hxx, hyy may be broadcast views ((Lx, 1), (1, Ly)); the error names ``names`` and the flat index.
    """
    for h, name in ((hxx, names[0]), (hyy, names[1])):
        bad = ~(h.flatten() > 0)
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"{name} has no variance to compare (all rows equal after centring) at batch/layer index {idx}: "
                "CKA is undefined"
            )
    return hxy / (hxx.sqrt() * hyy.sqrt())


# --------------------------------------------------------------------------- public API


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _feature_sums(x3, y3, debiased: bool, backend, shift_x=None, shift_y=None) -> dict:
    """float64 sums of one chunk, shifted by column means (or the given shifts): dict of (L, ...) tensors."""
    cd = compute_dtype(x3, y3)
    if shift_x is None:
        shift_x = x3.mean(-2, dtype=cd)  # (L, dx)
        shift_y = y3.mean(-2, dtype=cd)  # (L, dy)
    op = kernel("shifted_cross_products", x3.device, backend)
    sums = op(x3, y3, shift_x, shift_y, debiased)
    return {k: v.to(torch.float64) for k, v in sums.items()}


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
        method: ``"feature"`` (cost n (dx dy + dx^2 + dy^2), memory dx dy),
            ``"gram"`` (cost n^2 (dx + dy), memory n^2) or ``"auto"`` (feature when dx + dy <= n).
        backend: force a backend (see ``repforget_kernels._dispatch``).

    Returns:
        () or (B,) tensor, float32 (float64 for float64 input).

    Formula: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), HSIC sums in float64.
    """
    min_rows = 4 if debiased else 2
    check_rows(x, "x", min_rows=min_rows)
    check_rows(y, "y", min_rows=min_rows)
    check_same_rows(x, y)
    if method not in ("auto", "gram", "feature"):
        raise ValueError(f"method must be 'auto', 'gram' or 'feature', got {method!r}")
    x3, y3 = _as_batch(x), _as_batch(y)
    n, dx, dy = x3.shape[-2], x3.shape[-1], y3.shape[-1]
    if method == "auto":
        method = "feature" if dx + dy <= n else "gram"
    if method == "feature":
        sums = _feature_sums(x3, y3, debiased, backend)
        counts = torch.full((x3.shape[0],), float(n), dtype=torch.float64, device=x3.device)
        cka = _cka_from_sums(sums, counts, debiased)
    else:
        gram = kernel("centered_gram", x3.device, backend)
        k, l_ = gram(x3, debiased), gram(y3, debiased)  # (B, n, n) each
        cka = _ratio((k * l_).sum((-2, -1), dtype=torch.float64), _frob2(k), _frob2(l_))
    cka = cka.to(compute_dtype(x, y))
    return cka if x.dim() == 3 else cka[0]


def _stack_layers(xs, name: str, min_rows: int):
    """Check layers: a (L, n, d) tensor is returned as it is, a sequence of (n, d_i) tensors as a list."""
    if isinstance(xs, torch.Tensor):
        check_rows(xs, name, min_rows=min_rows)
        if xs.dim() != 3:
            raise ValueError(f"{name} must be (L, n, d) or a sequence of (n, d_i) tensors, got shape {tuple(xs.shape)}")
        return xs
    if not isinstance(xs, Sequence) or isinstance(xs, (str, bytes)):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} is empty: give at least one layer")
    layers = []
    for i, t in enumerate(xs):
        check_rows(t, f"{name}[{i}]", min_rows=min_rows, batched=False)
        if t.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"all layers need the same number of rows: {name}[0] has shape {tuple(xs[0].shape)}, "
                f"{name}[{i}] has shape {tuple(t.shape)}"
            )
        check_same_device(**{f"{name}[0]": xs[0], f"{name}[{i}]": t})
        layers.append(t)
    return layers


def _layer_grams(layers, debiased: bool, backend) -> torch.Tensor:
    """Centred or U-centred Gram of each layer, flattened: -> (L, n*n). A stack, or layers sharing d, go in one call."""
    gram = kernel("centered_gram", layers[0].device, backend)
    if isinstance(layers, torch.Tensor):
        return gram(layers, debiased).flatten(1)
    if len({t.shape for t in layers}) == 1:
        return gram(torch.stack(layers), debiased).flatten(1)
    return torch.cat([gram(t.unsqueeze(0), debiased).flatten(1) for t in layers])


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
        method: ``"gram"``: each layer's centred Gram once (L n^2 d), then all pairs as one
            GEMM on the flattened Grams (Lx Ly n^2), memory (Lx + Ly) n^2;
            ``"feature"``: cross-products per pair (Lx Ly n dx dy), memory dx dy;
            ``"auto"``: gram when the Grams fit in 2^28 elements (1 GiB of float32), else feature.
        backend: force a backend.

    Returns:
        (Lx, Ly) tensor, float32 (float64 for float64 input).
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
    if method == "gram":
        gx = _layer_grams(lx, debiased, backend)  # (Lx, n^2)
        gy = gx if ys is None else _layer_grams(ly, debiased, backend)  # (Ly, n^2)
        pair = (gx @ gy.T).to(torch.float64)  # (Lx, Ly)
        if ys is None:  # the diagonal holds the squared norms, from the same GEMM: CKA(X_i, X_i) = 1 exactly
            nx = ny = pair.diagonal().clone()  # (Lx,)
        else:
            nx = torch.linalg.vector_norm(gx, dim=-1, dtype=torch.float64).square()  # (Lx,)
            ny = torch.linalg.vector_norm(gy, dim=-1, dtype=torch.float64).square()  # (Ly,)
        return _ratio(pair, nx.unsqueeze(1), ny.unsqueeze(0), ("xs", "xs" if ys is None else "ys")).to(out_dtype)
    out = torch.empty(len(lx), len(ly), dtype=torch.float64)
    for i, xi in enumerate(lx):
        for j, yj in enumerate(ly):
            try:
                out[i, j] = linear_cka(xi, yj, debiased=debiased, method="feature", backend=backend).double()
            except ValueError as exc:  # name the layers, not linear_cka's x and y
                raise ValueError(f"layer pair (xs[{i}], {'xs' if ys is None else 'ys'}[{j}]): {exc}") from None
    return out.to(device=lx[0].device, dtype=out_dtype)


class StreamingCKA:
    """Exact linear CKA over any number of rows, fed in chunks, in O(dx dy) memory.

    Holds mergeable float64 sums of shifted rows (see ``shifted_cross_products``) with the
    shift set to the first chunk's column means; :meth:`compute` centres exactly at the end.
    The result equals :func:`linear_cka` on all rows seen, whatever the chunking, the merge
    order or the process that saw them (:meth:`merge`, :meth:`all_reduce` move both sides to
    one shift exactly before adding).

    Args:
        layers: None for (n_chunk, d) inputs, else the number of layers L for (L, n_chunk, d) inputs.
        debiased: unbiased HSIC (needs n >= 4 rows in total).
        backend: force a backend for the per-chunk sums.

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

    # ----------------------------------------------------------------- feeding
    def _check_chunk(self, t: torch.Tensor, name: str) -> torch.Tensor:
        check_rows(t, name, min_rows=1)
        if self.layers is None and t.dim() != 2:
            raise ValueError(f"{name} must be (n_chunk, d) since layers=None, got shape {tuple(t.shape)}")
        if self.layers is not None and (t.dim() != 3 or t.shape[0] != self.layers):
            raise ValueError(f"{name} must be ({self.layers}, n_chunk, d) since layers={self.layers}, got shape {tuple(t.shape)}")
        return _as_batch(t)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "StreamingCKA":
        """Add a chunk of rows: x (n_chunk, dx) or (L, n_chunk, dx), y likewise with dy. Returns self."""
        x3, y3 = self._check_chunk(x, "x"), self._check_chunk(y, "y")
        check_same_rows(x3, y3)
        cd = compute_dtype(x3, y3)
        if self._state is None:
            self._state = self._empty(x3.shape[0], x3.shape[-1], y3.shape[-1], x3.device, cd)
            # stored in float64 but rounded to the compute dtype: exactly the shift the op applies
            self._state["shift_x"] = x3.mean(-2, dtype=cd).to(torch.float64)
            self._state["shift_y"] = y3.mean(-2, dtype=cd).to(torch.float64)
            self._dtype = cd
        st = self._state
        if (x3.shape[-1], y3.shape[-1]) != (st["sx"].shape[-1], st["sy"].shape[-1]) or x3.device != st["sx"].device:
            raise ValueError(
                f"chunk shapes x {tuple(x.shape)}, y {tuple(y.shape)} on {x.device} do not match the state "
                f"(dx={st['sx'].shape[-1]}, dy={st['sy'].shape[-1]}, on {st['sx'].device})"
            )
        if cd == torch.float64:
            self._dtype = torch.float64
        sums = _feature_sums(x3, y3, self.debiased, self.backend, st["shift_x"].to(cd), st["shift_y"].to(cd))
        for k, v in sums.items():
            st[k] += v
        st["n"] += x3.shape[-2]
        return self

    # ----------------------------------------------------------------- results
    def compute(self) -> torch.Tensor:
        """CKA over every row seen: () or (L,), float32 (float64 when any chunk was float64)."""
        st = self._require_state("compute")
        n_total = int(st["n"][0])
        need = 4 if self.debiased else 2
        if n_total < need:
            raise ValueError(f"StreamingCKA has seen {n_total} row(s); CKA needs at least {need}")
        cka = _cka_from_sums(st, st["n"], self.debiased).to(self._dtype)
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
            self._dtype = other._dtype
            return self
        st, ot = self._state, other._state
        if st["sxy"].shape != ot["sxy"].shape:
            raise ValueError(f"cannot merge states of shapes {tuple(ot['sxy'].shape)} and {tuple(st['sxy'].shape)}")
        moved = _reshift(ot, ot["shift_x"] - st["shift_x"], ot["shift_y"] - st["shift_y"], self.debiased)
        for k in self._sum_keys():
            st[k] += moved[k].to(st[k].device)
        st["n"] += ot["n"].to(st["n"].device)
        if other._dtype == torch.float64:
            self._dtype = torch.float64
        return self

    def all_reduce(self, group=None) -> "StreamingCKA":
        """Sum the state over the ranks of ``group`` (torch.distributed); every rank ends with the total.

        Ranks that saw no rows take part with zero sums. All ranks agree on one shift (the
        row-weighted mean of their shifts) before the sums are added.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("all_reduce needs an initialised torch.distributed process group")
        st = self._state
        if st is not None:
            dev = st["sx"].device
        else:  # NCCL only moves CUDA tensors
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        meta = torch.zeros(4, dtype=torch.float64, device=dev)
        if st is not None:
            meta[:] = torch.tensor([st["sx"].shape[0], st["sx"].shape[-1], st["sy"].shape[-1],
                                    1.0 if self._dtype == torch.float64 else 0.0], dtype=torch.float64)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
        layers, dx, dy, wide = (int(v) for v in meta.tolist())
        if layers == 0:
            raise ValueError("all_reduce: no rank has seen any rows")
        if st is None:
            self._state = st = self._empty(layers, dx, dy, dev, torch.float32)
            self._dtype = torch.float32
        elif (st["sx"].shape[0], dx, dy) != (layers, st["sx"].shape[-1], st["sy"].shape[-1]):
            raise ValueError(f"all_reduce: ranks hold states of different shapes (this rank: {tuple(st['sxy'].shape)})")
        if wide:
            self._dtype = torch.float64
        # common shift: the row-weighted mean of every rank's shift
        wx = st["shift_x"] * st["n"].unsqueeze(-1)
        wy = st["shift_y"] * st["n"].unsqueeze(-1)
        n_all = st["n"].clone()
        for t in (wx, wy, n_all):
            dist.all_reduce(t, group=group)
        # rounded to the dtype later chunks are shifted in, so the stored shift is the one applied
        shift_x = (wx / n_all.clamp_min(1).unsqueeze(-1)).to(self._dtype).to(torch.float64)
        shift_y = (wy / n_all.clamp_min(1).unsqueeze(-1)).to(self._dtype).to(torch.float64)
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
               "dtype": None if self._dtype is None else str(self._dtype).replace("torch.", "")}
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
        return self

    # ----------------------------------------------------------------- internals
    def _sum_keys(self) -> tuple:
        return _SUM_KEYS + (_DEBIASED_KEYS if self.debiased else ())

    def _empty(self, layers: int, dx: int, dy: int, device, cd) -> dict:
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
