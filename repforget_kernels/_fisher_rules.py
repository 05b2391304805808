"""How DiagonalFisher rebuilds per-sample squared gradients: one rule object per module type.

After BackPACK's module extensions (Dangel, Kunstner & Hennig 2020): each rule says which modules
it serves (``matches``), what its forward hook keeps of a call (``capture``: the input, reshaped per
sample), and how the calls' captured inputs and output gradients g become
sum_s (per-sample gradient of the parameter)^2, added to the parameter's accumulator
(``accumulate``; True when done, False when the parameter needs the exact per-sequence loop).

:data:`RULES` is matched in order, the first rule that matches a module is its rule; the last one,
the generic rule, matches every module. A parameter is served by a rule when all its uses have that
rule and an attribute the rule handles; a weight shared by a Linear and an Embedding (tied
embeddings / lm_head) by :data:`TIED`; any other mix falls back to DiagonalFisher's loop.
Adding a module type: one rule class here and its instance in :data:`RULES`.

Per-sample gradients, with g_st the output gradient of sample s at token t and x_st the input:
  Linear weight G_s = sum_t g_st x_st^T (:func:`per_sample_linear_fisher`), bias sum_t g_st;
  transformers' Conv1D (GPT-2: y = x W + b, W (in, out)) the same with the roles swapped;
  Embedding row v of sample s: sum_{t: id_st = v} g_st, none for padding_idx;
  any other module's direct parameters (RMSNorm, LayerNorm, ...): torch.func vmap over samples of
  the vjp of the module.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .fisher import per_sample_linear_fisher

__all__ = ["Call", "RULES", "TIED", "module_rule", "param_rule"]


class Call:
    """One call of a hooked module during the batch forward: its captured input and output gradient."""

    __slots__ = ("module", "rule", "x", "args", "kwargs", "g", "immediate")

    def __init__(self, module: nn.Module, rule):
        self.module, self.rule = module, rule
        self.x = self.args = self.kwargs = self.g = None
        self.immediate = False


def _pending(uses: list, calls: dict) -> list:
    """(attr, call) for the calls of a parameter's modules that have an output gradient and were not
    done in their gradient hook, in the order of the uses and then of the calls."""
    return [(a, c) for m, a, _ in uses for c in calls[m] if c.g is not None and not c.immediate]


def _first_input(args: tuple, kwargs: dict, b: int) -> Optional[torch.Tensor]:
    """The module's input tensor when its first dimension is the batch, else None."""
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != b:
        return None
    return x


class LinearRule:
    """nn.Linear with its own forward: weight by the fused per-sample kernel, bias by token sums."""

    kind = "linear"
    attrs = ("weight", "bias")
    immediate = True  # a module called once may square its gradients in its gradient hook
    transposed = False  # W stored (out, in)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def capture(self, call: Call, args: tuple, kwargs: dict, b: int) -> bool:
        x = _first_input(args, kwargs, b)
        if x is None:
            return False
        call.x = x.detach().reshape(b, -1, x.shape[-1])  # (B, T, in)
        return True

    def squares(self, acc: torch.Tensor, attr: str, cs: list, backend) -> None:
        """Weight or bias squares from calls ``cs``; their tokens are concatenated, so the per-sample
        gradients of every use are summed before squaring."""
        if not cs:
            return
        g = torch.cat([c.g.reshape(c.x.shape[0], -1, c.g.shape[-1]) for c in cs], dim=1)  # (B, T', out)
        if attr == "weight":
            x = torch.cat([c.x for c in cs], dim=1)  # (B, T', in)
            if self.transposed:  # W (in, out): G_s = sum_t x_st g_st^T, the roles swapped
                per_sample_linear_fisher(g, x, out=acc, backend=backend)
            else:
                per_sample_linear_fisher(x, g, out=acc, backend=backend)
        else:
            acc.add_(g.sum(1, dtype=acc.dtype).square().sum(0))  # sum_s (sum_t g_st)^2

    def accumulate(self, acc: torch.Tensor, uses: list, calls: dict, backend) -> bool:
        self.squares(acc, uses[0][1], [c for _, c in _pending(uses, calls)], backend)
        return True


class Conv1DRule(LinearRule):
    """transformers' Conv1D (GPT-2), y = x W + b with W (in, out): the Linear rule, roles swapped."""

    kind = "conv1d"
    transposed = True

    def matches(self, module: nn.Module) -> bool:
        conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
        return conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward


def _embedding_rows(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx, cd):
    """Per-sample embedding gradient rows as segment sums over (sample, id) keys.

    ids (B, T), g (B, T, d) -> (keys (K,) = s * V + id sorted, rows (K, d) = sum_{t: id_st = id} g_st).
    Positions with padding_idx get no gradient (as in nn.Embedding). Memory: K <= B T rows.
    """
    b = ids.shape[0]
    keys = torch.arange(b, device=ids.device).unsqueeze(1) * num_embeddings + ids  # (B, T)
    gg = g.reshape(b, ids.shape[1], -1)  # (B, T, d)
    if padding_idx is not None:
        keep = ids != padding_idx  # (B, T)
        keys, gg = keys[keep], gg[keep]  # (n,), (n, d)
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)  # (K,), (n,)
    rows = torch.zeros(uniq.numel(), gg.shape[-1], dtype=cd, device=g.device)  # (K, d)
    rows.index_add_(0, inv, gg.reshape(-1, gg.shape[-1]).to(cd))
    return uniq, rows


