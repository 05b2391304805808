"""Driver models: the embedded tokenizer and model (pretraining, variants, cache), local/preset resolution,
layer discovery, memory plan."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from repforget_kernels.driver import pretrain as pretrain_mod
from repforget_kernels.driver.benchmark import make_benchmark
from repforget_kernels.driver.models import (
    ModelNotFound,
    decoder_layers,
    load_model,
    memory_plan,
    resolve_model_path,
)
from repforget_kernels.driver.pretrain import PRETRAIN, TINY, VARIANTS, build_tokenizer, tiny_config

from conftest import SMALL_TINY, load_small, small_benchmark

# Real shapes from the checkpoints' config.json files, written by hand (no download).
YI_6B = dict(vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                 tie_word_embeddings=False)


def _small(cls_config, cls_model, **extra):
    cfg = cls_config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32, **extra)
    torch.manual_seed(0)
    return cls_model(cfg)


def _fake_snapshot(root, repo, name="abc123", ref=True):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / name
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(name)
    return snap


class TestTokenizer:
    def test_specials_and_subwords(self):
        corpus = make_benchmark(0)
        tok = build_tokenizer(corpus)
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, None) and 1000 < len(tok) <= 2048
        name = corpus["forget"][0]["entity"]
        assert tok.decode(tok(f"Who taught {name}?", add_special_tokens=False)["input_ids"]) == f"Who taught {name}?"
        assert len(tok(" Zzqx Vvxk", add_special_tokens=False)["input_ids"]) > 2  # unseen words: subwords, no <unk>

    def test_deterministic(self):
        corpus = small_benchmark()
        assert build_tokenizer(corpus, 512).get_vocab() == build_tokenizer(small_benchmark(), 512).get_vocab()

    def test_bad_corpus(self):
        with pytest.raises(ValueError, match="corpus"):
            build_tokenizer({})


class TestTinyModel:
    def test_config(self):
        cfg = tiny_config(2048)
        assert cfg.model_type == "qwen2" and cfg.vocab_size == 2048 and cfg.num_hidden_layers >= 6
        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
        assert 2_000_000 <= n <= 5_000_000  # "a few million parameters"
        with pytest.raises(ValueError, match="vocab_size"):
            tiny_config(1)

    def test_pretraining_reaches_target(self, tiny, tiny_cache):
        model, _, info = load_small(tiny_cache)
        assert info["pretrain"]["em"]["forget"] >= SMALL_TINY["recipe"]["target"]
        assert info["pretrain"]["em"]["retain"] >= SMALL_TINY["recipe"]["target"]
        assert set(info["pretrain"]["em"]) >= {"forget_paraphrase", "utility", "holdout"}
        assert info["name"] == "tiny" and info["layers"] == len(decoder_layers(model))
        assert info["params"] == sum(p.numel() for p in model.parameters())
        assert not model.training

    def test_cached_load_is_identical_and_does_not_train(self, tiny, tiny_cache, monkeypatch):
        model, tokenizer, _ = tiny

        def no_training(*args, **kwargs):
            raise AssertionError("a cached model must not be pretrained again")

        monkeypatch.setattr(pretrain_mod, "pretrain", no_training)
        again, tok2, info2 = load_small(tiny_cache)
        assert info2["cached"] is True
        assert tok2.get_vocab() == tokenizer.get_vocab()
        for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
        assert not [p.name for p in tiny_cache.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    def test_copied_cache_directory_gives_the_same_numbers(self, tiny, tiny_cache, tmp_path):
        """A saved model directory round-trips: same tokenizer pipeline, same evaluation numbers."""
        import shutil

        from repforget_kernels.driver.data import encode
        from repforget_kernels.driver.evaluate import evaluate

        model, tokenizer, corpus = tiny
        _, _, info = load_small(tiny_cache)
        copy_dir = shutil.copytree(info["path"], tmp_path / "copy")
        loaded, tok2, _ = load_model(str(copy_dir), cache_dir=tmp_path / "unused", progress=False)
        text = corpus["forget"][0]["prompt"] + " " + corpus["forget"][0]["answer"]
        assert tok2.tokenize(text) == tokenizer.tokenize(text)
        splits = {k: encode(tokenizer, corpus[k]) for k in ("forget", "retain")}
        splits2 = {k: encode(tok2, corpus[k]) for k in ("forget", "retain")}
        for k in splits:
            assert torch.equal(splits[k]["input_ids"], splits2[k]["input_ids"])
        assert evaluate(loaded, splits2, tokenizer=tok2) == evaluate(model, splits, tokenizer=tokenizer)

    def test_variants(self, tiny_cache):
        """The nulls are cached variants of the same code: another seed, no forget entities, no training."""
        random_init, _, info = load_small(tiny_cache, "random_init")
        assert info["variant"] == "random_init" and info["pretrain"] == {}
        oracle, _, oracle_info = load_small(tiny_cache, "retain_oracle")
        assert oracle_info["pretrain"]["em"]["retain"] >= 0.9  # learned retain ...
        assert oracle_info["pretrain"]["em"]["forget"] <= 0.3  # ... never saw the forget entities
        assert set(VARIANTS) == {"original", "other_seed", "retain_oracle", "random_init"}
        with pytest.raises(ValueError, match="variant must be one of"):
            load_small(tiny_cache, "pruned")

    def test_corpus_without_training_splits(self, tmp_path):
        with pytest.raises(ValueError, match="non-empty splits"):
            load_model("tiny", cache_dir=tmp_path, corpus={"forget": [], "retain": []}, progress=False)

    def test_recipe_is_in_the_cache_key(self):
        corpus = small_benchmark()
        keys = {pretrain_mod._key(corpus, "original", 0, TINY, dict(PRETRAIN, lr=lr), 2048) for lr in (1e-3, 2e-3)}
        assert len(keys) == 2


class TestResolve:
    @pytest.mark.parametrize("preset, repo", [("yi-6b", "01-ai/Yi-6B"), ("qwen2.5-7b", "Qwen/Qwen2.5-7B")])
    def test_missing_preset_names_repo_and_directory(self, tmp_path, monkeypatch, preset, repo):
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        with pytest.raises(ModelNotFound, match=rf"{repo}.*{tmp_path}"):
            resolve_model_path(preset)

    def test_preset_found_in_hub_cache(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        _fake_snapshot(tmp_path, "01-ai/Yi-6B", "old", ref=False)
        snap = _fake_snapshot(tmp_path, "Qwen/Qwen2.5-7B")
        assert resolve_model_path("qwen2.5-7b") == snap
        assert resolve_model_path("yi-6b").name == "old"

    def test_preset_found_under_hf_home(self, tmp_path, monkeypatch):
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        snap = _fake_snapshot(tmp_path / "hub", "01-ai/Yi-6B")
        assert resolve_model_path("Yi-6B") == snap

    def test_bad_directories(self, tmp_path):
        with pytest.raises(ModelNotFound, match="model directory not found"):
            resolve_model_path(str(tmp_path / "nothing"))
        with pytest.raises(ModelNotFound, match="no config.json"):
            resolve_model_path(str(tmp_path))
        assert issubclass(ModelNotFound, FileNotFoundError)

    def test_load_local_directory(self, tmp_path):
        model = _small(Qwen2Config, Qwen2ForCausalLM)
        model.save_pretrained(tmp_path)
        build_tokenizer(small_benchmark(), 512).save_pretrained(tmp_path)
        loaded, tok, info = load_model(str(tmp_path), cache_dir=tmp_path / "unused")
        assert info["layers"] == 3 and info["dtype"] == "float32" and info["pretrain"] == {}
        assert getattr(loaded, "is_activation_checkpointing", None) or loaded.is_gradient_checkpointing
        assert not loaded.training
        assert tok.pad_token_id is not None
        for a, b in zip(model.parameters(), loaded.parameters()):
            assert torch.equal(a, b)


class TestDecoderLayers:
    @pytest.mark.parametrize("cls_config, cls_model", [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)])
    def test_llama_and_qwen2(self, cls_config, cls_model):
        model = _small(cls_config, cls_model)
        layers = decoder_layers(model)
        assert len(layers) == 3 and all(a is b for a, b in zip(layers, model.model.layers))

    @pytest.mark.parametrize("shape, cls_config, cls_model", [(YI_6B, LlamaConfig, LlamaForCausalLM),
                                                            (QWEN25_7B, Qwen2Config, Qwen2ForCausalLM)])
    def test_real_shapes_on_meta_device(self, shape, cls_config, cls_model):
        cfg = cls_config(**shape)
        with torch.device("meta"):
            model = cls_model(cfg)
        layers = decoder_layers(model)
        assert len(layers) == shape["num_hidden_layers"]
        assert all(a is b for a, b in zip(layers, model.model.layers))
        assert memory_plan(cfg)["params"] == sum(p.numel() for p in model.parameters())

    def test_generic_names_and_distractors(self):
        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ff = torch.nn.Linear(4, 4)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.config = type("Cfg", (), {"num_hidden_layers": 12})()
                self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
                self.mixed = torch.nn.ModuleList([Block() if i % 2 else torch.nn.Linear(4, 4) for i in range(12)])
                self.trunk = torch.nn.Sequential(torch.nn.Identity())
                self.trunk.blocks = torch.nn.ModuleList([Block() for _ in range(12)])

        net = Net()
        assert all(a is b for a, b in zip(decoder_layers(net), net.trunk.blocks))
        net.config.num_hidden_layers = 5
        with pytest.raises(ValueError, match="no ModuleList of 5"):
            decoder_layers(net)


class TestMemoryPlan:
    def test_seven_b_numbers(self):
        cfg = Qwen2Config(**QWEN25_7B)
        plan = memory_plan(cfg)
        p = plan["params"]
        assert 7.5e9 < p < 7.7e9  # Qwen2.5-7B: 7.62B parameters
        b, d = plan["bytes"], plan["diagnostics_bytes"]
        assert b["weights"] == b["gradients"] == b["kl_reference"] == b["reference"] == 2 * p
        assert b["optimizer"] == 4 * p and d["weights"] == d["reference"] == 2 * p
        assert d["token_cka"] == 8 * 3 * 3584**2 * 28  # 8.6 GB of float64 StreamingCKA state
        assert 4 * 6.4e9 < d["fisher"] < 4 * 6.7e9  # float32 sums of the 6.5B block parameters
        assert plan["training"] == sum(b.values())
        assert plan["diagnostics"] == 4 * p + max(d["fisher"] + d["activations"] + d["logits"], d["token_cka"])
        assert plan["total"] == max(plan["training"], plan["diagnostics"])
        assert plan["total_without_kl"] == max(plan["training"] - 2 * p, plan["diagnostics"])
        assert plan["kl_cache_bytes_per_token"] == 4 * 152064

    def test_what_fits_one_gpu(self):
        cfg = Qwen2Config(**QWEN25_7B)
        adamw = memory_plan(cfg, batch_size=8)
        assert not adamw["fits_80gb"] and adamw["total_without_kl"] > adamw["budget"]
        assert "sgd" in adamw["advice"] and "--no-token-cka" in adamw["advice"]
        parked = memory_plan(cfg, batch_size=8, token_cka=False)  # the original waits in host memory
        assert parked["bytes"]["reference"] == parked["diagnostics_bytes"]["token_cka"] == 0
        assert parked["total_without_kl"] <= parked["budget"] < parked["total"] and "GA+KL" in parked["advice"]
        sgd = memory_plan(cfg, optimizer="sgd", batch_size=8)
        assert sgd["fits_80gb"] and sgd["bytes"]["optimizer"] == 0
        ada = memory_plan(cfg, optimizer="adafactor", batch_size=8)
        assert ada["fits_80gb"] and 0 < ada["bytes"]["optimizer"] < 0.01 * ada["params"]
        yi = memory_plan(LlamaConfig(**YI_6B), batch_size=8)
        assert 6.0e9 < yi["params"] < 6.1e9 and yi["total_without_kl"] <= yi["budget"] < yi["total"]

    def test_sharded_over_several_gpus(self):
        cfg = Qwen2Config(**QWEN25_7B)
        with torch.device("meta"):  # the real module tree: one block's and the root group's parameters
            model = Qwen2ForCausalLM(cfg)
        p = sum(t.numel() for t in model.parameters())
        block = sum(t.numel() for t in decoder_layers(model)[0].parameters())
        root = p - cfg.num_hidden_layers * block  # embeddings, final norm, head
        one, four = memory_plan(cfg, batch_size=8), memory_plan(cfg, batch_size=8, gpus=4)
        b = four["bytes"]
        assert four["params"] == p
        assert b["weights"] == 4 * p // 4 + 2 * (2 * block + root)  # float32 shards + gathered bf16 groups
        assert b["gradients"] == 4 * p // 4 + 2 * (block + root) and b["optimizer"] == 8 * p // 4
        assert b["activations"] == memory_plan(cfg, batch_size=2)["bytes"]["activations"]  # the batch is split
        assert four["diagnostics_bytes"]["weights"] == 4 * p // 4 + 2 * p  # shards + a gathered replica
        assert four["fits_80gb"] and not one["fits_80gb"]
        assert not memory_plan(cfg, batch_size=8, gpus=2)["fits_80gb"]
        assert "each of 4 GPUs" in four["advice"]

    def test_checkpointing_and_batch_scale_activations(self):
        cfg = LlamaConfig(**YI_6B)
        on = memory_plan(cfg, batch_size=4, seq_len=1024)["bytes"]["activations"]
        off = memory_plan(cfg, batch_size=4, seq_len=1024, gradient_checkpointing=False)["bytes"]["activations"]
        assert on < off / 10
        assert memory_plan(cfg, batch_size=8, seq_len=1024)["bytes"]["activations"] == 2 * on
        small, large = (memory_plan(cfg, diag_batch_size=k)["diagnostics_bytes"] for k in (1, 4))
        assert large["activations"] == 4 * small["activations"] and large["logits"] == 4 * small["logits"]

    @pytest.mark.parametrize("kwargs, match", [({"optimizer": "lion"}, "optimizer"), ({"batch_size": 0}, "batch_size"),
                                               ({"seq_len": 1.5}, "seq_len"), ({"gpus": 0}, "gpus"),
                                               ({"diag_batch_size": True}, "diag_batch_size"),
                                               ({"optimizer": "adafactor", "gpus": 2}, "adafactor")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            memory_plan(LlamaConfig(**YI_6B), **kwargs)
