"""The unlearning methods, each declared once: its loss terms, what data and reference it needs, its knobs.

The CLI (choices and help), the pipeline (what to prepare) and the trainer (what to compute) all read
:data:`METHODS`. A method's loss is the sum of a forget term on a forget batch and, for methods with a
retain term, a retain term on a retain batch drawn alongside (the retain set reshuffled every pass):

- ``ga``:     -NLL(forget)                                   gradient ascent
- ``ga_gd``:  -NLL(forget) + NLL(retain)                     plus gradient descent on retain
- ``ga_kl``:  -NLL(forget) + KL(p_ref || p_theta)(retain)
- ``npo``:    -(2/beta) mean_s log sigmoid(-beta (log pi_theta(y_s|x_s) - log pi_ref(y_s|x_s)))
              (Zhang et al. 2024, "Negative Preference Optimization"; sequence log-probs summed over
              the answer tokens)
- ``npo_gd``: npo + NLL(retain)                              (open-unlearning's default "NPO")
- ``npo_kl``: npo + KL(p_ref || p_theta)(retain)
- ``rlabel``: NLL(forget with each answer replaced by the answer of another forget item)

The reference ``pi_ref`` of NPO and the KL anchor ``p_ref`` are the ORIGINAL model theta_0 for every
request by default (``reference="original"``); ``reference="current"`` uses the model as it is at the
start of each request instead (in the single setting the two coincide). Loss definitions and their
normalisation: ``losses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .losses import forward_logits, ga_loss, kl_loss, nll_loss, npo_loss, token_logprobs

__all__ = ["Method", "METHODS", "METHOD_NAMES", "REFERENCES", "get_method"]

REFERENCES = ("original", "current")


def _ga_forget(model, batch, cfg, denominator):
    return ga_loss(forward_logits(model, batch), batch["labels"], denominator)


def _nll_forget(model, batch, cfg, denominator):
    return nll_loss(forward_logits(model, batch), batch["labels"], denominator)


def _npo_forget(model, batch, cfg, denominator):
    seq_logp = token_logprobs(forward_logits(model, batch), batch["labels"])[0].sum(1)  # (B,)
    return npo_loss(seq_logp, batch["ref_logp"], cfg.beta, denominator)


def _nll_retain(model, batch, reference, denominator):
    return nll_loss(forward_logits(model, batch), batch["labels"], denominator)


def _kl_retain(model, batch, reference, denominator):
    """KL(p_ref || p_theta) on a retain batch: the reference log-softmax is cached on the batch
    (``ref_logprobs``) or computed by the frozen reference model ``reference``."""
    import torch

    logits = forward_logits(model, batch)  # (B, T, V)
    if "ref_logprobs" in batch:
        ref = batch["ref_logprobs"]
    else:
        with torch.no_grad():
            ref = torch.log_softmax(forward_logits(reference, batch).float(), dim=-1)  # (B, T, V)
    return kl_loss(logits, ref, batch["attention_mask"], denominator)


@dataclass(frozen=True)
class Method:
    """One unlearning method.

    forget_term(model, batch, cfg, denominator) -> scalar loss on a forget batch;
    retain_term(model, batch, reference, denominator) -> scalar loss on a retain batch, or None;
    forget_units / retain_units: what each term is a mean over ("tokens", "sequences", "positions"),
    for data-parallel denominators; needs_ref_logp: NPO's reference sequence log-probs on the forget
    data; needs_kl_reference: a KL anchor on retain (cached log-softmax or a frozen model);
    relabel: the forget data is relabelled (RLabel) before training; hyperparameters: the
    TrainConfig fields the method reads beyond lr and the budget.
    """

    name: str
    summary: str
    forget_term: Callable
    forget_units: str = "tokens"
    retain_term: Optional[Callable] = None
    retain_units: Optional[str] = None
    needs_ref_logp: bool = False
    needs_kl_reference: bool = False
    relabel: bool = False
    hyperparameters: tuple = ()

    @property
    def needs_retain(self) -> bool:
        return self.retain_term is not None

    @property
    def needs_reference(self) -> bool:
        """Whether the method reads a reference model (NPO's pi_ref or the KL anchor)."""
        return self.needs_ref_logp or self.needs_kl_reference


METHODS = {m.name: m for m in (
    Method("ga", "gradient ascent on the forget NLL", _ga_forget),
    Method("ga_gd", "gradient ascent on forget + gradient descent on retain", _ga_forget,
           retain_term=_nll_retain, retain_units="tokens"),
    Method("ga_kl", "gradient ascent on forget + KL to the reference on retain", _ga_forget,
           retain_term=_kl_retain, retain_units="positions", needs_kl_reference=True),
    Method("npo", "negative preference optimisation on forget", _npo_forget, forget_units="sequences",
           needs_ref_logp=True, hyperparameters=("beta",)),
    Method("npo_gd", "NPO on forget + gradient descent on retain", _npo_forget, forget_units="sequences",
           retain_term=_nll_retain, retain_units="tokens", needs_ref_logp=True, hyperparameters=("beta",)),
    Method("npo_kl", "NPO on forget + KL to the reference on retain", _npo_forget, forget_units="sequences",
           retain_term=_kl_retain, retain_units="positions", needs_ref_logp=True, needs_kl_reference=True,
           hyperparameters=("beta",)),
    Method("rlabel", "NLL on forget questions relabelled with other forget answers", _nll_forget, relabel=True),
)}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return METHODS[name]
