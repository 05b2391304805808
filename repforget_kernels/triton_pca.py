"""Triton kernels for the pca ops (placeholder: registers nothing yet)."""
