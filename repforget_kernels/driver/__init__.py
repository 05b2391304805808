"""Reference driver: unlearn, relearn and diagnose causal LMs end to end.

Model side: ``data`` (synthetic corpus, JSONL, encoding), ``models`` (tiny Qwen2, local HF checkpoints,
layer discovery, memory plan), ``losses`` / ``train`` (GA, GA+GD, GA+KL, NPO, NPO+KL, RLabel,
relearning), ``evaluate`` (accuracy, perplexity, MIA AUC), ``distributed`` (process group, work split
across ranks, FSDP2 sharding). The analysis side (diagnostics, pipeline, report, plots, cli) builds on
these. Submodules are imported on use: ``from repforget_kernels.driver import models``.
"""
from __future__ import annotations

__all__ = ["data", "models", "losses", "train", "evaluate", "distributed"]
