"""Unlearning-benchmark metrics as TOFU and MUSE define them (docs/interop.md gives each definition's source).

- ROUGE-L recall (TOFU, Maini et al. 2024): ``rouge_score``'s ROUGE-L recall (Porter stemmer) of the greedy
  answer against the reference answer, averaged over a split's items.
- probability (TOFU): mean over items of p(answer | question)^(1/|answer|) = exp(-mean NLL) over the
  supervised tokens (the answer and EOS, as TOFU's labels).
- truth ratio (TOFU): per item R = P(perturbed) / P(paraphrased) with P(a) = p(a | q)^(1/|a|), the perturbed
  answers combined by their geometric mean (TOFU's code averages their per-token NLLs):
  R = exp(NLL(paraphrased) - mean_j NLL(perturbed_j)), NLL per token. A split's number is mean_i min(R_i, 1/R_i) on
  the forget split and mean_i max(0, 1 - R_i) elsewhere (higher is better on both).
- forget quality (TOFU): the p-value of the two-sample Kolmogorov-Smirnov test between the forget truth
  ratios of the evaluated model and of the retain model (trained without the forget data).
- model utility (TOFU): the harmonic mean of probability, ROUGE-L and truth ratio on the non-forget
  evaluation splits that have them (TOFU's retain, real-authors and world-facts sets; here the retain and
  utility splits given).
- privleak (MUSE, Shi et al. 2024): (AUC - AUC_retain) / AUC_retain * 100, AUC the Min-K% membership AUC of
  forget (members) against holdout (non-members), of the evaluated model and of the retain model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .data import encode

__all__ = ["rouge_l_recall", "truth_ratio_data", "truth_ratios", "truth_ratio_score", "probability",
           "forget_quality", "harmonic_mean", "model_utility", "privleak", "against_retain", "UTILITY_SPLITS"]

UTILITY_SPLITS = ("retain", "utility")  # the evaluation splits model utility is taken over, where present
_SCORERS: dict = {}  # rouge_score scorers, built once


def rouge_l_recall(generation: str, reference: str) -> float:
    """ROUGE-L recall of ``generation`` against ``reference`` (rouge_score, Porter stemmer, as TOFU)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE-L needs the 'rouge-score' package (pip install 'repforget-kernels[driver]')") from None
    scorer = _SCORERS.setdefault("rougeL", rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return float(scorer.score(reference, generation)["rougeL"].recall)


def truth_ratio_data(tokenizer, items: list, max_length: int, chat_template: bool = False) -> Optional[dict]:
    """The encoded alternatives of a split for the truth ratio, or None unless every item has perturbed answers.

    Returns {"paraphrased": encode() of (question, paraphrased answer; the answer where there is none), N rows,
    "perturbed": encode() of every (question, perturbed answer) pair, M rows, "perturbed_item": (M,) long, the
    item of each perturbed row}.
    """
    if not items or not all(item.get("perturbed_answer") for item in items):
        return None
    paraphrased = [{"prompt": it["prompt"], "answer": it.get("paraphrased_answer") or it["answer"]} for it in items]
    perturbed = [{"prompt": it["prompt"], "answer": alt} for it in items for alt in it["perturbed_answer"]]
    owner = [i for i, it in enumerate(items) for _ in it["perturbed_answer"]]
    return {"paraphrased": encode(tokenizer, paraphrased, max_length, chat_template=chat_template),
            "perturbed": encode(tokenizer, perturbed, max_length, chat_template=chat_template),
            "perturbed_item": torch.tensor(owner, dtype=torch.long)}


def _mean_nll(scores: dict) -> torch.Tensor:
    """(N,) float64 NLL per supervised token of each row of a split_scores() output."""
    return scores["nll"].double() / scores["supervised"].clamp_min(1).double()


def truth_ratios(paraphrased_scores: dict, perturbed_scores: dict, perturbed_item: torch.Tensor) -> torch.Tensor:
    """(N,) float64 R_i = exp(NLL(paraphrased_i) - mean_j NLL(perturbed_ij)), NLL per token: the geometric
    mean of the perturbed answers' normalised probabilities over the paraphrased answer's."""
    para = _mean_nll(paraphrased_scores)  # (N,)
    pert = _mean_nll(perturbed_scores)  # (M,)
    sums = torch.zeros_like(para).index_add_(0, perturbed_item, pert)
    counts = torch.zeros_like(para).index_add_(0, perturbed_item, torch.ones_like(pert))
    return torch.exp(para - sums / counts)


def truth_ratio_score(ratios: torch.Tensor, forget: bool) -> float:
    """A split's truth-ratio number: mean min(R, 1/R) on the forget split, mean max(0, 1 - R) elsewhere."""
    ratios = ratios.double()
    if forget:
        return float(torch.minimum(ratios, 1.0 / ratios).mean())
    return float((1.0 - ratios).clamp_min(0.0).mean())


def probability(scores: dict) -> float:
    """Mean over the split's rows of exp(-NLL per supervised token) (TOFU's length-normalised probability)."""
    return float(torch.exp(-_mean_nll(scores)).mean())


def forget_quality(ratios: list, retain_ratios: list) -> float:
    """The two-sample KS test p-value between the forget truth ratios of a model and of the retain model."""
    from scipy.stats import ks_2samp

    if len(ratios) == 0 or len(retain_ratios) == 0:
        raise ValueError(f"forget quality needs truth ratios of both models, got {len(ratios)} and {len(retain_ratios)}")
    return float(ks_2samp(list(ratios), list(retain_ratios)).pvalue)


def harmonic_mean(values: list) -> float:
    """n / sum(1 / v) of non-negative values (0 when one of them is 0)."""
    if not values:
        raise ValueError("harmonic_mean of no values")
    if any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic_mean needs values >= 0, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def model_utility(probability_by_split: dict, rouge_by_split: dict, truth_ratio_by_split: dict) -> Optional[float]:
    """The harmonic mean of probability, ROUGE-L and truth ratio over UTILITY_SPLITS (each number where measured);
    None when no utility split was evaluated."""
    values = [table[split] for split in UTILITY_SPLITS
              for table in (probability_by_split, rouge_by_split, truth_ratio_by_split)
              if table.get(split) is not None]
    return harmonic_mean(values) if values else None


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE's PrivLeak in percent: (AUC - AUC_retain) / AUC_retain * 100 (0: as private as the retain model)."""
    if not retain_auc > 0:
        raise ValueError(f"retain_auc must be > 0, got {retain_auc!r}")
    return (auc - retain_auc) / retain_auc * 100.0


def against_retain(record: dict, retain_record: Optional[dict]) -> dict:
    """{"forget_quality", "privleak"} of an evaluated stage record against the retain model's record (both
    ``evaluate`` outputs with ``tofu``); each None where one of the two lacks what it needs (no retain model,
    no forget truth ratios, no holdout split)."""
    out = {"forget_quality": None, "privleak": None}
    if retain_record is None:
        return out
    mine, theirs = (r.get("truth_ratio_items", {}).get("forget") for r in (record, retain_record))
    if mine and theirs:
        out["forget_quality"] = forget_quality(mine, theirs)
    auc, retain_auc = (r.get("mia_auc") for r in (record, retain_record))
    if auc and retain_auc:
        out["privleak"] = privleak(auc["min_k"], retain_auc["min_k"])
    return out
