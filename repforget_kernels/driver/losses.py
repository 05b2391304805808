"""Unlearning losses over answer tokens, padding and prompts always masked.

Conventions: ``labels`` (B, T) are aligned with ``input_ids`` and hold -100 where a token is not
supervised (prompt, padding); the logits at position t predict token t+1, so every loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``. All reductions run in float32 (bf16 logits are upcast).

The methods built from these losses are declared in ``methods.METHODS``.

NLL is the mean over supervised tokens of the batch; KL is the mean over real (non-padding)
next-token positions of sum_v p_orig(v) (log p_orig(v) - log p_theta(v)); NPO is a mean over
sequences. Each loss takes an optional ``denominator`` replacing the batch's own count (tokens,
positions or sequences): data-parallel training computes each rank's share of a batch with the whole
batch's count, so the ranks' losses add up to the loss of the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import pad_rows, split_rows

__all__ = [
    "token_logprobs",
    "next_token_logprobs",
    "forward_logits",
    "sequence_logprob",
    "nll_loss",
    "ga_loss",
    "kl_loss",
    "npo_loss",
    "random_label_data",
]

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label token and its mask.

    logits (B, T, V) any float dtype, labels (B, T) long with -100 = unsupervised.
    Returns (logp (B, T-1) float32, 0 where masked; mask (B, T-1) bool). Cost: one log_softmax, O(B T V).
    """
    _, logp, mask = next_token_logprobs(logits, labels)
    return logp.masked_fill(~mask, 0.0), mask


def next_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp_all (B, T-1, V) float32 log-softmax, logp (B, T-1) of each next label, mask (B, T-1) bool).

    Position t predicts labels[t + 1]; -100 labels are masked (their logp is that of token 0, unmasked
    callers must apply ``mask``).
    """
    target = labels[:, 1:]  # (B, T-1)
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return logp_all, logp, target != -100


def forward_logits(model, batch: dict) -> torch.Tensor:
    """logits (B, T, V) of a causal LM on a batch (input_ids, attention_mask), no loss computed by HF."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def sequence_logprob(model, batch: dict) -> torch.Tensor:
    """(B,) float32: sum of log p over supervised tokens (labels != -100) of each sequence; one forward pass."""
    logp, _ = token_logprobs(forward_logits(model, batch), batch["labels"])
    return logp.sum(1)


def _divisor(count: torch.Tensor, denominator, what: str):
    """``denominator`` if given (a positive count), else ``count``; ValueError when the divisor is 0."""
    if denominator is None:
        if int(count) == 0:
            raise ValueError(what)
        return count
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r}")
    return denominator


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, denominator=None) -> torch.Tensor:
    """Scalar float32: negative log-likelihood summed over the supervised tokens, divided by their count.

    logits (B, T, V), labels (B, T) with -100 masked. ``denominator`` replaces the count (see the module
    docstring). Raises ValueError if no token is supervised and no denominator is given.
    """
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / _divisor(mask.sum(), denominator,
                                  "labels supervise no token (all -100 after the shift): nothing to learn from")


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, denominator=None) -> torch.Tensor:
    """Gradient ascent: -nll_loss (minimising it maximises the forget NLL)."""
    return -nll_loss(logits, labels, denominator)


def kl_loss(logits: torch.Tensor, ref_logprobs: torch.Tensor, attention_mask: torch.Tensor,
            denominator=None) -> torch.Tensor:
    """Scalar float32: mean over real next-token positions of KL(p_ref || p_theta) over the vocabulary.

    logits (B, T, V) of the trained model; ref_logprobs (B, T, V) log-softmax of the frozen original at
    the same positions (only [:, :-1] is read); attention_mask (B, T) with 1 = real token. Position t
    counts when token t+1 is real; ``denominator`` replaces the count of such positions. Cost O(B T V).
    """
    mask = attention_mask[:, 1:].bool()  # (B, T-1)
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    logp = ref_logprobs[:, :-1].float()  # (B, T-1, V)
    per_pos = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
    count = _divisor(mask.sum(), denominator, "attention_mask has no real next-token position: KL is undefined")
    return per_pos.masked_fill(~mask, 0.0).sum() / count


def npo_loss(seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, beta: float, denominator=None) -> torch.Tensor:
    """Scalar: -(2/beta) mean_s log sigmoid(-beta (seq_logp_s - ref_seq_logp_s)).

    seq_logp (B,) sequence log-probs under the trained model, ref_seq_logp (B,) under the reference
    (cached before unlearning). At seq_logp == ref_seq_logp the loss is (2/beta) log 2. ``denominator``
    replaces the number of sequences B in the mean.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    log_ratio = seq_logp.float() - ref_seq_logp.float()  # (B,)
    count = _divisor(torch.tensor(log_ratio.numel()), denominator, "seq_logp is empty: NPO is undefined")
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).sum() / count


def random_label_data(encoded: dict, seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """RLabel data: each item's prompt followed by the answer tokens of another forget item.

    encoded: an encode() output with N >= 2 rows. For row i, the answer is drawn (seeded) from the rows
    whose answer token sequence differs from row i's (j != i always). Returns a new right-padded
    {input_ids, attention_mask, labels} with the new answer supervised.
    """
    rows = split_rows(encoded)
    if len(rows) < 2:
        raise ValueError(f"rlabel needs at least 2 forget items to swap answers, got {len(rows)}")
    gen = torch.Generator().manual_seed(seed)
    new_rows = []
    for i, (prompt, answer) in enumerate(rows):
        others = [j for j, (_, a) in enumerate(rows) if j != i and a != answer]
        if not others:
            others = [j for j in range(len(rows)) if j != i]
        j = others[int(torch.randint(len(others), (1,), generator=gen))]
        new_rows.append((prompt, rows[j][1]))
    return pad_rows([(p + a, [-100] * len(p) + a) for p, a in new_rows], pad_id)
