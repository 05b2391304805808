"""DiagonalFisher: the diagonal Fisher information of a causal LM from one forward and one backward per batch.

    F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2

with log p summed over the unmasked target tokens of sequence s (Fisher 1925; the empirical and the
true Fisher as in Kunstner, Hennig & Balles 2019). The per-sample squares are rebuilt from captured
module inputs and output gradients by one rule per module type (``_fisher_rules``); what no rule
covers runs an exact loop of per-sequence backward passes.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ._fisher_rules import Call, module_rule, param_rule
from ._validate import compute_dtype
from .fisher import fisher_accumulate_

__all__ = ["DiagonalFisher"]


def _targets(input_ids, attention_mask, labels) -> torch.Tensor:
    """(B, T-1) next-token targets, -100 where not counted.

    Position t predicts token t+1; it counts when tokens t and t+1 are both real
    (attention_mask) and, if labels are given, labels[t+1] != -100.
    """
    real = attention_mask != 0  # (B, T)
    valid = real[:, :-1] & real[:, 1:]  # (B, T-1)
    tgt = input_ids[:, 1:] if labels is None else labels[:, 1:]  # (B, T-1)
    valid &= tgt != -100
    return torch.where(valid, tgt, torch.full_like(tgt, -100))


def _sequence_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum over counted positions of log softmax(logits)[target]; logits (B, T, V), targets (B, T-1)."""
    b, t1 = targets.shape
    lg = logits[:, :-1]  # (B, T-1, V)
    lg = lg.to(torch.promote_types(lg.dtype, torch.float32)).reshape(b * t1, -1)  # (B (T-1), V)
    nll = nn.functional.cross_entropy(lg, targets.reshape(-1), ignore_index=-100, reduction="none")  # (B (T-1),)
    return -nll.view(b, t1).sum(1)


