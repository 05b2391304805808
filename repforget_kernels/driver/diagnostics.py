"""Layer-wise structure diagnostics of a causal LM against a reference, through the public metric API.

Activations are taken with forward hooks on every decoder block (``models.decoder_layers``), under
``torch.no_grad``, detached, and reduced inside the hook with the attention mask, so one forward
pass per probe batch serves every layer and no layer's token activations outlive their batch:

- pooled rows (sample ``mean`` | ``last`` | ``first``): ``pool_tokens`` in the hook, one (B, d) row
  block per layer and batch, kept: (L, n_probe, d) float32 in total;
- ``tokens``: every real token is a row; kept up to ``max_token_rows`` rows per layer for PCA;
- token-level CKA between two models: the reference's forward stashes one batch of token rows per
  layer (model dtype), the updated model's hook for layer l feeds ``StreamingCKA`` with the stashed
  and its own rows and drops the stash: peak memory is one batch of token rows per layer.

Per layer, against the reference: linear CKA of the pooled rows (biased and debiased), token-level
CKA (StreamingCKA over every real token), PCA similarity (|cos| of PC1, and the top-k subspace
similarity for ``pca_k`` > 1), normalised PCA shift (k = 2, in reference standard deviations) and
diagonal Fisher on forget data (``DiagonalFisher``, empirical, per-sample): per-layer mass (sum
over the block's parameters), mass ratio updated / reference, Spearman rank correlation on a
deterministic strided subsample, and a ``fisher_histogram`` of the same subsample.

Under ``torch.distributed`` (e.g. ``accelerate launch``), each rank runs its share of the probe
and forget batches; pooled rows are gathered back in probe order (the very rows of one process),
StreamingCKA accumulators merged with ``all_reduce`` and Fisher sums added across ranks one
parameter at a time, so every rank ends with the one-process numbers (up to float rounding of the
reduction order). The models here are plain (unsharded): the pipeline diagnoses a sharded trainee
through a gathered replica.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from repforget_kernels import (
    DiagonalFisher,
    StreamingCKA,
    fisher_histogram,
    linear_cka,
    pca_shift,
    pca_similarity,
    pool_tokens,
)

from .data import iterate_batches
from .distributed import all_sum, gather_batch_rows, rank_batches, world
from .models import decoder_layers
from .report import json_safe

__all__ = [
    "DiagnosticsConfig",
    "Snapshot",
    "LayerHooks",
    "block_output",
    "pooled_activations",
    "token_cka",
    "fisher_by_layer",
    "spearman",
    "snapshot",
    "compare",
    "diagnose",
]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Settings of one diagnostics pass.

    sample: rows for pooled CKA / PCA (``mean`` | ``last`` | ``first`` | ``tokens``).
    pca_k: subspace size of the extra PCA similarity (k = 1 is always reported).
    shift_k: number of reference principal directions for the PCA shift (default 2).
    batch_size: probe / forget batch size of the diagnostic forward (and Fisher backward) passes.
    token_cka: also compute token-level CKA (needs the reference model in memory).
    fisher: compute the Fisher diagnostics (one backward pass per forget sequence batch).
    fisher_samples: entries per layer kept for the rank correlation and histograms (strided subsample).
    hist_bins: bins of the log-spaced Fisher histograms.
    max_token_rows: rows per layer kept for PCA when ``sample == "tokens"``.
    """

    sample: str = "mean"
    pca_k: int = 1
    shift_k: int = 2
    batch_size: int = 16
    token_cka: bool = True
    fisher: bool = True
    fisher_samples: int = 100_000
    hist_bins: int = 48
    max_token_rows: int = 4096


@dataclass
class Snapshot:
    """What one model contributes to a comparison (all on CPU, float32 unless noted).

    rows: (L, n, d) pooled rows (or token rows for ``sample == "tokens"``), in probe order.
    fisher_mass: (L,) float64 per-layer Fisher mass, or None without Fisher.
    fisher_sub: list of L (m_l,) float32 strided subsamples of each layer's Fisher values, or None.
    """

    rows: torch.Tensor
    fisher_mass: Optional[torch.Tensor] = None
    fisher_sub: Optional[list] = None

    def state_dict(self) -> dict:
        return {"rows": self.rows, "fisher_mass": self.fisher_mass, "fisher_sub": self.fisher_sub}


# --------------------------------------------------------------------------- hooks


