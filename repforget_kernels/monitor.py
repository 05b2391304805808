"""Representation monitoring inside a training loop: the training model against a fixed reference, every N steps.

:class:`RepresentationMonitor` computes the reference's statistics once (pooled rows on fixed probe
batches, optionally Fisher summaries and stored token rows; see ``compare``), then ``step(model,
step)`` measures the training model against them on every ``every``-th step and returns a flat dict
of floats ready for any logger::

    monitor = RepresentationMonitor(base_model, probe_batches, every=200)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        scalars = monitor.step(model, step)      # None on the other steps
        if scalars:
            logger.log(scalars, step=step)       # {"repr/cka/layer_0": 0.98, ..., "repr/cka/mean": 0.95, ...}

A measurement runs the training model once per probe batch in eval mode under no_grad (plus one
forward and backward per Fisher batch when ``fisher_batches`` is given) and computes the metrics
on (L, n, d) rows; it restores every module's training flag, leaves gradients untouched and runs
inside ``torch.random.fork_rng``, so the training loop's random stream (dropout, shuffling) is the
one it would have been without the monitor.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from .activations import ProcessShare
from .compare import LayerFinder, ModelComparison, ReferenceStatistics, compare_models

__all__ = ["RepresentationMonitor", "comparison_scalars"]


def comparison_scalars(result: ModelComparison, prefix: str = "repr") -> dict[str, float]:
    """A comparison as flat scalars: ``{prefix}/{metric}/layer_{i}`` and ``{prefix}/{metric}/mean`` (over the
    layers where defined; NaN where undefined).

    Metrics: ``cka``, ``cka_debiased``, ``pca_similarity``, ``pca_shift_pc{j}`` (normalised shift along the
    reference's j-th principal direction), and when measured ``cka_tokens``, ``pca_similarity_k``,
    ``fisher_mass_ratio``, ``fisher_rank_corr``.
    """
    columns = {"cka": result.cka, "cka_debiased": result.cka_debiased, "cka_tokens": result.cka_tokens,
               "pca_similarity": result.pca_similarity, "pca_similarity_k": result.pca_similarity_k}
    for j in range(result.pca_shift.shape[1]):
        columns[f"pca_shift_pc{j + 1}"] = result.pca_shift[:, j]
    columns.update(fisher_mass_ratio=result.fisher_mass_ratio, fisher_rank_corr=result.fisher_rank_corr)
    out = {}
    for name, values in columns.items():
        if values is None:
            continue
        for i, v in enumerate(values.tolist()):
            out[f"{prefix}/{name}/layer_{i}"] = float(v)
        out[f"{prefix}/{name}/mean"] = float(values.double().nanmean()) if not bool(values.isnan().all()) else math.nan
    return out


def _rng_devices(model: nn.Module) -> list[int]:
    """CUDA device indices holding the model's parameters (whose RNG fork_rng must save)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


class RepresentationMonitor:
    """The training model's layer-wise structure against a reference, measured every ``every`` steps.

    Args:
        reference: the reference model (its statistics are computed here, once, before training
            changes anything: pass the base model before fine-tuning it, even when it is the very
            object being trained), or a :class:`~repforget_kernels.ReferenceStatistics` computed on
            ``probe_batches``.
        probe_batches: fixed probe batches (tokenizer-style dicts), kept as a list; small is fine
            (e.g. 64 sequences): every measurement runs the model on all of them.
        every: measure on steps that are multiples of ``every`` (``step % every == 0``).
        sample, max_rows, pca_k, shift_k, fisher_samples, find_layers, device, share: as for
            :func:`~repforget_kernels.compare_models`.
        token_cka: also token-level CKA, from the reference's token rows stored once
            (L * n_tokens * d * 4 bytes, refused above ``max_token_bytes``).
        fisher_batches: batches for the Fisher comparison (a backward pass per batch and measurement).
        prefix: first part of every key.

    ``step(model, step)`` returns the scalars of :func:`comparison_scalars` on measured steps and None
    otherwise; :meth:`measure` measures now; ``last`` holds the latest :class:`~repforget_kernels.ModelComparison`.
    """

    def __init__(self, reference, probe_batches: Iterable[Mapping], *, every: int = 50, sample: str = "mean",
                 token_cka: bool = False, pca_k: int = 1, shift_k: int = 2,
                 fisher_batches: Optional[Iterable[Mapping]] = None, fisher_samples: int = 100_000,
                 max_rows: Optional[int] = None, max_token_bytes: int = 256 << 20,
                 find_layers: Optional[LayerFinder] = None, device: torch.device | str = "cpu",
                 prefix: str = "repr", share: Optional[ProcessShare] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.batches = list(probe_batches)
        if not self.batches:
            raise ValueError("probe_batches is empty")
        self.fisher_batches = list(fisher_batches) if fisher_batches is not None else None
        self.every, self.prefix, self.token_cka = every, prefix, bool(token_cka)
        self.options = dict(pca_k=pca_k, shift_k=shift_k, find_layers=find_layers, device=device, share=share)
        if isinstance(reference, ReferenceStatistics):
            self.reference = reference
        elif isinstance(reference, nn.Module):
            self.reference = ReferenceStatistics.compute(
                reference, self.batches, sample=sample, max_rows=max_rows, fisher_batches=self.fisher_batches,
                fisher_samples=fisher_samples, tokens="store" if self.token_cka else None,
                max_token_bytes=max_token_bytes, find_layers=find_layers, device=device, share=share)
        else:
            raise TypeError(f"reference must be a torch.nn.Module or ReferenceStatistics, got {type(reference).__name__}")
        self.last: Optional[ModelComparison] = None

    def step(self, model: nn.Module, step: int) -> Optional[dict[str, float]]:
        """The scalars of ``model`` on a measured step (``step % every == 0``), else None."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step % self.every:
            return None
        return self.measure(model)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Compare ``model`` with the reference now: :func:`comparison_scalars` of the comparison."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        with torch.random.fork_rng(devices=_rng_devices(model)):
            self.last = compare_models(self.reference, model, self.batches, fisher_batches=self.fisher_batches,
                                       token_cka=self.token_cka, **self.options)
        return comparison_scalars(self.last, self.prefix)
