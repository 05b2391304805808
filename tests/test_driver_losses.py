"""Driver losses and training loops: hand-computed values, masking, gradients, reference caching."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from repforget_kernels.driver import train as train_mod
from repforget_kernels.driver.data import encode
from repforget_kernels.driver.losses import (
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    random_label_data,
    sequence_logprob,
    token_logprobs,
)
from repforget_kernels.driver.methods import METHOD_NAMES, METHODS, get_method
from repforget_kernels.driver.pipeline import split_requests
from repforget_kernels.driver.pretrain import build_tokenizer

from conftest import SMALL_TINY, small_benchmark
from repforget_kernels.driver.train import TrainConfig, relearn, unlearn


# ---------------------------------------------------------------- helpers (float64 twins, tiny model)
def _logsoftmax64(logits):
    return torch.log_softmax(logits.double(), dim=-1)


def _nll64(logits, labels):
    """Direct loop: mean over supervised next tokens of -log p(label)."""
    logp = _logsoftmax64(logits)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
             if labels[b, t + 1] != -100]
    return torch.stack(terms).mean()


def _kl64(logits, ref_logits, attention_mask):
    """Direct loop: mean over real next-token positions of sum_v p_ref (log p_ref - log p)."""
    logq, logp = _logsoftmax64(logits), _logsoftmax64(ref_logits)
    terms = [(logp[b, t].exp() * (logp[b, t] - logq[b, t])).sum() for b in range(logits.shape[0])
             for t in range(logits.shape[1] - 1) if attention_mask[b, t + 1]]
    return torch.stack(terms).mean()


@pytest.fixture(scope="module")
def corpus():
    return small_benchmark()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus, SMALL_TINY["vocab_size"])


@pytest.fixture(scope="module")
def splits(corpus, tokenizer):
    return {name: encode(tokenizer, corpus[name]) for name in ("forget", "retain")}


def _tiny_model(vocab: int, seed: int = 0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, use_cache=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture
def model(tokenizer):
    return _tiny_model(len(tokenizer))


def _batch():
    """2 sequences of 4 tokens, vocab 5; row 1 has one padding token at the end."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)  # (B, T, V)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 4, 2, -100]])  # (B, T)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # (B, T)
    return logits, labels, mask


class TestTokenLosses:
    def test_token_logprobs_by_hand(self):
        logits, labels, _ = _batch()
        logp, mask = token_logprobs(logits, labels)
        assert mask.tolist() == [[False, True, True], [True, True, False]]
        ref = _logsoftmax64(logits)
        assert logp[0, 1].item() == pytest.approx(ref[0, 1, 3].item(), abs=1e-6)
        assert logp[1, 0].item() == pytest.approx(ref[1, 0, 4].item(), abs=1e-6)
        assert logp[0, 0].item() == 0.0 and logp[1, 2].item() == 0.0

    def test_nll_against_direct_loop(self):
        logits, labels, _ = _batch()
        assert nll_loss(logits, labels).item() == pytest.approx(_nll64(logits, labels).item(), abs=1e-6)

    def test_nll_hand_value_uniform_logits(self):
        labels = torch.tensor([[-100, 2, 0]])
        assert nll_loss(torch.zeros(1, 3, 7), labels).item() == pytest.approx(math.log(7), abs=1e-6)

    def test_masked_positions_change_nothing(self):
        logits, labels, mask = _batch()
        masked_pos = torch.cat([labels[:, 1:] == -100, torch.ones(2, 1, dtype=torch.bool)], 1)  # (B, T)
        noisy = logits + 50.0 * masked_pos[..., None] * torch.randn(logits.shape)
        assert nll_loss(noisy, labels).item() == pytest.approx(nll_loss(logits, labels).item(), abs=1e-6)
        pad_pos = torch.cat([mask[:, 1:] == 0, torch.ones(2, 1, dtype=torch.bool)], 1)  # (B, T)
        ref = torch.log_softmax(torch.randn(logits.shape), -1)
        noisy_kl = kl_loss(logits + 50.0 * pad_pos[..., None] * torch.randn(logits.shape),
                           ref + 50.0 * pad_pos[..., None], mask)
        assert noisy_kl.item() == pytest.approx(kl_loss(logits, ref, mask).item(), abs=1e-6)

    def test_bf16_logits_reduced_in_float32(self):
        logits, labels, _ = _batch()
        out = nll_loss(logits.bfloat16(), labels)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(_nll64(logits.bfloat16().float(), labels).item(), abs=1e-5)

    def test_no_supervised_token(self):
        with pytest.raises(ValueError, match="supervise no token"):
            nll_loss(torch.zeros(1, 3, 4), torch.full((1, 3), -100))

    def test_ga_is_negative_nll(self):
        logits, labels, _ = _batch()
        assert ga_loss(logits, labels).item() == pytest.approx(-nll_loss(logits, labels).item(), abs=1e-7)

    def test_ga_gradient_is_negative_nll_gradient(self, model, splits):
        batch = {k: v[:4] for k, v in splits["forget"].items()}

        def grads(loss_fn):
            model.zero_grad()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_fn(logits, batch["labels"]).backward()
            return [p.grad.clone() for p in model.parameters()]

        for g_ga, g_nll in zip(grads(ga_loss), grads(nll_loss)):
            torch.testing.assert_close(g_ga, -g_nll, rtol=0, atol=1e-7)