def block_output(output) -> torch.Tensor:
    """The hidden states (B, T, d) of a decoder block's forward output (a tensor or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerHooks:
    """Context manager: a forward hook on each module of ``layers`` calling ``fn(index, hidden)``.

    ``hidden`` is the block's output (B, T, d), detached. Hooks are removed on exit, also on error.
    """

    def __init__(self, layers: list, fn: Callable[[int, torch.Tensor], None]):
        self.layers, self.fn, self.handles = list(layers), fn, []

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            self.fn(index, block_output(output).detach())
        return hook

    def __enter__(self) -> "LayerHooks":
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class _eval_mode:
    """Put a model in eval mode for the block, restoring its training flag after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# --------------------------------------------------------------------------- activations


@torch.no_grad()
def pooled_activations(model, probe: dict, *, sample: str = "mean", batch_size: int = 16,
                       max_token_rows: int = 4096) -> torch.Tensor:
    """Rows of every decoder block on the probe set, from one forward pass per batch.

    Args:
        model: a causal LM whose blocks ``decoder_layers`` finds.
        probe: ``data.encode`` output (input_ids, attention_mask (N, T)).
        sample: ``mean`` | ``last`` | ``first`` (one row per sequence) or ``tokens`` (every real token,
            the first ``max_token_rows`` rows per layer kept).
    Returns:
        (L, n, d) float32 on CPU, in probe order (also under torch.distributed, where each rank runs
        its share of the batches and keeps exactly the rows one process would).
    Cost: one forward pass over the probe set; memory: the (L, n, d) result plus one batch.
    """
    layers = decoder_layers(model)
    keep = _rows_kept(probe, sample, batch_size, max_token_rows)  # rows of each batch in the result
    per_layer = [[] for _ in layers]
    box = {}

    def reduce(i: int, hidden: torch.Tensor) -> None:
        rows = pool_tokens(hidden, box["mask"], sample=sample)  # (B, d) or (n_real, d)
        per_layer[i].append(rows[: keep[box["index"]]].float().cpu())

    dev = _device_of(model)
    with _eval_mode(model), LayerHooks(layers, reduce):
        for index, batch in rank_batches(probe, batch_size):
            batch = _to(batch, dev)
            box["mask"], box["index"] = batch["attention_mask"], index
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    width = model.config.hidden_size
    local = torch.stack([torch.cat(rows) if rows else torch.zeros(0, width) for rows in per_layer])  # (L, n_local, d)
    return gather_batch_rows(local, keep)


def _rows_kept(probe: dict, sample: str, batch_size: int, max_token_rows: int) -> list:
    """Rows each probe batch contributes: its sequences, or for ``tokens`` its real tokens up to the first
    ``max_token_rows`` token rows of the whole probe set (in batch order)."""
    if sample != "tokens":
        return [b["input_ids"].shape[0] for b in iterate_batches(probe, batch_size)]
    keep, seen = [], 0
    for b in iterate_batches(probe, batch_size):
        take = min(int(b["attention_mask"].sum()), max(0, max_token_rows - seen))
        keep.append(take)
        seen += take
    return keep


@torch.no_grad()
def token_cka(ref_model, upd_model, probe: dict, *, batch_size: int = 16, debiased: bool = False) -> torch.Tensor:
    """Token-level linear CKA per layer between two models on the same probe tokens.

    For each probe batch the reference runs first and its hooks stash each layer's real-token rows
    (n_real, d) in the model dtype; the updated model's hook for layer l feeds
    ``StreamingCKA.update(stash[l], rows)`` and frees the stash. Exact over every real token.

    Returns: (L,) float32 on CPU. Memory: L StreamingCKA states (8 (dx dy + dx^2 + dy^2) bytes each)
    plus one batch of the reference's token rows per layer.
    """
    ref_layers, upd_layers = decoder_layers(ref_model), decoder_layers(upd_model)
    if len(ref_layers) != len(upd_layers):
        raise ValueError(f"ref_model has {len(ref_layers)} decoder blocks, upd_model has {len(upd_layers)}")
    accs = [StreamingCKA(debiased=debiased) for _ in ref_layers]
    stash, mask_box = {}, {}

    def keep(i: int, hidden: torch.Tensor) -> None:
        stash[i] = pool_tokens(hidden, mask_box["ref"], sample="tokens")  # (n_real, d)

    def feed(i: int, hidden: torch.Tensor) -> None:
        rows = pool_tokens(hidden, mask_box["upd"], sample="tokens")  # (n_real, d)
        accs[i].update(stash.pop(i).to(rows.device), rows)

    ref_dev, upd_dev = _device_of(ref_model), _device_of(upd_model)
    with _eval_mode(ref_model), _eval_mode(upd_model):
        for _, batch in rank_batches(probe, batch_size):
            for model, layers, fn, key, dev in ((ref_model, ref_layers, keep, "ref", ref_dev),
                                                (upd_model, upd_layers, feed, "upd", upd_dev)):
                b = _to(batch, dev)
                mask_box[key] = b["attention_mask"]
                with LayerHooks(layers, fn):
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    if world()[1] > 1:
        for acc in accs:
            acc.all_reduce()
    return torch.stack([acc.compute().float().cpu() for acc in accs])


