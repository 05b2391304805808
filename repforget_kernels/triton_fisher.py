"""Triton kernels for the fisher ops (placeholder: registers nothing yet)."""
