"""Behavioural evaluation: exact match of generated answers, token accuracy, perplexity, MIA AUCs.

- exact match (``exact_match``): each prompt is continued greedily (batched, left-padded, with the KV
  cache) until EOS or the reference answer's length + 2 tokens; the item counts as correct when the
  continuation up to EOS (EOS excluded), decoded and normalised (:func:`normalize_answer`: lower case,
  punctuation dropped, whitespace collapsed), equals the normalised reference answer. The split's
  number is the fraction of correct items; the per-item outcomes are kept for bootstrap intervals.
  Items whose every supervised token is the argmax under teacher forcing need no decoding (greedy
  decoding then reproduces the reference token by token); only the others are decoded.

The other per-example numbers of a split come from ONE forward pass per batch (``split_scores``):

- token accuracy: teacher-forced answer-token accuracy, argmax_v p(v | prefix) == label over the
  supervised answer tokens, EOS excluded, pooled over the split (correct tokens / answer tokens).
- perplexity: exp(total NLL / supervised tokens) of the split.
- MIA scores per example over the answer tokens (EOS and every other special token excluded), oriented
  so that higher = more member-like (trained):
  ``loss``  = -mean NLL of the answer tokens;
  ``zlib``  = -(mean NLL of the answer tokens) / zlib-compressed byte length of the answer text alone
              (Carlini et al. 2021, "Extracting Training Data from Large Language Models": log-perplexity
              against zlib entropy; open-unlearning's ``mia_zlib``: the decoded answer, special tokens skipped);
  ``min_k`` = mean of the lowest k (``mink_k``, default MIN_K = 0.4 as in open-unlearning; at least one)
              fraction of the answer-token log-probs (Shi et al. 2024, "Detecting Pretraining Data");
  ``min_k_plus_plus`` = the same on z_t = (log p(x_t) - mu_t) / sigma_t with mu_t = E_{z~p_t} log p_t(z)
              and sigma_t^2 = Var_{z~p_t} log p_t(z) over the vocabulary at position t (Zhang et al. 2024).
- MIA AUC: roc_auc(scores on forget = members, scores on holdout = non-members).

Under torch.distributed each rank scores its share of the batches (``distributed.rank_batches``) and
the per-batch results are gathered in batch order, so every rank holds the one-process numbers.
"""
from __future__ import annotations

import inspect
import math
import zlib
from typing import Optional

import torch

import re
import string

from .data import position_ids, split_rows
from .distributed import gather_in_order, rank_batches
from .losses import forward_logits, next_token_logprobs

__all__ = ["MIN_K", "roc_auc", "normalize_answer", "greedy_continuations", "exact_match", "split_scores",
           "evaluate"]

MIN_K = 0.4  # fraction of lowest-scoring tokens averaged by Min-K% and Min-K%++ (open-unlearning's default)
_MIA = ("loss", "zlib", "min_k", "min_k_plus_plus")


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + 1/2 P(pos == neg) over all (pos, neg) pairs, counted directly in float64.

    pos (P,), neg (N,) real scores, higher = positive. Exact (no ranking approximations); cost O(P N)
    comparisons, in row blocks so memory stays O(block N).
    """
    for name, t in (("pos", pos), ("neg", neg)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN scores")
    pos, neg = pos.double().cpu(), neg.double().cpu()
    wins = 0.0
    for start in range(0, pos.numel(), 4096):
        block = pos[start:start + 4096, None]  # (b, 1)
        wins += float((block > neg).sum()) + 0.5 * float((block == neg).sum())
    return wins / (pos.numel() * neg.numel())


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, runs of whitespace collapsed to one space, stripped."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _eos_id(model, tokenizer):
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return getattr(getattr(model, "config", None), "eos_token_id", None)


@torch.no_grad()
def greedy_continuations(model, prompts: list, *, max_new_tokens: list, eos_id, pad_id: int = 0) -> list:
    """Greedy continuations of token-id prompts, one batched pass per new token (KV cache).

    prompts: B lists of ids (left-padded here; position ids follow the mask, so absolute-position models
    are padding-independent); max_new_tokens: B caps. Returns B lists of new ids, each ending at its first
    EOS (included) or at its cap. Cost: max(max_new_tokens) forward passes of one token per row after
    the prompt pass. Eval mode and no gradients: the caller's model state is restored.
    """
    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T) left padded
    mask = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = position_ids(mask)  # (B, T)
    caps = torch.tensor(max_new_tokens, device=device)  # (B,)
    cache_arg, extra = _decoding_arguments(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    new = [[] for _ in range(b)]
    done = caps <= 0  # (B,)
    for step in range(int(caps.max())):
        token = out.logits[:, -1].argmax(-1)  # (B,)
        for i in (~done).nonzero().flatten().tolist():
            new[i].append(int(token[i]))
        done |= (token == eos_id) if eos_id is not None else torch.zeros_like(done)
        done |= caps <= step + 1
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_arg: cache}, **extra)
    return new


def _decoding_arguments(model) -> tuple:
    """(name of the KV-cache argument, extra forward kwargs) across transformers versions: ``cache`` from 5.x
    on (``past_key_values`` before), and only the last position's logits where the model supports it."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def _answer_text(ids: list, eos_id, tokenizer) -> str:
    """Decoded ids up to the first EOS (excluded); the id string without a tokenizer."""
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, ids))


