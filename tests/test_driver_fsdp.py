"""Sharded training (FSDP2) on two gloo processes on CPU: the same parameters and losses as one process.

Each worker shards a copy of the same untrained tiny Qwen2 with ``distributed.shard_model`` and runs
every unlearning method and relearning on it; the one-process runs start from the same copy. SGD
makes the comparison tight (a step is the gradient itself); one AdamW run checks the optimizer on
sharded states. Forget batches of 5 over 6 rows leave rank 1 without rows in every second step.
"""
from __future__ import annotations

import copy
import functools
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from repforget_kernels.driver import distributed as Dist
from repforget_kernels.driver import train as T
from repforget_kernels.driver.methods import METHOD_NAMES as METHODS

from conftest import free_port, gloo_group, random_small_model
from test_driver_diagnostics import random_models

# (name, method or "relearn", optimizer, lr, frozen KL copy instead of the log-softmax cache)
CASES = [(m, m, "sgd", 0.5, False) for m in METHODS] + [
    ("npo_kl_frozen_copy", "npo_kl", "sgd", 0.5, True),
    ("relearn", "relearn", "sgd", 0.5, False),
    ("npo_adamw", "npo", "adamw", 1e-3, False),
]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """The small benchmark's tokenizer (the one random_models encodes with)."""
    return random_small_model()[1]


def _train(model, enc, method, optimizer, lr, frozen_copy):
    cache = T.KL_CACHE_BYTES
    T.KL_CACHE_BYTES = 0 if frozen_copy else cache  # 0: GA+KL / NPO+KL keep a frozen copy instead of a cache
    try:
        cfg = T.TrainConfig(lr=lr, epochs=2, batch_size=5, progress=False, optimizer=optimizer)
        forget = {k: v[:8] for k, v in enc["forget"].items()}  # 8 rows: batches of 5 and 3, two per epoch
        if method == "relearn":
            return T.relearn(model, forget, cfg)
        return T.unlearn(model, method, forget, enc["retain"], cfg, tokenizer=_tokenizer())  # idkdpo's refusals
    finally:
        T.KL_CACHE_BYTES = cache


def _spawn(worker, path, *args):
    mp.spawn(worker, args=(2, free_port(), str(path), *args), nprocs=2, join=True)
    return [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]


def _train_worker(rank, world, port, path):
    with gloo_group(rank, world, port):
        ref, _, enc = random_models()
        out = {}
        for name, method, optimizer, lr, frozen in CASES:
            model = Dist.shard_model(copy.deepcopy(ref))
            result = _train(model, enc, method, optimizer, lr, frozen)
            out[name] = {"result": result, "state": Dist.full_state_dict(model)}
        torch.save(out, f"{path}.{rank}")


