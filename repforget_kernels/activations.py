"""Per-layer activations of a model: decoder-block discovery, hooks that pool with the attention mask, streaming sinks.

Every decoder block (found by structure, :func:`decoder_layers`, or given as a list) gets a forward hook
that detaches the block's output (B, T, d) and reduces it right there with the attention mask of the
model call it belongs to (:func:`~repforget_kernels.pool_tokens`), so one forward pass serves every
layer and no block's token activations outlive the pass unless asked for:

- :class:`LayerActivations` is the context manager around your own forward passes: it keeps the
  pooled rows (``sample`` = ``mean`` | ``last`` | ``first`` | ``tokens``), and/or hands each pass's
  rows to a ``stream`` callable such as :meth:`PairedStreamingCKA.reference` / ``.updated`` (token-level
  CKA between two models over every real token without storing the rows) or :class:`RunningMoments`
  (exact token-level means and covariances in O(d^2) memory);
- :func:`collect_activations` runs a model over batches (eval mode, no_grad) and returns one tensor
  of rows per decoder block.

The attention mask is read from the model call itself (its ``attention_mask`` argument, keyword or
positional); without one every token counts. Blocks must return (B, T, d) hidden states (a tensor, or
a tuple / list whose first entry is that tensor), once per model call.

Length: one module because the hooks, the sinks they feed (PairedStreamingCKA, RunningMoments)
and the process sharing are one mechanism; each sink is small and only used through the hooks.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .pooling import SAMPLE_DEFINITIONS, pool_tokens

__all__ = [
    "decoder_layers",
    "block_output",
    "LayerActivations",
    "PairedStreamingCKA",
    "RunningMoments",
    "ProcessShare",
    "collect_activations",
]


# --------------------------------------------------------------------------- blocks


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a model, in order: the nn.ModuleList of ``config.num_hidden_layers`` same-class modules.

    Found by structure, not by parameter names (``"layers.1"`` would also match layers 10-19): among
    all ModuleLists whose children share one class, the one with exactly ``model.config.num_hidden_layers``
    children, or the longest one when the model has no such config field. Works for Llama, Qwen2,
    Mistral, GPT-2 (``transformer.h``), GPT-NeoX and any model built the same way.

    Raises:
        ValueError: when no ModuleList qualifies (pass the blocks yourself as ``layers=``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1:
                candidates.append(module)
    if want is not None:
        candidates = [m for m in candidates if len(m) == want]
    if not candidates:
        raise ValueError(f"no ModuleList of {want if want is not None else 'identical'} decoder blocks found "
                         f"in {type(model).__name__}; pass the blocks as layers=")
    return list(max(candidates, key=len))


def block_output(output) -> torch.Tensor:
    """The hidden states (B, T, d) in a block's forward output (a tensor, or a tuple / list holding it first)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _check_layers(layers, model: nn.Module) -> list[nn.Module]:
    if layers is None:
        return decoder_layers(model)
    if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
        raise TypeError("layers must be a sequence of modules (the blocks), got a single module")
    layers = list(layers)
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise TypeError(f"layers must be a non-empty sequence of torch.nn.Module, got {layers!r:.120}")
    return layers


def _check_sample(sample: str) -> None:
    if sample not in SAMPLE_DEFINITIONS:
        raise ValueError(f"sample must be one of {SAMPLE_DEFINITIONS}, got {sample!r}")


def _check_max_rows(max_rows) -> None:
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"max_rows must be None or an int >= 0, got {max_rows!r}")


# --------------------------------------------------------------------------- the context manager