def _subset(encoded: dict, rows: torch.Tensor) -> dict:
    """The encode() rows ``rows`` of every (N, ...) tensor."""
    n = encoded["input_ids"].shape[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v for k, v in encoded.items()}


@torch.no_grad()
def _teacher_forced_greedy(model, encoded: dict, batch_size: int) -> torch.Tensor:
    """(N,) bool: every supervised token (answer and EOS) is the argmax given the reference prefix; one forward
    pass per batch."""
    device = next(model.parameters()).device
    parts = []
    for index, batch in rank_batches(encoded, batch_size):
        batch = {key: value.to(device) for key, value in batch.items()}
        target = batch["labels"][:, 1:]  # (B, T-1)
        hit = (forward_logits(model, batch)[:, :-1].argmax(-1) == target) | (target == -100)  # (B, T-1)
        parts.append((index, hit.all(1).cpu()))
    return torch.cat(gather_in_order(parts))


@torch.no_grad()
def exact_match(model, encoded: dict, *, tokenizer=None, batch_size: int = 64,
                teacher_forced: Optional[torch.Tensor] = None, answers: bool = False):
    """(N,) bool: whether the greedy answer to each encoded item equals its reference (see the module docstring).

    encoded: an encode() output (prompt unsupervised, answer + EOS supervised). An item whose every supervised
    token is the argmax under teacher forcing (``teacher_forced``, computed here in one forward pass per batch
    when not given) is answered exactly so by greedy decoding, whose prefix at every step is then the
    reference's; only the other items are decoded, and compared as normalised text. Rows in order; under
    torch.distributed each rank takes its share of the batches and the outcomes are gathered.
    ``answers``: also return the N greedy answers as text (decoded up to EOS or 2 x the reference length + 8
    tokens, for ROUGE; the exact match still reads only the first reference length + 2 tokens), as
    (hits, answers).
    """
    was_training = model.training
    model.eval()
    eos = _eos_id(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    try:
        if teacher_forced is None:
            teacher_forced = _teacher_forced_greedy(model, encoded, batch_size)
        result = teacher_forced.clone()
        texts = [_answer_text(answer, eos, tokenizer) for _, answer in split_rows(encoded)] if answers else None
        todo = (~teacher_forced).nonzero().flatten()  # (M,) the items greedy decoding must answer
        parts = []
        for index, batch in (rank_batches(_subset(encoded, todo), batch_size) if todo.numel() else ()):
            rows = split_rows(batch)
            refs = [_answer_text(answer, eos, tokenizer) for _, answer in rows]
            caps = [len(answer) + 2 for _, answer in rows]
            long_caps = [2 * len(answer) + 8 for _, answer in rows] if answers else caps
            outs = greedy_continuations(model, [p for p, _ in rows], max_new_tokens=long_caps, eos_id=eos, pad_id=pad)
            got = [normalize_answer(_answer_text(o[:cap], eos, tokenizer)) == normalize_answer(r)
                   for o, cap, r in zip(outs, caps, refs)]
            parts.append((index, (torch.tensor(got, dtype=torch.bool), [_answer_text(o, eos, tokenizer) for o in outs])))
        if todo.numel():
            gathered = gather_in_order(parts)
            result[todo] = torch.cat([hits for hits, _ in gathered])
            if answers:
                for row, text in zip(todo.tolist(), [t for _, batch_texts in gathered for t in batch_texts]):
                    texts[row] = text
    finally:
        model.train(was_training)
    return (result, texts) if answers else result


def _min_k(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """(B,) mean of the lowest max(1, floor(k n)) of the n masked values of each row; values, mask (B, T)."""
    counts = mask.sum(1)  # (B,)
    keep = torch.clamp((counts.double() * k).long(), min=1)  # (B,)
    ordered = values.masked_fill(~mask, float("inf")).sort(dim=1).values  # (B, T)
    ranks = torch.arange(values.shape[1], device=values.device)  # (T,)
    take = ranks[None, :] < keep[:, None]  # (B, T)
    return ordered.masked_fill(~take, 0.0).sum(1) / keep


def _standardised(logp_rows: torch.Tensor, logp_tokens: torch.Tensor) -> torch.Tensor:
    """(M,) (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t^2 the mean and variance of log p under p itself.

    logp_rows (M, V) log-softmax rows (supervised positions only, so a 7B vocabulary costs M x V, not
    B x T x V), logp_tokens (M,) the label's log-prob. The variance is taken about mu (no E[x^2] - mu^2
    cancellation in float32).
    """
    probs = logp_rows.exp()  # (M, V)
    mu = (probs * logp_rows).sum(-1)  # (M,)
    sigma = (probs * (logp_rows - mu[:, None]).square()).sum(-1).clamp_min(1e-12).sqrt()  # (M,)
    return (logp_tokens - mu) / sigma


def _zlib_lengths(batch: dict, answer: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B,) zlib-compressed byte length of each row's answer text: the tokens at the ``answer`` (B, T-1)
    next-token positions, decoded with special tokens skipped (without a tokenizer: the id string)."""
    lengths = []
    for ids, keep in zip(batch["input_ids"][:, 1:], answer):
        real = ids[keep].tolist()
        text = tokenizer.decode(real, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, real))
        lengths.append(len(zlib.compress(text.encode("utf-8"))))
    return torch.tensor(lengths, dtype=torch.float64)


def _special_ids(tokenizer, eos) -> list:
    """The ids MIA scores skip: EOS and the tokenizer's other special tokens."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    return sorted(ids | ({eos} if eos is not None else set()))


@torch.no_grad()
def split_scores(model, encoded: dict, *, batch_size: int = 16, tokenizer=None, k: float = MIN_K) -> dict:
    """Per-example numbers of one split, one forward pass per batch, eval mode, float32 reductions.

    Returns {"greedy" (N,) bool: every supervised token is the argmax (the greedy answer is the reference,
    see :func:`exact_match`), "correct" (N,) and "tokens" (N,) answer-token counts (EOS excluded), "nll" (N,) summed NLL of
    the supervised tokens, "supervised" (N,) their counts,
    and the four MIA scores (N,) float64 ("loss", "zlib", "min_k", "min_k_plus_plus", over the answer tokens,
    special tokens excluded, Min-K% fraction ``k``)}, on CPU, in row order (under torch.distributed: every
    rank's batches, gathered).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k (the Min-K% fraction) must be in (0, 1], got {k!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = _eos_id(model, tokenizer)
    special = torch.tensor(_special_ids(tokenizer, eos), dtype=torch.long, device=device)  # (S,)
    parts: list[tuple[int, dict]] = []  # (batch index, {key: (B,) tensor})
    try:
        for index, batch in rank_batches(encoded, batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            logp_all, logp, mask = next_token_logprobs(forward_logits(model, batch), batch["labels"])  # (B, T-1, V), (B, T-1) x2
            target = batch["labels"][:, 1:]  # (B, T-1)
            z = torch.zeros_like(logp)  # (B, T-1): Min-K%++ statistic, only at supervised positions
            z[mask] = _standardised(logp_all[mask], logp[mask])
            tokens = mask.sum(1)  # (B,)
            answer = mask & ~torch.isin(target, special)  # (B, T-1) answer tokens, no EOS / special token
            nll = -(logp.masked_fill(~mask, 0.0)).sum(1)  # (B,)
            answer_nll = -(logp.masked_fill(~answer, 0.0)).sum(1) / answer.sum(1).clamp_min(1)  # (B,) mean
            argmax = logp_all.argmax(-1)  # (B, T-1)
            parts.append((index, {
                "greedy": ((argmax == target) | ~mask).all(1).cpu(),
                "correct": ((argmax == target) & answer).sum(1).cpu(),
                "tokens": answer.sum(1).cpu(),
                "supervised": tokens.cpu(),
                "nll": nll.double().cpu(),
                "loss": -answer_nll.double().cpu(),
                "zlib": -answer_nll.double().cpu() / _zlib_lengths(batch, answer, tokenizer),
                "min_k": _min_k(logp, answer, k).double().cpu(),
                "min_k_plus_plus": _min_k(z, answer, k).double().cpu(),
            }))
    finally:
        model.train(was_training)
    batches = gather_in_order(parts)
    return {key: torch.cat([b[key] for b in batches])
            for key in ("greedy", "correct", "tokens", "supervised", "nll", *_MIA)}


def evaluate(model, splits: dict[str, dict], *, batch_size: int = 16, tokenizer=None, generate: bool = True,
             generate_batch_size: int = 128, mink_k: float = MIN_K, tofu: bool = False,
             alternatives: Optional[dict] = None) -> dict:
    """Behavioural metrics of ``model`` on encode() outputs keyed by split name.

    Returns {"em": {split: exact match of greedy answers} (when ``generate``), "em_items": {split: "0110..."
    the per-item outcomes, in row order}, "token_acc": {split: teacher-forced answer-token accuracy, EOS
    excluded}, "perplexity": exp(mean NLL of the supervised tokens) on retain (None without retain),
    "mia_auc": {"loss", "zlib", "min_k", "min_k_plus_plus"}: forget = members vs holdout = non-members
    (None unless both are given)}. ``tokenizer`` decodes answers for the exact match and the ZLib score
    (without it token ids are compared and the id string compressed).

    ``tofu``: also TOFU's numbers (``metrics``): "rouge" {split: mean ROUGE-L recall of the greedy answers}
    (when ``generate``), "probability" {split}, and from ``alternatives`` ({split: metrics.truth_ratio_data
    or None}) "truth_ratio" {split: the split's truth-ratio score}, "truth_ratio_items" {split: per-item R},
    and "model_utility" (None without a utility split).
    """
    from . import metrics

    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"splits must be a non-empty dict of encode() outputs, got {splits!r}")
    scores = {name: split_scores(model, enc, batch_size=batch_size, tokenizer=tokenizer, k=mink_k)
              for name, enc in splits.items()}
    out: dict = {"token_acc": {name: float(s["correct"].sum()) / max(1, int(s["tokens"].sum()))
                               for name, s in scores.items()}}
    if generate:
        found = {name: exact_match(model, enc, tokenizer=tokenizer, batch_size=generate_batch_size,
                                   teacher_forced=scores[name]["greedy"], answers=tofu) for name, enc in splits.items()}
        hits = {name: f[0] if tofu else f for name, f in found.items()}
        out["em"] = {name: float(h.float().mean()) for name, h in hits.items()}
        out["em_items"] = {name: "".join("1" if v else "0" for v in h.tolist()) for name, h in hits.items()}
        if tofu:
            eos = _eos_id(model, tokenizer)
            out["rouge"] = {}
            for name, enc in splits.items():
                refs = [_answer_text(answer, eos, tokenizer) for _, answer in split_rows(enc)]
                recalls = [metrics.rouge_l_recall(g, r) for g, r in zip(found[name][1], refs)]
                out["rouge"][name] = sum(recalls) / len(recalls)
    out["perplexity"] = None
    if "retain" in scores:
        s = scores["retain"]
        out["perplexity"] = math.exp(float(s["nll"].sum()) / max(1, int(s["supervised"].sum())))
    out["mia_auc"] = None
    if "forget" in scores and "holdout" in scores:
        out["mia_auc"] = {key: roc_auc(scores["forget"][key], scores["holdout"][key]) for key in _MIA}
    if tofu:
        out["probability"] = {name: metrics.probability(s) for name, s in scores.items()}
        out["truth_ratio"], out["truth_ratio_items"] = {}, {}
        for name, data in (alternatives or {}).items():
            if data is None or name not in splits:
                continue
            ratios = metrics.truth_ratios(
                split_scores(model, data["paraphrased"], batch_size=batch_size, tokenizer=tokenizer, k=mink_k),
                split_scores(model, data["perturbed"], batch_size=batch_size, tokenizer=tokenizer, k=mink_k),
                data["perturbed_item"])
            out["truth_ratio"][name] = metrics.truth_ratio_score(ratios, forget=name == "forget")
            out["truth_ratio_items"][name] = ratios.tolist()
        out["model_utility"] = metrics.model_utility(out["probability"], out.get("rouge", {}), out["truth_ratio"])
    return out
