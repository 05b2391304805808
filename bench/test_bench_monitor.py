"""RepresentationMonitor overhead: a training loop of the tiny model on CPU with and without the monitor.

Run: OMP_NUM_THREADS=1 python -m pytest bench/test_bench_monitor.py --benchmark-json=monitor.json
     && python bench/ratios.py monitor.json
Group "training loop": the floor is 200 AdamW steps of the driver's tiny Qwen2 (4 blocks, hidden 128,
vocabulary 512) on batches of 8 x 32 tokens; ours is the same loop calling ``monitor.step(model,
step)`` after every step with ``every=50`` (4 measurements, each on 32 probe sequences: one forward
pass per probe batch plus CKA, debiased CKA, PCA similarity and shift of (4, 32, 128) rows).
Target: ours <= 1.05x the floor. The reference statistics are taken once before the loop (like
building the monitor before training) and are not timed. Group "one measurement": ``monitor.measure``
against the 50 training steps between two measurements; ours / floor is the overhead directly
(target <= 0.05), over two short timings that drift less with the load of a shared machine than
the two long loops. One intra-op thread: the tiny model's matrices gain nothing from more and lose
to contention on a shared machine.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2ForCausalLM

from repforget_kernels import RepresentationMonitor
from repforget_kernels.driver.models import tiny_config

STEPS, EVERY, VOCAB, BATCH, SEQ, PROBE = 200, 50, 512, 8, 32, 32
GROUP = f"training loop: tiny Qwen2, {STEPS} AdamW steps of {BATCH}x{SEQ} tokens, monitor every {EVERY}"
GROUP_ONE = f"one measurement ({PROBE} probe sequences) vs the {EVERY} training steps between two"


def _batches(n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)  # (B, T)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(VOCAB))
    train, probe = _batches(16, seed=1), _batches(PROBE // BATCH, seed=2)
    monitor = RepresentationMonitor(model, probe, every=EVERY)
    return model, train, monitor


def _train(start, train: list, monitor=None, steps: int = STEPS) -> None:
    model = copy.deepcopy(start).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        loss = model(**train[step % len(train)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if monitor is not None:
            monitor.step(model, step)


def test_training_loop(timed, benchmark, setup):
    model, train, _ = setup
    benchmark.group = GROUP
    timed(lambda: _train(model, train), "floor")


def test_training_loop_with_monitor(timed, benchmark, setup):
    model, train, monitor = setup
    benchmark.group = GROUP
    timed(lambda: _train(model, train, monitor), "ours")


def test_steps_between_measurements(timed, benchmark, setup):
    model, train, _ = setup
    benchmark.group = GROUP_ONE
    timed(lambda: _train(model, train, steps=EVERY), "floor")


def test_one_measurement(timed, benchmark, setup):
    model, _, monitor = setup
    trained = copy.deepcopy(model).train()
    benchmark.group = GROUP_ONE
    timed(lambda: monitor.measure(trained), "ours")
