"""compare_models: a model against itself is identical at every layer; against a perturbed copy every number equals
the kernels called on the collected activations; reference statistics computed once give the same numbers;
undefined layers give NaN / None; the Fisher summaries are the DiagonalFisher's values."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from repforget_kernels import (
    DiagonalFisher,
    ProcessShare,
    ReferenceStatistics,
    collect_activations,
    compare_models,
    decoder_layers,
    fisher_histogram,
    linear_cka,
    pca_shift,
    pca_similarity,
)
from repforget_kernels.compare import _fisher_summary, spearman

from test_activations import one_thread, padded_batches, tiny_model  # noqa: F401 (one_thread: autouse)

REPORT_KEYS = {"layer", "cka", "cka_pooled", "cka_debiased", "cka_tokens", "pca_similarity", "pca_shift",
               "fisher_mass", "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"}


def perturbed(model, scale: float = 0.05, seed: int = 1):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


@pytest.fixture(scope="module")
def pair():
    """(reference Qwen2, perturbed copy, probe batches (left padded), Fisher batches (right padded))."""
    ref = tiny_model("qwen2")
    return ref, perturbed(ref), padded_batches("left", n_batches=4), padded_batches("right", n_batches=2, seed=5)


@pytest.fixture(scope="module")
def result(pair):
    ref, upd, probe, forget = pair
    return compare_models(ref, upd, probe, fisher_batches=forget, pca_k=3, fisher_samples=1000)


def block_fisher_mass(model, batches) -> list:
    """Per-block sum of DiagonalFisher values of the whole model (every parameter estimated)."""
    f = DiagonalFisher(model)
    for b in batches:
        f.update(b)
    values = f.compute()
    out = []
    for layer in decoder_layers(model):
        ids = {id(p) for p in layer.parameters()}
        out.append(sum(float(values[n].double().sum()) for n, p in model.named_parameters() if id(p) in ids))
    return out


class TestSelfComparison:
    def test_identical_at_every_layer(self, pair):
        ref, _, probe, forget = pair
        out = compare_models(ref, ref, probe, fisher_batches=forget, pca_k=3)
        # identical float32 rows: CKA's float64 ratio of equal sums and the |cos| of two identical PCA fits are 1
        # up to float32 rounding of the rows' products (~1e-7); the mean difference is exactly 0
        for name in ("cka", "cka_debiased", "cka_tokens", "pca_similarity", "pca_similarity_k"):
            torch.testing.assert_close(getattr(out, name), torch.ones(3), rtol=0, atol=1e-5, msg=name)
        assert torch.equal(out.pca_shift, torch.zeros(3, 2))
        assert torch.equal(out.fisher_mass_ratio, torch.ones(3, dtype=torch.float64))  # the same computation twice
        torch.testing.assert_close(out.fisher_rank_corr, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


class TestAgainstKernels:
    def test_pooled_metrics_are_the_kernels_on_the_collected_rows(self, pair, result):
        ref, upd, probe, _ = pair
        x, y = torch.stack(collect_activations(ref, probe)), torch.stack(collect_activations(upd, probe))  # (L, n, d)
        # the same forward passes and the same kernel calls on bitwise equal rows: equal results
        assert torch.equal(result.cka, linear_cka(x, y))
        assert torch.equal(result.cka_debiased, linear_cka(x, y, debiased=True))
        assert torch.equal(result.pca_similarity, pca_similarity(x, y, k=1))
        assert torch.equal(result.pca_similarity_k, pca_similarity(x, y, k=3))
        assert torch.equal(result.pca_shift, pca_shift(x, y, k=2, normalize=True))
        assert bool(((result.cka > 0) & (result.cka < 0.999)).all())  # the perturbation shows

    def test_token_cka_is_linear_cka_over_every_real_token(self, pair, result):
        ref, upd, probe, _ = pair
        x, y = collect_activations(ref, probe, sample="tokens"), collect_activations(upd, probe, sample="tokens")
        want = torch.stack([linear_cka(a.double(), b.double()) for a, b in zip(x, y)])
        # streamed float64 sums of float32 rows vs float64 rows: ~1e-7 relative, values of order 1
        torch.testing.assert_close(result.cka_tokens.double(), want, rtol=0, atol=1e-5)

    def test_fisher_per_layer(self, pair, result):
        ref, upd, _, forget = pair
        mass_ref, mass_upd = block_fisher_mass(ref, forget), block_fisher_mass(upd, forget)
        # float32 per-sample squares summed in another order than the whole-model estimator: ~1e-6 relative
        torch.testing.assert_close(result.fisher_mass_ref, torch.tensor(mass_ref, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(result.fisher_mass, torch.tensor(mass_upd, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(result.fisher_mass_ratio, result.fisher_mass / result.fisher_mass_ref, rtol=0, atol=0)
        assert bool(((result.fisher_rank_corr > -1) & (result.fisher_rank_corr < 1)).all())
        h = result.fisher_histogram
        assert len(h.edges) == 49 and int(h.counts.sum()) + h.n_zero <= 3 * 1000

    def test_fisher_summaries_are_strided_values_of_each_block(self, pair):
        ref, _, probe, forget = pair
        stats = ReferenceStatistics.compute(ref, probe[:1], fisher_batches=forget, fisher_samples=97)
        layers = decoder_layers(ref)
        names = [[n for n, p in ref.named_parameters() if any(p is q for q in layer.parameters())] for layer in layers]
        fisher = DiagonalFisher(ref, params=[n for layer in names for n in layer])
        for b in forget:
            fisher.update(b)
        values = fisher.compute()
        for i, layer in enumerate(names):
            flat = torch.cat([values[n].flatten() for n in layer])
            step = -(-flat.numel() // 97)  # a stride that crosses parameter boundaries at uneven offsets
            assert stats.fisher_values[i].numel() <= 97
            torch.testing.assert_close(stats.fisher_values[i], flat[::step], rtol=0, atol=0)
            assert float(stats.fisher_mass[i]) == pytest.approx(float(flat.double().sum()), rel=1e-6)

    def test_fisher_unchanged_by_the_input_require_grads_hook_and_leaves_mode_and_grads(self, pair):
        ref, _, probe, forget = pair
        want = ReferenceStatistics.compute(ref, probe[:1], fisher_batches=forget, fisher_samples=10).fisher_mass
        hooked = copy.deepcopy(ref)
        enable = getattr(hooked, "activation_checkpointing_enable", None) or hooked.gradient_checkpointing_enable
        enable()  # registers enable_input_require_grads, as the driver's loading does
        hooked.train()
        got = ReferenceStatistics.compute(hooked, probe[:1], fisher_batches=forget, fisher_samples=10).fisher_mass
        assert bool((want > 0).all())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert hooked.training and all(p.grad is None for p in hooked.parameters())


class _TwoProcessShare(ProcessShare):
    """One of two simulated processes: runs the batches of its parity; ``sum`` adds the values the other
    process (run first, ``other=None``) passed to its own ``sum`` calls, in the same order."""

    def __init__(self, rank: int, other: "_TwoProcessShare | None" = None):
        self.rank, self.other, self.sent = rank, other, []

    @property
    def processes(self) -> int:
        return 2

    def runs(self, index: int) -> bool:
        return index % 2 == self.rank

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        self.sent.append(value.clone())
        return value if self.other is None else value + self.other.sent[len(self.sent) - 1]


class TestFisherNormalisation:
    """Fisher summaries are per-sequence means over the sequences with a counted target token."""

    @staticmethod
    def batches_with_uncounted_rows():
        batches = padded_batches("right", n_batches=2, seed=7)
        batches[0]["labels"][1:] = -100  # three of batch 0's four sequences count no target token
        return batches

    def test_one_process_mean_over_counted_sequences(self, pair):
        ref = pair[0]
        batches = self.batches_with_uncounted_rows()
        layers = decoder_layers(ref)
        mass, _ = _fisher_summary(ref, layers, batches, 1000, ProcessShare())
        torch.testing.assert_close(mass, torch.tensor(block_fisher_mass(ref, batches), dtype=torch.float64),
                                   rtol=1e-6, atol=0)

    def test_processes_weighted_by_counted_sequences(self, pair):
        ref = pair[0]
        batches = self.batches_with_uncounted_rows()
        layers = decoder_layers(ref)
        first = _TwoProcessShare(1)
        _fisher_summary(ref, layers, batches, 1000, first)
        mass, _ = _fisher_summary(ref, layers, batches, 1000, _TwoProcessShare(0, other=first))
        want = torch.tensor(block_fisher_mass(ref, batches), dtype=torch.float64)  # one process, all batches
        torch.testing.assert_close(mass, want, rtol=1e-5, atol=0)

    def test_no_counted_token_is_refused(self, pair):
        ref = pair[0]
        batches = self.batches_with_uncounted_rows()[:1]
        batches[0]["labels"][:] = -100
        with pytest.raises(ValueError, match="fisher_batches is empty or has no counted target token"):
            _fisher_summary(ref, decoder_layers(ref), batches, 1000, ProcessShare())


class TestReferenceStatistics:
    @pytest.mark.parametrize("tokens", ["store", "model"])
    def test_statistics_once_then_many_models(self, pair, result, tokens):
        ref, upd, probe, forget = pair
        stats = ReferenceStatistics.compute(ref, probe, fisher_batches=forget, fisher_samples=1000, tokens=tokens)
        assert compare_models(stats, upd, probe, fisher_batches=forget, pca_k=3).to_dict() == result.to_dict()
        other = perturbed(ref, seed=2)
        assert compare_models(stats, other, probe, pca_k=3).to_dict() == \
            compare_models(ref, other, probe, pca_k=3).to_dict()

    def test_state_dict_round_trip(self, pair, result):
        ref, upd, probe, forget = pair
        stats = ReferenceStatistics.compute(ref, probe, fisher_batches=forget, fisher_samples=1000, tokens="store")
        buf = io.BytesIO()
        torch.save(stats.state_dict(), buf)
        buf.seek(0)
        loaded = ReferenceStatistics.from_state_dict(torch.load(buf, weights_only=True))
        assert compare_models(loaded, upd, probe, fisher_batches=forget, pca_k=3).to_dict() == result.to_dict()
        with pytest.raises(ValueError, match="lacks"):
            ReferenceStatistics.from_state_dict({"rows": stats.rows})

    def test_other_batches_and_settings_are_refused(self, pair):
        ref, upd, probe, forget = pair
        stats = ReferenceStatistics.compute(ref, probe)
        with pytest.raises(ValueError, match=r"batches\[1\] differs from the batch"):
            compare_models(stats, upd, [probe[0], probe[2]])
        with pytest.raises(ValueError, match="3 batches given, the reference statistics were computed on 4"):
            compare_models(stats, upd, probe[:3])
        with pytest.raises(ValueError, match="token_cka=True but the reference statistics hold no token rows"):
            compare_models(stats, upd, probe, token_cka=True)
        with pytest.raises(ValueError, match="sample='last' differs from the reference statistics' sample='mean'"):
            compare_models(stats, upd, probe, sample="last")
        with pytest.raises(ValueError, match="hold no Fisher summary"):
            compare_models(stats, upd, probe, fisher_batches=forget)
        assert compare_models(stats, upd, probe).cka_tokens is None  # None by default: no token source
        with pytest.raises(ValueError, match="max_token_bytes=1000"):
            ReferenceStatistics.compute(ref, probe, tokens="store", max_token_bytes=1000)

    def test_argument_errors(self, pair):
        ref, upd, probe, _ = pair
        with pytest.raises(TypeError, match="reference must be a torch.nn.Module or ReferenceStatistics"):
            compare_models(torch.randn(3), upd, probe)
        with pytest.raises(ValueError, match="reference has 3 decoder blocks, updated has 2"):
            compare_models(ref, upd, probe, find_layers=lambda m: decoder_layers(m)[: 3 if m is ref else 2])
        with pytest.raises(ValueError, match="pca_k must be a positive int"):
            compare_models(ref, upd, probe, pca_k=0)
        with pytest.raises(ValueError, match="tokens must be one of"):
            ReferenceStatistics.compute(ref, probe, tokens="all")


class _Constant(torch.nn.Module):
    def forward(self, x):
        return torch.ones_like(x)


class _Embed(torch.nn.Module):
    """Embedding, a tanh block, then a block whose output is constant (every row equal: CKA and PCA undefined)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 8)
        self.first = torch.nn.Linear(8, 8)
        self.constant = _Constant()

    def forward(self, input_ids, attention_mask=None):
        return self.constant(torch.tanh(self.first(self.emb(input_ids))))  # (B, T, 8)