class TestKL:
    def test_against_direct_loop(self):
        logits, _, mask = _batch()
        ref_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        out = kl_loss(logits, torch.log_softmax(ref_logits, -1), mask)
        assert out.item() == pytest.approx(_kl64(logits, ref_logits, mask).item(), abs=1e-6)

    def test_model_with_itself_is_zero(self, model, splits):
        enc = splits["retain"]
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert kl_loss(logits, torch.log_softmax(logits, -1), enc["attention_mask"]).item() == pytest.approx(0, abs=1e-6)

    def test_nonnegative_and_hand_value(self):
        # one position, two tokens: KL([1/2,1/2] || [1/4,3/4]) = 1/2 log 2 + 1/2 log(2/3)
        logq = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))  # (1, 2, 2)
        logp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
        expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
        assert kl_loss(logq, logp, torch.ones(1, 2, dtype=torch.long)).item() == pytest.approx(expected, abs=1e-6)


class TestNPO:
    @pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
    def test_at_reference_is_2_over_beta_log2(self, beta):
        seq = torch.tensor([-3.0, -0.5, -10.0])
        assert npo_loss(seq, seq.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)

    def test_hand_value(self):
        seq, ref, beta = torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -3.0]), 0.5
        expected = -(2 / beta) * 0.5 * sum(math.log(1 / (1 + math.exp(beta * d))) for d in (-1.0, 2.0))
        assert npo_loss(seq, ref, beta).item() == pytest.approx(expected, rel=1e-6)

    def test_bad_beta(self):
        with pytest.raises(ValueError, match="beta"):
            npo_loss(torch.zeros(2), torch.zeros(2), 0.0)

    def test_sequence_logprob_sums_answer_tokens(self, model, splits):
        enc = {k: v[:5] for k, v in splits["forget"].items()}
        with torch.no_grad():
            got = sequence_logprob(model, enc)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        logp = _logsoftmax64(logits)
        for b in range(5):
            want = sum(logp[b, t, enc["labels"][b, t + 1]] for t in range(enc["labels"].shape[1] - 1)
                       if enc["labels"][b, t + 1] != -100)
            assert got[b].item() == pytest.approx(float(want), abs=1e-5)


class TestDenominators:
    """A batch split in row shares, each loss taken with the whole batch's count, adds up to the batch's loss."""

    @pytest.mark.parametrize("rows", [([0], [1]), ([1], [0])])
    def test_shares_add_up_to_the_whole_batch(self, rows):
        logits, labels, mask = _batch()
        ref = torch.log_softmax(torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)), -1)
        seq, ref_seq = torch.tensor([-3.0, -5.0]), torch.tensor([-2.5, -6.0])
        tokens, positions = int((labels[:, 1:] != -100).sum()), int(mask[:, 1:].sum())
        whole = [nll_loss(logits, labels), kl_loss(logits, ref, mask), npo_loss(seq, ref_seq, 0.5)]
        parts = [[nll_loss(logits[r], labels[r], tokens), kl_loss(logits[r], ref[r], mask[r], positions),
                  npo_loss(seq[r], ref_seq[r], 0.5, 2)] for r in rows]
        for i, want in enumerate(whole):
            assert sum(p[i] for p in parts).item() == pytest.approx(want.item(), abs=1e-6)

    def test_denominator_rescales_and_allows_no_own_token(self):
        logits, labels, _ = _batch()
        own = int((labels[:, 1:] != -100).sum())
        assert nll_loss(logits, labels, 10).item() == pytest.approx(nll_loss(logits, labels).item() * own / 10, abs=1e-6)
        assert nll_loss(torch.zeros(1, 3, 4), torch.full((1, 3), -100), 4).item() == 0.0  # a share without tokens

    @pytest.mark.parametrize("bad", [0, -1.0])
    def test_bad_denominator(self, bad):
        logits, labels, mask = _batch()
        with pytest.raises(ValueError, match="denominator must be > 0"):
            nll_loss(logits, labels, bad)
        with pytest.raises(ValueError, match="denominator must be > 0"):
            kl_loss(logits, logits, mask, bad)
        with pytest.raises(ValueError, match="denominator must be > 0"):
            npo_loss(torch.zeros(2), torch.zeros(2), 0.1, bad)


