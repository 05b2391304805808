"""Benchmark interop end to end: TOFU-format splits, a local model and a retain model (tiny, built from configs)
through `repforget run --config`, with and without LoRA; TOFU / MUSE metrics in the report; exported models load
and give the report's numbers back; LoRA wrapping and its memory plan."""
from __future__ import annotations

import json

import pytest
import torch

from repforget_kernels.driver.cli import main
from repforget_kernels.driver.data import encode, load_split
from repforget_kernels.driver.evaluate import evaluate
from repforget_kernels.driver.metrics import truth_ratio_data

from conftest import SMALL_TINY, random_small_model

pytest.importorskip("peft")
pytest.importorskip("yaml")
pytest.importorskip("rouge_score")

BENCHMARK_KEYS = ("rouge", "truth_ratio", "forget_quality", "model_utility", "privleak")


def tofu_records(items: list, pool: list) -> list:
    """TOFU-style records of benchmark items: question, answer, a paraphrased answer and three perturbed answers
    (other items' answers)."""
    return [{"question": it["prompt"], "answer": it["answer"], "paraphrased_answer": "It is " + it["answer"],
             "perturbed_answer": [pool[(i + k) % len(pool)]["answer"] for k in (1, 2, 3)]}
            for i, it in enumerate(items)]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A local original model and a retain model (same small Qwen2 config, other seed), TOFU-format forget (JSON
    array) / retain / holdout (JSONL) files, and an experiment YAML file naming them."""
    root = tmp_path_factory.mktemp("interop")
    model, tok, corpus = random_small_model()
    model.save_pretrained(root / "original")
    tok.save_pretrained(root / "original")
    torch.manual_seed(1)
    retain_model = type(model)(model.config)
    retain_model.save_pretrained(root / "retain_model")
    tok.save_pretrained(root / "retain_model")
    (root / "forget.json").write_text(json.dumps(tofu_records(corpus["forget"][:12], corpus["retain"])))
    for split in ("retain", "holdout"):
        records = tofu_records(corpus[split][:16], corpus["forget"])
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    import yaml

    config = {"model": str(root / "original"), "retain_model": str(root / "retain_model"),
              "forget": str(root / "forget.json"), "retain": str(root / "retain.jsonl"),
              "holdout": str(root / "holdout.jsonl"), "method": ["ga_gd", "npo"], "lr": [1e-3], "epochs": 1,
              "batch_size": 8, "relearn_controls": ["forget"], "relearn_batch_size": 8, "no_fisher": True,
              "no_token_cka": True, "probe_items": 8, "eval_items": 16, "save_models": True, "device": "cpu",
              "no_progress": True, "max_length": 48, "workers": 1}
    (root / "exp.yaml").write_text(yaml.safe_dump(config))
    return root, tok


def _run(root, out, *extra):
    assert main(["run", "--config", str(root / "exp.yaml"), "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _check_report(report, root, methods=("ga_gd", "npo")):
    assert [r["method"] for r in report["runs"]] == list(methods)
    assert report["config"]["resolved"]["config"]["file"] == str(root / "exp.yaml")
    assert report["config"]["resolved"]["method"] == list(methods)
    for run in report["runs"]:
        for stage in run["stages"]:
            for key in BENCHMARK_KEYS:
                assert key in stage, (stage["name"], key)
            assert 0.0 <= stage["forget_quality"] <= 1.0 and stage["model_utility"] is not None
            assert set(stage["truth_ratio"]) == {"forget", "retain", "holdout"}
            assert len(stage["truth_ratio_items"]["forget"]) == 12
            assert set(stage["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
            assert isinstance(stage["privleak"], float)
            assert stage["structure"]["forget"]["layers"]  # diagnostics beside the benchmark numbers


def _check_export(report, root, out, tok, stage_name):
    """The exported model of a stage loads with from_pretrained and gives that stage's numbers back."""
    from transformers import AutoModelForCausalLM

    from repforget_kernels.driver.models import load_tokenizer

    stage = next(s for s in report["runs"][0]["stages"] if s["name"] == stage_name)
    directory = out / stage["model_dir"]
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    loaded_tok = load_tokenizer(directory)  # AutoTokenizer, unless it re-tokenises this word-level vocabulary
    assert loaded_tok("Who is it?")["input_ids"] == tok("Who is it?")["input_ids"]
    items = load_split(root / "forget.json", "forget")
    got = evaluate(model, {"forget": encode(loaded_tok, items, 48)}, tokenizer=loaded_tok, batch_size=64,
                   generate_batch_size=64, tofu=True, alternatives={"forget": truth_ratio_data(loaded_tok, items, 48)})
    assert got["em"]["forget"] == stage["em"]["forget"]
    assert got["token_acc"]["forget"] == pytest.approx(stage["token_acc"]["forget"], rel=1e-6)
    assert got["probability"]["forget"] == pytest.approx(stage["probability"]["forget"], rel=1e-5)
    assert got["truth_ratio"]["forget"] == pytest.approx(stage["truth_ratio"]["forget"], rel=1e-5)
    return directory


