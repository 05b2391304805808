"""Driver diagnostics: hooks, one pass per batch, and every number equal to the public API on
manually collected activations. Also holds ``small_corpus`` (8 facts per domain), the corpus of
the ``tiny`` fixture in conftest.py that the other driver test files use.
"""
from __future__ import annotations

import copy

import pytest
import torch

from repforget_kernels import DiagonalFisher, linear_cka, pca_shift, pca_similarity, pool_tokens
from repforget_kernels.driver import diagnostics as D
from repforget_kernels.driver.data import encode, make_corpus
from repforget_kernels.driver.models import build_tokenizer, decoder_layers, tiny_config

SMALL = dict(seed=0, n_per_domain=8, n_probe_per_domain=4)


# --------------------------------------------------------------------------- shared fixtures (imported elsewhere)


def small_corpus() -> dict:
    return make_corpus(**SMALL)


def random_models():
    """(reference, perturbed copy, encoded small-corpus splits): an untrained tiny Qwen2 (instant, seeded)."""
    corpus = small_corpus()
    tok = build_tokenizer(corpus)
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(tiny_config(len(tok))).eval()
    upd = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in upd.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    enc = {k: encode(tok, v) for k, v in corpus.items()}
    return ref, upd, enc


@pytest.fixture(scope="module")
def random_pair():
    return random_models()


def block_outputs(model, enc: dict, batch_size: int) -> list:
    """Every block's full output per batch, collected with plain hooks: list over batches of (mask, [L x (B,T,d)])."""
    from repforget_kernels.driver.data import iterate_batches

    out = []
    for batch in iterate_batches(enc, batch_size):
        got = {}
        handles = [m.register_forward_hook(lambda mod, a, o, i=i: got.__setitem__(i, D.block_output(o).detach()))
                   for i, m in enumerate(decoder_layers(model))]
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
        out.append((batch["attention_mask"], [got[i] for i in range(len(got))]))
    return out


def manual_rows(model, enc: dict, sample: str, batch_size: int = 5) -> torch.Tensor:
    """(L, n, d) rows from full block outputs pooled after the fact."""
    per = block_outputs(model, enc, batch_size)
    n_layers = len(per[0][1])
    return torch.stack([torch.cat([pool_tokens(h[i], m, sample=sample) for m, h in per]) for i in range(n_layers)])


# --------------------------------------------------------------------------- tests


