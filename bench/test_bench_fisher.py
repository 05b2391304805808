"""Diagonal Fisher: per-sample linear Fisher, DiagonalFisher and fisher_accumulate_ against baselines.

Run: OMP_NUM_THREADS=2 pytest bench/test_bench_fisher.py --benchmark-json=fisher.json && python bench/ratios.py fisher.json
Groups (ratios only within a group of one run):
- per_sample_linear_fisher B=32 T=128 1024x1024: ours (every CPU backend) vs the einsum that
  materialises the B per-sample gradients, vs torch.func vmap(grad) of the layer's loss, and
  the floor (one GEMM with the same multiply-adds: the batch gradient). Targets: >= 1.3x the
  einsum, >= 2x vmap(grad).
- DiagonalFisher small Llama (4 layers, hidden 256, vocab 4096, B=16, T=64): ours (one forward,
  one backward) vs a loop of per-sequence backward passes, and the floor (one forward and one
  backward of the batch with parameter gradients). Target: >= 5x the loop. Both do the same
  multiply-adds (the per-sample GEMMs replace the weight-gradient GEMMs), so on CPU the gain
  is only batched-GEMM efficiency and Python overhead: 1.6x (1 thread) to 2x (2 threads) here.
- fisher_accumulate_ 16M bf16 grads: ours vs ``fisher += grad.float()**2``.
Peak memory of per_sample_linear_fisher beyond its inputs (result included) is measured with
the torch profiler's CPU allocation records and asserted under 2 float32 weight matrices.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from repforget_kernels import DiagonalFisher, fisher_accumulate_, per_sample_linear_fisher
from repforget_kernels._dispatch import backend_available
from repforget_kernels.diagonal_fisher import _sequence_log_likelihood, _targets

CPU = torch.device("cpu")
BACKENDS = [b for b in ("torch", "cpp") if backend_available(b, CPU)[0]]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- per_sample_linear_fisher

B, T, D_IN, D_OUT = 32, 128, 1024, 1024
W_BYTES = D_IN * D_OUT * 4


@pytest.fixture(scope="module")
def layer():
    x = torch.randn(B, T, D_IN, generator=_gen(1))  # (B, T, in)
    g = torch.randn(B, T, D_OUT, generator=_gen(2))  # (B, T, out)
    return x, g


def _einsum(x, g):
    """Materialises the B per-sample gradients (B, out, in), then squares and sums them."""
    return torch.einsum("bto,bti->boi", g, x).square().sum(0)


def _vmap_grad(x, g):
    """torch.func per-sample gradients of the layer's loss <F.linear(x_s, w), g_s>, squared and summed."""
    w = torch.zeros(D_OUT, D_IN)

    def loss(w_, x_s, g_s):
        return (torch.nn.functional.linear(x_s, w_) * g_s).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, g).square().sum(0)


def _batch_gradient(x, g):
    """The floor: one GEMM with the same multiply-adds (the batch gradient, no per-sample squares)."""
    return g.reshape(-1, D_OUT).T @ x.reshape(-1, D_IN)


class TestPerSampleLinearFisher:
    GROUP = f"per_sample_linear_fisher B={B} T={T} {D_OUT}x{D_IN} fp32"

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_ours(self, timed, benchmark, layer, backend):
        benchmark.group = self.GROUP
        timed(lambda: per_sample_linear_fisher(*layer, backend=backend), "ours")

    def test_einsum(self, timed, benchmark, layer):
        benchmark.group = self.GROUP
        timed(lambda: _einsum(*layer), "baseline", rounds=3)

    def test_vmap_grad(self, timed, benchmark, layer):
        benchmark.group = self.GROUP
        timed(lambda: _vmap_grad(*layer), "baseline", rounds=3)

    def test_floor(self, timed, benchmark, layer):
        benchmark.group = self.GROUP
        timed(lambda: _batch_gradient(*layer), "floor")