# --------------------------------------------------------------------------- Fisher


def _layer_param_names(model) -> list:
    """For each decoder block, the names (as in model.named_parameters()) of its parameters."""
    owner = {}
    for i, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            owner[id(p)] = i
    names = [[] for _ in decoder_layers(model)]
    for name, p in model.named_parameters():
        if id(p) in owner:
            names[owner[id(p)]].append(name)
    return names


def fisher_by_layer(model, forget: dict, *, batch_size: int = 16, samples: int = 100_000) -> tuple:
    """Empirical diagonal Fisher of the decoder blocks on forget data, summarised per layer.

    F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2 (``DiagonalFisher``, labels="data",
    per-sample squares, padding and prompt tokens masked by the labels).

    Returns:
        (mass (L,) float64 = sum of F over each block's parameters,
         list of L (m_l,) float32 strided subsamples of the block's F values, m_l <= ``samples``).
    Under torch.distributed, each rank's Fisher (times its sequence count) is summed over ranks.
    Cost: one forward + per-sample backward per forget batch; memory: one float32 copy of the blocks
    (the summaries are taken one parameter at a time).
    """
    names = _layer_param_names(model)
    wanted = [n for layer in names for n in layer]
    params = dict(model.named_parameters())
    dev = _device_of(model)
    with _eval_mode(model):
        fisher = DiagonalFisher(model, params=wanted, labels="data", per_sample=True)  # blocks only
        seen = 0
        for _, batch in rank_batches(forget, batch_size):
            fisher.update(_to(batch, dev))
            seen += batch["input_ids"].shape[0]
    owner = {n: i for i, layer in enumerate(names) for n in layer}
    steps = [max(1, math.ceil(sum(params[n].numel() for n in layer) / samples)) for layer in names]
    offsets = [0] * len(names)
    mass = torch.zeros(len(names), dtype=torch.float64)  # (L,)
    subs = [[] for _ in names]
    for n, value in _merged_fisher(fisher, seen, wanted, params):
        i, flat = owner[n], value.flatten()
        mass[i] += float(flat.sum(dtype=torch.float64))
        subs[i].append(flat[(-offsets[i]) % steps[i]::steps[i]].float().cpu())  # every steps[i]-th of the block
        offsets[i] += flat.numel()
    return mass, [torch.cat(s) for s in subs]


