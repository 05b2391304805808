"""Diagonal Fisher: the three ops through their public functions on every backend, against the
float64 references, and DiagonalFisher against an autograd brute force on tiny transformers models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from conftest import TOL, randn
from repforget_kernels import DiagonalFisher, fisher_accumulate_, fisher_histogram, per_sample_linear_fisher
from repforget_kernels import _ops
from repforget_kernels._dispatch import kernel
from repforget_kernels._ops import HISTOGRAM, PER_SAMPLE_LINEAR_FISHER, SQUARE_ACCUMULATE
from repforget_kernels.reference import (
    fisher_accumulate_ref,
    fisher_histogram_ref,
    per_sample_linear_fisher_ref,
    to_f64,
)

HALF = (torch.float16, torch.bfloat16)


def rule_of(df: DiagonalFisher, name: str) -> str:
    """The kind of rule rebuilding parameter ``name``'s per-sample squares ("loop": the exact fallback)."""
    rule = df._strategy[name]
    return "loop" if rule is None else rule.kind
ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (float64), the error measure of every comparison here."""
    got, ref = to_f64(got), to_f64(ref)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


def tol_for(*dtypes) -> float:
    """Input rounding is shared with the reference, so only the accumulation differs: float32 work."""
    return TOL[torch.float64] if all(d == torch.float64 for d in dtypes) else TOL[torch.float32]


# --------------------------------------------------------------------------- fisher_accumulate_


class TestFisherAccumulate:
    @pytest.mark.parametrize("gdtype", ALL_FLOATS)
    @pytest.mark.parametrize("adtype", (torch.float32, torch.float64))
    def test_matches_reference(self, backend, gen, device, gdtype, adtype):
        acc = randn(37, 13, gen=gen, dtype=adtype, device=device).abs()
        grad = randn(37, 13, gen=gen, dtype=gdtype, device=device)
        want = fisher_accumulate_ref(acc, grad, 0.37)
        got = fisher_accumulate_(acc, grad, scale=0.37, backend=backend)
        assert got is acc and got.dtype == adtype
        assert rel_err(got, want) < tol_for(adtype, gdtype)

    def test_sequence_is_updated_pairwise(self, backend, gen, device):
        shapes = [(5,), (3, 7), (2, 3, 11), (1,)]
        dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
        accs = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes]
        grads = [randn(*s, gen=gen, dtype=d, device=device) for s, d in zip(shapes, dtypes)]
        for _ in range(2):
            out = fisher_accumulate_(accs, grads, backend=backend)
        assert out is accs
        for a, g in zip(accs, grads):
            assert rel_err(a, 2 * to_f64(g) ** 2) < TOL[torch.float32]

    def test_half_grads_are_upcast_before_squaring(self, backend, device):
        # 3e-30**2 = 9e-60 underflows to 0 in bf16/float32; only an upcast square keeps it.
        acc = torch.zeros(4, dtype=torch.float64, device=device)
        fisher_accumulate_(acc, torch.full((4,), 3e-30, dtype=torch.bfloat16, device=device), backend=backend)
        g64 = float(torch.tensor(3e-30, dtype=torch.bfloat16).double())
        assert torch.equal(acc, torch.full_like(acc, g64**2))  # a bf16 value's square is exact in float64
        # fp16: 1e-4**2 = 1e-8 is below fp16's smallest subnormal (6e-8).
        acc32 = torch.zeros(4, dtype=torch.float32, device=device)
        fisher_accumulate_(acc32, torch.full((4,), 1e-4, dtype=torch.float16, device=device), backend=backend)
        assert float(acc32.min()) > 0.9e-8

    def test_op_contract_in_place_and_scaled(self, backend, gen, device):
        op = kernel(SQUARE_ACCUMULATE, device, backend)
        acc = torch.ones(9, 5, dtype=torch.float64, device=device)
        g = randn(9, 5, gen=gen, dtype=torch.bfloat16, device=device)
        assert op([acc], [g], -0.5) is None
        assert rel_err(acc, fisher_accumulate_ref(np.ones((9, 5)), g, -0.5)) < TOL[torch.float64]

    def test_errors(self, device):
        acc = torch.zeros(3, 4, device=device)
        with pytest.raises(ValueError, match=r"grad\[1\] has shape \(4, 3\) but fisher\[1\] has shape \(3, 4\)"):
            fisher_accumulate_([acc, acc.clone()], [acc, torch.zeros(4, 3, device=device)])
        with pytest.raises(TypeError, match="fisher must be float32 or float64"):
            fisher_accumulate_(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3))
        with pytest.raises(TypeError, match="grad must have a floating dtype"):
            fisher_accumulate_(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"grad\[0\] contains 3 NaN or Inf"):
            fisher_accumulate_([acc], [torch.tensor([[0.0, float("nan"), 0, 0]] * 3)])
        with pytest.raises(ValueError, match="both be tensors or both sequences"):
            fisher_accumulate_([acc], acc)
        with pytest.raises(ValueError, match="fisher must be contiguous"):
            fisher_accumulate_(torch.zeros(4, 3).T, acc)
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fisher_accumulate_(acc, acc, scale=float("inf"))


# --------------------------------------------------------------------------- per_sample_linear_fisher


def _mask(b, t, gen, device):
    m = torch.rand(b, t, generator=gen) > 0.3  # (B, T)
    m[:, 0] = True
    return m.to(device)


class TestPerSampleLinearFisher:
    @pytest.mark.parametrize("b,t,n_in,n_out", [(1, 7, 13, 5), (3, 9, 17, 29), (5, 1, 11, 6), (2, 33, 3, 40)])
    @pytest.mark.parametrize("masked", [False, True])
    def test_matches_reference(self, backend, gen, device, dtype, b, t, n_in, n_out, masked):
        x = randn(b, t, n_in, gen=gen, dtype=dtype, device=device)
        g = randn(b, t, n_out, gen=gen, dtype=dtype, device=device)
        mask = _mask(b, t, gen, device) if masked else None
        got = per_sample_linear_fisher(x, g, mask=mask, backend=backend)
        assert got.shape == (n_out, n_in) and got.dtype == dtype
        assert rel_err(got, per_sample_linear_fisher_ref(x, g, mask)) < tol_for(dtype)

    @pytest.mark.parametrize("half", HALF)
    def test_half_inputs_computed_in_float32(self, backend, gen, device, half):
        x = randn(4, 10, 19, gen=gen, dtype=half, device=device)
        g = randn(4, 10, 7, gen=gen, dtype=half, device=device)
        mask = _mask(4, 10, gen, device)
        got = per_sample_linear_fisher(x, g, mask=mask, backend=backend)
        assert got.dtype == torch.float32
        assert rel_err(got, per_sample_linear_fisher_ref(x, g, mask)) < TOL[torch.float32]

    def test_out_accumulates_across_batches(self, backend, gen, device):
        xs = [randn(3, 6, 9, gen=gen, device=device) for _ in range(2)]
        gs = [randn(3, 6, 4, gen=gen, device=device) for _ in range(2)]
        out = torch.full((4, 9), 2.0, dtype=torch.float64, device=device)
        for x, g in zip(xs, gs):
            assert per_sample_linear_fisher(x, g, out=out, backend=backend) is out
        want = 2.0 + per_sample_linear_fisher_ref(torch.cat(xs), torch.cat(gs))
        assert rel_err(out, want) < TOL[torch.float32]

    def test_op_contract_adds_into_out(self, backend, gen, device):
        op = kernel(PER_SAMPLE_LINEAR_FISHER, device, backend)
        x = randn(2, 5, 7, gen=gen, dtype=torch.float64, device=device)
        g = randn(2, 5, 3, gen=gen, dtype=torch.float64, device=device)
        mask = _mask(2, 5, gen, device)
        out = torch.ones(3, 7, dtype=torch.float64, device=device)
        assert op(x, g, mask, out) is None
        assert rel_err(out, 1.0 + per_sample_linear_fisher_ref(x, g, mask)) < TOL[torch.float64]

    def test_2d_input_is_one_token_per_sample(self, backend, gen, device):
        x, g = randn(6, 8, gen=gen, device=device), randn(6, 5, gen=gen, device=device)
        mask = torch.tensor([1, 0, 1, 1, 0, 1], device=device)
        got = per_sample_linear_fisher(x, g, mask=mask, backend=backend)
        want = per_sample_linear_fisher_ref(x.unsqueeze(1), g.unsqueeze(1), mask.unsqueeze(1))
        assert rel_err(got, want) < TOL[torch.float32]

    def test_integer_mask_equals_bool_mask(self, backend, gen, device):
        x, g = randn(3, 8, 5, gen=gen, device=device), randn(3, 8, 4, gen=gen, device=device)
        m = _mask(3, 8, gen, device)
        a = per_sample_linear_fisher(x, g, mask=m, backend=backend)
        b = per_sample_linear_fisher(x, g, mask=m.long(), backend=backend)
        assert torch.equal(a, b)

    @pytest.mark.parametrize("floor", [64, 2048])
    def test_composite_row_blocks_and_sample_chunks(self, gen, device, monkeypatch, floor):
        # A tiny scratch budget forces row blocks (64 B) or several samples per GEMM (2 KiB).
        monkeypatch.setattr(_ops, "_SCRATCH_FLOOR_BYTES", floor)
        x, g = randn(7, 5, 9, gen=gen, device=device), randn(7, 5, 12, gen=gen, device=device)
        mask = _mask(7, 5, gen, device)
        c, rows = _ops._plan_chunks(7, 5, 9, 12, 4)
        assert (rows < 12) if floor == 64 else (c > 1)
        got = per_sample_linear_fisher(x, g, mask=mask, backend="torch")
        assert rel_err(got, per_sample_linear_fisher_ref(x, g, mask)) < TOL[torch.float32]

    def test_composite_scratch_under_two_weight_matrices(self):
        b, t, n_in, n_out = 32, 128, 1024, 1024
        w = n_in * n_out * 4
        c, rows = _ops._plan_chunks(b, t, n_in, n_out, 4)
        scratch = c * rows * n_in * 4 + c * t * (n_in + n_out) * 4  # per-sample block + upcast/masked inputs
        assert scratch + w < 2 * w  # beyond the inputs, counting the freshly allocated result

    def test_errors(self, device):
        x, g = torch.zeros(2, 3, 4, device=device), torch.zeros(2, 3, 5, device=device)
        with pytest.raises(ValueError, match=r"got x \(2, 3, 4\) and grad_out \(2, 4, 5\)"):
            per_sample_linear_fisher(x, torch.zeros(2, 4, 5))
        with pytest.raises(ValueError, match=r"got x \(2, 3, 4, 1\)"):
            per_sample_linear_fisher(torch.zeros(2, 3, 4, 1), g)
        with pytest.raises(ValueError, match=r"out must have shape \(out_features, in_features\) = \(5, 4\)"):
            per_sample_linear_fisher(x, g, out=torch.zeros(4, 5))
        with pytest.raises(TypeError, match="out must be float32 or float64"):
            per_sample_linear_fisher(x, g, out=torch.zeros(5, 4, dtype=torch.float16))
        with pytest.raises(TypeError, match="mask must be bool or integer"):
            per_sample_linear_fisher(x, g, mask=torch.ones(2, 3))
        with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
            per_sample_linear_fisher(x, g, mask=torch.ones(3, 2, dtype=torch.bool))
        with pytest.raises(TypeError, match="mask must be a tensor or an array of numbers"):
            per_sample_linear_fisher(x, g, mask="keep")
        with pytest.raises(TypeError, match="out must be a torch.Tensor, got ndarray"):
            per_sample_linear_fisher(x, g, out=np.zeros((5, 4), dtype=np.float32))
        bad = g.clone()
        bad[0, 1, 2] = float("nan")
        with pytest.raises(ValueError, match="grad_out contains 1 NaN"):
            per_sample_linear_fisher(x, bad)
        with pytest.raises(TypeError, match="x must have a floating dtype"):
            per_sample_linear_fisher(torch.zeros(2, 3, 4, dtype=torch.int32), g)


# --------------------------------------------------------------------------- fisher_histogram


def _fisher_like(gen, *shape, dtype=torch.float32, device=None):
    """Non-negative values spread over many decades, ~10% exact zeros: (*shape)."""
    v = torch.exp(3 * torch.randn(*shape, generator=gen, dtype=torch.float64))
    v[torch.rand(*shape, generator=gen) < 0.1] = 0.0
    return v.to(device=device, dtype=dtype)


class TestFisherHistogram:
    @pytest.mark.parametrize("log", [True, False])
    @pytest.mark.parametrize("vdtype", ALL_FLOATS)
    def test_matches_reference(self, backend, gen, device, log, vdtype):
        # edges: torch's and numpy's logspace / linspace both round the exponent t = a + i h (|t| <= 30 here)
        # or the point lo + i h, a relative error <= ln(10) |t| 4 u ~ 3e-14: rtol 1e-12
        v = _fisher_like(gen, 57, 31, dtype=vdtype, device=device)
        counts, edges = fisher_histogram(v, bins=23, log=log, backend=backend)
        want_counts, want_edges, want_zero = fisher_histogram_ref(v, bins=23, log=log)
        assert counts.dtype == torch.int64 and edges.dtype == torch.float64
        np.testing.assert_array_equal(counts.cpu().numpy(), want_counts)
        np.testing.assert_allclose(edges.cpu().numpy(), want_edges, rtol=1e-12)
        hist = fisher_histogram(v, bins=23, log=log, backend=backend)
        assert hist.n_zero == want_zero and int(hist.counts.sum()) + hist.n_zero == v.numel()

    def test_pooled_dict_and_sequence_equal_concatenation(self, backend, gen, device):
        parts = [_fisher_like(gen, 13, 7, device=device), _fisher_like(gen, 41, device=device), _fisher_like(gen, 3, 2, 5, device=device)]
        flat = torch.cat([p.reshape(-1) for p in parts])
        want = fisher_histogram_ref(flat, bins=17)
        for pooled in (parts, tuple(parts), {f"p{i}": p for i, p in enumerate(parts)}):
            hist = fisher_histogram(pooled, bins=17, backend=backend)
            np.testing.assert_array_equal(hist.counts.cpu().numpy(), want[0])
            np.testing.assert_allclose(hist.edges.cpu().numpy(), want[1], rtol=1e-12)
            assert hist.n_zero == want[2]

    @pytest.mark.parametrize("log", [True, False])
    @pytest.mark.parametrize("value", [0.25, 1e20])
    def test_single_distinct_value(self, backend, device, log, value):
        v = torch.full((9,), value, dtype=torch.float64, device=device)
        counts, edges = fisher_histogram(v, bins=4, log=log, backend=backend)
        want_counts, want_edges, _ = fisher_histogram_ref(v, bins=4, log=log)
        assert bool((edges[1:] > edges[:-1]).all())  # a usable range even for huge values
        np.testing.assert_array_equal(counts.cpu().numpy(), want_counts)
        assert int(counts.sum()) == 9
        np.testing.assert_allclose(edges.cpu().numpy(), want_edges, rtol=1e-12)

    @pytest.mark.parametrize("log", [True, False])
    def test_op_contract_bounds(self, backend, device, log):
        op = kernel(HISTOGRAM, device, backend)
        v = torch.tensor([0.0, 0.5, 1.0, 2.5, 4.5, 7.9, 8.0, 9.0, -1.0], dtype=torch.float32, device=device)
        got = op(v, 1.0, 8.0, 3, log).cpu().tolist()
        # linear bins [1, 3.33), [3.33, 5.67), [5.67, 8]; log bins [1, 2), [2, 4), [4, 8]; 8.0 == hi is in the
        # last bin, 0.5, 9.0 (outside) and 0, -1 are not counted.
        assert got == ([1, 1, 3] if log else [2, 1, 2])

    def test_result_unpacks_and_pickles(self, gen):
        import pickle

        hist = fisher_histogram(_fisher_like(gen, 50), bins=5)
        counts, edges = hist
        again = pickle.loads(pickle.dumps(hist))
        assert torch.equal(again.counts, counts) and torch.equal(again.edges, edges) and again.n_zero == hist.n_zero

    def test_errors(self):
        with pytest.raises(ValueError, match="negative values"):
            fisher_histogram(torch.tensor([1.0, -2.0]))
        with pytest.raises(ValueError, match=r"values\[1\] contains 1 NaN or Inf"):
            fisher_histogram([torch.ones(3), torch.tensor([float("inf")])])
        with pytest.raises(ValueError, match="all zero"):
            fisher_histogram(torch.zeros(5))
        with pytest.raises(ValueError, match="bins must be a positive integer"):
            fisher_histogram(torch.ones(5), bins=0)
        with pytest.raises(ValueError, match="no element"):
            fisher_histogram(torch.ones(0))
        with pytest.raises(TypeError, match="values must be a tensor"):
            fisher_histogram("abc")


# --------------------------------------------------------------------------- DiagonalFisher


VOCAB = 97
# DiagonalFisher against per-sequence backward passes of the same model: the same products summed in
# another order (batched vs single GEMMs). A gradient entry sums m <= B T V ~ 3e3 products (B = 3-4,
# T = 10, V = 97), so its error is <= 5 sqrt(m) u (conftest's probabilistic bound) times the sum of
# |terms|, which in these tiny random models exceeds max |g| by a factor kappa; a square doubles the
# relative error. float64: 2 * 5 * 55 * 2^-53 * kappa <= 1e-9 for kappa <= 1.6e4. float32: the same
# with u = 2^-24 and kappa <= 1.5: 1e-4. bf16 weights: every bf16 activation of the batched forward
# is rounded independently of the per-sequence one (u = 2^-8), ~6 such roundings on a gradient's path
# through two blocks, so |error| <= 6 u max |g| to first order and twice that for the squares.
F64_MODEL = 1e-9
F32_MODEL = 2 * 5 * math.sqrt(3000) * 2.0**-24 * 1.5
BF16_MODEL = 2 * 6 * 2.0**-8


def _tiny(kind: str = "llama", *, tie: bool = False, dtype=torch.float64, seed: int = 0):
    """A random-weight causal LM (hidden 32, 2 layers, vocab 97), built from a config, in eval mode."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    cfg = cfg_cls(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()


