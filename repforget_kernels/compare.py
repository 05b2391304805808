"""Compare two models layer by layer in one call: CKA (biased, debiased, token-level), PCA similarity and shift, Fisher.

:func:`compare_models` runs the reference and the updated model on the same batches (one forward
pass of each per batch, hooks on every decoder block, see ``activations``), then computes per layer,
from the pooled rows X_ref, X_upd (L, n, d):

- ``cka``: linear CKA ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) of the rows (``linear_cka``);
- ``cka_debiased``: the same with the unbiased HSIC estimator (n >= 4);
- ``cka_tokens``: linear CKA over every real token of the batches, streamed (``StreamingCKA``), exact;
- ``pca_similarity``: |cos| of the first principal directions, each PCA fitted on its own rows;
  ``pca_similarity_k``: mean cosine of the principal angles between the top-k subspaces (pca_k > 1);
- ``pca_shift``: (mean(X_upd) - mean(X_ref)) . v_i / sqrt(lambda_i) for the reference's top
  principal directions v_i and explained variances lambda_i (ddof = 1): shifts in reference
  standard deviations;
- with ``fisher_batches``: the empirical diagonal Fisher of each block's parameters,
  F_j = (1/N) sum_s (d/d theta_j log p(y_s | x_s))^2 (``DiagonalFisher``, per-sample squares), as
  per-layer mass (sum over the block), the mass ratio updated / reference, the Spearman rank
  correlation of the two Fisher vectors (on a deterministic strided subsample) and a log-spaced
  histogram of the updated model's values.

A layer where a metric is undefined (e.g. constant rows: token 0 of a causal LM) gets NaN there
(None in ``to_dict()``), not an error.

The reference side is reusable: :meth:`ReferenceStatistics.compute` takes the reference's pooled rows
and Fisher summaries once, and any number of updated models are then compared against it (the
batches must be the same; they are checked). Token-level CKA needs the reference's token rows on
the same batches, from one of three sources:

- a reference *model* (``compare_models(model, ...)`` or ``ReferenceStatistics.compute(..., tokens="model")``):
  it runs again on every batch of every comparison; memory: one batch of its token rows per layer;
  cost: one more forward pass per batch; the reference model must stay unchanged in memory;
- stored rows (``tokens="store"``): every real token row of every layer, L * n_tokens * d * 4
  bytes (8 for float64), refused above ``max_token_bytes``; no reference forward afterwards;
- none (``tokens=None``): no token-level CKA.

Length: one module because ReferenceStatistics and compare_models are two halves of one pass (the
statistics computed once are exactly what the comparison would compute) and share its checks and
Fisher summaries.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .activations import (
    LayerActivations,
    PairedStreamingCKA,
    ProcessShare,
    _check_batch,
    _check_max_rows,
    _check_sample,
    _eval_mode,
    _merged_rows,
    _run_pass,
    decoder_layers,
)
from .cka import linear_cka
from .diagonal_fisher import DiagonalFisher
from .fisher import FisherHistogram, fisher_histogram
from .pca import pca_shift, pca_similarity

__all__ = ["ReferenceStatistics", "ModelComparison", "compare_models", "spearman"]

LayerFinder = Callable[[nn.Module], Sequence[nn.Module]]
TOKEN_SOURCES = (None, "model", "store")


# --------------------------------------------------------------------------- helpers


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length 1-D tensors, ties given their average rank.

    Pearson correlation of the average ranks, in float64; NaN when either side is constant.
    Cost: two sorts of n entries.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dim() != 1:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (a, b)]
        raise ValueError(f"a and b must be 1-D tensors of the same length, got {shapes[0]} and {shapes[1]}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra.square().sum()) * float(rb.square().sum()))
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of v (n,), tied values sharing the mean of their ranks: (n,) float64."""
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # (u,) rank of each group's last member
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def _batch_key(batch: Mapping, index: int) -> list[int]:
    """[B, T, real tokens, position-weighted checksum of the real token ids]: tells two batch lists apart."""
    mask = _check_batch(batch, index).cpu() != 0  # (B, T)
    ids = batch["input_ids"].cpu().long()  # (B, T)
    weights = torch.arange(1, ids.shape[1] + 1)  # (T,)
    return [ids.shape[0], ids.shape[1], int(mask.sum()), int(((ids + 1) * mask * weights).sum())]