class LayerActivations:
    """Context manager: pooled rows of every decoder block over the forward passes run inside it.

    Use it around your own forward passes (training or evaluation, any Hugging Face causal LM, or any
    nn.Module given its blocks)::

        with LayerActivations(model, sample="mean") as acts:
            for batch in loader:
                model(**batch)
        rows = acts.stack()          # (L, n, d): one row per sequence and block

    Args:
        model: the module whose call carries the attention mask (its ``attention_mask`` argument,
            keyword or positional; absent or None: every token is real).
        layers: the blocks to hook, in order; None: :func:`decoder_layers` (model).
        sample: rows per block output, as :func:`~repforget_kernels.pool_tokens` defines them:
            ``mean`` (masked mean over real tokens), ``last`` (last real token), ``first`` (token 0,
            the original toolkit's choice: near-constant in causal LMs, kept for comparison),
            ``tokens`` (every real token is a row).
        keep: keep the rows (``rows``, ``stack()``); False with a ``stream`` to store nothing.
        max_rows: keep at most this many rows per block (the first ones, in pass order); None: all.
            A plain attribute: it may be changed between passes.
        stream: ``stream(layer_index, rows)`` called for every block output with that pass's rows
            (on the block's device, float32, float64 for float64 activations; not capped by max_rows),
            e.g. :meth:`PairedStreamingCKA.reference`, :meth:`PairedStreamingCKA.updated` or a
            :class:`RunningMoments`.
        device: where kept rows are stored (default CPU), float32 (float64 for float64 activations).

    Hooks are registered on entry and removed on exit, also on error; entering again adds to the
    rows already kept (:meth:`clear` drops them). Outputs are detached, so the hooks never hold the
    graph; the context changes neither the model's mode nor its gradients. Cost per block and pass:
    one pooling pass over (B, T, d) (a batched GEMV for ``mean``); memory: the kept rows only. Under
    reentrant activation checkpointing blocks run twice per training step: use it on passes without it.
    """

    def __init__(self, model: nn.Module, *, layers: Optional[Sequence[nn.Module]] = None, sample: str = "mean",
                 keep: bool = True, max_rows: Optional[int] = None,
                 stream: Optional[Callable[[int, torch.Tensor], None]] = None,
                 device: torch.device | str = "cpu"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_sample(sample)
        _check_max_rows(max_rows)
        if stream is not None and not callable(stream):
            raise TypeError(f"stream must be a callable (layer_index, rows), got {type(stream).__name__}")
        if not keep and stream is None:
            raise ValueError("keep=False without a stream would collect nothing")
        self.model, self.layers, self.sample = model, _check_layers(layers, model), sample
        self.keep, self.max_rows, self.stream, self.device = bool(keep), max_rows, stream, torch.device(device)
        self._chunks: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._counts = [0] * len(self.layers)
        self._mask_position = _positional_index(model.forward, "attention_mask")
        self._mask: Optional[torch.Tensor] = None
        self._handles: list = []

    # ----------------------------------------------------------------- hooks
    def __enter__(self) -> "LayerActivations":
        if self._handles:
            raise RuntimeError("this LayerActivations is already active")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._take_mask, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._drop_mask, always_call=True))
            self._handles += [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._mask = [], None

    def _take_mask(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        self._mask = mask

    def _drop_mask(self, *_ignored) -> None:
        self._mask = None

    def _mask_for(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"a hooked block returned hidden states of shape {tuple(hidden.shape)}; expected (B, T, d)")
        if self._mask is None:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # (B, T)
        if not isinstance(self._mask, torch.Tensor) or self._mask.shape != hidden.shape[:2]:
            got = tuple(self._mask.shape) if isinstance(self._mask, torch.Tensor) else type(self._mask).__name__
            raise ValueError(f"the model call's attention_mask must be (B, T) = {tuple(hidden.shape[:2])} like the "
                             f"block outputs, got {got}")
        return self._mask.to(hidden.device)

    def _room(self, index: int) -> Optional[int]:
        return None if self.max_rows is None else max(0, self.max_rows - self._counts[index])

    def _hook(self, index: int):
        def hook(_module, _inputs, output) -> None:
            room = self._room(index) if self.keep else 0
            if room == 0 and self.stream is None:
                return
            hidden = block_output(output).detach()  # (B, T, d)
            rows = pool_tokens(hidden, self._mask_for(hidden), sample=self.sample)  # (B, d) or (n_real, d)
            if self.stream is not None:
                self.stream(index, rows)
            if room != 0:
                kept = (rows if room is None else rows[:room]).to(self.device)
                if kept.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
                    kept = kept.clone()  # a view of the block output ("first"): keep the rows, not all of (B, T, d)
                self._chunks[index].append(kept)
                self._counts[index] += kept.shape[0]
        return hook

    # ----------------------------------------------------------------- results
    @property
    def n_rows(self) -> int:
        """Rows kept per block so far."""
        return self._counts[0]

    @property
    def rows(self) -> list[torch.Tensor]:
        """The kept rows: one (n, d_l) tensor per block, in pass order (also concatenated into place)."""
        for i, chunks in enumerate(self._chunks):
            if len(chunks) > 1:
                self._chunks[i] = [torch.cat(chunks)]
        return [chunks[0] if chunks else torch.zeros(0, 0, device=self.device) for chunks in self._chunks]

    def stack(self) -> torch.Tensor:
        """The kept rows of every block stacked: (L, n, d); needs blocks of one width."""
        rows = self.rows
        widths = {r.shape[-1] for r in rows}
        if len(widths) > 1:
            raise ValueError(f"blocks have different widths {sorted(widths)}: use .rows (one tensor per block)")
        return torch.stack(rows)

    def clear(self) -> None:
        """Drop the kept rows."""
        self._chunks = [[] for _ in self.layers]
        self._counts = [0] * len(self.layers)


def _positional_index(fn: Callable, name: str) -> Optional[int]:
    """Position of parameter ``name`` among fn's positional parameters (bound methods: without self), or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


# --------------------------------------------------------------------------- streaming sinks


class PairedStreamingCKA:
    """Per-layer :class:`~repforget_kernels.StreamingCKA` between two models fed the same batches, storing no rows.

    For each batch, run the reference model with ``stream=paired.reference`` (its rows for layer l
    wait in a one-batch stash), then the updated model with ``stream=paired.updated`` (each layer's
    rows meet the stashed ones in ``StreamingCKA.update`` and the stash is freed)::

        paired = PairedStreamingCKA(len(decoder_layers(base)))
        with LayerActivations(base, sample="tokens", keep=False, stream=paired.reference), \\
             LayerActivations(tuned, sample="tokens", keep=False, stream=paired.updated):
            for batch in batches:
                base(**batch)
                tuned(**batch)
        paired.compute()   # (L,) token-level CKA over every real token

    Args:
        n_layers: number of layers L.
        debiased: unbiased HSIC (needs 4 rows in total).

    Exact (equal to ``linear_cka`` on all rows, whatever the batching). Memory: L StreamingCKA
    states, 8 (dx dy + dx^2 + dy^2) bytes each, plus one batch of the reference's rows per layer.
    ``accumulators`` holds the L StreamingCKA (merge or ``all_reduce`` them across processes).
    """

    def __init__(self, n_layers: int, *, debiased: bool = False):
        from .cka import StreamingCKA

        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.accumulators = [StreamingCKA(debiased=debiased) for _ in range(n_layers)]
        self._stash: dict[int, torch.Tensor] = {}

    def _check(self, layer: int) -> None:
        if not 0 <= layer < len(self.accumulators):
            raise ValueError(f"layer must be in [0, {len(self.accumulators)}), got {layer}")

    def reference(self, layer: int, rows: torch.Tensor) -> None:
        """Stash the reference's rows (n, dx) of ``layer`` for the next :meth:`updated` call of that layer."""
        self._check(layer)
        if layer in self._stash:
            raise ValueError(f"layer {layer}: reference rows fed twice before the updated model's rows")
        self._stash[layer] = rows

    def updated(self, layer: int, rows: torch.Tensor) -> None:
        """Pair the updated model's rows (n, dy) of ``layer`` with the stashed reference rows (same n)."""
        self._check(layer)
        if layer not in self._stash:
            raise ValueError(f"layer {layer}: updated rows arrived without reference rows; run the reference "
                             "model on the same batch first")
        ref = self._stash.pop(layer)
        self.accumulators[layer].update(ref.to(rows.device), rows)

    def compute(self) -> torch.Tensor:
        """(L,) CKA over every row pair seen, float32 (float64 for float64 rows), on the CPU."""
        return torch.stack([acc.compute().cpu() for acc in self.accumulators])


class RunningMoments:
    """Exact running mean (and covariance) of each layer's rows, streamed, never storing them.

    Pass it as ``stream=`` of :class:`LayerActivations` (it is called as ``moments(layer, rows)``),
    e.g. with ``sample="tokens"`` for token-level statistics over any number of tokens.

    Args:
        n_layers: number of layers L.
        covariance: also accumulate the second moment (d x d per layer).

    Sums are float64 and shifted by each layer's first chunk mean (so large offsets, as LLM
    "massive activations", cost no precision): n, s = sum (x - c), S = sum (x - c)(x - c)^T;
    mean = c + s / n; covariance = (S - s s^T / n) / (n - 1). Memory: 8 L (d + d^2) bytes
    (8 L d without the covariance); cost per chunk of n rows: n d (n d^2 with the covariance).
    """

    def __init__(self, n_layers: int, *, covariance: bool = False):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.with_covariance = bool(covariance)
        self._n = [0] * n_layers
        self._shift: list[Optional[torch.Tensor]] = [None] * n_layers
        self._sum: list[Optional[torch.Tensor]] = [None] * n_layers
        self._second: list[Optional[torch.Tensor]] = [None] * n_layers

    def __call__(self, layer: int, rows: torch.Tensor) -> None:
        self.update(layer, rows)

    def update(self, layer: int, rows: torch.Tensor) -> None:
        """Add rows (n, d) of ``layer``."""
        if not 0 <= layer < len(self._n):
            raise ValueError(f"layer must be in [0, {len(self._n)}), got {layer}")
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or not rows.is_floating_point():
            got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"rows must be a float (n, d) tensor, got {got}")
        if rows.shape[0] == 0:
            return
        x = rows.to(torch.float64)  # (n, d)
        if self._shift[layer] is None:
            d = x.shape[1]
            self._shift[layer] = x.mean(0)  # (d,)
            self._sum[layer] = torch.zeros(d, dtype=torch.float64, device=x.device)
            if self.with_covariance:
                self._second[layer] = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        elif x.shape[1] != self._shift[layer].shape[0]:
            raise ValueError(f"layer {layer}: rows of width {x.shape[1]}, earlier rows had {self._shift[layer].shape[0]}")
        xc = x.to(self._shift[layer].device) - self._shift[layer]  # (n, d)
        self._sum[layer] += xc.sum(0)
        if self.with_covariance:
            self._second[layer] += xc.T @ xc  # (d, d)
        self._n[layer] += x.shape[0]

    @property
    def n(self) -> list[int]:
        """Rows seen per layer."""
        return list(self._n)

    def _need(self, layer: int, rows: int) -> None:
        if self._n[layer] < rows:
            raise ValueError(f"layer {layer} has seen {self._n[layer]} row(s); this needs at least {rows}")

    def mean(self, layer: int) -> torch.Tensor:
        """(d,) float64 mean of the rows of ``layer``."""
        self._need(layer, 1)
        return self._shift[layer] + self._sum[layer] / self._n[layer]

    def covariance(self, layer: int) -> torch.Tensor:
        """(d, d) float64 sample covariance (ddof = 1) of the rows of ``layer``."""
        if not self.with_covariance:
            raise ValueError("RunningMoments(covariance=False) keeps no second moment")
        self._need(layer, 2)
        n, s = self._n[layer], self._sum[layer]
        return (self._second[layer] - torch.outer(s, s) / n) / (n - 1)


# --------------------------------------------------------------------------- passes over batches


class ProcessShare:
    """How the processes of a distributed job share one pass over the batches (the default: one process runs all).

    The library's passes (:func:`collect_activations`, ``compare_models``, ``ReferenceStatistics``)
    walk every batch in every process, run those for which :meth:`runs` is true, and, when
    ``processes > 1``, merge: kept rows with :meth:`gather_rows`, StreamingCKA states with
    :meth:`reduce_cka`, Fisher sums with :meth:`sum`. Subclass it for torch.distributed (e.g. batch
    i on rank i mod world, ``all_gather`` of the rows, ``StreamingCKA.all_reduce``), so every
    process ends with the numbers of one process.
    """

    @property
    def processes(self) -> int:
        """Number of processes sharing the pass."""
        return 1

    def runs(self, index: int) -> bool:
        """Whether this process runs batch ``index``."""
        return True

    def gather_rows(self, local: torch.Tensor, rows_per_batch: list[int]) -> torch.Tensor:
        """Every process's kept rows (L, n_local, d), batch i contributing rows_per_batch[i] rows, merged
        in batch order: (L, sum(rows_per_batch), d)."""
        return local

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the processes."""
        return value

    def reduce_cka(self, accumulator) -> None:
        """Merge a StreamingCKA's state over the processes, in place."""


def _forward_inputs(batch: Mapping, device: torch.device) -> dict:
    """A batch's model arguments on ``device``: every key but ``labels`` (activations need no loss), tensors moved."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


def _check_batch(batch, index: int) -> torch.Tensor:
    """The (B, T) attention mask of ``batches[index]`` (all ones when it has none), after checking the batch."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = f" with keys {list(batch)}" if isinstance(batch, Mapping) else ""
        raise TypeError(f"batches[{index}] must be a dict with 'input_ids' (as tokenizers return), got "
                        f"{type(batch).__name__}{keys}")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"batches[{index}]['input_ids'] must be an integer (B, T) tensor, got {got}")
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"batches[{index}]['attention_mask'] must be shaped like input_ids {tuple(ids.shape)}, got {got}")
    return mask


