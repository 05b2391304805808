"""Driver evaluation: exact match of generated answers (hand-computed and against an unbatched loop), exact ROC AUC,
per-example scores against direct loops, one forward pass, MIA on the pretrained small model."""
from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repforget_kernels.driver.data import encode, pad_rows
from repforget_kernels.driver.evaluate import (
    MIN_K,
    evaluate,
    exact_match,
    greedy_continuations,
    normalize_answer,
    roc_auc,
    split_scores,
)

from conftest import random_small_model

SPLITS = ("forget", "retain", "holdout", "unrelated")


def _pairwise_auc(pos, neg):
    """Direct double loop: wins + ties/2 over all pairs."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def _scores64(model, enc, tokenizer, k=MIN_K):
    """float64 per-example loss / zlib / min-k / min-k++ scores by explicit loops over the answer tokens
    (supervised, EOS and special tokens left out), and the teacher-forced correct answer tokens."""
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double()
    logp_all = torch.log_softmax(logits, -1)
    special = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}
    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": [], "correct": []}
    for b in range(enc["input_ids"].shape[0]):
        lp, z, answer, correct = [], [], [], 0
        for t in range(enc["labels"].shape[1] - 1):
            y = int(enc["labels"][b, t + 1])
            if y == -100 or y in special:
                continue
            row = logp_all[b, t]
            mu = float((row.exp() * row).sum())
            sigma = math.sqrt(float((row.exp() * row ** 2).sum()) - mu ** 2)
            lp.append(float(row[y]))
            z.append((float(row[y]) - mu) / sigma)
            answer.append(y)
            correct += int(row.argmax()) == y
        keep = max(1, int(len(lp) * k))
        mean = sum(lp) / len(lp)
        out["loss"].append(mean)
        out["zlib"].append(mean / len(zlib.compress(tokenizer.decode(answer, skip_special_tokens=True).encode())))
        out["min_k"].append(sum(sorted(lp)[:keep]) / keep)
        out["min_k_plus_plus"].append(sum(sorted(z)[:keep]) / keep)
        out["correct"].append(correct)
    return {key: torch.tensor(v, dtype=torch.float64) for key, v in out.items()}


@pytest.fixture(scope="module")
def small():
    """An untrained small Qwen2 with its tokenizer and encoded splits of the small benchmark."""
    model, tok, corpus = random_small_model()
    return model, tok, {name: encode(tok, corpus[name]) for name in SPLITS}


class _Successor(nn.Module):
    """A stand-in LM: the next token is the last one + 1, except that token 8 is followed by EOS (id 1)."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(eos_token_id=1)  # read when no tokenizer is given
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, so the device can be read

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, past_key_values=None):
        last = input_ids[:, -1:]  # (B, 1): with the cache only the new token is fed
        nxt = torch.where(last == 8, torch.ones_like(last), (last + 1) % self.vocab)  # (B, 1)
        logits = nn.functional.one_hot(nxt, self.vocab).float().expand(-1, input_ids.shape[1], -1)  # (B, T, V)
        return _Out(logits)


