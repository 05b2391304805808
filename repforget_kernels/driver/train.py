"""Unlearning and relearning loops (AdamW by default, seeded, in place, tqdm progress).

The methods and their loss terms are declared in ``methods.METHODS``. Reference quantities are
computed once per request, before its first step, from the reference model (the original theta_0
passed as ``reference``, or the model itself at the start of the request when ``reference`` is None),
never by a second copy held for NPO:

- NPO family: the reference sequence log-prob of every forget example (N floats, no model copy).
- KL methods: the reference model computes its log-softmax on each retain batch as it comes (one
  forward pass, no gradients); without a reference, the current model's log-softmax on every retain
  position is cached before the first step as a (N, T, V) float32 tensor when it is at most
  ``KL_CACHE_BYTES``, else (7B vocabularies: 152k logits per token, tens of GB for a retain set) a
  frozen copy computes it per batch (bf16 weights, no gradients, no optimizer state, + 2 bytes per
  parameter, see models.memory_plan).

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
from .losses import forward_logits, nll_loss, random_label_data, sequence_logprob
from .methods import get_method, idk_data

__all__ = ["TrainConfig", "KL_CACHE_BYTES", "SCHEDULERS", "lr_multiplier", "unlearn", "relearn", "reference_logprobs"]

KL_CACHE_BYTES = 256 * 2**20  # cache the original log-softmax on retain up to this size, else a frozen copy
_GRAD_CLIP = 1.0  # global gradient-norm clip of every step (gradient ascent otherwise explodes)
_OPTIMIZERS = {  # weight decay 0 by default: unlearning should move only what the loss asks for
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),
    "adafactor": lambda params, lr, wd: torch.optim.Adafactor(params, lr=lr, weight_decay=wd),
}
SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Hyper-parameters of one unlearning or relearning run (grad-norm clip 1 every update).

    max_steps caps optimizer updates; grad_accum batches are accumulated per update (their gradients
    averaged); warmup: updates of linear warm-up from 0, then ``scheduler`` (see :func:`lr_multiplier`).
    Method hyperparameters: beta (NPO, SimNPO, DPO temperature), gamma (SimNPO margin), rmu_layer (the
    decoder block RMU steers, None: L//4 - 1) and rmu_steer (RMU's coefficient c).
    """

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    beta: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    progress: bool = True
    optimizer: str = "adamw"  # "adamw" | "sgd" | "adafactor" (the latter two for 7B KL runs, see memory_plan)
    forget_weight: float = 1.0  # the loss is forget_weight * forget term + retain_weight * retain term
    retain_weight: float = 1.0
    weight_decay: float = 0.0
    warmup: int = 0
    scheduler: str = "constant"  # "constant" | "linear" (to 0 at the last update) | "cosine" (to 0)
    grad_accum: int = 1
    gamma: float = 0.0
    rmu_layer: int | None = None
    rmu_steer: float = 6.5  # WMDP's c for Zephyr-7B

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("beta", "forget_weight", "retain_weight", "rmu_steer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("weight_decay", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("warmup",) + (("rmu_layer",) if self.rmu_layer is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be None or a positive int, got {self.max_steps!r}")


