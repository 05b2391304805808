"""Unlearning and relearning loops (AdamW by default, seeded, in place, tqdm progress).

Reference quantities of the original model are computed once, before the first step, never by a
second model held for NPO:

- NPO / NPO+KL: the reference sequence log-prob of every forget example (N floats, no model copy).
- GA+KL / NPO+KL: the original model's log-softmax on every retain position, cached as a
  (N, T, V) float32 tensor when it is at most ``KL_CACHE_BYTES`` (the tiny model: 60 x 20 x ~400
  floats, under 2 MB); above that (7B vocabularies: 152k logits per token, tens of GB for a retain
  set) a frozen copy of the original model is kept instead (bf16 weights, no gradients, no optimizer
  state: + 2 bytes per parameter, see models.memory_plan) and its log-softmax computed per batch.

Several processes: a model sharded with ``distributed.shard_model`` (FSDP2) is trained data-parallel.
Every rank walks the same global batches (same seeds) and computes each loss term on its share of
the rows with the global batch's count (tokens, positions or sequences) as the denominator, so the
ranks' gradients add up to the one-process gradient of the same batch; gradient clipping sees the
global norm and the optimizer updates each rank's shard. Reference quantities are computed by every
rank on every batch, and a frozen KL copy is a plain (gathered) replica on each rank.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import iterate_batches
from .distributed import all_sum, is_sharded, plain_copy, rank_share, world
from .losses import (
    METHODS,
    forward_logits,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    random_label_data,
    sequence_logprob,
    token_logprobs,
)

__all__ = ["TrainConfig", "KL_CACHE_BYTES", "unlearn", "relearn", "reference_logprobs"]

KL_CACHE_BYTES = 256 * 2**20  # cache the original log-softmax on retain up to this size, else a frozen copy
_GRAD_CLIP = 1.0  # global gradient-norm clip of every step (gradient ascent otherwise explodes)
_OPTIMIZERS = {  # no weight decay anywhere: unlearning should move only what the loss asks for
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adafactor": lambda params, lr: torch.optim.Adafactor(params, lr=lr, weight_decay=0.0),
}
_USES_RETAIN = {"ga_gd", "ga_kl", "npo_kl"}
_USES_KL = {"ga_kl", "npo_kl"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one unlearning or relearning run (no weight decay, grad-norm clip 1 every step)."""

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    beta: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    progress: bool = True
    optimizer: str = "adamw"  # "adamw" | "sgd" | "adafactor" (the latter two for 7B KL runs, see memory_plan)

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be None or a positive int, got {self.max_steps!r}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def reference_logprobs(model, encoded: dict, batch_size: int, *, full: bool) -> torch.Tensor:
    """The model's reference quantities on every row of ``encoded``, in row order, on CPU, float32.

    full=False: sequence log-probs (N,) over supervised tokens (NPO). full=True: log-softmax (N, T, V)
    at every position (KL cache). One forward pass per batch, eval mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        out = []
        for batch in iterate_batches(encoded, batch_size):
            batch = _to(batch, device)
            if full:
                logp = torch.log_softmax(forward_logits(model, batch).float(), dim=-1).cpu()  # (B, t, V)
                pad = encoded["input_ids"].shape[1] - logp.shape[1]
                out.append(torch.nn.functional.pad(logp, (0, 0, 0, pad)))  # (B, T, V)
            else:
                out.append(sequence_logprob(model, batch).cpu())  # (B,)
        return torch.cat(out)
    finally:
        model.train(was_training)


def _kl_reference(model, retain: dict, cfg: TrainConfig):
    """(retain dict with cached 'ref_logprobs', None) if small enough, else (retain, frozen model copy)."""
    n, width = retain["input_ids"].shape
    vocab = model.get_output_embeddings().weight.shape[0]
    if n * width * vocab * 4 <= KL_CACHE_BYTES:
        return {**retain, "ref_logprobs": reference_logprobs(model, retain, cfg.batch_size, full=True)}, None
    frozen = plain_copy(model).eval().requires_grad_(False)
    return retain, frozen


def _retain_stream(retain: dict, cfg: TrainConfig):
    """Endless retain batches: reshuffled every pass (seeded), so forget and retain steps pair up."""
    for epoch in itertools.count():
        yield from iterate_batches(retain, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch + 1)


# The count each loss term is a mean over, per batch: supervised tokens (NLL, GA), real next-token
# positions (KL) or sequences (NPO).
_UNITS = {
    "tokens": lambda batch: int((batch["labels"][:, 1:] != -100).sum()),
    "positions": lambda batch: int(batch["attention_mask"][:, 1:].sum()),
    "sequences": lambda batch: int(batch["input_ids"].shape[0]),
}


def _units(method: str) -> tuple[str, str]:
    """(units of the forget term, units of the retain term) of ``method``."""
    return ("sequences" if method in ("npo", "npo_kl") else "tokens"), ("tokens" if method == "ga_gd" else "positions")


def _loss_terms(model, method: str, batch: dict, retain_batch, frozen, cfg: TrainConfig,
                denominators=(None, None)) -> list:
    """[forget term] or [forget term, retain term] of the method's loss on one forget batch (and one retain
    batch where the method uses it); the loss is their sum. ``denominators``: see losses (None: own count)."""
    logits = forward_logits(model, batch)  # (B, T, V)
    if method in ("npo", "npo_kl"):
        seq_logp = token_logprobs(logits, batch["labels"])[0].sum(1)  # (B,)
        terms = [npo_loss(seq_logp, batch["ref_logp"], cfg.beta, denominators[0])]
    elif method == "rlabel":
        terms = [nll_loss(logits, batch["labels"], denominators[0])]
    else:
        terms = [ga_loss(logits, batch["labels"], denominators[0])]
    if retain_batch is None:
        return terms
    retain_logits = forward_logits(model, retain_batch)  # (B, T, V)
    if method == "ga_gd":
        return terms + [nll_loss(retain_logits, retain_batch["labels"], denominators[1])]
    if frozen is not None:
        with torch.no_grad():
            ref = torch.log_softmax(forward_logits(frozen, retain_batch).float(), dim=-1)  # (B, T, V)
    else:
        ref = retain_batch["ref_logprobs"]
    return terms + [kl_loss(retain_logits, ref, retain_batch["attention_mask"], denominators[1])]


def _step(model, batches: list, units: tuple, terms_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, the step's loss value) for the global ``batches`` of one step.

    ``terms_fn(batches, denominators)`` returns one loss term per batch. One process: the sum of the
    terms on the whole batches. Sharded model: the terms on this rank's share of each batch with the
    whole batch's count (``units``) as denominator (0 for a rank without rows), summed and multiplied
    by the world size, since FSDP averages the ranks' gradients; the value is summed over ranks.
    """
    device = _device(model)
    if not is_sharded(model):
        loss = sum(terms_fn([_to(b, device) for b in batches], [None] * len(batches)))
        return loss, loss.detach()
    shares = [rank_share(b) for b in batches]
    denominators = [_UNITS[unit](b) for unit, b in zip(units, batches)]
    terms = terms_fn([_to(share, device) for share, _ in shares], denominators)
    local = sum(term * float(real) for term, (_, real) in zip(terms, shares))
    return local * world()[1], all_sum(local.detach())