class EmbeddingRule:
    """nn.Embedding with its own forward (no max_norm, no scale_grad_by_freq), padding_idx honoured."""

    kind = "embedding"
    attrs = ("weight",)
    immediate = False

    def matches(self, module: nn.Module) -> bool:
        return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
                and module.max_norm is None and not module.scale_grad_by_freq)

    def capture(self, call: Call, args: tuple, kwargs: dict, b: int) -> bool:
        x = _first_input(args, kwargs, b)
        if x is None:
            return False
        call.x = x.detach().reshape(b, -1)  # (B, T) ids
        return True

    def squares(self, acc: torch.Tensor, module: nn.Module, cs: list) -> tuple:
        """Row squares from calls ``cs``; returns (keys, rows) of the per-sample rows for a tied cross term."""
        ids = torch.cat([c.x for c in cs], dim=1)  # (B, T')
        g = torch.cat([c.g.reshape(c.x.shape[0], c.x.shape[1], -1) for c in cs], dim=1)  # (B, T', d)
        keys, rows = _embedding_rows(ids, g, module.num_embeddings, module.padding_idx, acc.dtype)
        acc.index_add_(0, keys % module.num_embeddings, rows.square())
        return keys, rows

    def accumulate(self, acc: torch.Tensor, uses: list, calls: dict, backend) -> bool:
        cs = [c for _, c in _pending(uses, calls)]
        if cs:
            self.squares(acc, uses[0][0], cs)
        return True


def _generic_per_sample(call: Call, attrs: list) -> dict:
    """Exact per-sample gradients of a module's direct parameters: {attr: (B, *param.shape)}.

    vmap over samples of the vjp of functional_call(module, params, input_s) with cotangent
    grad_out_s (each sample run as a batch of one). Materialises B copies of these params only.
    """
    module = call.module
    params = {a: module._parameters[a].detach() for a in attrs}
    pos = [i for i, a in enumerate(call.args) if isinstance(a, torch.Tensor)]

    def one(g_s, *tensors_s):
        args = list(call.args)
        for i, a in zip(pos, tensors_s):
            args[i] = a.unsqueeze(0)

        def f(p):
            return torch.func.functional_call(module, p, tuple(args), call.kwargs)

        _, vjp_fn = torch.func.vjp(f, params)
        return vjp_fn(g_s.unsqueeze(0))[0]

    return torch.func.vmap(one)(call.g, *[call.args[i] for i in pos])


class GenericRule:
    """Any other module with direct parameters (norms, ...): torch.func per-sample gradients."""

    kind = "generic"
    attrs = None  # every attribute
    immediate = False

    def matches(self, module: nn.Module) -> bool:
        return True

    def capture(self, call: Call, args: tuple, kwargs: dict, b: int) -> bool:
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return False
        if any(isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != b) for a in args):
            return False
        call.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        call.kwargs = dict(kwargs)
        return True

    def accumulate(self, acc: torch.Tensor, uses: list, calls: dict, backend) -> bool:
        per = None
        try:
            for attr, c in _pending(uses, calls):
                ps = _generic_per_sample(c, [attr])[attr]  # (B, *shape)
                per = ps.to(acc.dtype) if per is None else per + ps
        except Exception:  # noqa: BLE001 - a module torch.func cannot transform: the exact loop instead
            return False
        if per is not None:
            acc.add_(per.square().sum(0))
        return True


class TiedRule:
    """A weight shared by Linear (lm_head) and Embedding uses: sum_s (L_s + E_s)^2 =
    sum_s L_s^2 + sum_s E_s^2 + 2 sum_s E_s * L_s, the cross term on the rows sample s touches."""

    kind = "tied"
    roles = frozenset({("linear", "weight"), ("embedding", "weight")})

    def accumulate(self, acc: torch.Tensor, uses: list, calls: dict, backend) -> bool:
        cs = [c for _, c in _pending(uses, calls)]
        lin = [c for c in cs if c.rule is LINEAR]
        emb = [c for c in cs if c.rule is EMBEDDING]
        LINEAR.squares(acc, "weight", lin, backend)
        if not emb:
            return True
        table = next(m for m, _, r in uses if r is EMBEDDING)
        keys, e_rows = EMBEDDING.squares(acc, table, emb)
        if not lin:
            return True
        v_count = table.num_embeddings
        x = torch.cat([c.x for c in lin], dim=1)  # (B, T', d)
        g = torch.cat([c.g.reshape(c.x.shape[0], -1, c.g.shape[-1]) for c in lin], dim=1)  # (B, T', V)
        sizes = torch.bincount(keys // v_count, minlength=x.shape[0]).tolist()
        ids = keys % v_count  # (K,)
        l_rows = torch.cat(
            [g[s][:, v].T.to(acc.dtype) @ x[s].to(acc.dtype) for s, v in enumerate(ids.split(sizes))]
        )  # (K, d): rows of sum_t g_st x_st^T at the ids sample s uses
        acc.index_add_(0, ids, 2 * e_rows * l_rows)
        return True


LINEAR, EMBEDDING = LinearRule(), EmbeddingRule()
RULES = (LINEAR, Conv1DRule(), EMBEDDING, GenericRule())
TIED = TiedRule()


def module_rule(module: nn.Module):
    """The first rule of :data:`RULES` that matches ``module`` (the generic rule at the latest)."""
    return next(r for r in RULES if r.matches(module))


def param_rule(uses: list):
    """The rule serving a parameter from its uses [(module, attr, rule)], or None for the exact loop."""
    rules = {r for _, _, r in uses}
    roles = {(r.kind, a) for _, a, r in uses}
    if len(rules) == 1:
        (rule,) = rules
        if rule.attrs is None or (len(roles) == 1 and next(iter(roles))[1] in rule.attrs):
            return rule
    return TIED if roles == TIED.roles else None
