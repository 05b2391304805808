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
- ``simnpo``: -(2/beta) mean_s log sigmoid(-(beta/|y_s|) log pi_theta(y_s|x_s) - gamma) + NLL(retain)
              (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
              Unlearning"; reference-free, length-normalised, margin gamma; with open-unlearning's retain NLL)
- ``idkdpo``: DPO with an "I don't know" answer preferred over the forget answer, + NLL(retain)
              (Maini et al. 2024 TOFU's "IDK" preference objective, as open-unlearning's IdkDPO; the refusals
              are drawn, seeded, from :data:`IDK_ANSWERS`)
- ``rmu``:    mean ||h_l(x_f) - c u||^2 on forget + mean ||h_l(x_r) - h_l^frozen(x_r)||^2 on retain, h_l the
              output of decoder block ``rmu_layer`` and u a fixed random unit vector (Li et al. 2024, "The WMDP
              Benchmark", representation misdirection for unlearning; c = ``rmu_steer``, the retain weight is
              the paper's alpha)

The reference ``pi_ref`` of NPO and the KL anchor ``p_ref`` are the ORIGINAL model theta_0 for every
request by default (``reference="original"``); ``reference="current"`` uses the model as it is at the
start of each request instead (in the single setting the two coincide). Loss definitions and their
normalisation: ``losses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .data import pad_rows, position_ids, split_rows
from .losses import (
    dpo_loss,
    forward_logits,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    representation_mse,
    simnpo_loss,
    token_logprobs,
)

__all__ = ["Method", "METHODS", "METHOD_NAMES", "REFERENCES", "IDK_ANSWERS", "get_method", "idk_data",
           "rmu_direction", "rmu_layer_index", "block_output"]

REFERENCES = ("original", "current")

# Refusals preferred by IdkDPO, in the style of TOFU's idontknow.jsonl (Maini et al. 2024), written for this
# package; one is drawn per forget item (seeded).
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I cannot answer that.",
    "That is not something I know.",
    "I'm afraid I don't have that information.",
    "I am not able to answer this question.",
    "I have no idea.",
    "Sorry, I don't know the answer to that.",
    "I can't say.",
)


def idk_data(encoded: dict, tokenizer, seed: int = 0) -> dict:
    """The forget rows with their answers replaced by refusals drawn (seeded) from IDK_ANSWERS.

    encoded: an encode() output (N rows); returns a right-padded {input_ids, attention_mask, labels} of N rows,
    row i = row i's prompt + a refusal + EOS, the refusal and EOS supervised.
    """
    gen = torch.Generator().manual_seed(seed)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for prompt, _ in split_rows(encoded):
        answer = IDK_ANSWERS[int(torch.randint(len(IDK_ANSWERS), (1,), generator=gen))]
        ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + eos
        rows.append((prompt + ids, [-100] * len(prompt) + ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_rows(rows, pad)


def rmu_layer_index(model, cfg) -> int:
    """The decoder block RMU steers: ``cfg.rmu_layer``, else block L//4 - 1 (7 of 32, WMDP's choice for
    Zephyr-7B; 0 for small models); ValueError when out of range."""
    layers = model.config.num_hidden_layers
    layer = cfg.rmu_layer if cfg.rmu_layer is not None else max(0, layers // 4 - 1)
    if not 0 <= layer < layers:
        raise ValueError(f"rmu_layer must be in [0, {layers - 1}] for this {layers}-block model, got {layer}")
    return layer


def rmu_direction(width: int, seed: int) -> torch.Tensor:
    """(width,) float32 the fixed random unit vector u of RMU: uniform [0, 1) entries, normalised (WMDP code)."""
    u = torch.rand(width, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def block_output(model, batch: dict, layer: int) -> torch.Tensor:
    """(B, T, d) the output of decoder block ``layer`` (0-based): hidden_states[layer + 1]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                position_ids=position_ids(batch["attention_mask"]), output_hidden_states=True)
    return out.hidden_states[layer + 1]


def _ga_forget(model, batch, cfg, denominator):
    return ga_loss(forward_logits(model, batch), batch["labels"], denominator)


def _nll_forget(model, batch, cfg, denominator):
    return nll_loss(forward_logits(model, batch), batch["labels"], denominator)


def _npo_forget(model, batch, cfg, denominator):
    seq_logp = token_logprobs(forward_logits(model, batch), batch["labels"])[0].sum(1)  # (B,)
    return npo_loss(seq_logp, batch["ref_logp"], cfg.beta, denominator)


def _answer_logp(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,) summed answer log-probs, (B,) supervised token counts) of a batch, one forward pass."""
    logp, mask = token_logprobs(forward_logits(model, batch), batch["labels"])
    return logp.sum(1), mask.sum(1)


def _simnpo_forget(model, batch, cfg, denominator):
    seq_logp, lengths = _answer_logp(model, batch)
    return simnpo_loss(seq_logp, lengths, cfg.beta, cfg.gamma, denominator)


def _idk_rows(batch) -> dict:
    """The refusal rows paired with a forget batch (``batch["idk"]`` holds all of them, ``batch["row"]`` the
    batch's row indices), trimmed to their longest real row, on the batch's device."""
    device = batch["input_ids"].device
    rows = batch["row"].cpu()
    sub = {k: v[rows] for k, v in batch["idk"].items()}
    used = int(sub["attention_mask"].sum(1).max())
    return {k: (v[:, :used] if v.dim() == 2 else v).to(device) for k, v in sub.items()}


def _idkdpo_forget(model, batch, cfg, denominator):
    idk = _idk_rows(batch)
    win, _ = _answer_logp(model, idk)
    lose, _ = _answer_logp(model, batch)
    return dpo_loss(win, idk["ref_logp"], lose, batch["ref_logp"], cfg.beta, denominator)


def _rmu_forget(model, batch, cfg, denominator):
    layer = rmu_layer_index(model, cfg)
    hidden = block_output(model, batch, layer)  # (B, T, d)
    target = cfg.rmu_steer * rmu_direction(hidden.shape[-1], cfg.seed).to(hidden.device)  # (d,)
    return representation_mse(hidden, target, batch["attention_mask"], denominator)


def _nll_retain(model, batch, reference, cfg, denominator):
    return nll_loss(forward_logits(model, batch), batch["labels"], denominator)


def _rmu_retain(model, batch, reference, cfg, denominator):
    """Retain activations at the steered block kept equal to the frozen model's (``reference``)."""
    layer = rmu_layer_index(model, cfg)
    with torch.no_grad():
        frozen = block_output(reference, batch, layer)  # (B, T, d)
    return representation_mse(block_output(model, batch, layer), frozen, batch["attention_mask"], denominator)


def _kl_retain(model, batch, reference, cfg, denominator):
    """KL(p_ref || p_theta) on a retain batch: the reference log-softmax is cached on the batch
    (``ref_logprobs``) or computed by the frozen reference model ``reference``."""
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
    retain_term(model, batch, reference, cfg, denominator) -> scalar loss on a retain batch, or None;
    forget_units / retain_units: what each term is a mean over ("tokens", "sequences", "positions"),
    for data-parallel denominators; needs_ref_logp: NPO's reference sequence log-probs on the forget
    data; needs_kl_reference: a KL anchor on retain (cached log-softmax or a frozen model);
    relabel: the forget data is relabelled (RLabel) before training; hyperparameters: the
    TrainConfig fields the method reads beyond lr and the budget; needs_idk: refusal rows paired with the
    forget rows (IdkDPO); needs_frozen_model: a frozen model on retain batches (RMU's activations).
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
    needs_idk: bool = False
    needs_frozen_model: bool = False

    @property
    def needs_retain(self) -> bool:
        return self.retain_term is not None

    @property
    def needs_reference(self) -> bool:
        """Whether the method reads a reference model (NPO's pi_ref or the KL anchor)."""
        return self.needs_ref_logp or self.needs_kl_reference or self.needs_frozen_model


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
    Method("simnpo", "SimNPO (length-normalised, reference-free NPO with margin gamma) + NLL on retain",
           _simnpo_forget, forget_units="sequences", retain_term=_nll_retain, retain_units="tokens",
           hyperparameters=("beta", "gamma")),
    Method("idkdpo", "DPO preferring 'I don't know' over the forget answer + NLL on retain", _idkdpo_forget,
           forget_units="sequences", retain_term=_nll_retain, retain_units="tokens", needs_ref_logp=True,
           needs_idk=True, hyperparameters=("beta",)),
    Method("rmu", "representation misdirection: forget activations at one block to c*u, retain to the frozen model's",
           _rmu_forget, forget_units="positions_all", retain_term=_rmu_retain, retain_units="positions_all",
           needs_frozen_model=True, hyperparameters=("rmu_layer", "rmu_steer")),
)}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return METHODS[name]
