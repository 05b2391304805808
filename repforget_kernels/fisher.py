"""Diagonal Fisher information (placeholder until the fisher module lands)."""
__all__ = ["DiagonalFisher", "fisher_accumulate_", "fisher_histogram", "per_sample_linear_fisher"]


def _todo(*_a, **_k):
    raise NotImplementedError("fisher module not written yet")


DiagonalFisher = fisher_accumulate_ = fisher_histogram = per_sample_linear_fisher = _todo