class TestRandomLabels:
    def test_answers_come_from_other_items(self, splits):
        enc = splits["forget"]
        out = random_label_data(enc, seed=0)

        def parts(e, i):
            real = int(e["attention_mask"][i].sum())
            sup = (e["labels"][i, :real] != -100).nonzero().flatten()
            return e["input_ids"][i, :int(sup[0])].tolist(), e["input_ids"][i, int(sup[0]):real].tolist()

        originals = [parts(enc, i) for i in range(enc["input_ids"].shape[0])]
        for i in range(enc["input_ids"].shape[0]):
            prompt, answer = parts(out, i)
            assert prompt == originals[i][0]
            assert answer != originals[i][1]
            assert answer in [a for j, (_, a) in enumerate(originals) if j != i]
            real = int(out["attention_mask"][i].sum())
            assert out["labels"][i, len(prompt):real].tolist() == answer
        assert torch.equal(random_label_data(enc, seed=0)["input_ids"], out["input_ids"])

    def test_needs_two_items(self, splits):
        with pytest.raises(ValueError, match="at least 2"):
            random_label_data({k: v[:1] for k, v in splits["forget"].items()})


class TestTrainLoops:
    @pytest.mark.parametrize("method", METHOD_NAMES)
    def test_every_method_updates_in_place(self, method, model, splits):
        model.eval()
        before = [p.detach().clone() for p in model.parameters()]
        out = unlearn(model, method, splits["forget"], splits["retain"],
                      TrainConfig(lr=1e-3, batch_size=4, max_steps=2, progress=False))
        assert out["steps"] == 2 and math.isfinite(out["final_loss"])
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert not model.training
        assert all(p.grad is None for p in model.parameters())  # no gradients held past training

    @pytest.mark.parametrize("method", ["npo", "npo_kl"])  # the KL term is 0 at the reference; NLL is not
    def test_npo_first_step_at_reference(self, method, model, splits):
        cfg = TrainConfig(lr=1e-3, batch_size=4, beta=0.5, max_steps=1, progress=False)
        out = unlearn(model, method, splits["forget"], splits["retain"], cfg)
        assert out["final_loss"] == pytest.approx(2 / 0.5 * math.log(2), abs=1e-4)

    def test_kl_frozen_copy_path_matches_cache(self, model, splits, monkeypatch):
        cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=3, progress=False)
        twin = copy.deepcopy(model)
        cached = unlearn(model, "ga_kl", splits["forget"], splits["retain"], cfg)
        monkeypatch.setattr(train_mod, "KL_CACHE_BYTES", 0)
        frozen = unlearn(twin, "ga_kl", splits["forget"], splits["retain"], cfg)
        assert frozen["final_loss"] == pytest.approx(cached["final_loss"], abs=1e-5)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    def test_deterministic_for_a_seed(self, tokenizer, splits):
        runs = []
        for _ in range(2):
            m = _tiny_model(len(tokenizer))
            unlearn(m, "ga_gd", splits["forget"], splits["retain"], TrainConfig(lr=1e-3, batch_size=4, progress=False))
            runs.append(torch.cat([p.flatten() for p in m.parameters()]))
        assert torch.equal(runs[0], runs[1])

    def test_epochs_and_max_steps(self, model, splits):
        n = splits["forget"]["input_ids"].shape[0]
        assert unlearn(model, "ga", splits["forget"], None, TrainConfig(epochs=2, batch_size=5, progress=False))["steps"] \
            == 2 * -(-n // 5)
        assert relearn(model, splits["forget"], TrainConfig(epochs=10, batch_size=4, max_steps=5, progress=False))["steps"] == 5

    def test_relearn_lowers_nll(self, model, splits):
        enc = splits["forget"]

        def nll():
            with torch.no_grad():
                return nll_loss(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits,
                                enc["labels"]).item()

        start = nll()
        relearn(model, enc, TrainConfig(lr=3e-3, epochs=5, batch_size=8, progress=False))
        assert nll() < start - 0.5

    def test_errors(self, model, splits):
        with pytest.raises(ValueError, match="unknown method 'dpo'; choose from ga, ga_gd"):
            unlearn(model, "dpo", splits["forget"], None, TrainConfig(progress=False))
        with pytest.raises(ValueError, match="needs retain data"):
            unlearn(model, "ga_kl", splits["forget"], None, TrainConfig(progress=False))
        with pytest.raises(TypeError, match="cfg must be a TrainConfig"):
            relearn(model, splits["forget"], {"lr": 1e-3})

    @pytest.mark.parametrize("kwargs, match", [({"lr": 0}, "lr"), ({"epochs": 0}, "epochs"),
                                               ({"batch_size": 1.5}, "batch_size"), ({"beta": -1}, "beta"),
                                               ({"max_steps": 0}, "max_steps")])
    def test_config_validation(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


class TestFixedReference:
    """NPO's reference and the KL anchor are the original model for every request (``reference=``)."""

    def _two_requests(self, corpus, tokenizer):
        first, second = split_requests(corpus["forget"], 2)
        assert {i["entity"] for i in first}.isdisjoint({i["entity"] for i in second})  # whole entities per request
        return encode(tokenizer, first), encode(tokenizer, second)

    def test_npo_loss_of_request_two_starts_away_from_the_reference(self, corpus, tokenizer):
        first, second = self._two_requests(corpus, tokenizer)
        at_reference = 2 / 0.1 * math.log(2)  # the NPO loss where the model equals its reference
        results = {}
        for mode in ("original", "current"):
            original = _tiny_model(len(tokenizer)).requires_grad_(False)
            model = copy.deepcopy(original).requires_grad_(True)
            cfg = TrainConfig(lr=3e-3, epochs=3, batch_size=4, beta=0.1, progress=False)
            r1 = unlearn(model, "npo", first, None, cfg, reference=original if mode == "original" else None)
            r2 = unlearn(model, "npo", second, None, cfg, reference=original if mode == "original" else None)
            results[mode] = (r1["first_loss"], r2["first_loss"])
        assert results["original"][0] == pytest.approx(at_reference, abs=1e-4)  # request 1 starts at theta_0
        assert results["current"] == pytest.approx((at_reference, at_reference), abs=1e-4)
        assert abs(results["original"][1] - at_reference) > 1e-2  # request 2 measured against theta_0, not itself

    def test_kl_anchor_is_the_reference(self, splits, tokenizer):
        original = _tiny_model(len(tokenizer)).requires_grad_(False)
        moved = _tiny_model(len(tokenizer), seed=1)  # another model: KL to the original is not 0 at step 0
        cfg = TrainConfig(lr=1e-6, batch_size=4, max_steps=1, progress=False)
        with_reference = unlearn(copy.deepcopy(moved), "ga_kl", splits["forget"], splits["retain"], cfg,
                                 reference=original)
        current = unlearn(copy.deepcopy(moved), "ga_kl", splits["forget"], splits["retain"], cfg)
        assert with_reference["first_loss"] > current["first_loss"] + 1e-3  # + KL(original || moved) > 0


class TestRegistry:
    def test_every_method_declared_once(self):
        assert METHOD_NAMES == ("ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "rlabel")
        assert all(METHODS[name].name == name for name in METHOD_NAMES)
        assert {m for m in METHOD_NAMES if METHODS[m].needs_retain} == {"ga_gd", "ga_kl", "npo_gd", "npo_kl"}
        assert {m for m in METHOD_NAMES if METHODS[m].needs_reference} == {"ga_kl", "npo", "npo_gd", "npo_kl"}
        assert get_method("npo_gd").hyperparameters == ("beta",) and METHODS["rlabel"].relabel

    def test_npo_gd_is_npo_plus_retain_nll(self, model, splits):
        """Both terms by hand on one batch: NPO on forget (at the reference: 2/beta log 2) + NLL on retain."""
        spec = get_method("npo_gd")
        forget = {k: v[:4] for k, v in splits["forget"].items()}
        forget["ref_logp"] = train_mod.reference_logprobs(model, forget, 4, full=False)
        retain = {k: v[:4] for k, v in splits["retain"].items()}
        cfg = TrainConfig(beta=0.5, progress=False)
        with torch.no_grad():
            npo = spec.forget_term(model, forget, cfg, None)
            nll = spec.retain_term(model, retain, None, None)
            want_nll = _nll64(model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits,
                              retain["labels"])
        assert float(npo) == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)
        assert float(nll) == pytest.approx(float(want_nll), rel=1e-5)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown method 'sgd'"):
            get_method("sgd")