def _merged_fisher(fisher: DiagonalFisher, seen: int, names: list, params: dict) -> Iterator[tuple]:
    """(name, F) per parameter in ``names`` order: this process's Fisher (zeros without forget batches), or
    under torch.distributed the ranks' Fisher means weighted by their sequence counts."""
    local = fisher.iter_compute() if seen else ((n, torch.zeros_like(params[n], dtype=torch.float32)) for n in names)
    if world()[1] == 1:
        yield from local
        return
    total = float(all_sum(torch.tensor(float(seen), dtype=torch.float64)))
    for n, value in local:
        yield n, (all_sum(value.to(torch.float64) * seen) / total).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length 1-D tensors, ties given their average rank.

    Pearson correlation of the average ranks, in float64; NaN when either side is constant.
    Cost: two sorts of n entries.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be 1-D of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra.square().sum()) * float(rb.square().sum()))
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of v (n,), tied values sharing the mean of their ranks: (n,) float64."""
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # (u,) rank of each group's last member
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


# --------------------------------------------------------------------------- snapshots and comparison


def snapshot(model, probe: dict, forget: Optional[dict], cfg: DiagnosticsConfig) -> Snapshot:
    """Pooled rows on the probe set and (when ``cfg.fisher`` and forget data are given) Fisher summaries."""
    rows = pooled_activations(model, probe, sample=cfg.sample, batch_size=cfg.batch_size,
                              max_token_rows=cfg.max_token_rows)
    if not cfg.fisher or forget is None:
        return Snapshot(rows)
    mass, subs = fisher_by_layer(model, forget, batch_size=cfg.batch_size, samples=cfg.fisher_samples)
    return Snapshot(rows, mass, subs)


def _per_layer(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> list:
    """fn over the stacked layers (L, n, d) at once; where that raises ValueError (e.g. a layer without
    variance, as token-0 rows of a causal LM), layer by layer with None for the layers that fail."""
    try:
        return [v.tolist() for v in fn(x, y).unbind(0)]
    except ValueError:
        out = []
        for xi, yi in zip(x.unbind(0), y.unbind(0)):
            try:
                out.append(fn(xi, yi).tolist())
            except ValueError:
                out.append(None)
        return out


def compare(ref: Snapshot, upd: Snapshot, cfg: DiagnosticsConfig, tokens: Optional[torch.Tensor] = None) -> dict:
    """Per-layer structure numbers of ``upd`` against ``ref`` (same probe rows, same model shape).

    Returns a JSON-ready dict:
      layers: [{"layer", "cka" (token CKA when sample == "tokens", else pooled), "cka_pooled",
                "cka_debiased", "cka_tokens", "pca_similarity" (k = 1, |cos|),
                "pca_similarity_k" (k = cfg.pca_k, when > 1), "pca_shift" (normalised, cfg.shift_k values),
                "fisher_mass", "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"}, ...]
      fisher: {"mass_ratio" (total over blocks), "histogram": {"counts", "edges"}} or None.
    NaN and undefined values are stored as None.
    """
    x, y = ref.rows, upd.rows  # (L, n, d) each
    if x.shape != y.shape:
        raise ValueError(f"reference rows {tuple(x.shape)} and updated rows {tuple(y.shape)} differ in shape")
    n = x.shape[1]
    cka = _per_layer(linear_cka, x, y)
    deb = _per_layer(lambda a, b: linear_cka(a, b, debiased=True), x, y) if n >= 4 else [None] * len(cka)
    sim1 = _per_layer(lambda a, b: pca_similarity(a, b, k=1), x, y)
    k = min(cfg.pca_k, n, x.shape[-1])
    simk = _per_layer(lambda a, b: pca_similarity(a, b, k=k), x, y) if cfg.pca_k > 1 else None
    sk = min(cfg.shift_k, n, x.shape[-1])
    shift = _per_layer(lambda a, b: pca_shift(a, b, k=sk, normalize=True), x, y)
    tok = tokens.tolist() if tokens is not None else [None] * len(cka)
    layers = []
    for i in range(len(cka)):
        row = {"layer": i, "cka": json_safe(tok[i] if cfg.sample == "tokens" else cka[i]), "cka_pooled": json_safe(cka[i]),
               "cka_debiased": json_safe(deb[i]), "cka_tokens": json_safe(tok[i]), "pca_similarity": json_safe(sim1[i]),
               "pca_shift": json_safe(shift[i])}
        if simk is not None:
            row["pca_similarity_k"] = json_safe(simk[i])
        row.update(_fisher_layer(ref, upd, i))
        layers.append(row)
    return {"layers": layers, "fisher": _fisher_stage(ref, upd, cfg)}


def _fisher_layer(ref: Snapshot, upd: Snapshot, i: int) -> dict:
    if ref.fisher_mass is None or upd.fisher_mass is None:
        return {"fisher_mass": None, "fisher_mass_ref": None, "fisher_mass_ratio": None, "fisher_rank_corr": None}
    m_ref, m_upd = float(ref.fisher_mass[i]), float(upd.fisher_mass[i])
    return {"fisher_mass": json_safe(m_upd), "fisher_mass_ref": json_safe(m_ref),
            "fisher_mass_ratio": json_safe(m_upd / m_ref) if m_ref > 0 else None,
            "fisher_rank_corr": json_safe(spearman(ref.fisher_sub[i], upd.fisher_sub[i]))}


def _fisher_stage(ref: Snapshot, upd: Snapshot, cfg: DiagnosticsConfig) -> Optional[dict]:
    if ref.fisher_mass is None or upd.fisher_mass is None:
        return None
    total_ref, total_upd = float(ref.fisher_mass.sum()), float(upd.fisher_mass.sum())
    values = torch.cat(upd.fisher_sub)  # (sum m_l,)
    hist = None
    if bool((values > 0).any()):
        h = fisher_histogram(values, bins=cfg.hist_bins, log=True)
        hist = {"counts": h.counts.tolist(), "edges": h.edges.tolist(), "n_zero": h.n_zero}
    return {"mass": total_upd, "mass_ref": total_ref,
            "mass_ratio": json_safe(total_upd / total_ref) if total_ref > 0 else None, "histogram": hist}


def diagnose(ref_model, upd_model, probe: dict, forget: Optional[dict], cfg: DiagnosticsConfig,
             ref: Optional[Snapshot] = None) -> dict:
    """All diagnostics of ``upd_model`` against ``ref_model``: :func:`compare`'s dict.

    ``ref`` reuses a reference :class:`Snapshot` taken earlier (the pipeline takes it once per
    original model); ``ref_model`` is then only run for the token-level CKA (cfg.token_cka).
    """
    ref = ref if ref is not None else snapshot(ref_model, probe, forget, cfg)
    upd = snapshot(upd_model, probe, forget, cfg)
    tokens = token_cka(ref_model, upd_model, probe, batch_size=cfg.batch_size) if cfg.token_cka else None
    return compare(ref, upd, cfg, tokens)
