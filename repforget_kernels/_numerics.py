"""Floating-point helpers shared by the metric front doors: roundoff, exact shifts, exact scales.

Every metric computes on shifted and scaled rows x' = (x - s) * sigma, where

- s is the column mean rounded to the compute dtype, so a kernel that subtracts s in that
  dtype applies exactly the value the caller records, and x - s is exact for columns with a
  large offset (Sterbenz: x and s within a factor 2) (``mean_shift``); the remainder
  mean - s is at most half an ulp of the mean, and is removed exactly in float64 algebra
  (CKA sums, PCA) or by centring the Gram (H K H);
- sigma is a power of two (exact: it only moves exponents) that brings the largest
  column range of each layer into [0.5, 1) (``range_scale``), so products of rows neither
  overflow (x ~ 1e9 in float32) nor underflow (x ~ 1e-20) before the metric's own ratio
  removes the scale.

``unit_roundoff`` gives the u used by the documented accuracy bounds and by the
"within rounding of zero" tests that decide when a metric is undefined.
"""
from __future__ import annotations

import torch

__all__ = ["unit_roundoff", "range_scale", "scale_from_extrema", "mean_shift", "shift_from_sums", "ZERO_TEST_FACTOR"]

# A quantity computed as a difference of terms whose magnitudes add up to E is taken as zero
# when it is at most ZERO_TEST_FACTOR * u * E: its rounding error is a few u * E (each term
# carries a relative error of a few u), so this leaves a margin of more than 10x for the
# accumulation growth of long float32 sums, while genuine values sit far above it (1/sqrt(rank)
# of E for a centred Gram, see cka._ratio).
ZERO_TEST_FACTOR = 64.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: 2^-53 float64, 2^-24 float32, 2^-11 float16, 2^-8 bfloat16."""
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
            torch.bfloat16: 2.0**-8}[dtype]


def range_scale(x3: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """Power-of-two scale per layer: (L, n, d) -> (L,) float64 sigma = 2^-e (:func:`scale_from_extrema`).

    Two reductions of x (amin, amax: faster than one torch.aminmax over a dimension on CPU); the front
    doors that also need the means take both from one pass (op ``column_stats``).
    """
    with torch.no_grad():
        return scale_from_extrema(x3.amin(-2), x3.amax(-2), centred)


def scale_from_extrema(lo: torch.Tensor, hi: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """Power-of-two scale per layer from the column extrema (L, d): -> (L,) float64 sigma = 2^-e.

    centred=True: e is the exponent of max_j (max_i x_ij - min_i x_ij), so every centred or
    mean-shifted value times sigma lies in (-1, 1) and the largest column range times sigma in
    [0.5, 1). centred=False: the same for max |x_ij| (data used without centring).
    A layer whose range is zero (constant columns) gets sigma = 1.
    """
    lo, hi = lo.detach().to(torch.float64), hi.detach().to(torch.float64)  # (L, d) each
    width = (hi - lo) if centred else torch.maximum(hi.abs(), lo.abs())  # (L, d)
    _, e = torch.frexp(width.amax(-1))  # (L,) width = f 2^e, f in [0.5, 1)
    return torch.ldexp(torch.ones_like(width[:, 0]), -e.to(torch.float64))  # (L,)


def mean_shift(x3: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means of (L, n, d): (mean (L, d) float64, shift (L, d) = mean rounded to cd) (:func:`shift_from_sums`)."""
    return shift_from_sums(x3.sum(-2, dtype=torch.float64), x3.shape[-2], cd)


def shift_from_sums(sums: torch.Tensor, n: int, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (L, d) float64, shift (L, d) = mean rounded to cd) from float64 column sums (L, d) of n rows.

    mean keeps the sums' autograd graph; shift is detached: every metric is invariant to the shift,
    or (a centring vector) stationary in it at the mean.
    """
    mean = sums / n  # (L, d)
    return mean, mean.detach().to(cd)