class TestUndefinedLayers:
    def test_constant_layer_gives_nan_and_none_not_an_error(self):
        torch.manual_seed(0)
        net = _Embed().eval()
        batches = padded_batches("right")
        out = compare_models(net, perturbed(net), batches, find_layers=lambda m: [m.first, m.constant], pca_k=2)
        assert bool(torch.isfinite(out.cka[0])) and bool(torch.isfinite(out.pca_shift[0]).all())
        for name in ("cka", "cka_debiased", "cka_tokens", "pca_similarity", "pca_similarity_k"):
            assert bool(torch.isnan(getattr(out, name)[1])), name
        assert bool(torch.isnan(out.pca_shift[1]).all())
        d = out.to_dict()
        json.dumps(d, allow_nan=False)  # strict JSON
        row = d["layers"][1]
        assert row["cka"] is None and row["cka_tokens"] is None and row["pca_shift"] is None
        assert d["layers"][0]["cka"] == pytest.approx(float(out.cka[0])) and d["fisher"] is None


class TestToDict:
    def test_report_keys(self, result):
        d = result.to_dict()
        assert [row["layer"] for row in d["layers"]] == [0, 1, 2]
        assert set(d["layers"][0]) == REPORT_KEYS | {"pca_similarity_k"}
        assert d["layers"][0]["cka"] == d["layers"][0]["cka_pooled"] == pytest.approx(float(result.cka[0]))
        assert set(d["fisher"]) == {"mass", "mass_ref", "mass_ratio", "histogram"}
        assert d["fisher"]["mass_ratio"] == pytest.approx(float(result.fisher_mass.sum() / result.fisher_mass_ref.sum()))
        want = fisher_histogram(torch.ones(3), bins=2)  # the histogram's JSON shape
        assert set(d["fisher"]["histogram"]) == {"counts", "edges", "n_zero"} and isinstance(want.n_zero, int)
        json.dumps(d, allow_nan=False)

    def test_tokens_sample_headlines_token_cka(self, pair):
        ref, upd, probe, _ = pair
        d = compare_models(ref, upd, probe, sample="tokens", max_rows=30).to_dict()
        for row in d["layers"]:
            assert row["cka"] == row["cka_tokens"] and row["cka_pooled"] != row["cka_tokens"]
            assert "pca_similarity_k" not in row
        off = compare_models(ref, upd, probe, sample="tokens", token_cka=False).to_dict()
        assert all(row["cka"] is None and row["cka_pooled"] is not None for row in off["layers"])


class TestSpearman:
    def test_matches_scipy_with_ties(self):
        scipy_stats = pytest.importorskip("scipy.stats")
        gen = torch.Generator().manual_seed(3)
        a = torch.randint(0, 7, (301,), generator=gen).float()  # many ties
        b = a + torch.randn(301, generator=gen)
        assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)

    def test_constant_is_nan_and_shapes_checked(self):
        assert spearman(torch.ones(5), torch.arange(5.0)) != spearman(torch.ones(5), torch.arange(5.0))
        with pytest.raises(ValueError, match="same length"):
            spearman(torch.ones(4), torch.ones(5))