def _keys_tensor(keys: list) -> torch.Tensor:
    return torch.tensor(keys, dtype=torch.int64).reshape(-1, 4)  # (n_batches, 4)


def _check_key(have: torch.Tensor, batch: Mapping, index: int, what: str) -> None:
    """Raise unless ``batch`` is batch ``index`` of those the statistics were computed on (keys ``have``)."""
    if index >= have.shape[0]:
        raise ValueError(f"{what}: more batches than the {have.shape[0]} the reference statistics were computed on")
    if _batch_key(batch, index) != have[index].tolist():
        raise ValueError(f"{what}[{index}] differs from the batch the reference statistics were computed on "
                         "(shape, real tokens or token ids): compare on the same batches")


def _check_count(have: torch.Tensor, count: int, what: str) -> None:
    if count != have.shape[0]:
        raise ValueError(f"{what}: {count} batches given, the reference statistics were computed on {have.shape[0]}")


def _finite_or_none(values: torch.Tensor) -> list:
    """A tensor as nested lists of floats, NaN / Inf as None (JSON-ready)."""
    def clean(v):
        return [clean(u) for u in v] if isinstance(v, list) else (v if math.isfinite(v) else None)
    return clean(values.tolist())


def _nan(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """NaN of ``shape`` in the metrics' dtype for rows like ``like`` (float64 for float64, else float32)."""
    return torch.full(shape, math.nan, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def _per_layer(fn: Callable, x: torch.Tensor, y: torch.Tensor, shape: tuple = ()) -> torch.Tensor:
    """fn over the stacked layers (L, n, d) at once -> (L, *shape) on the CPU; where that raises ValueError (a
    layer without variance, too few rows), layer by layer with NaN for the layers that fail."""
    try:
        return fn(x, y).cpu()
    except ValueError:
        out = []
        for xi, yi in zip(x.unbind(0), y.unbind(0)):
            try:
                out.append(fn(xi, yi).cpu())
            except ValueError:
                out.append(_nan(shape, xi))
        return torch.stack(out)


# --------------------------------------------------------------------------- Fisher summaries


def _block_param_names(model: nn.Module, layers: Sequence[nn.Module]) -> list[list[str]]:
    """For each block, the names (as in model.named_parameters(), tied weights once) of its parameters."""
    owner = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            owner[id(p)] = i
    names = [[] for _ in layers]
    for name, p in model.named_parameters():
        if id(p) in owner:
            names[owner[id(p)]].append(name)
    return names


def _fisher_summary(model: nn.Module, layers: Sequence[nn.Module], batches: list, samples: int,
                    share: ProcessShare) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Empirical diagonal Fisher of the blocks' parameters on ``batches``, summarised per layer.

    Returns (mass (L,) float64 = sum of F over each block's parameters, list of L (m_l,) float32 strided
    subsamples of the block's F values in parameter order, m_l <= ``samples``), on the CPU. Under several
    processes each one's Fisher (times its sequence count) is summed. Cost: one forward and one
    backward per batch (``DiagonalFisher``, per-sample squares); memory: one float32 copy of the blocks'
    parameters (the summaries are taken one parameter at a time).
    """
    names = _block_param_names(model, layers)
    wanted = [n for layer in names for n in layer]
    params = dict(model.named_parameters())
    fisher = DiagonalFisher(model, params=wanted, labels="data", per_sample=True)
    for index, batch in enumerate(batches):
        _check_batch(batch, index)
        if share.runs(index):
            fisher.update(batch)
    seen = fisher.n_sequences  # F's divisor: sequences with a counted target token, not batch rows
    owner = {n: i for i, layer in enumerate(names) for n in layer}
    steps = [max(1, math.ceil(sum(params[n].numel() for n in layer) / samples)) for layer in names]
    offsets = [0] * len(names)
    mass = torch.zeros(len(names), dtype=torch.float64)  # (L,)
    subs = [[] for _ in names]
    for n, value in _merged_fisher(fisher, seen, wanted, params, share):
        i, flat = owner[n], value.flatten()
        mass[i] += float(flat.sum(dtype=torch.float64))
        subs[i].append(flat[(-offsets[i]) % steps[i]::steps[i]].float().cpu())  # every steps[i]-th value of the block
        offsets[i] += flat.numel()
    return mass, [torch.cat(s) for s in subs]


def _merged_fisher(fisher: DiagonalFisher, seen: int, names: list, params: dict,
                   share: ProcessShare) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, F) per parameter in ``names`` order: this process's Fisher (zeros without batches), or over
    several processes the processes' Fisher means weighted by their sequence counts ``seen`` (each
    process's ``n_sequences``), i.e. the per-sequence mean over every process's counted sequences."""
    local = fisher.iter_compute() if seen else ((n, torch.zeros_like(params[n], dtype=torch.float32)) for n in names)
    total = seen if share.processes == 1 else float(share.sum(torch.tensor(float(seen), dtype=torch.float64)))
    if not total:
        raise ValueError("fisher_batches is empty or has no counted target token (labels all -100): "
                         "the Fisher needs at least one sequence")
    if share.processes == 1:
        yield from local
        return
    for n, value in local:
        yield n, (share.sum(value.to(torch.float64) * seen) / total).float()


# --------------------------------------------------------------------------- reference statistics


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _TokenStore:
    """A ``stream`` that keeps every token row of every layer per batch, up to ``limit`` bytes in all."""

    def __init__(self, limit: int, device: torch.device):
        self.limit, self.device, self.bytes = limit, device, 0
        self.batches: list[Optional[list[torch.Tensor]]] = []

    def start(self, runs: bool) -> None:
        self.batches.append([] if runs else None)

    def __call__(self, layer: int, rows: torch.Tensor) -> None:
        self.bytes += rows.numel() * rows.element_size()
        if self.bytes > self.limit:
            raise ValueError(f"storing the reference's token rows needs more than max_token_bytes={self.limit}: "
                             "raise max_token_bytes, or use tokens='model' (the reference runs again per "
                             "comparison) or tokens=None (no token-level CKA)")
        self.batches[-1].append(rows.to(self.device))


@dataclass(eq=False)
class ReferenceStatistics:
    """What a reference model contributes to every comparison, computed once (:meth:`compute`).

    Fields (on ``device``, CPU by default):
        rows: (L, n, d) float32 pooled rows of every decoder block on the batches (float64 for a float64 model).
        sample: the row definition (``mean`` | ``last`` | ``first`` | ``tokens``); max_rows: the cap used.
        batch_keys: (n_batches, 4) int64 fingerprints of the batches (shape, real tokens, id checksum).
        fisher_mass: (L,) float64 per-block Fisher mass, or None; fisher_values: L (m_l,) float32 strided
            subsamples of each block's Fisher values; fisher_samples: m_l's bound; fisher_keys as batch_keys.
        token_rows: per batch, the L token-row tensors (n_real, d) (None for batches another process
            runs), when stored (``tokens="store"``), else None.
        model: the reference model when it is to be run again for token-level CKA (``tokens="model"``).
    """

    rows: torch.Tensor
    sample: str
    max_rows: Optional[int]
    batch_keys: torch.Tensor
    fisher_mass: Optional[torch.Tensor] = None
    fisher_values: Optional[list] = None
    fisher_samples: int = 100_000
    fisher_keys: Optional[torch.Tensor] = None
    token_rows: Optional[list] = None
    model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.rows.shape[0]

    @classmethod
    def compute(cls, model: nn.Module, batches: Iterable[Mapping], *, sample: str = "mean",
                max_rows: Optional[int] = None, fisher_batches: Optional[Iterable[Mapping]] = None,
                fisher_samples: int = 100_000, tokens: Optional[str] = None, max_token_bytes: int = 256 << 20,
                find_layers: Optional[LayerFinder] = None, device: torch.device | str = "cpu",
                share: Optional[ProcessShare] = None) -> "ReferenceStatistics":
        """Statistics of ``model`` on ``batches`` (and ``fisher_batches``), for :func:`compare_models`.

        Args:
            model: the reference (any HF causal LM, or an nn.Module with ``find_layers``), run in eval
                mode under no_grad (training flags restored).
            batches: iterable of tokenizer-style dicts (``input_ids``, ``attention_mask``); compare on the same.
            sample: row definition (see :class:`~repforget_kernels.LayerActivations`); max_rows: keep at
                most this many rows per layer (None: all).
            fisher_batches: batches with the tokens to score (``labels`` optional, -100 ignored) for the
                Fisher summaries; None: no Fisher.
            fisher_samples: entries per layer kept for the rank correlation and histogram.
            tokens: source of the reference's token rows for token-level CKA: ``"model"`` (keep ``model``
                and run it again per comparison), ``"store"`` (keep every token row, at most
                ``max_token_bytes`` bytes) or None.
            find_layers: model -> its blocks (default :func:`~repforget_kernels.decoder_layers`).
            device: where rows are kept.
            share: how processes split the batches (:class:`~repforget_kernels.ProcessShare`).

        Cost: one forward pass per batch, plus one forward and backward per Fisher batch.
        """
        _check_sample(sample)
        _check_max_rows(max_rows)
        _check_positive_int("fisher_samples", fisher_samples)
        _check_choice("tokens", tokens, TOKEN_SOURCES)
        _check_positive_int("max_token_bytes", max_token_bytes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        share = share or ProcessShare()
        layers = list((find_layers or decoder_layers)(model))
        device = torch.device(device)
        store = _TokenStore(max_token_bytes, device) if tokens == "store" else None
        acts = LayerActivations(model, layers=layers, sample=sample, max_rows=max_rows, device=device,
                                stream=store if sample == "tokens" else None)
        collectors = [acts]
        if store is not None and sample != "tokens":
            collectors.append(LayerActivations(model, layers=layers, sample="tokens", keep=False, stream=store))
        keys = []

        def before(index: int, batch: Mapping) -> None:
            keys.append(_batch_key(batch, index))
            if store is not None:
                store.start(share.runs(index))

        with torch.no_grad(), _eval_mode(model):
            rows_per_batch = _run_pass(batches, share, sample, max_rows, [(model, collectors)], before)
        stats = cls(rows=_merged_rows(acts, model, rows_per_batch, share), sample=sample, max_rows=max_rows,
                    batch_keys=_keys_tensor(keys), fisher_samples=fisher_samples,
                    token_rows=store.batches if store is not None else None,
                    model=model if tokens == "model" else None)
        if fisher_batches is not None:
            fisher_batches = list(fisher_batches)
            stats.fisher_mass, stats.fisher_values = _fisher_summary(model, layers, fisher_batches, fisher_samples, share)
            stats.fisher_keys = _keys_tensor([_batch_key(b, i) for i, b in enumerate(fisher_batches)])
        return stats

    def state_dict(self) -> dict:
        """Every field but ``model``, as tensors, lists and plain values (``torch.save`` / ``weights_only`` load)."""
        return {"rows": self.rows, "sample": self.sample, "max_rows": self.max_rows, "batch_keys": self.batch_keys,
                "fisher_mass": self.fisher_mass, "fisher_values": self.fisher_values,
                "fisher_samples": self.fisher_samples, "fisher_keys": self.fisher_keys, "token_rows": self.token_rows}

    @classmethod
    def from_state_dict(cls, state: Mapping, *, model: Optional[nn.Module] = None) -> "ReferenceStatistics":
        """Statistics from :meth:`state_dict`; ``model``: the reference to run again for token-level CKA."""
        missing = [k for k in ("rows", "sample", "max_rows", "batch_keys") if k not in state]
        if missing:
            raise ValueError(f"state is not a ReferenceStatistics.state_dict(): it lacks {missing}")
        return cls(**dict(state), model=model)


# --------------------------------------------------------------------------- the comparison


@dataclass(eq=False)
class ModelComparison:
    """Per-layer comparison of an updated model with a reference (:func:`compare_models`); tensors on the CPU.

    cka, cka_debiased, pca_similarity: (L,) float32 (float64 for float64 rows); NaN where undefined.
    cka_tokens: (L,) token-level CKA over every real token, or None when not computed.
    pca_similarity_k: (L,) top-``pca_k`` subspace similarity, or None for pca_k = 1.
    pca_shift: (L, k) normalised shift along the reference's top-k principal directions.
    fisher_mass, fisher_mass_ref: (L,) float64 per-block Fisher mass (updated, reference);
    fisher_mass_ratio: (L,) their ratio (NaN where the reference's is 0); fisher_rank_corr: (L,)
    float64 Spearman correlation of the two Fisher subsamples; fisher_histogram: log-spaced
    :class:`~repforget_kernels.fisher.FisherHistogram` of the updated model's subsample (None when
    every value is 0). All Fisher fields None without Fisher batches.
    rows_reference, rows_updated: the (L, n, d) pooled rows the pooled metrics were computed on (for
    resampling them, e.g. bootstrap intervals); not part of ``to_dict()``.
    """

    sample: str
    cka: torch.Tensor
    cka_debiased: torch.Tensor
    pca_similarity: torch.Tensor
    pca_shift: torch.Tensor
    cka_tokens: Optional[torch.Tensor] = None
    pca_similarity_k: Optional[torch.Tensor] = None
    pca_k: int = 1
    fisher_mass: Optional[torch.Tensor] = None
    fisher_mass_ref: Optional[torch.Tensor] = None
    fisher_mass_ratio: Optional[torch.Tensor] = None
    fisher_rank_corr: Optional[torch.Tensor] = None
    fisher_histogram: Optional[FisherHistogram] = None
    rows_reference: Optional[torch.Tensor] = field(default=None, repr=False)
    rows_updated: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.cka.shape[0]

    def to_dict(self) -> dict:
        """JSON-ready numbers, undefined ones (NaN) as None::

            {"layers": [{"layer", "cka", "cka_pooled", "cka_debiased", "cka_tokens", "pca_similarity",
                         "pca_similarity_k" (pca_k > 1 only), "pca_shift" [k values], "fisher_mass",
                         "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"}, ...],
             "fisher": {"mass", "mass_ref", "mass_ratio" (totals over the blocks),
                        "histogram": {"counts", "edges", "n_zero"} or None} or None}

        ``cka`` is the headline CKA: token-level for ``sample="tokens"`` (None when not computed),
        else the pooled rows' (``cka_pooled``, always the CKA of the kept rows).
        """
        none = [None] * self.n_layers
        cols = {"cka_pooled": _finite_or_none(self.cka), "cka_debiased": _finite_or_none(self.cka_debiased),
                "cka_tokens": _finite_or_none(self.cka_tokens) if self.cka_tokens is not None else none,
                "pca_similarity": _finite_or_none(self.pca_similarity), "pca_shift": _finite_or_none(self.pca_shift)}
        if self.pca_similarity_k is not None:
            cols["pca_similarity_k"] = _finite_or_none(self.pca_similarity_k)
        for key in ("fisher_mass", "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"):
            value = getattr(self, key)
            cols[key] = _finite_or_none(value) if value is not None else none
        layers = []
        for i in range(self.n_layers):
            row = {"layer": i, "cka": cols["cka_tokens"][i] if self.sample == "tokens" else cols["cka_pooled"][i]}
            for key in ("cka_pooled", "cka_debiased", "cka_tokens", "pca_similarity", "pca_similarity_k", "pca_shift",
                        "fisher_mass", "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"):
                if key in cols:
                    row[key] = cols[key][i]
            if all(v is None for v in row["pca_shift"]):
                row["pca_shift"] = None
            layers.append(row)
        return {"layers": layers, "fisher": self._fisher_totals()}

    def _fisher_totals(self) -> Optional[dict]:
        if self.fisher_mass is None:
            return None
        total, total_ref = float(self.fisher_mass.sum()), float(self.fisher_mass_ref.sum())
        h = self.fisher_histogram
        hist = None if h is None else {"counts": h.counts.tolist(), "edges": h.edges.tolist(), "n_zero": h.n_zero}
        ratio = total / total_ref if total_ref > 0 else math.nan
        return {"mass": total, "mass_ref": total_ref, "mass_ratio": ratio if math.isfinite(ratio) else None,
                "histogram": hist}


def _layer_metrics(x: torch.Tensor, y: torch.Tensor, pca_k: int, shift_k: int) -> dict:
    """CKA (biased, debiased), PCA similarity (k = 1 and pca_k) and normalised PCA shift of rows (L, n, d) each."""
    n, d = x.shape[1], x.shape[2]
    out = {"cka": _per_layer(linear_cka, x, y)}
    if n >= 4:
        out["cka_debiased"] = _per_layer(lambda a, b: linear_cka(a, b, debiased=True), x, y)
    else:
        out["cka_debiased"] = torch.full((x.shape[0],), math.nan)
    out["pca_similarity"] = _per_layer(lambda a, b: pca_similarity(a, b, k=1), x, y)
    k = max(1, min(pca_k, n, d))
    out["pca_similarity_k"] = _per_layer(lambda a, b: pca_similarity(a, b, k=k), x, y) if pca_k > 1 else None
    sk = max(1, min(shift_k, n, d))
    out["pca_shift"] = _per_layer(lambda a, b: pca_shift(a, b, k=sk, normalize=True), x, y, shape=(sk,))
    return out


def _fisher_fields(ref_mass, ref_values, upd_mass, upd_values, bins: int) -> dict:
    ratio = torch.where(ref_mass > 0, upd_mass / ref_mass, torch.full_like(ref_mass, math.nan))  # (L,)
    corr = torch.tensor([spearman(a, b) for a, b in zip(ref_values, upd_values)], dtype=torch.float64)  # (L,)
    values = torch.cat(upd_values)  # (sum m_l,)
    hist = fisher_histogram(values, bins=bins, log=True) if bool((values > 0).any()) else None
    return {"fisher_mass": upd_mass, "fisher_mass_ref": ref_mass, "fisher_mass_ratio": ratio,
            "fisher_rank_corr": corr, "fisher_histogram": hist}


def _same_setting(name: str, given, have):
    """``have`` (the statistics' setting) unless ``given`` asks for something else."""
    if given is not None and given != have:
        raise ValueError(f"{name}={given!r} differs from the reference statistics' {name}={have!r}")
    return have


def _reduced_token_cka(paired: PairedStreamingCKA, share: ProcessShare, like: torch.Tensor) -> torch.Tensor:
    """(L,) token-level CKA, merged over the processes; NaN (in the dtype of rows ``like``) for a layer with too few rows."""
    out = []
    for acc in paired.accumulators:
        if share.processes > 1:
            share.reduce_cka(acc)
        try:
            out.append(acc.compute().cpu())
        except ValueError:
            out.append(_nan((), like))
    return torch.stack(out)


def compare_models(reference, updated: nn.Module, batches: Iterable[Mapping], *,
                   fisher_batches: Optional[Iterable[Mapping]] = None, sample: Optional[str] = None,
                   max_rows: Optional[int] = None, token_cka: Optional[bool] = None, pca_k: int = 1,
                   shift_k: int = 2, fisher_samples: Optional[int] = None, hist_bins: int = 48,
                   find_layers: Optional[LayerFinder] = None, device: torch.device | str = "cpu",
                   share: Optional[ProcessShare] = None) -> ModelComparison:
    """Per-layer structure of ``updated`` against ``reference`` on the same batches: see the module docstring.

    Args:
        reference: the reference model (nn.Module), or its :class:`ReferenceStatistics` computed once
            on the same ``batches`` (and ``fisher_batches``).
        updated: the model to compare (same number of decoder blocks and width).
        batches: iterable of tokenizer-style dicts (``input_ids``, ``attention_mask`` (B, T), left or right
            padding; other keys passed to forward, ``labels`` ignored); iterated once.
        fisher_batches: batches scored for the Fisher comparison (``labels`` optional); None: no Fisher.
        sample: row definition (default ``mean``; with statistics: theirs). max_rows: rows kept per layer.
        token_cka: token-level CKA over every real token; None: when the reference can provide token rows
            (a model, or statistics with ``tokens`` set); True without a source raises ValueError.
        pca_k: also the top-k subspace similarity when > 1 (k clipped to min(n, d)).
        shift_k: reference principal directions of the PCA shift (clipped to min(n, d)).
        fisher_samples: Fisher entries per layer for the rank correlation (default 100000; with statistics: theirs).
        hist_bins: bins of the Fisher histogram.
        find_layers: model -> its blocks (default :func:`~repforget_kernels.decoder_layers`).
        device: where rows are kept and the metrics computed (default CPU).
        share: how processes split the batches (:class:`~repforget_kernels.ProcessShare`).

    Returns:
        :class:`ModelComparison` (``to_dict()`` for JSON).

    Cost: one forward pass of each model per batch (statistics with stored or no token rows: of
    ``updated`` only), one forward + backward of each per Fisher batch (of ``updated`` only with
    statistics), then O(L n d (d + k)) for the metrics. Memory: the (L, n, d) rows of both models,
    one batch of token rows per layer, L StreamingCKA states (8 * 3 d^2 bytes each).
    """
    if not isinstance(updated, nn.Module):
        raise TypeError(f"updated must be a torch.nn.Module, got {type(updated).__name__}")
    for name, value in (("pca_k", pca_k), ("shift_k", shift_k), ("hist_bins", hist_bins)):
        _check_positive_int(name, value)
    share = share or ProcessShare()
    find = find_layers or decoder_layers
    upd_layers = list(find(updated))
    if isinstance(reference, ReferenceStatistics):
        stats, ref_model = reference, reference.model
        sample = _same_setting("sample", sample, stats.sample)
        max_rows = _same_setting("max_rows", max_rows, stats.max_rows)
        fisher_samples = _same_setting("fisher_samples", fisher_samples, stats.fisher_samples)
        n_ref = stats.n_layers
        has_tokens = ref_model is not None or stats.token_rows is not None
        if fisher_batches is not None and stats.fisher_mass is None:
            raise ValueError("fisher_batches given but the reference statistics hold no Fisher summary: compute "
                             "them with fisher_batches")
    elif isinstance(reference, nn.Module):
        stats, ref_model = None, reference
        sample = "mean" if sample is None else sample
        fisher_samples = 100_000 if fisher_samples is None else fisher_samples
        n_ref, has_tokens = len(find(reference)), True
    else:
        raise TypeError(f"reference must be a torch.nn.Module or ReferenceStatistics, got {type(reference).__name__}")
    _check_sample(sample)
    _check_max_rows(max_rows)
    _check_positive_int("fisher_samples", fisher_samples)
    if n_ref != len(upd_layers):
        raise ValueError(f"reference has {n_ref} decoder blocks, updated has {len(upd_layers)}")
    token_cka = has_tokens if token_cka is None else bool(token_cka)
    if token_cka and not has_tokens:
        raise ValueError("token_cka=True but the reference statistics hold no token rows and no model: compute them "
                         "with tokens='store' or tokens='model'")
    device = torch.device(device)
    paired = PairedStreamingCKA(len(upd_layers)) if token_cka else None

    def collectors(model: nn.Module, stream, keep: bool) -> list[LayerActivations]:
        """The pooled-row collector (if ``keep``) and the token stream (if any) of one model, sharing one hook
        when both are token rows."""
        layers = upd_layers if model is updated else list(find(model))
        out = []
        if keep:
            out.append(LayerActivations(model, layers=layers, sample=sample, max_rows=max_rows, device=device,
                                        stream=stream if sample == "tokens" else None))
        if stream is not None and (sample != "tokens" or not keep):
            out.append(LayerActivations(model, layers=layers, sample="tokens", keep=False, stream=stream))
        return out

    runs = []
    if stats is None:
        ref_collectors = collectors(reference, paired.reference if token_cka else None, keep=True)
        runs.append((reference, ref_collectors))
    elif token_cka and ref_model is not None:
        runs.append((ref_model, collectors(ref_model, paired.reference, keep=False)))
    upd_collectors = collectors(updated, paired.updated if token_cka else None, keep=True)
    runs.append((updated, upd_collectors))

    def before(index: int, batch: Mapping) -> None:
        if stats is None:
            return
        _check_key(stats.batch_keys, batch, index, "batches")
        if token_cka and ref_model is None and share.runs(index):
            if stats.token_rows[index] is None:
                raise ValueError(f"batches[{index}]: the reference statistics hold no token rows for it (another "
                                 "process ran it when they were computed)")
            for layer, rows in enumerate(stats.token_rows[index]):
                paired.reference(layer, rows)

    ref_mode = _eval_mode(ref_model) if ref_model is not None else contextlib.nullcontext()
    with torch.no_grad(), _eval_mode(updated), ref_mode:
        rows_per_batch = _run_pass(batches, share, sample, max_rows, runs, before)
    if stats is not None:
        _check_count(stats.batch_keys, len(rows_per_batch), "batches")
        x = stats.rows
    else:
        x = _merged_rows(ref_collectors[0], reference, rows_per_batch, share)
    y = _merged_rows(upd_collectors[0], updated, rows_per_batch, share)
    if x.shape != y.shape:
        raise ValueError(f"reference rows {tuple(x.shape)} and updated rows {tuple(y.shape)} differ in shape: "
                         "the two models' blocks must have one width")
    result = _layer_metrics(x.to(y.device), y, pca_k, shift_k)
    result["cka_tokens"] = _reduced_token_cka(paired, share, y) if token_cka else None
    if fisher_batches is not None:
        fisher_batches = list(fisher_batches)
        if stats is not None:
            for i, batch in enumerate(fisher_batches):
                _check_key(stats.fisher_keys, batch, i, "fisher_batches")
            _check_count(stats.fisher_keys, len(fisher_batches), "fisher_batches")
            ref_mass, ref_values = stats.fisher_mass, stats.fisher_values
        else:
            ref_mass, ref_values = _fisher_summary(reference, list(find(reference)), fisher_batches, fisher_samples, share)
        upd_mass, upd_values = _fisher_summary(updated, upd_layers, fisher_batches, fisher_samples, share)
        result.update(_fisher_fields(ref_mass, ref_values, upd_mass, upd_values, hist_bins))
    return ModelComparison(sample=sample, pca_k=pca_k, rows_reference=x, rows_updated=y, **result)