class TestHooks:
    def test_one_forward_per_batch_for_all_layers_and_hooks_removed(self, random_pair):
        ref, _, enc = random_pair
        calls = []
        pre = ref.register_forward_pre_hook(lambda *a: calls.append(1))
        rows = D.pooled_activations(ref, enc["probe"], sample="mean", batch_size=5)
        pre.remove()
        n = enc["probe"]["input_ids"].shape[0]
        assert len(calls) == -(-n // 5)
        layers = decoder_layers(ref)
        assert rows.shape == (len(layers), n, ref.config.hidden_size)
        assert all(len(m._forward_hooks) == 0 for m in layers)

    def test_hooks_removed_on_error(self, random_pair):
        ref, _, enc = random_pair
        layers = decoder_layers(ref)

        def boom(i, hidden):
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            with D.LayerHooks(layers, boom):
                ref(input_ids=enc["probe"]["input_ids"][:2], attention_mask=enc["probe"]["attention_mask"][:2])
        assert all(len(m._forward_hooks) == 0 for m in layers)

    @pytest.mark.parametrize("sample", ["mean", "last", "first", "tokens"])
    def test_rows_equal_pooling_of_full_outputs(self, random_pair, sample):
        ref, _, enc = random_pair
        got = D.pooled_activations(ref, enc["probe"], sample=sample, batch_size=5)
        want = manual_rows(ref, enc["probe"], sample)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    def test_hidden_states_match_layers_before_final_norm(self, random_pair):
        ref, _, enc = random_pair
        got = D.pooled_activations(ref, enc["probe"], sample="mean", batch_size=64)
        with torch.no_grad():
            hs = ref(**{k: enc["probe"][k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        for i in range(len(hs) - 2):  # the last hidden state has the final norm applied
            torch.testing.assert_close(got[i], pool_tokens(hs[i + 1], enc["probe"]["attention_mask"]), rtol=1e-5, atol=1e-5)

    def test_token_rows_capped(self, random_pair):
        ref, _, enc = random_pair
        rows = D.pooled_activations(ref, enc["probe"], sample="tokens", batch_size=4, max_token_rows=17)
        assert rows.shape[1] == 17
        torch.testing.assert_close(rows, manual_rows(ref, enc["probe"], "tokens")[:, :17])


class TestSelfComparison:
    def test_model_with_itself_is_identical_at_every_layer(self, random_pair):
        ref, _, enc = random_pair
        out = D.diagnose(ref, ref, enc["probe"], enc["forget"], D.DiagnosticsConfig(batch_size=4))
        for row in out["layers"]:
            assert row["cka"] == pytest.approx(1.0, abs=1e-5)
            assert row["cka_debiased"] == pytest.approx(1.0, abs=1e-5)
            assert row["cka_tokens"] == pytest.approx(1.0, abs=1e-5)
            assert row["pca_similarity"] == pytest.approx(1.0, abs=1e-5)
            assert row["pca_shift"] == pytest.approx([0.0, 0.0], abs=1e-5)
            assert row["fisher_mass_ratio"] == pytest.approx(1.0, rel=1e-6)
            assert row["fisher_rank_corr"] == pytest.approx(1.0, abs=1e-9)
        assert out["fisher"]["mass_ratio"] == pytest.approx(1.0, rel=1e-6)


class TestAgainstPublicAPI:
    @pytest.fixture(scope="class")
    def result(self, random_pair):
        ref, upd, enc = random_pair
        cfg = D.DiagnosticsConfig(batch_size=5, pca_k=3, fisher_samples=1000)
        return cfg, D.diagnose(ref, upd, enc["probe"], enc["forget"], cfg)

    def test_pooled_metrics(self, random_pair, result):
        ref, upd, enc = random_pair
        cfg, out = result
        x, y = manual_rows(ref, enc["probe"], "mean"), manual_rows(upd, enc["probe"], "mean")
        for i, row in enumerate(out["layers"]):
            assert row["cka"] == pytest.approx(float(linear_cka(x[i], y[i])), abs=1e-6)
            assert row["cka"] == row["cka_pooled"]
            assert row["cka_debiased"] == pytest.approx(float(linear_cka(x[i], y[i], debiased=True)), abs=1e-6)
            assert row["pca_similarity"] == pytest.approx(float(pca_similarity(x[i], y[i], k=1)), abs=1e-5)
            assert row["pca_similarity_k"] == pytest.approx(float(pca_similarity(x[i], y[i], k=3)), abs=1e-5)
            want = pca_shift(x[i], y[i], k=2, normalize=True).tolist()
            assert row["pca_shift"] == pytest.approx(want, rel=1e-4, abs=1e-5)
            assert 0.0 < row["cka"] < 1.0

    def test_token_cka_equals_linear_cka_on_all_tokens(self, random_pair, result):
        ref, upd, enc = random_pair
        _, out = result
        x, y = manual_rows(ref, enc["probe"], "tokens"), manual_rows(upd, enc["probe"], "tokens")
        for i, row in enumerate(out["layers"]):
            assert row["cka_tokens"] == pytest.approx(float(linear_cka(x[i].double(), y[i].double())), abs=1e-5)

    def test_fisher_per_layer(self, random_pair, result):
        ref, upd, enc = random_pair
        cfg, out = result
        from repforget_kernels.driver.data import iterate_batches

        masses = []
        for model in (ref, upd):
            f = DiagonalFisher(model)
            for batch in iterate_batches(enc["forget"], 5):
                f.update(batch)
            values = f.compute()
            per = []
            for layer in decoder_layers(model):
                ids = {id(p) for p in layer.parameters()}
                per.append(sum(float(values[n].double().sum()) for n, p in model.named_parameters() if id(p) in ids))
            masses.append(per)
        for i, row in enumerate(out["layers"]):
            assert row["fisher_mass_ref"] == pytest.approx(masses[0][i], rel=1e-4)
            assert row["fisher_mass"] == pytest.approx(masses[1][i], rel=1e-4)
            assert row["fisher_mass_ratio"] == pytest.approx(masses[1][i] / masses[0][i], rel=1e-4)
            assert -1.0 <= row["fisher_rank_corr"] <= 1.0
        hist = out["fisher"]["histogram"]
        n_sub = sum(min(cfg.fisher_samples, sum(p.numel() for p in layer.parameters())) for layer in decoder_layers(upd))
        assert sum(hist["counts"]) + hist["n_zero"] <= n_sub
        assert len(hist["edges"]) == cfg.hist_bins + 1

    def test_fisher_unchanged_by_input_require_grads_hook(self, random_pair):
        ref, _, enc = random_pair
        want, _ = D.fisher_by_layer(ref, enc["forget"], batch_size=8, samples=10)
        hooked = copy.deepcopy(ref)
        hooked.gradient_checkpointing_enable()  # registers enable_input_require_grads, as load_model(path) does
        got, _ = D.fisher_by_layer(hooked, enc["forget"], batch_size=8, samples=10)
        assert bool((want > 0).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)

    def test_subsample_is_every_step_th_value_of_the_block(self, random_pair):
        """Per parameter, as the summaries are taken: the same entries as striding the block's concatenation."""
        from repforget_kernels.driver.data import iterate_batches

        ref, _, enc = random_pair
        samples = 97  # a stride that crosses parameter boundaries at uneven offsets
        mass, subs = D.fisher_by_layer(ref, enc["forget"], batch_size=4, samples=samples)
        names = [[n for n, p in ref.named_parameters() if any(p is q for q in layer.parameters())]
                 for layer in decoder_layers(ref)]
        fisher = DiagonalFisher(ref, params=[n for layer in names for n in layer])
        for batch in iterate_batches(enc["forget"], 4):
            fisher.update(batch)
        values = fisher.compute()
        for i, layer in enumerate(names):
            flat = torch.cat([values[n].flatten() for n in layer])
            step = -(-flat.numel() // samples)
            assert subs[i].numel() <= samples
            torch.testing.assert_close(subs[i], flat[::step], rtol=1e-5, atol=0)
            assert float(mass[i]) == pytest.approx(float(flat.double().sum()), rel=1e-5)

    def test_each_call_leaves_model_mode_and_grads(self, random_pair):
        ref, upd, enc = random_pair
        upd.train()
        D.fisher_by_layer(upd, enc["forget"], batch_size=8, samples=10)
        assert upd.training
        assert all(p.grad is None for p in upd.parameters())
        upd.eval()


class TestHelpers:
    def test_spearman_matches_scipy_with_ties(self):
        scipy_stats = pytest.importorskip("scipy.stats")
        gen = torch.Generator().manual_seed(3)
        a = torch.randint(0, 7, (301,), generator=gen).float()  # many ties
        b = a + torch.randn(301, generator=gen)
        assert D.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)

    def test_spearman_constant_is_nan_and_shapes_checked(self):
        assert D.spearman(torch.ones(5), torch.arange(5.0)) != D.spearman(torch.ones(5), torch.arange(5.0))
        with pytest.raises(ValueError, match="same length"):
            D.spearman(torch.ones(4), torch.ones(5))

    def test_layer_without_variance_gives_none_not_crash(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 10, 6, generator=gen)
        x[1] = 1.0  # layer 1 constant rows: CKA undefined there
        snap = D.Snapshot(x)
        out = D.compare(snap, D.Snapshot(x.clone()), D.DiagnosticsConfig(fisher=False, token_cka=False))
        assert out["layers"][1]["cka"] is None and out["layers"][1]["pca_shift"] is None
        assert out["layers"][0]["cka"] == pytest.approx(1.0, abs=1e-6)
        assert out["fisher"] is None

    def test_shape_mismatch_raises(self):
        with pytest.raises(ValueError, match="differ in shape"):
            D.compare(D.Snapshot(torch.randn(2, 5, 3)), D.Snapshot(torch.randn(2, 6, 3)), D.DiagnosticsConfig())