def _copy_worker(rank, world, port, path):
    """Round trips of a sharded model (gathered copy, full state dict, loading one), bf16 with float32 masters
    (also trained), adafactor refused, and main_rank_first's order and failure."""
    with gloo_group(rank, world, port):
        ref, upd, enc = random_models()
        model = Dist.shard_model(copy.deepcopy(ref))
        plain = Dist.plain_copy(model)
        out = {"plain": plain.state_dict(), "plain_tied": plain.lm_head.weight is plain.model.embed_tokens.weight,
               "state": Dist.full_state_dict(model), "sharded": Dist.is_sharded(model),
               "plain_sharded": Dist.is_sharded(plain)}
        Dist.load_full_state_dict(model, upd.state_dict() if rank == 0 else {})  # rank 0's copy is scattered
        out["loaded"] = Dist.plain_copy(model).state_dict()
        half = Dist.shard_model(copy.deepcopy(ref).to(torch.bfloat16))
        out["half_master_dtypes"] = {p.dtype for p in half.parameters()}
        out["half_plain"] = Dist.plain_copy(half).state_dict()
        batch = {k: v[:2] for k, v in enc["probe"].items()}
        out["half_logits_dtype"] = half(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.dtype
        try:
            _train(half, enc, "ga", "adafactor", 1e-3, False)
        except ValueError as exc:
            out["adafactor_error"] = str(exc)
        _train(half, enc, "relearn", "sgd", 0.05, False)  # bf16 compute, float32 master updates
        out["half_trained"] = Dist.full_state_dict(half)
        marker = Path(f"{path}.first")
        with Dist.main_rank_first():  # rank 0 alone first (it writes the marker), then the others
            out["first"] = (Dist.world(), marker.exists())
            if rank == 0:
                time.sleep(0.3)
                marker.write_text("rank 0 was here")
        try:
            with Dist.main_rank_first():
                if rank == 0:
                    raise KeyError("rank 0 fails")
                out["ran_after_failure"] = True
        except (KeyError, RuntimeError) as exc:
            out["failure"] = type(exc).__name__
        torch.save(out, f"{path}.{rank}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(one-process results, the two ranks' results) for every case."""
    torch.set_num_threads(1)
    ref, _, enc = random_models()
    one = {}
    for name, method, optimizer, lr, frozen in CASES:
        model = copy.deepcopy(ref)
        one[name] = {"result": _train(model, enc, method, optimizer, lr, frozen), "state": model.state_dict(),
                     "moved": max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                                           ref.state_dict().values()))}
    T.KL_CACHE_BYTES = 256 * 2**20
    return one, _spawn(_train_worker, tmp_path_factory.mktemp("fsdp") / "rank")


