"""Driver evaluation: exact ROC AUC, per-example scores against direct loops, one forward pass, MIA on the tiny model."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from repforget_kernels.driver.data import SPLITS, encode, make_corpus
from repforget_kernels.driver.evaluate import MIN_K, evaluate, roc_auc, split_scores
from repforget_kernels.driver.models import PRETRAIN_TARGET, build_tokenizer


def _pairwise_auc(pos, neg):
    """Direct double loop: wins + ties/2 over all pairs."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def _scores64(model, enc, tokenizer, k=MIN_K):
    """float64 per-example loss / zlib / min-k / min-k++ scores by explicit loops over supervised tokens."""
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double()
    logp_all = torch.log_softmax(logits, -1)
    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": [], "correct": []}
    for b in range(enc["input_ids"].shape[0]):
        lp, z, correct = [], [], 0
        for t in range(enc["labels"].shape[1] - 1):
            y = int(enc["labels"][b, t + 1])
            if y == -100:
                continue
            row = logp_all[b, t]
            mu = float((row.exp() * row).sum())
            sigma = math.sqrt(float((row.exp() * row ** 2).sum()) - mu ** 2)
            lp.append(float(row[y]))
            z.append((float(row[y]) - mu) / sigma)
            correct += int(row.argmax()) == y
        keep = max(1, int(len(lp) * k))
        real = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        out["loss"].append(sum(lp) / len(lp))
        out["zlib"].append(sum(lp) / len(zlib.compress(tokenizer.decode(real).encode())))
        out["min_k"].append(sum(sorted(lp)[:keep]) / keep)
        out["min_k_plus_plus"].append(sum(sorted(z)[:keep]) / keep)
        out["correct"].append(correct)
    return {key: torch.tensor(v, dtype=torch.float64) for key, v in out.items()}


@pytest.fixture(scope="module")
def small():
    """A random-init tiny Qwen2 with a tokenizer and encoded splits of a small corpus."""
    corpus = make_corpus(0, n_per_domain=8)
    tok = build_tokenizer(corpus)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    return model, tok, {name: encode(tok, corpus[name]) for name in SPLITS}


class TestRocAuc:
    def test_ties_count_one_half(self):
        pos, neg = torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])
        # wins: 3>all (3); 1>0 (1) tie 1 (0.5); 2>0,1 (2) tie 2 (0.5), twice -> 3 + 1.5 + 2*2.5 = 9.5 of 12
        assert roc_auc(pos, neg) == pytest.approx(9.5 / 12, abs=1e-15)
        assert roc_auc(pos, neg) == pytest.approx(_pairwise_auc(pos.tolist(), neg.tolist()), abs=1e-15)

    def test_extremes(self):
        assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
        assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
        assert roc_auc(torch.full((5,), 7.0), torch.full((3,), 7.0)) == 0.5

    def test_random_with_many_ties_matches_pairwise(self):
        gen = torch.Generator().manual_seed(0)
        pos = torch.randint(0, 6, (37,), generator=gen).float()
        neg = torch.randint(0, 5, (23,), generator=gen).to(torch.float16)
        assert roc_auc(pos, neg) == pytest.approx(_pairwise_auc(pos.tolist(), neg.float().tolist()), abs=1e-15)

    @pytest.mark.parametrize("pos, neg, err, match", [
        (torch.tensor([]), torch.tensor([1.0]), ValueError, "pos must be a non-empty 1-D"),
        (torch.tensor([1.0]), torch.ones(2, 2), ValueError, "neg must be a non-empty 1-D"),
        (torch.tensor([float("nan")]), torch.tensor([1.0]), ValueError, "pos contains NaN"),
        ([1.0], torch.tensor([1.0]), TypeError, "pos must be a torch.Tensor"),
    ])
    def test_bad_input(self, pos, neg, err, match):
        with pytest.raises(err, match=match):
            roc_auc(pos, neg)


class TestScores:
    def test_against_direct_loops(self, small):
        model, tok, splits = small
        enc = splits["forget"]
        got = split_scores(model, enc, batch_size=4, tokenizer=tok)
        want = _scores64(model, enc, tok)
        for key in ("loss", "zlib", "min_k", "min_k_plus_plus"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["correct"].double(), want["correct"])
        assert torch.equal(got["tokens"], (enc["labels"][:, 1:] != -100).sum(1))

    def test_without_tokenizer_compresses_ids(self, small):
        model, _, splits = small
        enc = splits["holdout"]
        got = split_scores(model, enc)
        for b in range(3):
            real = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
            length = len(zlib.compress(" ".join(map(str, real)).encode()))
            assert got["zlib"][b].item() == pytest.approx(-got["nll"][b].item() / length, rel=1e-12)

    def test_one_forward_pass_per_batch(self, small):
        model, tok, splits = small
        calls = []
        handle = model.register_forward_hook(lambda *args: calls.append(1))
        try:
            evaluate(model, splits, batch_size=4, tokenizer=tok)
        finally:
            handle.remove()
        assert len(calls) == sum(-(-enc["input_ids"].shape[0] // 4) for enc in splits.values())

    def test_evaluate_keys_and_accuracy(self, small):
        model, tok, splits = small
        out = evaluate(model, splits, tokenizer=tok)
        assert set(out) == {"forget_acc", "retain_acc", "holdout_acc", "probe_acc", "perplexity", "mia_auc"}
        s = split_scores(model, splits["retain"], tokenizer=tok)
        assert out["retain_acc"] == pytest.approx(float(s["correct"].sum() / s["tokens"].sum()))
        assert out["perplexity"] == pytest.approx(math.exp(float(s["nll"].sum() / s["tokens"].sum())), rel=1e-9)
        assert set(out["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
        assert all(0.0 <= v <= 1.0 for v in out["mia_auc"].values())

    def test_absent_splits_give_none(self, small):
        model, _, splits = small
        out = evaluate(model, {"forget": splits["forget"]})
        assert out["retain_acc"] is None and out["perplexity"] is None and out["mia_auc"] is None
        with pytest.raises(ValueError, match="splits must be a non-empty dict"):
            evaluate(model, {})

    def test_eval_mode_restored(self, small):
        model, _, splits = small
        model.train()
        try:
            split_scores(model, splits["probe"])
            assert model.training
        finally:
            model.eval()


class TestMembership:
    def test_trained_model_separates_members(self, pretrained_tiny):
        model, tok, _, corpus = pretrained_tiny
        splits = {name: encode(tok, corpus[name]) for name in ("forget", "retain", "holdout")}
        out = evaluate(model, splits, tokenizer=tok)
        assert out["forget_acc"] >= PRETRAIN_TARGET and out["retain_acc"] >= PRETRAIN_TARGET
        assert out["holdout_acc"] < 0.8
        for name, auc in out["mia_auc"].items():
            assert auc > 0.8, (name, auc)