def lr_multiplier(step: int, total: int, warmup: int, scheduler: str) -> float:
    """The learning-rate factor of update ``step`` (0-based) of ``total``: (step + 1) / (warmup + 1) during the
    first ``warmup`` updates, then with progress p = (step - warmup) / max(1, total - warmup) in [0, 1):
    1 (constant), 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return 1.0 - progress
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


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


def _kl_reference(model, reference, retain: dict, cfg: TrainConfig):
    """(retain, the frozen model that computes the KL anchor's log-softmax per batch): ``reference`` when given
    (one forward of a retain batch per step, no cache of the whole retain set); without one, the model as it
    is now: its log-softmax cached as (retain with 'ref_logprobs', None) when that fits KL_CACHE_BYTES, else a
    frozen copy."""
    if reference is not None:
        return retain, reference
    n, width = retain["input_ids"].shape
    vocab = model.get_output_embeddings().weight.shape[0]
    if n * width * vocab * 4 <= KL_CACHE_BYTES:
        return {**retain, "ref_logprobs": reference_logprobs(model, retain, cfg.batch_size, full=True)}, None
    return retain, plain_copy(model).eval().requires_grad_(False)


def _retain_stream(retain: dict, cfg: TrainConfig):
    """Endless retain batches: reshuffled every pass (seeded), so forget and retain steps pair up."""
    for epoch in itertools.count():
        yield from iterate_batches(retain, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch + 1)


# The count each loss term is a mean over, per batch: supervised tokens (NLL, GA), real next-token
# positions (KL), real tokens (RMU) or sequences (NPO).
_UNITS = {
    "tokens": lambda batch: int((batch["labels"][:, 1:] != -100).sum()),
    "positions": lambda batch: int(batch["attention_mask"][:, 1:].sum()),
    "positions_all": lambda batch: int(batch["attention_mask"].sum()),
    "sequences": lambda batch: int(batch["input_ids"].shape[0]),
}


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


def _optimise(model, batches_per_epoch: int, make_epoch, step_fn, cfg: TrainConfig, desc: str, schedule=None,
              on_step=None, on_epoch=None) -> dict:
    """The shared loop: epochs x updates of ``cfg.grad_accum`` batches each (the last update of an epoch may
    take fewer), capped by max_steps updates; clip, step; returns the updates and epochs taken and the loss
    of the first and of the last update (the mean over its batches).

    ``step_fn(batch)`` returns (loss to back-propagate, loss value), see :func:`_step`; the accumulated
    gradients are divided by the number of batches of the update. ``schedule(step)`` multiplies the learning
    rate of update ``step`` (0-based); without it, ``cfg.warmup`` / ``cfg.scheduler`` do (:func:`lr_multiplier`).
    ``on_step(steps)`` is called after each update with the number of updates so far, ``on_epoch(epochs)``
    after each epoch (training stops when it returns True), both with the model in eval mode. Gradients are
    freed when the loop ends (``.grad`` is None), so they cost nothing during evaluation."""
    per_epoch = -(-batches_per_epoch // cfg.grad_accum)  # updates per epoch
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if cfg.optimizer == "adafactor" and is_sharded(model):
        raise ValueError("optimizer 'adafactor' does not run on FSDP-sharded parameters (its factored second "
                         "moments need whole matrices): use 'adamw' or 'sgd'")
    if schedule is None and (cfg.warmup or cfg.scheduler != "constant"):
        schedule = lambda step: lr_multiplier(step, total, cfg.warmup, cfg.scheduler)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _OPTIMIZERS[cfg.optimizer](params, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule is not None else None
    was_training = model.training
    model.train()
    steps, loss_value, first_loss, epochs = 0, float("nan"), float("nan"), 0

    def pause(callback, count):
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        try:
            return callback(count)
        finally:
            model.train()

    def update(values):
        nonlocal steps, loss_value, first_loss
        for p in params:
            if p.grad is not None:
                p.grad.div_(len(values))
        torch.nn.utils.clip_grad_norm_(params, _GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        steps += 1
        loss_value = sum(values) / len(values)
        first_loss = loss_value if steps == 1 else first_loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if on_step is not None:
            pause(on_step, steps)

    try:
        with tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False) as bar:
            for epoch in range(cfg.epochs):
                if steps >= total:
                    break
                values: list = []
                optimizer.zero_grad(set_to_none=True)
                for batch in itertools.islice(make_epoch(epoch), (total - steps) * cfg.grad_accum):
                    loss, value = step_fn(batch)
                    loss.backward()
                    values.append(float(value))
                    if len(values) == cfg.grad_accum:
                        update(values)
                        values = []
                if values:
                    update(values)
                epochs += 1
                if on_epoch is not None and pause(on_epoch, epochs):
                    break
    finally:
        optimizer.zero_grad(set_to_none=True)  # the last step's gradients are not kept past training
        model.train(was_training)
    return {"steps": steps, "epochs": epochs, "first_loss": first_loss, "final_loss": loss_value}


def _n_batches(encoded: dict, batch_size: int) -> int:
    return -(-encoded["input_ids"].shape[0] // batch_size)


def unlearn(model, method: str, forget: dict, retain: dict | None, cfg: TrainConfig, *, reference=None,
            tokenizer=None) -> dict:
    """Unlearn ``forget`` in place with ``method`` (see ``methods.METHODS``); returns {"steps", "first_loss",
    "final_loss"}.

    forget / retain: encode() outputs. Methods with a retain term take one retain batch per forget batch
    (retain reshuffled per pass). ``reference``: the model the NPO reference log-probs and the KL anchor
    come from (the original theta_0, frozen, not trained here); None: ``model`` itself as it is before the
    first step. Reference quantities are computed before the first step (see the module docstring);
    rlabel swaps answers among forget items; idkdpo pairs each forget row with a refusal (``tokenizer``
    encodes them, required); rmu reads a frozen model on retain (``reference``, else a frozen copy of
    ``model`` as it is now).
    """
    spec = get_method(method)
    if spec.needs_retain and retain is None:
        raise ValueError(f"method {method!r} needs retain data, got retain=None")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    source = model if reference is None else reference
    if spec.needs_ref_logp:
        forget = {**forget, "ref_logp": reference_logprobs(source, forget, cfg.batch_size, full=False)}
    if spec.needs_idk:
        if tokenizer is None:
            raise ValueError(f"method {method!r} needs the tokenizer (to encode its refusals), got tokenizer=None")
        idk = idk_data(forget, tokenizer, seed=cfg.seed)
        idk["ref_logp"] = reference_logprobs(source, idk, cfg.batch_size, full=False)
        forget = {**forget, "row": torch.arange(forget["input_ids"].shape[0]), "idk": idk}
    if spec.relabel:
        forget = random_label_data(forget, seed=cfg.seed, pad_id=getattr(model.config, "pad_token_id", None) or 0)
    frozen = None
    if spec.needs_kl_reference:
        retain, frozen = _kl_reference(model, reference, retain, cfg)
    if spec.needs_frozen_model:
        frozen = reference if reference is not None else plain_copy(model).eval().requires_grad_(False)
    stream = _retain_stream(retain, cfg) if spec.needs_retain else None
    units = (spec.forget_units, spec.retain_units)

    def terms(batches, denominators):
        out = [cfg.forget_weight * spec.forget_term(model, batches[0], cfg, denominators[0])]
        if len(batches) > 1:
            out.append(cfg.retain_weight * spec.retain_term(model, batches[1], frozen, cfg, denominators[1]))
        return out

    def step(batch):
        batches = [batch] if stream is None else [batch, next(stream)]
        return _step(model, batches, units, terms)

    def epoch_batches(epoch):
        return iterate_batches(forget, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _optimise(model, _n_batches(forget, cfg.batch_size), epoch_batches, step, cfg, f"unlearn {method}")


def relearn(model, data: dict, cfg: TrainConfig, *, schedule=None, on_step=None, on_epoch=None) -> dict:
    """Plain NLL fine-tuning on ``data`` (an encode() output), in place; returns {"steps", "epochs",
    "first_loss", "final_loss"}. ``schedule(step)`` multiplies the learning rate of each step; ``on_step(steps)``
    runs after each update (recovery curves), ``on_epoch(epochs)`` after each epoch and stops training by
    returning True (early stopping; see :func:`_optimise`)."""
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
        return _optimise(model, _n_batches(data, cfg.batch_size), epoch_batches, step, cfg, "relearn", schedule,
                         on_step, on_epoch)
