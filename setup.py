"""Build and package repforget-kernels.

The compiled extension ``repforget_kernels._C`` holds the C++ CPU kernels of
``csrc/cpu/*.cpp`` (OpenMP, registered as ``torch.ops.repforget.*``). When the
installed torch has CUDA (``torch.version.cuda`` set) and a CUDA toolkit is found
(``CUDA_HOME``), the same extension also compiles ``csrc/cuda/*.cu`` (plain CUDA,
no torch headers) and ``csrc/cuda/*.cpp`` (their torch binding) with
``-DREPFORGET_WITH_CUDA``; otherwise, or when csrc/cuda holds no sources, it is
CPU only.

Install into an environment that already has torch (the build imports it):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

``REPFORGET_NO_EXTENSION=1`` skips the extension (pure Python install; the torch
composites serve every op).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    """Sorted source paths relative to the project root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _openmp_flags() -> list[str]:
    """-fopenmp where the compiler is GCC/Clang on Linux; at::parallel_for is serial without it."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the C++ (and, when possible, CUDA) extension."""
    if os.environ.get("REPFORGET_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - the README installs torch first
        raise RuntimeError(
            "building repforget_kernels._C needs torch installed first: "
            "`pip install torch` then `pip install --no-build-isolation -e .` "
            "(or set REPFORGET_NO_EXTENSION=1 for a pure-Python install)"
        ) from exc

    cpu_sources = _sources("csrc/cpu/*.cpp")
    if not cpu_sources:
        return [], {}
    omp = _openmp_flags()
    cxx_flags = ["-O3", *omp]
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("csrc/cuda/*.cu"))
    if with_cuda:
        ext = CUDAExtension(
            name="repforget_kernels._C",
            sources=cpu_sources + cuda_sources,
            define_macros=[("REPFORGET_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": [
                    "-O3",
                    "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90,code=sm_90",
                ],
            },
            extra_link_args=omp,
        )
    else:
        ext = CppExtension(
            name="repforget_kernels._C",
            sources=cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="repforget-kernels",
    version="0.1.0",
    description=(
        "Fast, exact representation diagnostics (linear CKA, randomized PCA, diagonal Fisher) "
        "for LLM unlearning research, with C++/CUDA/Triton kernels and a reference unlearning driver"
    ),
    packages=find_packages(include=["repforget_kernels", "repforget_kernels.*"]),
    package_data={"repforget_kernels.driver": ["*.yaml", "*.yml", "*.json", "**/*.yaml", "**/*.yml", "**/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    # torch unpinned above the floor: the README installs the wanted build first, and
    # --no-build-isolation keeps pip from pulling another one.
    install_requires=["numpy", "torch>=2.4"],
    extras_require={
        # scipy (KS test), rouge-score, datasets (parquet / save_to_disk splits), pyyaml (--config), peft (--lora-rank):
        # the benchmark interop of docs/interop.md
        "driver": ["transformers", "tokenizers", "tqdm", "matplotlib", "scipy", "rouge-score", "datasets", "pyyaml",
                   "peft"],
        # hypothesis: the property sweep; triton: its kernels are tested under TRITON_INTERPRET=1; accelerate: the
        # shipped FSDP launch config is tested; mpmath (also a torch dependency, through sympy): the 50-digit
        # check of the refined float64 PCA reference
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton", "accelerate", "mpmath"],
        "bench": ["pytest-benchmark", "pytorch-cka", "ckatorch"],
        # only the launcher for `accelerate launch` (multi-GPU driver runs); never imported
        "multigpu": ["accelerate"],
    },
    entry_points={"console_scripts": ["repforget = repforget_kernels.driver.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)
