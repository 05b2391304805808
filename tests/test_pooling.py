"""pool_tokens against the float64 reference, with left and right padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repforget_kernels import pool_tokens
from repforget_kernels import reference as R

from conftest import DTYPE, TOL, randn


def _mask(lengths, t, left=False):
    m = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            m[i, t - n:] = 1
        else:
            m[i, :n] = 1
    return m


class TestPoolTokens:
    @pytest.mark.parametrize("how", ["mean", "last", "first"])
    @pytest.mark.parametrize("left", [False, True])
    @pytest.mark.parametrize("dtype", [DTYPE, torch.bfloat16])
    def test_matches_reference(self, gen, how, left, dtype):
        h = randn(4, 9, 13, gen=gen, dtype=dtype)
        m = _mask([9, 3, 1, 6], 9, left).to(h.device)
        got = pool_tokens(h, m, sample=how)
        assert got.shape == (4, 13)
        # the reference pools the same (rounded) values; the mean is a float32 (float64) GEMV of <= 9 terms
        work = torch.float64 if dtype == torch.float64 else torch.float32
        np.testing.assert_allclose(R.to_f64(got), R.masked_pool_ref(h, m, how), rtol=TOL[work], atol=TOL[work])

    def test_tokens_are_every_real_token(self, gen):
        h = randn(3, 5, 4, gen=gen)
        m = _mask([5, 2, 3], 5).to(h.device)
        got = pool_tokens(h, m, sample="tokens")
        assert got.shape == (10, 4)
        torch.testing.assert_close(got, torch.cat([h[0], h[1, :2], h[2, :3]]).to(got.dtype))

    def test_padding_values_do_not_leak(self, gen):
        h = randn(2, 6, 3, gen=gen)
        m = _mask([4, 2], 6).to(h.device)
        poisoned = h.clone()
        poisoned[m == 0] = 1e6
        for how in ("mean", "last", "tokens"):
            torch.testing.assert_close(pool_tokens(poisoned, m, sample=how), pool_tokens(h, m, sample=how))

    def test_bad_input(self, gen):
        h = randn(2, 3, 4, gen=gen)
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\) = \(2, 3\), got \(2, 4\)"):
            pool_tokens(h, torch.ones(2, 4))
        with pytest.raises(ValueError, match=r"no real token at rows \[1\]"):
            pool_tokens(h, torch.tensor([[1, 1, 0], [0, 0, 0]]))
        with pytest.raises(ValueError, match="sample must be one of"):
            pool_tokens(h, torch.ones(2, 3), sample="max")
        with pytest.raises(ValueError, match=r"hidden must be \(B, T, d\)"):
            pool_tokens(h[0], torch.ones(3))
