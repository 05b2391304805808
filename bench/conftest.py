"""Benchmark helpers: every suite times with pytest-benchmark, in groups, tagged by role.

Roles (``benchmark.extra_info["role"]``): ``ours`` (a public function of this library),
``floor`` (the work it cannot avoid, e.g. its GEMMs), ``baseline`` (another implementation).
``python bench/ratios.py RESULTS.json`` turns a ``--benchmark-json`` file into the ratio table
of RESULTS.md: ours / floor and baseline / ours, each within one group of one run.

REPFORGET_BENCH_ROUNDS sets the rounds per benchmark (default 5; slow baselines use 3).
"""
from __future__ import annotations

import os

import pytest

ROUNDS = int(os.environ.get("REPFORGET_BENCH_ROUNDS", "5"))


@pytest.fixture
def timed(benchmark):
    """timed(fn, role, rounds=None): run fn under pytest-benchmark (one warm-up round) and tag its role."""

    def run(fn, role: str, rounds: int | None = None):
        if role not in ("ours", "floor", "baseline"):
            raise ValueError(f"role must be ours, floor or baseline, got {role!r}")
        benchmark.extra_info["role"] = role
        return benchmark.pedantic(fn, rounds=rounds or ROUNDS, iterations=1, warmup_rounds=1)

    return run
