"""Unlearning losses over answer tokens, padding and prompts always masked.

Conventions: ``labels`` (B, T) are aligned with ``input_ids`` and hold -100 where a token is not
supervised (prompt, padding); the logits at position t predict token t+1, so every loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``. All reductions run in float32 (bf16 logits are upcast).

The methods built from these losses are declared in ``methods.METHODS``.

NLL is the mean over supervised tokens of the batch; KL is the mean over real (non-padding)
next-token positions of sum_v p_orig(v) (log p_orig(v) - log p_theta(v)); NPO, SimNPO and DPO are means
over sequences; the RMU representation loss is a mean over real tokens and hidden units. Each loss takes an optional ``denominator`` replacing the batch's own count (tokens,
positions or sequences): data-parallel training computes each rank's share of a batch with the whole
batch's count, so the ranks' losses add up to the loss of the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import pad_rows, position_ids, split_rows

__all__ = [
    "token_logprobs",
    "next_token_logprobs",
    "forward_logits",
    "sequence_logprob",
    "nll_loss",
    "ga_loss",
    "kl_loss",
    "npo_loss",
    "simnpo_loss",
    "dpo_loss",
    "representation_mse",
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
    """logits (B, T, V) of a causal LM on a batch (input_ids, attention_mask), no loss computed by HF; position ids
    follow the attention mask (``data.position_ids``), so left padding does not shift absolute positions."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids(batch["attention_mask"]), use_cache=False).logits


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


def simnpo_loss(seq_logp: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float = 0.0,
                denominator=None) -> torch.Tensor:
    """Scalar: SimNPO (Fan et al. 2024, "Simplicity Prevails", eq. 4), reference-free and length-normalised:
    -(2/beta) mean_s log sigmoid(-(beta / |y_s|) log pi_theta(y_s|x_s) - gamma).

    seq_logp (B,) summed answer log-probs, lengths (B,) supervised token counts |y_s| (> 0), gamma >= 0 the
    reward margin. (open-unlearning writes the same loss with delta = gamma / beta.) ``denominator``
    replaces B.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if bool((lengths <= 0).any()):
        raise ValueError("lengths must be > 0 for every sequence (an item without supervised tokens)")
    reward = -beta * seq_logp.float() / lengths.float() - gamma  # (B,)
    count = _divisor(torch.tensor(reward.numel()), denominator, "seq_logp is empty: SimNPO is undefined")
    return -(2.0 / beta) * F.logsigmoid(reward).sum() / count


def dpo_loss(win_logp: torch.Tensor, ref_win_logp: torch.Tensor, lose_logp: torch.Tensor,
             ref_lose_logp: torch.Tensor, beta: float, denominator=None) -> torch.Tensor:
    """Scalar: DPO (Rafailov et al. 2023) as open-unlearning scales it for unlearning,
    -(2/beta) mean_s log sigmoid(beta ((log pi(w_s) - log pi_ref(w_s)) - (log pi(l_s) - log pi_ref(l_s)))).

    All (B,) summed answer log-probs: w the preferred answer (IdkDPO: an "I don't know" answer), l the
    dispreferred one (the forget answer). At pi == pi_ref the loss is (2/beta) log 2. ``denominator``
    replaces B.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    margin = (win_logp.float() - ref_win_logp.float()) - (lose_logp.float() - ref_lose_logp.float())  # (B,)
    count = _divisor(torch.tensor(margin.numel()), denominator, "win_logp is empty: DPO is undefined")
    return -(2.0 / beta) * F.logsigmoid(beta * margin).sum() / count


def representation_mse(hidden: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor,
                       denominator=None) -> torch.Tensor:
    """Scalar float32: mean over real tokens and hidden units of (hidden - target)^2 (RMU's loss terms,
    Li et al. 2024 "The WMDP Benchmark", eq. 1-2, with the official code's element-wise mean: the paper's
    per-token squared L2 norm divided by the width d).

    hidden (B, T, d) activations of the trained model, target (B, T, d) or (d,) (the steering vector c*u),
    attention_mask (B, T), 1 = real token. ``denominator`` replaces the count of real tokens.
    """
    mask = attention_mask.bool()  # (B, T)
    per_token = (hidden.float() - target.float()).square().mean(-1)  # (B, T)
    count = _divisor(mask.sum(), denominator, "attention_mask has no real token: the RMU loss is undefined")
    return per_token.masked_fill(~mask, 0.0).sum() / count


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
