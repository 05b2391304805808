"""Behavioural evaluation: answer accuracy, perplexity and membership-inference AUCs.

All per-example numbers of a split come from ONE forward pass per batch (``split_scores``):

- accuracy: teacher-forced answer-token accuracy, argmax_v p(v | prefix) == label over supervised
  tokens, pooled over the split (correct tokens / supervised tokens).
- perplexity: exp(total NLL / supervised tokens) of the split.
- MIA scores per example, oriented so that higher = more member-like (trained):
  ``loss``  = -mean NLL of the answer tokens;
  ``zlib``  = -(sum NLL of the answer tokens) / zlib-compressed byte length of the example's text
              (Carlini et al. 2021: log-perplexity against zlib entropy);
  ``min_k`` = mean of the lowest k% (k = 20, at least one) answer-token log-probs (Shi et al. 2024);
  ``min_k_plus_plus`` = the same on z_t = (log p(x_t) - mu_t) / sigma_t with mu_t = E_{z~p_t} log p_t(z)
              and sigma_t^2 = Var_{z~p_t} log p_t(z) over the vocabulary at position t (Zhang et al. 2024).
- MIA AUC: roc_auc(scores on forget = members, scores on holdout = non-members).

Under torch.distributed each rank scores its share of the batches (``distributed.rank_batches``) and
the per-batch results are gathered in batch order, so every rank holds the one-process numbers.
"""
from __future__ import annotations

import math
import zlib

import torch

from .distributed import gather_in_order, rank_batches
from .losses import forward_logits, next_token_logprobs

__all__ = ["MIN_K", "roc_auc", "split_scores", "evaluate"]

MIN_K = 0.2  # fraction of lowest-scoring tokens averaged by Min-K% and Min-K%++
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


def _zlib_lengths(batch: dict, tokenizer) -> torch.Tensor:
    """(B,) zlib-compressed byte length of each example's real tokens (decoded text, else the id string)."""
    lengths = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = ids[mask.bool()].tolist()
        text = tokenizer.decode(real) if tokenizer is not None else " ".join(map(str, real))
        lengths.append(len(zlib.compress(text.encode("utf-8"))))
    return torch.tensor(lengths, dtype=torch.float64)


@torch.no_grad()
def split_scores(model, encoded: dict, *, batch_size: int = 16, tokenizer=None, k: float = MIN_K) -> dict:
    """Per-example numbers of one split, one forward pass per batch, eval mode, float32 reductions.

    Returns {"correct" (N,) and "tokens" (N,) supervised-token counts, "nll" (N,) summed answer NLL,
    and the four MIA scores (N,) float64 ("loss", "zlib", "min_k", "min_k_plus_plus")}, on CPU, in row
    order (under torch.distributed: every rank's batches, gathered).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[int, dict]] = []  # (batch index, {key: (B,) tensor})
    try:
        for index, batch in rank_batches(encoded, batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            logp_all, logp, mask = next_token_logprobs(forward_logits(model, batch), batch["labels"])  # (B, T-1, V), (B, T-1) x2
            target = batch["labels"][:, 1:]  # (B, T-1)
            z = torch.zeros_like(logp)  # (B, T-1): Min-K%++ statistic, only at supervised positions
            z[mask] = _standardised(logp_all[mask], logp[mask])
            tokens = mask.sum(1)  # (B,)
            nll = -(logp.masked_fill(~mask, 0.0)).sum(1)  # (B,)
            parts.append((index, {
                "correct": ((logp_all.argmax(-1) == target) & mask).sum(1).cpu(),
                "tokens": tokens.cpu(),
                "nll": nll.double().cpu(),
                "loss": (-nll / tokens.clamp_min(1)).double().cpu(),
                "zlib": -nll.double().cpu() / _zlib_lengths(batch, tokenizer),
                "min_k": _min_k(logp, mask, k).double().cpu(),
                "min_k_plus_plus": _min_k(z, mask, k).double().cpu(),
            }))
    finally:
        model.train(was_training)
    batches = gather_in_order(parts)
    return {key: torch.cat([b[key] for b in batches]) for key in ("correct", "tokens", "nll", *_MIA)}


def evaluate(model, splits: dict[str, dict], *, batch_size: int = 16, tokenizer=None) -> dict:
    """Behavioural metrics of ``model`` on encode() outputs keyed by split name.

    Returns {"<split>_acc" for every split given (forget_acc and retain_acc always present, None when the
    split is absent), "perplexity" (retain, None if absent), "mia_auc": {"loss", "zlib", "min_k",
    "min_k_plus_plus"} (forget = members vs holdout = non-members; None unless both are given)}.
    ``tokenizer`` (optional) decodes text for the ZLib score; without it the token-id string is compressed.
    """
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"splits must be a non-empty dict of encode() outputs, got {splits!r}")
    scores = {name: split_scores(model, enc, batch_size=batch_size, tokenizer=tokenizer) for name, enc in splits.items()}
    out: dict = {"forget_acc": None, "retain_acc": None}
    for name, s in scores.items():
        out[f"{name}_acc"] = float(s["correct"].sum()) / max(1, int(s["tokens"].sum()))
    out["perplexity"] = None
    if "retain" in scores:
        s = scores["retain"]
        out["perplexity"] = math.exp(float(s["nll"].sum()) / max(1, int(s["tokens"].sum())))
    out["mia_auc"] = None
    if "forget" in scores and "holdout" in scores:
        out["mia_auc"] = {key: roc_auc(scores["forget"][key], scores["holdout"][key]) for key in _MIA}
    return out