def _batch(gen, b=3, t=10, *, labels=False):
    """input_ids (B, T) with left padding in row 0, right padding in row 1; labels with -100 spots."""
    ids = torch.randint(0, VOCAB, (b, t), generator=gen)
    am = torch.ones(b, t, dtype=torch.long)
    am[0, :3] = 0
    if b > 1:
        am[1, t - 4 :] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    if labels:
        lab = ids.masked_fill(am == 0, -100)
        lab[-1, 4] = -100
        batch["labels"] = lab
    return batch


def _sequence_ll(model, one: dict, targets=None):
    """Summed next-token log-likelihood of one sequence (1, T): position i counts when tokens i and
    i+1 are real and labels[i+1] != -100."""
    ids, am = one["input_ids"], one["attention_mask"]
    lab = one.get("labels", ids) if targets is None else targets
    out = model(input_ids=ids, attention_mask=am)
    logits = out if isinstance(out, torch.Tensor) else out.logits  # (1, T, V)
    logp = logits[0].double().log_softmax(-1)  # (T, V)
    return sum(
        logp[i, lab[0, i + 1]]
        for i in range(ids.shape[1] - 1)
        if am[0, i] and am[0, i + 1] and lab[0, i + 1] != -100
    )


def _brute_force(model, batch, names=None):
    """For each sequence alone: backward of its summed next-token log-likelihood, squared, averaged."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    out = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    b = batch["input_ids"].shape[0]
    for s in range(b):
        ll = _sequence_ll(model, {k: v[s : s + 1] for k, v in batch.items()})
        for n, g in zip(names, torch.autograd.grad(ll, [params[n] for n in names], allow_unused=True)):
            if g is not None:
                out[n] += g.double() ** 2
    return {n: v / b for n, v in out.items()}


def _assert_close_dicts(got: dict, want: dict, tol: float):
    assert set(got) == set(want)
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, f"{worst}: relative error {errs[worst]:.3g}"


class TestDiagonalFisher:
    def test_llama_equals_brute_force(self, backend, gen):
        model = _tiny("llama")
        batch = _batch(gen, labels=True)
        got = DiagonalFisher(model, backend=backend).update(batch).compute()
        assert all(got[n].dtype == torch.float64 and got[n].shape == p.shape for n, p in model.named_parameters())
        _assert_close_dicts(got, _brute_force(model, batch), F64_MODEL)

    def test_tied_qwen2_equals_brute_force(self, gen):
        model = _tiny("qwen2", tie=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        batch = _batch(gen, b=4)
        df = DiagonalFisher(model)
        assert rule_of(df, "model.embed_tokens.weight") == "tied"
        _assert_close_dicts(df.update(batch).compute(), _brute_force(model, batch), F64_MODEL)

    @pytest.mark.parametrize("batched_positions", [True, False], ids=["position_ids", "default-positions"])
    def test_gpt2_conv1d_equals_brute_force(self, gen, batched_positions):
        import transformers

        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).double().eval()
        batch = _batch(gen, b=3, t=9)
        batch["attention_mask"][:, :3] = 1  # right padding only: GPT-2's absolute positions
        df = DiagonalFisher(model)
        assert rule_of(df, "transformer.h.0.attn.c_attn.weight") == "conv1d"
        if batched_positions:
            batch["position_ids"] = torch.arange(9).expand(3, 9)
        got = df.update(batch).compute()
        batch.pop("position_ids", None)
        _assert_close_dicts(got, _brute_force(model, batch), F64_MODEL)

    def test_float32_model_within_1e4(self, gen):
        model = _tiny("qwen2", dtype=torch.float32)
        batch = _batch(gen)
        got = DiagonalFisher(model).update(batch).compute()
        assert all(v.dtype == torch.float32 for v in got.values())
        _assert_close_dicts(got, _brute_force(model, batch), F32_MODEL)

    def test_padding_is_ignored(self, gen):
        model = _tiny("llama")
        batch = _batch(gen, b=2)
        got = DiagonalFisher(model).update(batch).compute()
        am = batch["attention_mask"].bool()
        alone = [{"input_ids": batch["input_ids"][s, am[s]][None], "attention_mask": torch.ones(1, int(am[s].sum()), dtype=torch.long)} for s in range(2)]
        want = [_brute_force(model, a) for a in alone]
        # left padding moves sequence 0 by 3 positions; transformers computes the rotary angles p theta in
        # float32 (error <= u32 p, p <= 10, for q and for k), so its scores and their gradients move by
        # <= 2 u32 (T + 1) relatively, the squares by twice that
        rope = 2 * 2 * 2.0**-24 * (10 + 1)
        _assert_close_dicts(got, {n: (want[0][n] + want[1][n]) / 2 for n in got}, F64_MODEL + rope)

    def test_updates_average_over_sequences(self, gen):
        model = _tiny("llama")
        batch = _batch(gen, b=4)
        whole = DiagonalFisher(model).update(batch).compute()
        halves = DiagonalFisher(model)
        for sl in (slice(0, 1), slice(1, 4)):
            halves.update({k: v[sl] for k, v in batch.items()})
        assert halves.n_sequences == 4
        _assert_close_dicts(halves.compute(), whole, F64_MODEL)

    @pytest.mark.parametrize("per_sample", [True, False])
    def test_sequences_without_a_target_are_not_counted(self, gen, per_sample):
        model = _tiny("llama")
        batch = _batch(gen, b=3, labels=True)
        batch["labels"][2] = -100  # no target token
        batch["attention_mask"][1] = 0  # no real token, so no counted position
        batch["labels"][1] = -100
        df = DiagonalFisher(model, per_sample=per_sample).update(batch)
        assert df.n_sequences == 1
        # only sequence 0 carries a gradient, so both estimators equal its per-sequence square
        _assert_close_dicts(df.compute(), _brute_force(model, {k: v[:1] for k, v in batch.items()}), F64_MODEL)

    def test_a_batch_without_targets_leaves_the_mean_unchanged(self, gen):
        model = _tiny("llama")
        batch = _batch(gen, labels=True)
        empty = {k: v.clone() for k, v in batch.items()}
        empty["labels"][:] = -100
        alone = DiagonalFisher(model).update(batch)
        both = DiagonalFisher(model).update(batch).update(empty)
        assert both.n_sequences == alone.n_sequences == 3
        # the empty batch's gradients are exactly zero: the same sums, divided by the same count
        assert all(torch.equal(both.compute()[n], v) for n, v in alone.compute().items())
        with pytest.raises(ValueError, match="no sequence seen yet with a counted target token"):
            DiagonalFisher(model).update(empty).compute()

    def test_empty_batch_is_a_clear_error(self):
        df = DiagonalFisher(_tiny("llama"))
        with pytest.raises(ValueError, match=r"input_ids holds no sequence \(B = 0, shape \(0, 5\)\)"):
            df.update({"input_ids": torch.zeros(0, 5, dtype=torch.long)})
        assert df.n_sequences == 0

    def test_params_subset(self, gen):
        model = _tiny("llama")
        names = ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
        got = DiagonalFisher(model, params=names).update(_batch(gen)).compute()
        assert list(got) == names

    def test_iter_compute_gives_compute_one_parameter_at_a_time(self, gen):
        model = _tiny("llama")
        fisher = DiagonalFisher(model)
        with pytest.raises(ValueError, match="no sequence seen"):
            fisher.iter_compute()  # raises at the call, not at the first next()
        fisher.update(_batch(gen))
        pairs = fisher.iter_compute()
        name, first = next(pairs)
        assert name == next(iter(fisher.compute()))
        rest = list(pairs)
        want = fisher.compute()
        assert [name] + [n for n, _ in rest] == list(want)
        for n, value in [(name, first)] + rest:
            torch.testing.assert_close(value, want[n], rtol=0, atol=0)

    def test_per_sample_false_squares_the_batch_gradient(self, gen):
        model = _tiny("llama")
        batch = _batch(gen, labels=True)
        got = DiagonalFisher(model, per_sample=False).update(batch).compute()
        params = dict(model.named_parameters())
        ll = sum(_sequence_ll(model, {k: v[s : s + 1] for k, v in batch.items()}) for s in range(3))
        grads = torch.autograd.grad(ll, list(params.values()))
        _assert_close_dicts(got, {n: g.double() ** 2 / 3 for n, g in zip(params, grads)}, F64_MODEL)

    def test_labels_model_reproducible_and_not_data(self, gen):
        model = _tiny("llama")
        batch = _batch(gen)
        a = DiagonalFisher(model, labels="model", seed=7).update(batch).compute()
        b = DiagonalFisher(model, labels="model", seed=7).update(batch).compute()
        c = DiagonalFisher(model, labels="model", seed=8).update(batch).compute()
        d = DiagonalFisher(model).update(batch).compute()
        name = "model.layers.0.self_attn.q_proj.weight"
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert rel_err(a[name], c[name]) > 1e-3 and rel_err(a[name], d[name]) > 1e-3

    def test_labels_model_per_sample_matches_batch_square_for_one_sequence(self, gen):
        model = _tiny("qwen2", tie=True)
        one = {k: v[:1] for k, v in _batch(gen).items()}
        a = DiagonalFisher(model, labels="model", seed=3).update(one).compute()
        b = DiagonalFisher(model, labels="model", seed=3, per_sample=False).update(one).compute()
        _assert_close_dicts(a, b, F64_MODEL)

    def test_bf16_model_accumulates_in_float32(self, gen):
        model = _tiny("llama", dtype=torch.bfloat16)
        batch = _batch(gen)
        got = DiagonalFisher(model).update(batch).compute()
        assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in got.values())
        # same bf16 model, per-sequence backward passes: only the bf16 rounding of batched vs single GEMMs
        # differs (BF16_MODEL)
        _assert_close_dicts(got, _brute_force(model, batch), BF16_MODEL)

    def test_model_state_restored(self, gen):
        model = _tiny("llama").train()
        model.model.layers[1].eval()
        model.model.norm.weight.requires_grad_(False)
        model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
        DiagonalFisher(model, params=["model.norm.weight", "lm_head.weight"]).update(_batch(gen))
        assert model.training and not model.model.layers[1].training and model.model.layers[0].training
        assert not model.model.norm.weight.requires_grad
        assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
        assert all(not m._forward_hooks for m in model.modules())

    def test_subset_with_input_require_grads_hook(self, gen):
        # transformers' hook makes the embedding output a leaf that requires grad; with the
        # embedding not requested, the backward must still reach every hooked module.
        model = _tiny("llama")
        model.enable_input_require_grads()
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"]
        batch = _batch(gen)
        got = DiagonalFisher(model, params=names).update(batch).compute()
        _assert_close_dicts(got, _brute_force(model, batch, names), F64_MODEL)

    def test_gradient_checkpointing_model_in_train_mode(self, gen):
        model = _tiny("llama")
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.train()
        batch = _batch(gen)
        got = DiagonalFisher(model).update(batch).compute()
        model.eval()
        _assert_close_dicts(got, _brute_force(model, batch), F64_MODEL)

    @pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "non-reentrant-checkpoint"])
    def test_uncovered_parameters_fall_back_to_the_loop(self, gen, checkpoint):
        model = _OddLM(checkpoint=checkpoint).double()
        batch = _batch(gen, b=3, t=7)
        batch["input_ids"][2, 3] = 0  # the embedding's padding_idx: no gradient there
        df = DiagonalFisher(model)
        assert rule_of(df, "shared") == "loop" and rule_of(df, "norm.weight") == "generic"
        got = df.update(batch).compute()
        _assert_close_dicts(got, _brute_force(model, batch), F64_MODEL)

    def test_errors(self, gen):
        model = _tiny("llama")
        with pytest.raises(ValueError, match="labels must be 'data' or 'model'"):
            DiagonalFisher(model, labels="empirical")
        with pytest.raises(ValueError, match="not parameters of model"):
            DiagonalFisher(model, params=["nope.weight"])
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            DiagonalFisher("llama")
        df = DiagonalFisher(model)
        with pytest.raises(ValueError, match="no sequence seen yet"):
            df.compute()
        with pytest.raises(TypeError, match="batch must be a dict with 'input_ids'"):
            df.update({"attention_mask": torch.ones(2, 3)})
        with pytest.raises(ValueError, match=r"input_ids must be an integer \(B, T\) tensor with T >= 2"):
            df.update({"input_ids": torch.zeros(2, 1, dtype=torch.long)})
        with pytest.raises(ValueError, match=r"labels must be an integer or bool tensor shaped like input_ids \(2, 5\)"):
            df.update({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)})
        assert df.n_sequences == 0
        with pytest.raises(IndexError):  # the forward fails before anything is accumulated
            df.update({"input_ids": torch.full((2, 5), VOCAB + 3, dtype=torch.long)})
        df.update(_batch(gen))  # still usable
        assert df.n_sequences == 3


class _Transposed(nn.Module):
    """A Linear run on (T, B, d): its input does not carry the batch first, so hooks cannot attribute it."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return self.lin(h.transpose(0, 1)).transpose(0, 1)


class _OddLM(nn.Module):
    """Embedding -> LayerNorm -> transposed Linear -> a matrix shared by a Linear and a direct matmul -> logits."""

    def __init__(self, d=12, checkpoint=False):
        super().__init__()
        torch.manual_seed(1)
        self.checkpoint = checkpoint
        self.emb = nn.Embedding(VOCAB, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.odd = _Transposed(d)
        self.proj = nn.Linear(d, d, bias=False)
        self.shared = self.proj.weight  # also used directly below: a Linear use and a generic use
        self.out = nn.Linear(d, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        e = self.emb(input_ids)
        h = torch.utils.checkpoint.checkpoint(self.norm, e, use_reentrant=False) if self.checkpoint else self.norm(e)
        h = self.odd(h)
        h = torch.tanh(self.proj(h)) + h @ self.shared
        return self.out(h)
