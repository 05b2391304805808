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
    dpo_loss,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    random_label_data,
    representation_mse,
    sequence_logprob,
    simnpo_loss,
    token_logprobs,
)
from repforget_kernels.driver.methods import (
    IDK_ANSWERS,
    METHOD_NAMES,
    METHODS,
    block_output,
    get_method,
    idk_data,
    rmu_direction,
)
from repforget_kernels.driver.pipeline import split_requests
from repforget_kernels.driver.pretrain import build_tokenizer

from conftest import SMALL_TINY, small_benchmark
from repforget_kernels.driver.train import TrainConfig, lr_multiplier, relearn, unlearn


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
    def test_every_method_updates_in_place(self, method, model, splits, tokenizer):
        model.eval()
        before = [p.detach().clone() for p in model.parameters()]
        out = unlearn(model, method, splits["forget"], splits["retain"],
                      TrainConfig(lr=1e-3, batch_size=4, max_steps=2, progress=False), tokenizer=tokenizer)
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
        assert METHOD_NAMES == ("ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "rlabel", "simnpo", "idkdpo", "rmu")
        assert all(METHODS[name].name == name for name in METHOD_NAMES)
        assert {m for m in METHOD_NAMES if METHODS[m].needs_retain} == {"ga_gd", "ga_kl", "npo_gd", "npo_kl", "simnpo",
                                                                        "idkdpo", "rmu"}
        assert {m for m in METHOD_NAMES if METHODS[m].needs_reference} == {"ga_kl", "npo", "npo_gd", "npo_kl",
                                                                           "idkdpo", "rmu"}
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
            nll = spec.retain_term(model, retain, None, cfg, None)
            want_nll = _nll64(model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits,
                              retain["labels"])
        assert float(npo) == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)
        assert float(nll) == pytest.approx(float(want_nll), rel=1e-5)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown method 'sgd'"):
            get_method("sgd")


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


class TestSimNPO:
    def test_hand_computed(self):
        """beta 2, gamma 0.5: rewards -2 * (-2) / 2 - 0.5 = 1.5 and -2 * (-6) / 3 - 0.5 = 3.5."""
        got = simnpo_loss(torch.tensor([-2.0, -6.0]), torch.tensor([2, 3]), beta=2.0, gamma=0.5)
        want = -(2 / 2.0) * (_logsigmoid(1.5) + _logsigmoid(3.5)) / 2
        assert float(got) == pytest.approx(want, rel=1e-6)

    def test_length_normalised(self):
        """The same mean log-prob per token gives the same loss whatever the length."""
        a = simnpo_loss(torch.tensor([-3.0]), torch.tensor([3]), beta=1.0)
        b = simnpo_loss(torch.tensor([-30.0]), torch.tensor([30]), beta=1.0)
        assert float(a) == pytest.approx(float(b), rel=1e-6)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="gamma must be >= 0"):
            simnpo_loss(torch.zeros(1), torch.ones(1), 1.0, -0.1)
        with pytest.raises(ValueError, match="lengths must be > 0"):
            simnpo_loss(torch.zeros(2), torch.tensor([1, 0]), 1.0)

    def test_forget_term_on_a_batch(self, model, splits):
        """The method's forget term = the loss of the batch's summed log-probs over its answer-token counts."""
        forget = {k: v[:4] for k, v in splits["forget"].items()}
        cfg = TrainConfig(beta=2.5, gamma=0.3, progress=False)
        with torch.no_grad():
            got = get_method("simnpo").forget_term(model, forget, cfg, None)
            logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
        logp = _logsoftmax64(logits)
        want = []
        for b in range(4):
            terms = [logp[b, t, forget["labels"][b, t + 1]] for t in range(forget["labels"].shape[1] - 1)
                     if forget["labels"][b, t + 1] != -100]
            want.append(_logsigmoid(float(-2.5 * sum(terms) / len(terms) - 0.3)))
        assert float(got) == pytest.approx(-(2 / 2.5) * sum(want) / 4, rel=1e-5)