class _Fixed(nn.Module):
    """A stand-in LM returning fixed logits (B, T, V) whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(eos_token_id=1)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return _Out(self.logits[:, :input_ids.shape[1]])


class _Out(dict):
    """A model output as transformers returns it: mapping and attribute access."""

    def __init__(self, logits):
        super().__init__(logits=logits, past_key_values=None)
        self.logits = logits


def _answers(rows):
    """encode()-style rows from (prompt ids, answer ids) with EOS (1) appended to the answer."""
    return pad_rows([(p + a + [1], [-100] * len(p) + a + [1]) for p, a in rows], pad_id=0)


class TestExactMatch:
    def test_hand_computed_case(self):
        # prompts continue 5 6 -> 7 8 EOS; 3 -> 4 5 6 7 (no EOS within len + 2); 6 -> 7 8 EOS
        enc = _answers([([5, 6], [7, 8]), ([3], [4, 5]), ([6], [8]), ([2, 3, 4, 5, 6], [7, 8])])
        got = exact_match(_Successor(), enc, batch_size=3)
        assert got.tolist() == [True, False, False, True]
        outs = greedy_continuations(_Successor(), [[5, 6], [3]], max_new_tokens=[4, 4], eos_id=1)
        assert outs == [[7, 8, 1], [4, 5, 6, 7]]

    def test_normalisation(self):
        assert normalize_answer("  The  Kesar-Medal. ") == "the kesar medal"
        assert normalize_answer("14 March, 1957") == normalize_answer("14 march 1957")

    def test_batched_cached_generation_equals_a_plain_loop(self, tiny):
        """Left padding, position ids and the KV cache change nothing: one prompt at a time, no cache, agrees."""
        model, tok, corpus = tiny
        items = corpus["forget"][:5] + corpus["holdout"][:5]
        enc = encode(tok, items)
        got = exact_match(model, enc, tokenizer=tok, batch_size=4)
        want = []
        for item in items:
            ids = tok(item["prompt"], add_special_tokens=False)["input_ids"]
            answer = tok(" " + item["answer"], add_special_tokens=False)["input_ids"]
            new = []
            with torch.no_grad():
                for _ in range(len(answer) + 3):
                    nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                    if nxt == tok.eos_token_id:
                        break
                    new.append(nxt)
            want.append(normalize_answer(tok.decode(new)) == normalize_answer(item["answer"]))
        assert got.tolist() == want
        assert any(want) and not all(want)  # the trained facts right, the never-seen holdout wrong
        decoded = exact_match(model, enc, tokenizer=tok, batch_size=4, teacher_forced=torch.zeros(len(items), dtype=torch.bool))
        assert decoded.tolist() == want  # the teacher-forced shortcut changes nothing: every item decoded agrees


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
        labels = enc["labels"][:, 1:]
        assert torch.equal(got["supervised"], (labels != -100).sum(1))
        assert torch.equal(got["tokens"], ((labels != -100) & (labels != tok.eos_token_id)).sum(1))

    def test_without_tokenizer_compresses_ids(self, small):
        model, _, splits = small
        enc = splits["holdout"]
        got = split_scores(model, enc)  # no tokenizer: the ids of the answer (EOS from the model's config left out)
        eos = model.config.eos_token_id
        for b in range(3):
            answer = [t for t in enc["labels"][b].tolist() if t not in (-100, eos)]
            length = len(zlib.compress(" ".join(map(str, answer)).encode()))
            assert got["zlib"][b].item() == pytest.approx(got["loss"][b].item() / length, rel=1e-12)

    @pytest.mark.parametrize("k, lowest", [(0.4, [0.125]), (0.7, [0.125, 0.25]), (1.0, [0.125, 0.25, 0.5])])
    def test_hand_computed_mia_scores(self, k, lowest):
        """Answer 2 3 2 + EOS after prompt 5, predicted with p = 1/2, 1/4, 1/8 and EOS with 0.9: loss is the mean
        log p of the three answer tokens (EOS not scored), ZLib that over the zlib length of "2 3 2", Min-K% the
        mean of the lowest max(1, floor(3 k))."""
        enc = _answers([([5], [2, 3, 2])])  # input 5 2 3 2 1
        probs = torch.full((1, 5, 6), 0.0)
        for t, (y, p) in enumerate([(2, 0.5), (3, 0.25), (2, 0.125), (1, 0.9), (0, 1.0)]):
            probs[0, t] = (1 - p) / 5
            probs[0, t, y] = p
        got = split_scores(_Fixed(probs.log()), enc, k=k)
        mean = (math.log(0.5) + math.log(0.25) + math.log(0.125)) / 3
        assert got["loss"].item() == pytest.approx(mean, rel=1e-6)
        assert got["zlib"].item() == pytest.approx(mean / len(zlib.compress(b"2 3 2")), rel=1e-6)
        assert got["min_k"].item() == pytest.approx(sum(map(math.log, lowest)) / len(lowest), rel=1e-6)

    def test_mink_k_checked(self, small):
        model, _, splits = small
        with pytest.raises(ValueError, match=r"k \(the Min-K% fraction\) must be in \(0, 1\]"):
            split_scores(model, splits["holdout"], k=0.0)

    def test_one_forward_pass_per_batch(self, small):
        model, tok, splits = small
        calls = []
        handle = model.register_forward_hook(lambda *args: calls.append(1))
        try:
            evaluate(model, splits, batch_size=4, tokenizer=tok, generate=False)
        finally:
            handle.remove()
        assert len(calls) == sum(-(-enc["input_ids"].shape[0] // 4) for enc in splits.values())

    def test_evaluate_keys_and_accuracy(self, small):
        model, tok, splits = small
        out = evaluate(model, splits, tokenizer=tok)
        assert set(out) == {"token_acc", "em", "em_items", "perplexity", "mia_auc"}
        assert set(out["em"]) == set(out["token_acc"]) == set(out["em_items"]) == set(SPLITS)
        s = split_scores(model, splits["retain"], tokenizer=tok)
        assert out["token_acc"]["retain"] == pytest.approx(float(s["correct"].sum() / s["tokens"].sum()))
        assert out["perplexity"] == pytest.approx(math.exp(float(s["nll"].sum() / s["supervised"].sum())), rel=1e-9)
        items = out["em_items"]["retain"]
        assert len(items) == splits["retain"]["input_ids"].shape[0] and set(items) <= {"0", "1"}
        assert out["em"]["retain"] == pytest.approx(items.count("1") / len(items))
        assert set(out["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
        assert all(0.0 <= v <= 1.0 for v in out["mia_auc"].values())

    def test_absent_splits_give_none(self, small):
        model, _, splits = small
        out = evaluate(model, {"forget": splits["forget"]})
        assert "retain" not in out["em"] and out["perplexity"] is None and out["mia_auc"] is None
        with pytest.raises(ValueError, match="splits must be a non-empty dict"):
            evaluate(model, {})

    def test_eval_mode_restored(self, small):
        model, _, splits = small
        model.train()
        try:
            split_scores(model, splits["unrelated"])
            exact_match(model, splits["unrelated"])
            assert model.training
        finally:
            model.eval()


class TestMembership:
    def test_trained_model_separates_members(self, tiny):
        model, tok, corpus = tiny
        splits = {name: encode(tok, corpus[name]) for name in ("forget", "retain", "holdout")}
        out = evaluate(model, splits, tokenizer=tok)
        assert out["em"]["forget"] >= 0.9 and out["em"]["retain"] >= 0.9
        assert out["em"]["holdout"] < 0.3
        for name, auc in out["mia_auc"].items():
            assert auc > 0.8, (name, auc)
