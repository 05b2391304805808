"""The driver's diagnostics settings and how its processes share them; the work is the library's ``compare_models``.

``repforget analyze`` and the pipeline diagnose a model against the original with
``repforget_kernels.compare_models`` (per layer: CKA biased / debiased / token-level, PCA similarity
and normalised shift, Fisher mass, mass ratio, rank correlation, histogram) on the probe set, and
the Fisher on the forget set; this module turns a :class:`DiagnosticsConfig` and the encoded splits
into its arguments (:func:`statistics_options`, :func:`comparison_options`).

Under ``torch.distributed`` (``torchrun`` / ``accelerate launch``), :class:`RankShare` splits every
pass: batch i runs on rank i mod world (``distributed.rank_batches``' rule), pooled rows are gathered
back in probe order (``distributed.gather_batch_rows``: the very rows of one process), StreamingCKA
states merged with ``all_reduce`` and Fisher sums added across ranks, so every rank ends with the
one-process numbers (up to float rounding of the reduction order). The models are plain
(unsharded): the pipeline diagnoses a sharded trainee through a gathered replica.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from repforget_kernels import ProcessShare

from .data import iterate_batches
from .distributed import all_sum, gather_batch_rows, world

__all__ = ["DiagnosticsConfig", "RankShare", "statistics_options", "comparison_options"]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Settings of one diagnostics pass.

    sample: rows for pooled CKA / PCA (``mean`` | ``last`` | ``first`` | ``tokens``).
    pca_k: subspace size of the extra PCA similarity, the mean cosine of the top-k principal angles (k = 1, the
        first principal directions' |cos|, is always reported; pca_k = 1 adds nothing).
    shift_k: number of reference principal directions for the PCA shift (default 2).
    batch_size: probe / forget batch size of the diagnostic forward (and Fisher backward) passes.
    token_cka: also compute token-level CKA (needs the reference model in memory).
    fisher: compute the Fisher diagnostics (one backward pass per forget sequence batch).
    fisher_samples: entries per layer kept for the rank correlation and histograms (strided subsample).
    fisher_items: sequences of each probe set the pipeline's Fisher is taken on (the first ones).
    hist_bins: bins of the log-spaced Fisher histograms.
    max_token_rows: rows per layer kept for PCA when ``sample == "tokens"``.
    """

    sample: str = "mean"
    pca_k: int = 4
    shift_k: int = 2
    batch_size: int = 16
    token_cka: bool = True
    fisher: bool = True
    fisher_samples: int = 100_000
    fisher_items: int = 32
    hist_bins: int = 48
    max_token_rows: int = 4096


class RankShare(ProcessShare):
    """The process group's split of a pass: batch i on rank i mod world, rows gathered in batch order,
    StreamingCKA states all-reduced, sums all-reduced (one process: the library's default)."""

    @property
    def processes(self) -> int:
        return world()[1]

    def runs(self, index: int) -> bool:
        rank, size = world()
        return index % size == rank

    def gather_rows(self, local: torch.Tensor, rows_per_batch: list) -> torch.Tensor:
        return gather_batch_rows(local.cpu(), rows_per_batch)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_sum(value)

    def reduce_cka(self, accumulator) -> None:
        accumulator.all_reduce()


def statistics_options(cfg: DiagnosticsConfig, probe: dict, forget: Optional[dict]) -> dict:
    """Keyword arguments of ``ReferenceStatistics.compute`` (and ``compare_models``) for one diagnostics pass:
    the probe batches, the forget batches for the Fisher (when ``cfg.fisher`` and given), the row settings
    and the process group's :class:`RankShare`."""
    fisher = cfg.fisher and forget is not None
    return {"batches": list(iterate_batches(probe, cfg.batch_size)),
            "fisher_batches": list(iterate_batches(forget, cfg.batch_size)) if fisher else None,
            "sample": cfg.sample, "max_rows": cfg.max_token_rows if cfg.sample == "tokens" else None,
            "fisher_samples": cfg.fisher_samples, "share": RankShare()}


def comparison_options(cfg: DiagnosticsConfig, probe: dict, forget: Optional[dict]) -> dict:
    """Keyword arguments of ``compare_models`` for one diagnostics pass (:func:`statistics_options` plus the
    metric settings)."""
    return dict(statistics_options(cfg, probe, forget), token_cka=cfg.token_cka, pca_k=cfg.pca_k,
                shift_k=cfg.shift_k, hist_bins=cfg.hist_bins)
