"""Shared fixtures.

Environment knobs (repsim-style reruns of the whole suite):
  REPFORGET_TEST_DEVICE=cuda   run every metric test on CUDA tensors (default: cpu)
  REPFORGET_TEST_DTYPE=float64 run the float32 tests in float64 instead

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run (slowly) on CPU tensors and are tested like every other backend.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from repforget_kernels._dispatch import BACKENDS, backend_available  # noqa: E402

DEVICE = torch.device(os.environ.get("REPFORGET_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("REPFORGET_TEST_DTYPE", "float32"))

# float32 input vs float64 reference; bf16/fp16 input is compared with the reference on the
# same rounded values, so only the accumulation differs.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """Backends that can run on ``device`` in this environment (always includes torch)."""
    return [b for b in BACKENDS if backend_available(b, device)[0]]


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test; tensors are drawn on CPU then moved to DEVICE."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("REPFORGET_TEST_RANDOM") else 1234)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """Inside a spawned test worker: one thread, a gloo process group of ``world`` ranks on ``port``, destroyed on exit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free local TCP port, for the rendezvous of test process groups."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def randn(*shape, gen: torch.Generator, dtype=None, device=None) -> torch.Tensor:
    """Standard normal draws on CPU (reproducible), moved to the test device and dtype."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return t.to(device=device or DEVICE, dtype=dtype or DTYPE)


# --------------------------------------------------------------------------- driver: small benchmark and model

# The embedded benchmark and model at test size, built by the same code as the demo's.
SMALL_BENCHMARK = dict(entities=20, holdout_entities=4, utility_train=20, utility=4, unrelated=12)
SMALL_TINY = {"architecture": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64},
              "recipe": {"lr": 1e-2, "batch_size": 16, "epochs": 40, "warmup_steps": 50, "check_every": 4,
                         "goal": 0.98, "target": 0.9},
              "vocab_size": 512}


def small_benchmark() -> dict:
    """The embedded benchmark at test size: 20 entities (2 forget entities), 4 holdout, small utility sets."""
    from repforget_kernels.driver.benchmark import BenchmarkConfig, make_benchmark

    return make_benchmark(0, BenchmarkConfig(**SMALL_BENCHMARK))


def random_small_model():
    """(untrained small Qwen2, its tokenizer, the small benchmark): instant and seeded."""
    from transformers import Qwen2ForCausalLM

    from repforget_kernels.driver.pretrain import build_tokenizer, tiny_config

    corpus = small_benchmark()
    tok = build_tokenizer(corpus, SMALL_TINY["vocab_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_config(len(tok), SMALL_TINY["architecture"])).eval()
    return model, tok, corpus


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Cache directory of pretrained small models, kept across pytest sessions (REPFORGET_TEST_CACHE overrides).

    Models are keyed by corpus, seed, variant and recipe inside it, so each pretrains once.
    """
    env = os.environ.get("REPFORGET_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp().parent / "repforget-tiny-cache"


def load_small(cache: Path, variant: str = "original"):
    """(model, tokenizer, info) of a small pretrained variant (original, other_seed, retain_oracle, random_init)."""
    from repforget_kernels.driver.models import load_model

    return load_model("tiny", cache_dir=cache, corpus=small_benchmark(), variant=variant, progress=False,
                      tiny_options=SMALL_TINY)


@pytest.fixture(scope="session")
def tiny(tiny_cache):
    """(model, tokenizer, corpus): the small model pretrained on the small benchmark (forget and retain EM >= 0.9)."""
    model, tok, _ = load_small(tiny_cache)
    return model, tok, small_benchmark()
