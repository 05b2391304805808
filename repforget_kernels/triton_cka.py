"""Triton kernels for the cka ops (placeholder: registers nothing yet)."""