def _rows_of(mask: torch.Tensor, sample: str) -> int:
    """Rows one batch with this (B, T) attention mask yields under ``sample``."""
    return int((mask != 0).sum()) if sample == "tokens" else mask.shape[0]


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class _eval_mode:
    """Context manager: every module of ``model`` in eval mode inside, each one's own training flag restored after."""

    def __init__(self, model: nn.Module):
        self.model, self.modes = model, []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for module, mode in self.modes:
            module.training = mode


def _call_model(model: nn.Module, batch: Mapping) -> None:
    """One forward pass of ``model`` on ``batch`` for its hooks. For HF models: no KV cache, and the logits of
    the last position only (the hooks need none; all B T V of them would cost a GEMM with the vocabulary)."""
    inputs = _forward_inputs(batch, _model_device(model))
    if hasattr(getattr(model, "config", None), "use_cache"):
        inputs["use_cache"] = False
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    for name in ("logits_to_keep", "num_logits_to_keep"):  # transformers >= 4.50, and before
        if name in accepted and name not in inputs:
            inputs[name] = 1
            break
    model(**inputs)


def _merged_rows(acts: LayerActivations, model: nn.Module, rows_per_batch: list[int], share: ProcessShare) -> torch.Tensor:
    """(L, n, d): a :func:`_run_pass` collector's kept rows, merged over the processes in batch order."""
    if share.processes == 1:
        return acts.stack()
    if acts.n_rows == 0:  # this process ran no batch: an empty share of the right width
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        if width is None:
            raise ValueError("this process ran no batch and the model has no config.hidden_size to shape its empty "
                             "share of the rows: give every process at least one batch")
        local = torch.zeros(len(acts.layers), 0, int(width), device=acts.device)  # (L, 0, d)
    else:
        local = acts.stack()  # (L, n_local, d)
    return share.gather_rows(local, rows_per_batch)