class TestEndToEnd:
    def test_full_weights(self, experiment, tmp_path):
        root, tok = experiment
        out = tmp_path / "full"
        report = _run(root, out)
        _check_report(report, root)
        _check_export(report, root, out, tok, "unlearned")
        _check_export(report, root, out, tok, "relearned_forget")
        assert not (out / report["runs"][0]["stages"][1]["model_dir"] / "adapter").exists()

    def test_lora(self, experiment, tmp_path):
        root, tok = experiment
        out = tmp_path / "lora"
        methods = ("npo", "simnpo", "idkdpo", "rmu")  # the new methods, through LoRA
        report = _run(root, out, "--lora-rank", "4", "--lora-alpha", "8", "--method", *methods)
        _check_report(report, root, methods)
        assert all(s["train"]["steps"] > 0 for run in report["runs"] for s in run["stages"][1:])
        assert report["config"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["all-linear"]}
        directory = _check_export(report, root, out, tok, "unlearned")
        assert json.loads((directory / "adapter" / "adapter_config.json").read_text())["r"] == 4
        from transformers import AutoModelForCausalLM

        original = AutoModelForCausalLM.from_pretrained(root / "original")
        merged = AutoModelForCausalLM.from_pretrained(directory)
        changed = {n for (n, a), b in zip(original.named_parameters(), merged.parameters()) if not torch.equal(a, b)}
        assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved

    def test_command_line_overrides_the_file(self, experiment, tmp_path):
        root, _ = experiment
        from repforget_kernels.driver.cli import _expand_config, build_parser

        argv, experiment_file = _expand_config(["run", "--config", str(root / "exp.yaml"), "--method", "rmu",
                                                "--lr", "3e-4", "5e-4", "--out", str(tmp_path)])
        args = build_parser().parse_args(argv)
        assert args.method == ["rmu"] and args.lr == [3e-4, 5e-4] and args.epochs == 1 and args.save_models
        assert experiment_file["options"]["method"] == ["ga_gd", "npo"]

    def test_unknown_option_in_the_file(self, experiment, tmp_path, capsys):
        root, _ = experiment
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"methods": ["ga"]}))
        assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
        assert "unknown option 'methods'" in capsys.readouterr().err


class TestLora:
    def test_only_adapters_train_and_the_start_is_the_model(self):
        from repforget_kernels.driver.models import LoraSettings, merged_copy, with_lora

        model, tok, corpus = random_small_model()
        enc = encode(tok, corpus["forget"][:4])
        wrapped = with_lora(type(model)(model.config).requires_grad_(True), LoraSettings(rank=2))
        wrapped.load_state_dict({k: v for k, v in wrapped.state_dict().items()})  # keys are stable
        trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        base = merged_copy(wrapped)
        with torch.no_grad():
            a = wrapped(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            b = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        torch.testing.assert_close(a, b)  # B = 0 at the start: the adapters change nothing yet

    def test_bad_target(self):
        from repforget_kernels.driver.models import LoraSettings, check_lora_targets

        model, _, _ = random_small_model()
        with pytest.raises(ValueError, match=r"LoRA targets \['qkv'\] match no module"):
            check_lora_targets(model, LoraSettings(rank=2, targets=("qkv",)))
        with pytest.raises(ValueError, match="LoRA rank must be an int >= 1"):
            LoraSettings(rank=0)

    def test_memory_plan(self):
        from transformers import Qwen2Config

        from repforget_kernels.driver.models import lora_parameters, memory_plan

        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        # per block: q (64x64), k, v (32x64), o (64x64), gate, up (128x64), down (64x128): r (rows + cols) each
        per_block = 4 * ((64 + 64) + 2 * (32 + 64) + (64 + 64) + 2 * (128 + 64) + (64 + 128))
        assert lora_parameters(cfg, 4) == 2 * per_block
        full, lora = memory_plan(cfg), memory_plan(cfg, lora_rank=4)
        a, p = lora_parameters(cfg, 4), full["params"]
        assert lora["bytes"]["gradients"] == 2 * a and lora["bytes"]["optimizer"] == 4 * a
        assert lora["bytes"]["weights"] == 2 * p + 2 * a and lora["diagnostics_bytes"]["weights"] == 4 * p + 2 * a
        assert lora["training"] < full["training"]
        with pytest.raises(ValueError, match="one GPU"):
            memory_plan(cfg, lora_rank=4, gpus=2)
