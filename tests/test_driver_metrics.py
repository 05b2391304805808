"""TOFU / MUSE metrics: hand-computed cases of each definition, and their wiring into evaluate()."""
from __future__ import annotations

import math

import pytest
import torch

from repforget_kernels.driver.data import encode
from repforget_kernels.driver.evaluate import evaluate, exact_match
from repforget_kernels.driver.metrics import (
    against_retain,
    forget_quality,
    harmonic_mean,
    model_utility,
    privleak,
    probability,
    rouge_l_recall,
    truth_ratio_data,
    truth_ratio_score,
    truth_ratios,
)

from conftest import random_small_model

pytest.importorskip("rouge_score")
pytest.importorskip("scipy")


def _scores(nll, supervised):
    return {"nll": torch.tensor(nll, dtype=torch.float64), "supervised": torch.tensor(supervised)}


class TestDefinitions:
    def test_rouge_l_recall(self):
        # LCS "the cat sat" = 3 of the reference's 6 tokens; stemming maps "sitting" / "sits" together
        assert rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
        assert rouge_l_recall("He was born in Lagos in 1960", "Born in Lagos.") == pytest.approx(1.0)
        assert rouge_l_recall("", "Lagos") == 0.0

    def test_truth_ratio_hand_computed(self):
        """Paraphrased NLL per token 1 and 3; perturbed per token 2, 2 (item 0) and 2 (item 1):
        R = exp(1 - 2) = 1/e and exp(3 - 2) = e."""
        ratios = truth_ratios(_scores([2.0, 3.0], [2, 1]), _scores([4.0, 6.0, 2.0], [2, 3, 1]),
                              torch.tensor([0, 0, 1]))
        torch.testing.assert_close(ratios, torch.tensor([math.exp(-1), math.e], dtype=torch.float64))
        assert truth_ratio_score(ratios, forget=True) == pytest.approx(math.exp(-1))  # min(R, 1/R) both 1/e
        assert truth_ratio_score(ratios, forget=False) == pytest.approx((1 - math.exp(-1)) / 2)  # max(0, 1 - R)

    def test_probability_is_length_normalised(self):
        assert probability(_scores([2.0, 3.0], [2, 1])) == pytest.approx((math.exp(-1) + math.exp(-3)) / 2)

    def test_forget_quality_is_the_ks_p_value(self):
        # disjoint samples of 3 and 3: D = 1, exact p = 2 / C(6, 3) = 0.1; identical samples: p = 1
        assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
        assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
        with pytest.raises(ValueError, match="truth ratios of both models"):
            forget_quality([], [1.0])

    def test_harmonic_mean_and_model_utility(self):
        assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
        assert harmonic_mean([0.5, 0.0]) == 0.0
        with pytest.raises(ValueError, match="values >= 0"):
            harmonic_mean([-1.0])
        got = model_utility({"retain": 1.0, "forget": 0.01}, {"retain": 0.5}, {"retain": 0.25})
        assert got == pytest.approx(3 / 7)  # forget numbers never enter utility
        assert model_utility({"forget": 1.0}, {}, {}) is None

    def test_privleak(self):
        assert privleak(0.75, 0.5) == pytest.approx(50.0)
        assert privleak(0.5, 0.5) == 0.0
        with pytest.raises(ValueError, match="retain_auc must be > 0"):
            privleak(0.5, 0.0)

    def test_against_retain(self):
        record = {"truth_ratio_items": {"forget": [1.0, 2.0, 3.0]}, "mia_auc": {"min_k": 0.75}}
        retain = {"truth_ratio_items": {"forget": [4.0, 5.0, 6.0]}, "mia_auc": {"min_k": 0.5}}
        assert against_retain(record, retain) == pytest.approx({"forget_quality": 0.1, "privleak": 50.0})
        assert against_retain(record, None) == {"forget_quality": None, "privleak": None}


@pytest.fixture(scope="module")
def small():
    model, tok, corpus = random_small_model()
    items = [dict(it, paraphrased_answer=it["answer"] + " indeed",
                  perturbed_answer=[corpus["retain"][i]["answer"], corpus["retain"][i + 1]["answer"]])
             for i, it in enumerate(corpus["forget"][:8])]
    return model, tok, corpus, items


class TestEvaluateWiring:
    def test_truth_ratio_items_match_direct_scoring(self, small):
        """evaluate()'s per-item R equals exp(NLL(paraphrased) - mean NLL(perturbed)) scored one item at a time."""
        model, tok, corpus, items = small
        splits = {"forget": encode(tok, items), "retain": encode(tok, corpus["retain"][:8])}
        alts = {"forget": truth_ratio_data(tok, items, 64), "retain": None}
        out = evaluate(model, splits, tokenizer=tok, tofu=True, alternatives=alts, batch_size=3)

        def nll(prompt, answer):
            enc = encode(tok, [{"prompt": prompt, "answer": answer}])
            with torch.no_grad():
                logp = torch.log_softmax(model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.double(), -1)
            labels = enc["labels"][0, 1:]
            picked = [logp[0, t, labels[t]] for t in range(len(labels)) if labels[t] != -100]
            return -float(sum(picked)) / len(picked)

        want = [math.exp(nll(it["prompt"], it["paraphrased_answer"])
                         - sum(nll(it["prompt"], a) for a in it["perturbed_answer"]) / 2) for it in items]
        assert out["truth_ratio_items"]["forget"] == pytest.approx(want, rel=1e-5)
        assert out["truth_ratio"]["forget"] == pytest.approx(sum(min(r, 1 / r) for r in want) / len(want), rel=1e-5)
        assert "retain" not in out["truth_ratio"]  # no perturbed answers there
        assert set(out["rouge"]) == set(splits) and all(0.0 <= v <= 1.0 for v in out["rouge"].values())
        assert out["model_utility"] == pytest.approx(harmonic_mean([out["probability"]["retain"],
                                                                    out["rouge"]["retain"]]))

    def test_answers_leave_exact_match_unchanged(self, small):
        model, tok, corpus, _ = small
        enc = encode(tok, corpus["retain"][:10])
        plain = exact_match(model, enc, tokenizer=tok, batch_size=4)
        hits, answers = exact_match(model, enc, tokenizer=tok, batch_size=4, answers=True)
        assert torch.equal(plain, hits) and len(answers) == 10 and all(isinstance(a, str) for a in answers)