def _peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations (profiler records, in start order) during fn().

    Allocations freed inside the op that made them are netted out, so this can understate an
    op's internal scratch; our composite's scratch lives across ops and is seen.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = top = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        top = max(top, cur)
    return top


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_linear_fisher_peak_memory(benchmark, layer, backend):
    """Peak memory beyond the inputs, result included, in float32 weight matrices (target < 2)."""
    benchmark.group = "per_sample_linear_fisher peak memory (weight matrices)"
    peak = _peak_bytes(lambda: per_sample_linear_fisher(*layer, backend=backend))
    benchmark.extra_info["role"] = "ours"
    benchmark.extra_info["peak_weight_matrices"] = peak / W_BYTES
    benchmark.extra_info["einsum_peak_weight_matrices"] = _peak_bytes(lambda: _einsum(*layer)) / W_BYTES
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert peak < 2 * W_BYTES, f"peak {peak / W_BYTES:.2f} weight matrices"


# --------------------------------------------------------------------------- DiagonalFisher

LB, LT = 16, 64


@pytest.fixture(scope="module")
def llama():
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=LT,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (LB, LT), generator=_gen(3))  # (B, T)
    am = torch.ones(LB, LT, dtype=torch.long)
    am[: LB // 4, : LT // 8] = 0  # a quarter of the rows left-padded
    return model, {"input_ids": ids, "attention_mask": am}


def _loop_of_backwards(model, batch):
    """The baseline: one forward and one backward per sequence, squares accumulated."""
    params = list(model.parameters())
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    ids, am = batch["input_ids"], batch["attention_mask"]
    targets = _targets(ids, am, None)  # (B, T-1)
    for s in range(ids.shape[0]):
        logits = model(input_ids=ids[s : s + 1], attention_mask=am[s : s + 1], use_cache=False).logits
        ll = _sequence_log_likelihood(logits, targets[s : s + 1]).sum()
        grads = torch.autograd.grad(ll, params)
        torch._foreach_addcmul_(acc, list(grads), list(grads))
    return acc


def _batch_backward(model, batch):
    """The floor: one forward and one backward of the batch (parameter gradients), no per-sample work."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    ll = _sequence_log_likelihood(logits, _targets(ids, am, None)).sum()
    return torch.autograd.grad(ll, list(model.parameters()))


class TestDiagonalFisher:
    GROUP = f"DiagonalFisher llama 4x256 B={LB} T={LT}"

    def test_floor(self, timed, benchmark, llama):
        benchmark.group = self.GROUP
        timed(lambda: _batch_backward(*llama), "floor", rounds=3)

    def test_ours(self, timed, benchmark, llama):
        benchmark.group = self.GROUP
        model, batch = llama
        timed(lambda: DiagonalFisher(model).update(batch), "ours", rounds=3)

    def test_loop_of_backwards(self, timed, benchmark, llama):
        benchmark.group = self.GROUP
        timed(lambda: _loop_of_backwards(*llama), "baseline", rounds=3)


# --------------------------------------------------------------------------- fisher_accumulate_


@pytest.fixture(scope="module")
def bf16_grads():
    g = [torch.randn(4 * 1024 * 1024, generator=_gen(i)).to(torch.bfloat16) for i in range(4)]  # 4 x (4M,)
    return g, [torch.zeros(t.shape, dtype=torch.float32) for t in g]


class TestFisherAccumulate:
    GROUP = "fisher_accumulate_ 16M bf16 -> fp32"

    def test_ours(self, timed, benchmark, bf16_grads):
        benchmark.group = self.GROUP
        grads, accs = bf16_grads
        timed(lambda: fisher_accumulate_(accs, grads), "ours")

    def test_plain(self, timed, benchmark, bf16_grads):
        benchmark.group = self.GROUP
        grads, accs = bf16_grads

        def plain():
            for a, g in zip(accs, grads):
                a += g.float() ** 2

        timed(plain, "baseline")