def _run_pass(batches: Iterable[Mapping], share: ProcessShare, sample: str, max_rows: Optional[int],
              runs: Sequence[tuple[nn.Module, Sequence[LayerActivations]]],
              before: Optional[Callable[[int, Mapping], None]] = None) -> list[int]:
    """One pass over ``batches``: for each batch this process runs, each (model, collectors) of ``runs`` in
    order, the model called once with its collectors active (so one model may appear twice).

    Every batch of every process is walked: the return value lists the rows each batch contributes
    to a collector with ``sample`` rows and cap ``max_rows`` (what ``ProcessShare.gather_rows`` needs),
    and before each batch this process runs, each keeping collector's ``max_rows`` is set so it keeps
    exactly those (keeping collectors must use ``sample``). ``before(index, batch)`` is called for
    every batch first (checks, per-batch streams).
    """
    rows_per_batch, seen = [], 0
    for index, batch in enumerate(batches):
        take = _rows_of(_check_batch(batch, index), sample)
        if max_rows is not None:
            take = min(take, max(0, max_rows - seen))
        seen += take
        rows_per_batch.append(take)
        if before is not None:
            before(index, batch)
        if not share.runs(index):
            continue
        for model, collectors in runs:
            for acts in collectors:
                if acts.keep:
                    acts.max_rows = acts.n_rows + take
            with contextlib.ExitStack() as stack:
                for acts in collectors:
                    stack.enter_context(acts)
                _call_model(model, batch)
    if not rows_per_batch:
        raise ValueError("batches is empty: give at least one batch")
    return rows_per_batch