def _grad_leaves(t: torch.Tensor) -> list:
    """The leaf tensors requiring grad that ``t`` depends on (a walk of its autograd graph).

    Parameters are frozen during the update, so these are the roots made by the forward hooks
    and any leaf another hook created (e.g. transformers' enable_input_require_grads); the
    backward runs to all of them, so every hooked output gradient is computed.
    """
    leaves, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            leaves.append(fn.variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


# --------------------------------------------------------------------------- DiagonalFisher


class DiagonalFisher:
    """Diagonal Fisher information of a causal LM, accumulated over batches.

        F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2,
        log p(y_s | x_s) = sum_{t counted} log softmax(logits_{s,t})[y_{s,t+1}]

    Args:
        model: any causal LM returning ``.logits`` (B, T, V) (a ``transformers`` model or a
            module returning logits first). Computed in eval mode (no dropout); the mode, the
            parameters' ``requires_grad`` and their ``.grad`` are left as they were.
        params: parameter names to estimate (from ``model.named_parameters()``; tied weights
            appear once); None: every parameter that requires grad.
        labels: ``"data"``: the batch's next tokens (empirical Fisher). ``"model"``: at each
            counted position the target is sampled from the model's own predictive distribution
            (true Fisher, one Monte Carlo sample), with a generator seeded by ``seed``.
        per_sample: True: exact per-sample squares, equal to a loop of per-sequence backward
            passes. False: the square of each batch's SUMMED gradient, divided by N at the end,
            (1/N) sum_batches (sum_{s in b} g_s)^2, with g_s the gradient of sequence s's summed
            log-likelihood over the same counted tokens as per_sample=True (padding excluded),
            accumulated in float32 or better. It is biased upward by (B - 1) (E g)^2 per
            parameter (the squared mean gradient; zero in expectation only for labels="model",
            where it is unbiased but noisier) and depends on the batch size; B = 1 gives the
            per-sample value. This is not the original toolkit's estimator (that one squares the
            batch-MEAN gradient of a loss that supervises padding, accumulated in bf16); it is
            kept to show what squaring batch gradients does, not to reproduce published numbers.
        seed: seed of the sampling generator for labels="model".
        backend: force a backend for the fisher ops.

    ``update(batch)``: ``batch`` is a dict with ``input_ids`` (B, T) (T >= 2), optional
    ``attention_mask`` (B, T) (default all ones), optional ``labels`` (B, T) aligned with
    input_ids as in transformers (shifted inside: token t+1 is predicted at position t; -100 is
    ignored). Position t counts when tokens t and t+1 are both real, so padding (left or right)
    never enters the loss. Any other key is passed to the model's forward (e.g. ``position_ids``
    (B, T): GPT-2's position embedding is only covered by the hooks when its ids carry the batch;
    with the default (1, T) ids it falls back to the loop). Tensors are moved to the model's device.

    ``compute()`` -> {name: tensor shaped like the parameter, float32 (float64 for a float64
    parameter)} = the accumulated squares divided by N, the number of sequences seen that have at
    least one counted target token (a sequence whose labels are all -100, or whose mask leaves no
    counted position, contributes no gradient and is not counted).

    How per_sample=True is computed: ONE forward and ONE backward of the batch-summed
    log-likelihood, with parameters frozen so the backward computes no weight gradients.
    Forward hooks capture each parameter-owning module's input, tensor hooks its output
    gradient, and the per-sample squares are rebuilt per module type:
      - nn.Linear weight: :func:`per_sample_linear_fisher`; bias: sum_s (sum_t g_st)^2; the same
        for transformers' Conv1D (GPT-2), whose weight is stored transposed.
      - nn.Embedding: segment sums of output gradients over (sample, token id) keys.
      - a weight shared by Linear and Embedding uses (tied embeddings / lm_head): the uses'
        per-sample gradients are summed before squaring, exactly, via the cross term
        2 sum_s E_s * L_s on the rows each sample touches.
      - any other module with direct parameters (RMSNorm, LayerNorm, ...): torch.func vmap
        over samples of the vjp of the module (B copies of that module's parameters only).
      - everything the hooks cannot cover exactly (parameters shared across other kinds of
        modules, modules whose inputs do not carry the batch first, tensors in keyword
        arguments, modules run under no_grad (reentrant checkpointing), modules torch.func
        cannot transform) falls back to an exact loop of per-sequence backward passes for just
        those parameters. Parameters used outside their owning module's forward (e.g. a
        ``module.weight`` read directly by a parent) cannot be seen by hooks and are NOT detected.
    Cost: about one forward + backward of the batch (1.2x of it measured on a small Llama),
    vs B per-sequence ones for the loop; the multiply-adds equal the loop's (the per-sample
    GEMMs replace the weight-gradient GEMMs), so the gain is batched-GEMM efficiency and less
    Python overhead (1.6-2x the loop on 1-2 CPU threads; more where launches dominate).
    Gradient checkpointing: transformers only checkpoints in training mode and the update runs
    in eval mode, so nothing is recomputed; non-reentrant checkpointing elsewhere is harmless
    (the hooks are removed before the backward and the output-gradient hooks sit on the
    original tensors). If an update raises midway the estimator refuses further use.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Optional[Sequence[str]] = None,
        labels: str = "data",
        per_sample: bool = True,
        seed: int = 0,
        backend: Optional[str] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if labels not in ("data", "model"):
            raise ValueError(f"labels must be 'data' or 'model', got {labels!r}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            if isinstance(params, str):
                raise TypeError("params must be a sequence of parameter names, got a single str")
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"params has names that are not parameters of model: {unknown[:5]}")
        if not names:
            raise ValueError("no parameter to estimate (params is empty or nothing requires grad)")
        self.model, self.labels, self.per_sample, self.seed, self.backend = model, labels, bool(per_sample), seed, backend
        self._params = {n: named[n] for n in names}
        self._fisher = {n: torch.zeros(p.shape, dtype=compute_dtype(p), device=p.device) for n, p in self._params.items()}
        self._n = 0
        self._broken = False
        self._writing = False  # set from the first write into the sums until the update completes
        self._gen: Optional[torch.Generator] = None
        self._uses, self._strategy = self._plan()
        self._module_names: dict = {}
        for n, us in self._uses.items():
            for m, _, _ in us:
                self._module_names.setdefault(m, []).append(n)

    # ----------------------------------------------------------------- planning

    def _plan(self) -> tuple[dict, dict]:
        """uses: {name: [(module, attr, rule)]}; strategy: {name: its rule (``_fisher_rules.param_rule``), None: the loop}."""
        by_id = {id(p): n for n, p in self._params.items()}
        uses: dict = {n: [] for n in self._params}
        for module in self.model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in by_id:
                    uses[by_id[id(p)]].append((module, attr, module_rule(module)))
        return uses, {n: param_rule(us) for n, us in uses.items()}

    @property
    def n_sequences(self) -> int:
        """Sequences accumulated so far that had at least one counted target (the divisor of :meth:`compute`)."""
        return self._n

    # ----------------------------------------------------------------- batch handling

    def _prepare(self, batch) -> tuple[dict, torch.Tensor]:
        """(forward kwargs moved to the model's device, targets (B, T-1) with -100 where not counted)."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"batch must be a dict with 'input_ids', got {type(batch).__name__}")
        device = next(iter(self._params.values())).device
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 2 or ids.shape[1] < 2:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"input_ids must be an integer (B, T) tensor with T >= 2, got {got}")
        if ids.shape[0] == 0:
            raise ValueError(f"input_ids holds no sequence (B = 0, shape {tuple(ids.shape)}): give at least one")
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        labels = batch.get("labels")
        for key, t in (("attention_mask", am), ("labels", labels)):
            if t is not None and (
                not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.shape != ids.shape
            ):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{key} must be an integer or bool tensor shaped like input_ids {tuple(ids.shape)}, got {got}")
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
        inputs["attention_mask"] = am.to(device)
        if hasattr(getattr(self.model, "config", None), "use_cache"):
            inputs["use_cache"] = False
        targets = _targets(ids.to(device), am.to(device), None if labels is None else labels.to(device))
        return inputs, targets

    def _logits(self, inputs: dict) -> torch.Tensor:
        out = self.model(**inputs)
        if isinstance(out, torch.Tensor):
            return out  # (B, T, V)
        return out.logits if hasattr(out, "logits") else out[0]  # (B, T, V)

    def _sample_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at the counted positions."""
        if self._gen is None:
            self._gen = torch.Generator(device=logits.device).manual_seed(self.seed)
        b, t1 = targets.shape
        probs = logits[:, :-1].detach().float().softmax(-1).reshape(b * t1, -1)  # (B (T-1), V)
        drawn = torch.multinomial(probs, 1, generator=self._gen).view(b, t1)  # (B, T-1)
        return torch.where(targets != -100, drawn, targets)

    @staticmethod
    def _slice(inputs: dict, s: int, b: int) -> dict:
        return {k: (v[s : s + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v) for k, v in inputs.items()}

    # ----------------------------------------------------------------- public

    def update(self, batch) -> "DiagonalFisher":
        """Accumulate one batch (see the class docstring); returns self."""
        if self._broken:
            raise RuntimeError("an earlier update failed midway; this DiagonalFisher is inconsistent, create a new one")
        inputs, targets = self._prepare(batch)
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                if self.per_sample:
                    self._update_per_sample(inputs, targets)
                else:
                    self._update_batch_square(inputs, targets)
        except BaseException:
            self._broken = self._writing  # only a failure after the first write leaves partial sums
            raise
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
        self._writing = False
        self._n += int((targets != -100).any(1).sum())  # sequences with a counted target token
        return self

    def compute(self) -> dict:
        """{name: accumulated squares / sequences seen}, float32 (float64 for float64 params)."""
        return dict(self.iter_compute())

    def iter_compute(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The pairs of :meth:`compute` one parameter at a time, in ``params`` order: only one result
        tensor exists at a time (beside the float32 sums), where ``compute`` holds a second copy of them all."""
        if self._broken:
            raise RuntimeError("an earlier update failed midway; this DiagonalFisher is inconsistent, create a new one")
        if self._n == 0:
            raise ValueError("no sequence seen yet with a counted target token: call update(batch) first")
        n = self._n
        return ((name, f / n) for name, f in self._fisher.items())

    # ----------------------------------------------------------------- estimators

    def _update_batch_square(self, inputs: dict, targets: torch.Tensor) -> None:
        names = list(self._params)
        params = [self._params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        logits = self._logits(inputs)
        if self.labels == "model":
            targets = self._sample_targets(logits, targets)
        total = _sequence_log_likelihood(logits, targets).sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
        self._writing = True
        pairs = [(self._fisher[n], g) for n, g in zip(names, grads) if g is not None]
        if pairs:
            fisher_accumulate_([a for a, _ in pairs], [g for _, g in pairs], backend=self.backend)

    def _update_loop(self, names: list, inputs: dict, targets: torch.Tensor) -> None:
        """Exact per-sequence backward passes for ``names`` only (the fallback)."""
        params = [self._params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        b = targets.shape[0]
        for s in range(b):
            ll = _sequence_log_likelihood(self._logits(self._slice(inputs, s, b)), targets[s : s + 1]).sum()
            grads = torch.autograd.grad(ll, params, allow_unused=True)
            pairs = [(self._fisher[n], g) for n, g in zip(names, grads) if g is not None]
            if pairs:
                fisher_accumulate_([a for a, _ in pairs], [g for _, g in pairs], backend=self.backend)
        for p in params:
            p.requires_grad_(False)

    def _update_per_sample(self, inputs: dict, targets: torch.Tensor) -> None:
        b = targets.shape[0]
        hooked = {}
        for n, rule in self._strategy.items():
            if rule is not None:
                for module, _, module_rule_ in self._uses[n]:
                    hooked[module] = module_rule_
        calls: dict = {m: [] for m in hooked}
        bad: set = set()
        roots: list = []

        def forward_hook(module, args, kwargs, output):
            call = Call(module, hooked[module])
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.dim()
                    and output.shape[0] == b and call.rule.capture(call, args, kwargs, b)):
                bad.add(module)
                return None
            calls[module].append(call)
            if output.grad_fn is not None:
                output.register_hook(lambda g, call=call: self._on_grad(call, g))
                return None
            leaf = output.detach().requires_grad_(True)
            roots.append((leaf, call))
            return leaf.clone()  # a non-leaf, so the model may still modify it in place

        handles = [m.register_forward_hook(forward_hook, with_kwargs=True) for m in hooked]
        try:
            logits = self._logits(inputs)
            if self.labels == "model":
                targets = self._sample_targets(logits, targets)
            total = _sequence_log_likelihood(logits, targets).sum()
        finally:
            for h in handles:
                h.remove()
        loop = {n for n, r in self._strategy.items() if r is None or any(m in bad for m, _, _ in self._uses[n])}
        self._mark_immediate(calls, loop)
        self._writing = True
        if total.requires_grad:
            leaves = _grad_leaves(total)  # our roots, plus leaves made by others' hooks (input require-grads)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            by_leaf = {id(leaf): call for leaf, call in roots}
            for leaf, g in zip(leaves, grads):
                if g is not None and id(leaf) in by_leaf:
                    self._on_grad(by_leaf[id(leaf)], g)
        del logits, total
        loop |= self._rebuild(calls, loop)
        if loop:
            self._update_loop(sorted(loop), inputs, targets)

    # ----------------------------------------------------------------- rebuilding per-sample squares

    def _mark_immediate(self, calls: dict, loop: set) -> None:
        """Modules called once whose rule allows it and whose requested params are theirs alone:
        their squares are taken in the gradient hook."""
        for module, cs in calls.items():
            if len(cs) != 1 or not cs[0].rule.immediate:
                continue
            names = self._module_names.get(module, [])
            if names and all(n not in loop and len(self._uses[n]) == 1 for n in names):
                cs[0].immediate = True

    def _on_grad(self, call: Call, g: torch.Tensor) -> None:
        call.g = g.detach()
        if call.immediate:
            for n in self._module_names.get(call.module, []):
                call.rule.squares(self._fisher[n], self._uses[n][0][1], [call], self.backend)
            call.x = call.g = None

    def _rebuild(self, calls: dict, loop: set) -> set:
        """Accumulate every hooked parameter by its rule (those not done in a hook); returns the names
        whose rule could not serve them, for the loop."""
        failed = set()
        for n, rule in self._strategy.items():
            if n not in loop and rule is not None and not rule.accumulate(self._fisher[n], self._uses[n], calls, self.backend):
                failed.add(n)
        return failed
