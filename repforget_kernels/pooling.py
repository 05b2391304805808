"""Pooling of per-token activations (B, T, d) into per-sample rows, honouring the attention mask."""
from __future__ import annotations

import torch

from ._validate import as_tensor, check_float_tensor, check_same_device, compute_dtype

__all__ = ["SAMPLE_DEFINITIONS", "pool_tokens"]

SAMPLE_DEFINITIONS = ("mean", "last", "first", "tokens")


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, *, sample: str = "mean") -> torch.Tensor:
    """Rows for CKA / PCA from one layer's activations.

    Args:
        hidden: (B, T, d) activations, any float dtype.
        attention_mask: (B, T), nonzero / True at real tokens; every sequence needs one.
        sample: ``"mean"`` masked mean over real tokens (B, d); ``"last"`` the last real token
            (B, d; right or left padding alike); ``"first"`` token 0 (B, d: the original toolkit's
            choice, near-constant in causal LMs, kept for comparison); ``"tokens"`` every real
            token as a row (n_real, d).

    Returns:
        float32 rows (float64 for float64 input). Cost: one pass over ``hidden`` (a batched
        GEMV for the mean).

    Array inputs: ``hidden`` and ``attention_mask`` may be NumPy arrays (anything
    ``torch.as_tensor`` takes); the rows are a tensor either way.
    """
    hidden = check_float_tensor(hidden, "hidden")
    attention_mask = as_tensor(attention_mask, "attention_mask")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be (B, T) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}")
    check_same_device(hidden=hidden, attention_mask=attention_mask)
    if sample not in SAMPLE_DEFINITIONS:
        raise ValueError(f"sample must be one of {SAMPLE_DEFINITIONS}, got {sample!r}")
    cd = compute_dtype(hidden)
    mask = attention_mask != 0  # (B, T)
    counts = mask.sum(-1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError(f"attention_mask has sequences with no real token at rows {(counts == 0).nonzero().flatten().tolist()}")
    if sample == "first":
        return hidden[:, 0].to(cd)
    if sample == "tokens":
        return hidden[mask].to(cd)  # (n_real, d)
    if sample == "last":
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
        last = torch.where(mask, pos, -1).amax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(cd)
    w = (mask.to(cd) / counts.unsqueeze(-1).to(cd)).unsqueeze(-2)  # (B, 1, T)
    return torch.bmm(w, hidden.to(cd)).squeeze(-2)  # (B, d)