def collect_activations(model: nn.Module, batches: Iterable[Mapping], *, sample: str = "mean",
                        layers: Optional[Sequence[nn.Module]] = None, max_rows: Optional[int] = None,
                        device: torch.device | str = "cpu", share: Optional[ProcessShare] = None) -> list[torch.Tensor]:
    """Rows of every decoder block over ``batches``: one (n, d) tensor per block.

    Args:
        model: any Hugging Face causal LM (or nn.Module with ``layers``), run in eval mode under
            no_grad (each module's training flag restored after).
        batches: any iterable of dicts as tokenizers return them (``input_ids`` (B, T),
            ``attention_mask`` (B, T), left or right padding; other keys are passed to forward,
            ``labels`` dropped); tensors are moved to the model's device.
        sample: ``mean`` | ``last`` | ``first`` (one row per sequence) or ``tokens`` (every real token).
        layers, max_rows, device: as for :class:`LayerActivations`.
        share: how processes split the batches (:class:`ProcessShare`); every process gets all rows.

    Returns:
        a list of L tensors (n, d), float32 (float64 for a float64 model), on ``device``, rows in
        batch order. Cost: one forward pass per batch; memory: the rows plus one batch.
    """
    share = share or ProcessShare()
    acts = LayerActivations(model, layers=layers, sample=sample, max_rows=max_rows, device=device)
    with torch.no_grad(), _eval_mode(model):
        rows_per_batch = _run_pass(batches, share, sample, max_rows, [(model, [acts])])
    if share.processes == 1:
        return acts.rows
    return list(_merged_rows(acts, model, rows_per_batch, share).unbind(0))