class TestIdkDPO:
    def test_hand_computed(self):
        """beta 0.5: margins (-1 - -2) - (-3 - -1) = 3 and (0 - 0) - (-1 - -1) = 0."""
        got = dpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.tensor([-3.0, -1.0]),
                       torch.tensor([-1.0, -1.0]), beta=0.5)
        want = -(2 / 0.5) * (_logsigmoid(1.5) + _logsigmoid(0.0)) / 2
        assert float(got) == pytest.approx(want, rel=1e-6)

    def test_refusal_rows_keep_the_prompt(self, splits, tokenizer):
        forget = {k: v[:6] for k, v in splits["forget"].items()}
        idk = idk_data(forget, tokenizer, seed=3)
        refusals = {tuple(tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                    for a in IDK_ANSWERS}
        from repforget_kernels.driver.data import split_rows
        for (p_got, a_got), (p_want, _) in zip(split_rows(idk), split_rows(forget)):
            assert p_got == p_want and tuple(a_got) in refusals
        assert torch.equal(idk_data(forget, tokenizer, seed=3)["input_ids"], idk["input_ids"])

    def test_first_step_at_the_reference(self, model, splits, tokenizer):
        """At pi = pi_ref both log-ratios vanish: the forget term is (2/beta) log 2."""
        cfg = TrainConfig(lr=1e-3, batch_size=4, beta=0.5, max_steps=1, progress=False, retain_weight=1.0)
        forget = {k: v[:4] for k, v in splits["forget"].items()}
        idk = idk_data(forget, tokenizer)
        idk["ref_logp"] = train_mod.reference_logprobs(model, idk, 4, full=False)
        batch = {**forget, "ref_logp": train_mod.reference_logprobs(model, forget, 4, full=False),
                 "row": torch.arange(4), "idk": idk}
        with torch.no_grad():
            got = get_method("idkdpo").forget_term(model, batch, cfg, None)
        assert float(got) == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)

    def test_needs_the_tokenizer(self, model, splits):
        with pytest.raises(ValueError, match="needs the tokenizer"):
            unlearn(model, "idkdpo", splits["forget"], splits["retain"], TrainConfig(max_steps=1, progress=False))


class TestRMU:
    def test_representation_mse_hand_computed(self):
        """Row 0: tokens (1, 2) and (3, 4) against target (1, 0): squares (0 + 4) / 2 and (4 + 16) / 2; row 1's
        second token is padding."""
        hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [9.0, 9.0]]])
        mask = torch.tensor([[1, 1], [1, 0]])
        got = representation_mse(hidden, torch.tensor([1.0, 0.0]), mask)
        assert float(got) == pytest.approx((2.0 + 10.0 + 0.5) / 3, rel=1e-6)

    def test_direction_is_a_fixed_unit_vector(self):
        u = rmu_direction(16, seed=5)
        assert float(u.norm()) == pytest.approx(1.0, rel=1e-6) and bool((u >= 0).all())
        assert torch.equal(u, rmu_direction(16, seed=5))

    def test_first_step_loss(self, model, splits):
        """At the first step the retain term is 0 (the model is the frozen one); the forget term is the mean over
        real tokens and units of (h_l - c u)^2 at block rmu_layer."""
        cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=1, progress=False, rmu_layer=1, rmu_steer=3.0, seed=7)
        forget = splits["forget"]
        order = torch.randperm(forget["input_ids"].shape[0], generator=torch.Generator().manual_seed(7 * 1000))[:4]
        first = {k: v[order] for k, v in forget.items()}
        with torch.no_grad():
            h = block_output(model, first, 1).double()  # (4, T, d)
        target = 3.0 * rmu_direction(h.shape[-1], 7).double()
        mask = first["attention_mask"].bool()
        want = float(((h - target) ** 2).mean(-1)[mask].mean())
        out = unlearn(model, "rmu", forget, splits["retain"], cfg)
        assert out["first_loss"] == pytest.approx(want, rel=1e-5)

    def test_layer_out_of_range(self, model, splits):
        with pytest.raises(ValueError, match=r"rmu_layer must be in \[0, 1\]"):
            unlearn(model, "rmu", splits["forget"], splits["retain"],
                    TrainConfig(max_steps=1, progress=False, rmu_layer=2))


class TestKnobs:
    def test_lr_multiplier_hand_values(self):
        assert [lr_multiplier(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]
        assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(1 - 4 / 8)
        assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))

    def test_grad_accum_matches_one_large_batch(self, model, splits):
        """NPO is a mean over sequences: 2 accumulated batches of 2 rows = 1 batch of the same 4 rows."""
        twin = copy.deepcopy(model)
        common = dict(lr=1e-2, max_steps=1, progress=False, optimizer="sgd", beta=0.5)
        unlearn(model, "npo", splits["forget"], None, TrainConfig(batch_size=4, **common))
        unlearn(twin, "npo", splits["forget"], None, TrainConfig(batch_size=2, grad_accum=2, **common))
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def test_weight_decay_moves_weights_without_gradient(self, model, splits):
        """AdamW's decoupled decay shrinks every weight by lr * wd even where the loss does not reach."""
        twin = copy.deepcopy(model)
        cfg = dict(lr=1e-2, max_steps=1, progress=False, batch_size=4)
        unlearn(model, "ga", splits["forget"], None, TrainConfig(**cfg))
        unlearn(twin, "ga", splits["forget"], None, TrainConfig(weight_decay=0.5, **cfg))
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))

    @pytest.mark.parametrize("field,value,match", [("scheduler", "step", "scheduler must be one of"),
                                                   ("grad_accum", 0, "grad_accum must be a positive int"),
                                                   ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
                                                   ("warmup", -1, "warmup must be an int >= 0")])
    def test_bad_knobs(self, field, value, match):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{field: value})