def _optimise(model, batches_per_epoch: int, make_epoch, step_fn, cfg: TrainConfig, desc: str) -> dict:
    """The shared loop: epochs x batches (capped by max_steps), clip, step; returns steps and last loss.

    ``step_fn(batch)`` returns (loss to back-propagate, loss value), see :func:`_step`. Gradients are
    freed when the loop ends (``.grad`` is None), so they cost nothing during evaluation."""
    total = cfg.epochs * batches_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if cfg.optimizer == "adafactor" and is_sharded(model):
        raise ValueError("optimizer 'adafactor' does not run on FSDP-sharded parameters (its factored second "
                         "moments need whole matrices): use 'adamw' or 'sgd'")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _OPTIMIZERS[cfg.optimizer](params, cfg.lr)
    was_training = model.training
    model.train()
    steps, loss_value = 0, float("nan")
    try:
        with tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False) as bar:
            for epoch in range(cfg.epochs):
                for batch in itertools.islice(make_epoch(epoch), total - steps):
                    loss, value = step_fn(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, _GRAD_CLIP)
                    optimizer.step()
                    steps += 1
                    loss_value = float(value)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}")
    finally:
        optimizer.zero_grad(set_to_none=True)  # the last step's gradients are not kept past training
        model.train(was_training)
    return {"steps": steps, "final_loss": loss_value}


def _n_batches(encoded: dict, batch_size: int) -> int:
    return -(-encoded["input_ids"].shape[0] // batch_size)


def unlearn(model, method: str, forget: dict, retain: dict | None, cfg: TrainConfig) -> dict:
    """Unlearn ``forget`` in place with ``method`` (see losses.METHODS); returns {"steps", "final_loss"}.

    forget / retain: encode() outputs. Methods with a retain term (ga_gd, ga_kl, npo_kl) take one
    retain batch per forget batch (retain reshuffled per pass). Reference quantities are computed
    before the first step (see the module docstring); rlabel swaps answers among forget items.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in _USES_RETAIN and retain is None:
        raise ValueError(f"method {method!r} needs retain data, got retain=None")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if method in ("npo", "npo_kl"):
        forget = {**forget, "ref_logp": reference_logprobs(model, forget, cfg.batch_size, full=False)}
    if method == "rlabel":
        forget = random_label_data(forget, seed=cfg.seed, pad_id=getattr(model.config, "pad_token_id", None) or 0)
    frozen = None
    if method in _USES_KL:
        retain, frozen = _kl_reference(model, retain, cfg)
    stream = _retain_stream(retain, cfg) if method in _USES_RETAIN else None

    def terms(batches, denominators):
        retain_batch = batches[1] if len(batches) > 1 else None
        return _loss_terms(model, method, batches[0], retain_batch, frozen, cfg, denominators)

    def step(batch):
        batches = [batch] if stream is None else [batch, next(stream)]
        return _step(model, batches, _units(method), terms)

    def epoch_batches(epoch):
        return iterate_batches(forget, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _optimise(model, _n_batches(forget, cfg.batch_size), epoch_batches, step, cfg, f"unlearn {method}")


def relearn(model, data: dict, cfg: TrainConfig) -> dict:
    """Plain NLL fine-tuning on ``data`` (an encode() output), in place; returns {"steps", "final_loss"}."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")

    def terms(batches, denominators):
        return [nll_loss(forward_logits(model, batches[0]), batches[0]["labels"], denominators[0])]

    def step(batch):
        return _step(model, [batch], ("tokens",), terms)

    def epoch_batches(epoch):
        return iterate_batches(data, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _optimise(model, _n_batches(data, cfg.batch_size), epoch_batches, step, cfg, "relearn")