class TestShardedTraining:
    @pytest.mark.parametrize("name", [c[0] for c in CASES])
    def test_same_parameters_and_loss_as_one_process(self, trained, name):
        one, (rank0, rank1) = trained
        want, got = one[name], rank0[name]
        assert want["moved"] > 1e-3  # the runs move the weights: the comparison is not of untouched models
        assert got["result"]["steps"] == want["result"]["steps"] == 4
        assert got["result"]["final_loss"] == pytest.approx(want["result"]["final_loss"], rel=1e-5, abs=1e-6)
        assert rank1[name]["result"] == got["result"]  # the loss is summed over ranks: both report the same
        assert rank1[name]["state"] == {}  # only rank 0 gathers the checkpoint
        assert got["state"].keys() == want["state"].keys()
        # float32 rounding of a different reduction order: ~1e-7 after SGD steps that move weights by 0.1-0.2;
        # Adam's normalised steps amplify it where gradients are near zero (~2e-6 after steps of 1e-3)
        atol = 1e-5 if name.endswith("adamw") else 1e-6
        for key, value in want["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=0, atol=atol, msg=key)

    def test_rank_share_splits_rows_and_marks_an_empty_rank(self, monkeypatch):
        batch = {"input_ids": torch.arange(10).view(5, 2), "ref_logp": torch.arange(5.0), "tag": "x"}
        shares = []
        for rank in range(3):
            monkeypatch.setattr(Dist, "world", lambda rank=rank: (rank, 3))
            shares.append(Dist.rank_share(batch))
        assert [s["input_ids"][:, 0].tolist() for s, _ in shares] == [[0, 2], [4, 6], [8]]
        assert [s["ref_logp"].tolist() for s, _ in shares] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
        assert all(real and s["tag"] == "x" for s, real in shares)
        one_row = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
        monkeypatch.setattr(Dist, "world", lambda: (2, 3))
        share, real = Dist.rank_share(one_row)
        assert not real and share["input_ids"].shape == (1, 2)  # row 0 stands in, with its loss scaled by 0


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return _spawn(_copy_worker, tmp_path_factory.mktemp("copies") / "rank")


class TestCopies:
    def test_gathered_copy_and_checkpoint_equal_the_model(self, copies):
        ref, upd, _ = random_models()
        want = ref.state_dict()
        for rank, got in enumerate(copies):
            assert got["sharded"] and not got["plain_sharded"] and got["plain_tied"]
            for key, value in want.items():
                torch.testing.assert_close(got["plain"][key], value, rtol=0, atol=0)
                torch.testing.assert_close(got["loaded"][key], upd.state_dict()[key], rtol=0, atol=0)
            if rank == 0:
                assert got["state"].keys() == want.keys()
                for key, value in want.items():
                    torch.testing.assert_close(got["state"][key], value, rtol=0, atol=0)
            else:
                assert got["state"] == {}

    def test_bf16_model_trains_on_float32_masters(self, copies):
        ref, _, _ = random_models()
        half = ref.to(torch.bfloat16).state_dict()
        for got in copies:
            assert got["half_master_dtypes"] == {torch.float32}
            assert got["half_logits_dtype"] == torch.bfloat16  # compute stays in the loaded dtype
            for key, value in half.items():  # bf16 -> float32 -> bf16 is exact
                torch.testing.assert_close(got["half_plain"][key], value, rtol=0, atol=0)

    def test_adafactor_is_refused_on_sharded_parameters(self, copies):
        assert all("adafactor" in got["adafactor_error"] for got in copies)

    def test_bf16_compute_trains_like_float32(self, copies):
        """bf16 compute on float32 masters moves the weights like a float32 run, up to bf16 rounding of the
        compute (0.3-0.6% of the update here), while bf16 weights drop the updates under half an ulp (10-16%,
        over ten times as much)."""
        ref, _, enc = random_models()
        start = ref.to(torch.bfloat16)
        runs = {"float32": copy.deepcopy(start).float(), "bf16 weights": copy.deepcopy(start)}
        for model in runs.values():
            _train(model, enc, "relearn", "sgd", 0.05, False)
        keys = [k for k, v in start.state_dict().items() if v.is_floating_point()]

        def delta(state):  # the update of every weight, flattened, in float32
            return torch.cat([(state[k].float() - start.state_dict()[k].float()).flatten() for k in keys])

        want = delta(runs["float32"].state_dict())
        error = {name: float((delta(state) - want).norm() / want.norm())
                 for name, state in (("masters", copies[0]["half_trained"]),
                                     ("bf16 weights", runs["bf16 weights"].state_dict()))}
        assert error["masters"] < 0.05 and error["bf16 weights"] > 10 * error["masters"], error

    def test_main_rank_first_runs_rank_zero_alone_before_the_others(self, copies):
        assert copies[0]["first"] == ((0, 1), False)  # alone: no rank, no collective sees the others
        assert copies[1]["first"] == ((0, 1), True)  # entered after rank 0 had left

    def test_main_rank_first_stops_the_others_when_rank_zero_fails(self, copies):
        assert copies[0]["failure"] == "KeyError"  # rank 0's own error
        assert copies[1]["failure"] == "RuntimeError" and "ran_after_failure" not in copies[1]


class TestSettingsFromEnvironment:
    def test_defaults_are_float32_masters_and_full_shard(self):
        s = Dist.FSDPSettings.from_env({})
        assert s.master_dtype == torch.float32 and s.reshard_after_forward

    @pytest.mark.parametrize("env, master, reshard", [
        ({"ACCELERATE_MIXED_PRECISION": "no"}, None, True),
        ({"ACCELERATE_MIXED_PRECISION": "bf16", "FSDP_RESHARD_AFTER_FORWARD": "false"}, torch.float32, False),
        ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, torch.float32, False),
        ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_RESHARD_AFTER_FORWARD": "true"}, torch.float32, True),
    ])
    def test_accelerate_variables(self, env, master, reshard):
        s = Dist.FSDPSettings.from_env(env)
        assert s.master_dtype == master and s.reshard_after_forward == reshard

    @pytest.mark.parametrize("env, match", [
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "ACCELERATE_MIXED_PRECISION='fp16'"),
        ({"FSDP_RESHARD_AFTER_FORWARD": "HYBRID_SHARD"}, "FSDP_RESHARD_AFTER_FORWARD='HYBRID_SHARD'"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading: false"),
    ])
    def test_unsupported_values_name_the_variable(self, env, match):
        with pytest.raises(ValueError, match=match):
            Dist.FSDPSettings.from_env(env)

    def test_sharding_needs_several_ranks(self):
        ref, _, _ = random_models()
        with pytest.raises(ValueError, match="more than one rank"):
            Dist.shard_model(ref)
