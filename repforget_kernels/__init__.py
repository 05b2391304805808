"""repforget-kernels: fast, exact representation diagnostics for LLM unlearning research.

Linear CKA (biased, debiased, batched, all layer pairs, streaming), randomized PCA with
PCA similarity and shift, and diagonal Fisher information, behind one backend dispatcher
(torch composite, C++ on CPU, Triton / CUDA on GPU). See DESIGN.md for the definitions.
"""
from .cka import StreamingCKA, cka_matrix, linear_cka
from .fisher import (
    DiagonalFisher,
    fisher_accumulate_,
    fisher_histogram,
    per_sample_linear_fisher,
)
from .pca import PCAResult, pca_shift, pca_similarity, randomized_pca
from .pooling import pool_tokens

__version__ = "0.1.0"

__all__ = [
    "linear_cka",
    "cka_matrix",
    "StreamingCKA",
    "randomized_pca",
    "PCAResult",
    "pca_similarity",
    "pca_shift",
    "fisher_accumulate_",
    "per_sample_linear_fisher",
    "DiagonalFisher",
    "fisher_histogram",
    "pool_tokens",
]
