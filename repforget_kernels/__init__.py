"""repforget-kernels: fast, exact representation diagnostics for LLM unlearning research.

Linear CKA (biased, debiased, batched, all layer pairs, streaming), randomized PCA with
PCA similarity and shift, and diagonal Fisher information, behind one backend dispatcher
(torch composite, C++ on CPU, Triton / CUDA on GPU); and the surface between a model and those
kernels: per-layer activations of any causal LM (``LayerActivations``, ``collect_activations``),
one call to compare two models (``compare_models``) and monitoring while training
(``RepresentationMonitor``; ``repforget_kernels.integrations.transformers`` for the Trainer).
See docs/design.md for the definitions and docs/api.md for every name.
"""
from .activations import (
    LayerActivations,
    PairedStreamingCKA,
    ProcessShare,
    RunningMoments,
    collect_activations,
    decoder_layers,
)
from .cka import StreamingCKA, cka_matrix, linear_cka
from .compare import ModelComparison, ReferenceStatistics, compare_models
from .diagonal_fisher import DiagonalFisher
from .fisher import (
    FisherHistogram,
    fisher_accumulate_,
    fisher_histogram,
    per_sample_linear_fisher,
)
from .monitor import RepresentationMonitor, comparison_scalars
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
    "FisherHistogram",
    "pool_tokens",
    "decoder_layers",
    "LayerActivations",
    "collect_activations",
    "PairedStreamingCKA",
    "RunningMoments",
    "ProcessShare",
    "ReferenceStatistics",
    "ModelComparison",
    "compare_models",
    "RepresentationMonitor",
    "comparison_scalars",
]
