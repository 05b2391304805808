"""The repforget CLI: input errors (one line, exit 2, no complete-looking report), run and analyze."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repforget_kernels.driver as driver_package
from repforget_kernels.driver.cli import build_parser, demo_specs, main

from conftest import free_port, load_small, small_benchmark
from test_driver_pipeline import assert_stages_match


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


DATA_SPLITS = ("forget", "retain", "holdout", "unrelated")


@pytest.fixture
def splits(tmp_path):
    """The small benchmark's forget, retain, holdout and unrelated splits written as JSONL files."""
    corpus = small_benchmark()
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", corpus[k]) for k in DATA_SPLITS}


def split_args(splits, **override):
    files = dict(splits, **override)
    return [a for k, p in files.items() for a in (f"--{k}", str(p))]


def assert_error(capsys, rc, out_dir, *fragments, report=False):
    """Exit status 2, one line on stderr holding every fragment, and no report unless one was there before."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("repforget: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    if not report:
        assert not (out_dir / "report.json").exists()
        assert not (out_dir / "state").exists()  # refused before any work
    return lines[0]


class TestErrors:
    def test_missing_model_directory(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["run", "--model", str(tmp_path / "no-such-model"), "--out", str(out), "--no-progress"])
        assert_error(capsys, rc, out, "no-such-model")

    def test_malformed_jsonl_names_the_line(self, tmp_path, capsys, splits):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n')
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--cache-dir", str(tmp_path), *split_args(splits, forget=bad)])
        assert_error(capsys, rc, out, "bad.jsonl:2")

    def test_empty_split(self, tmp_path, capsys, splits):
        empty = tmp_path / "empty.jsonl"
        empty.write_text("\n")
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--cache-dir", str(tmp_path), *split_args(splits, retain=empty)])
        assert_error(capsys, rc, out, "split 'retain' is empty")

    def test_unknown_method(self, tmp_path, capsys):
        out = tmp_path / "out"
        rc = main(["run", "--method", "ga", "forgetful", "--out", str(out)])
        assert_error(capsys, rc, out, "unknown method 'forgetful'")

    def test_bad_flag_is_one_line_too(self, tmp_path, capsys):
        out = tmp_path / "out"
        rc = main(["run", "--sample", "middle", "--out", str(out)])
        assert_error(capsys, rc, out, "--sample")

    def test_analyze_missing_checkpoint(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["analyze", "--ref", str(tmp_path / "a"), "--upd", str(tmp_path / "b"),
                   "--data", str(splits["unrelated"]), "--out", str(out)])
        assert_error(capsys, rc, out, str(tmp_path / "a"))
        assert not (out / "analysis.json").exists()

    def test_previous_report_survives_a_failed_run(self, tmp_path, capsys, splits, checkpoints):
        out = tmp_path / "out"
        (out / "state").mkdir(parents=True)
        (out / "state" / "config.json").write_text('{"model": "something else"}')  # no checksum: damaged
        (out / "report.json").write_text('{"complete": true}')
        (out / "report.md").write_text("previous")
        capsys.readouterr()
        rc = main(["run", "--out", str(out), "--model", str(checkpoints[0]), "--no-progress", "--no-nulls",
                   *split_args(splits)])
        assert_error(capsys, rc, out, "config.json is damaged", "--restart", report=True)
        assert (out / "report.json").read_text() == '{"complete": true}'
        assert (out / "report.md").read_text() == "previous"

    def test_non_utf8_jsonl_names_the_line(self, tmp_path, capsys, splits):
        bad = tmp_path / "latin1.jsonl"
        bad.write_bytes('{"prompt": "a", "answer": "b"}\n{"prompt": "caf\u00e9", "answer": "x"}\n'.encode("latin-1"))
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), *split_args(splits, forget=bad)])
        assert_error(capsys, rc, out, "latin1.jsonl:2", "not UTF-8")

    @pytest.mark.parametrize("args,fragment", [
        (["--lr", "inf"], "argument --lr: must be a positive finite number, got 'inf'"),
        (["--lr", "-1e-3"], "argument --lr: must be a positive finite number, got '-1e-3'"),
        (["--lr", "1e-3", "nan"], "argument --lr: must be a positive finite number, got 'nan'"),
        (["--beta", "-1"], "argument --beta: must be a positive finite number, got '-1'"),
        (["--beta", "nan"], "argument --beta"),
        (["--max-length", "1"], "argument --max-length: must be an integer >= 2, got '1'"),
        (["--relearn-epochs", "-1"], "argument --relearn-epochs: must be an integer >= 1"),
        (["--relearn-lr", "0"], "argument --relearn-lr"),
        (["--epochs", "0"], "argument --epochs"),
        (["--batch-size", "x"], "argument --batch-size: must be an integer >= 1, got 'x'"),
        (["--requests", "0"], "argument --requests"),
        (["--diag-batch-size", "0"], "argument --diag-batch-size"),
        (["--pca-k", "0"], "argument --pca-k"),
        (["--device", "banana"], "--device must be cpu, cuda or cuda:N, got 'banana'"),
    ])
    def test_bad_arguments_before_any_work(self, tmp_path, capsys, splits, args, fragment):
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--no-progress", *split_args(splits), *args])
        assert_error(capsys, rc, out, fragment)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_device_without_cuda(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--device", "cuda", *split_args(splits)])
        assert_error(capsys, rc, out, "--device cuda: this machine has no CUDA GPU")

    def test_out_is_a_file(self, tmp_path, capsys, splits):
        out = tmp_path / "taken"
        out.write_text("not a directory")
        rc = main(["run", "--out", str(out), *split_args(splits)])
        assert_error(capsys, rc, tmp_path / "nowhere", f"--out {out} exists and is not a directory")

    @pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
    def test_out_unwritable(self, tmp_path, capsys, splits):
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        try:
            rc = main(["run", "--out", str(parent / "out"), *split_args(splits)])
            assert_error(capsys, rc, parent / "out", "is not writable")
        finally:
            parent.chmod(0o700)

    def test_out_unwritable_as_root_too(self, tmp_path, capsys, splits, monkeypatch):
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), *split_args(splits)])
        assert_error(capsys, rc, tmp_path / "nowhere", "is not writable (Permission denied)")


@pytest.fixture
def checkpoints(tmp_path, tiny):
    """(ref_dir, upd_dir): the small pretrained model and a copy with every weight scaled by 1.05, saved as HF
    checkpoints."""
    model, tok, _ = tiny
    ref_dir, upd_dir = tmp_path / "ref", tmp_path / "upd"
    upd = copy.deepcopy(model)
    with torch.no_grad():
        for p in upd.parameters():
            p.mul_(1.05)
    for m, d in ((model, ref_dir), (upd, upd_dir)):
        m.save_pretrained(d)
        tok.save_pretrained(d)
    return ref_dir, upd_dir


class TestAnalyzeShapes:
    @pytest.mark.parametrize("field,value", [("hidden_size", 96), ("vocab_size", 7)])
    def test_models_of_another_shape_are_refused(self, tmp_path, capsys, splits, checkpoints, field, value):
        ref_dir, upd_dir = checkpoints
        cfg = json.loads((upd_dir / "config.json").read_text())
        cfg[field] = value
        (upd_dir / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / "analysis"
        capsys.readouterr()  # the fixture's own output
        rc = main(["analyze", "--ref", str(ref_dir), "--upd", str(upd_dir), "--data", str(splits["unrelated"]),
                   "--out", str(out)])
        assert_error(capsys, rc, out, f"--upd has {field}={value}", "not two checkpoints of one model")
        assert not out.exists()


class TestData:
    def test_data_files_need_forget_and_retain(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--forget", str(splits["forget"])])
        assert_error(capsys, rc, out, "--retain missing", "--fill-synthetic")

    def test_relearning_control_needs_its_data(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--forget", str(splits["forget"]), "--retain", str(splits["retain"])])
        assert_error(capsys, rc, out, "relearning control(s) unrelated need --unrelated")

    def test_missing_null_model(self, tmp_path, capsys, splits):
        out = tmp_path / "out"
        rc = main(["run", "--out", str(out), "--retain-model", str(tmp_path / "no-oracle"), *split_args(splits)])
        assert_error(capsys, rc, out, "no-oracle")


RUN = ["--method", "ga", "--lr", "3e-3", "--epochs", "2", "--batch-size", "4", "--relearn-lr", "3e-3", "--device", "cpu",
       "--no-progress", "--eval-items", "48", "--probe-items", "16", "--diag-batch-size", "8"]


class TestCommands:
    def test_run_writes_a_complete_report(self, tmp_path, capsys, splits, checkpoints, tiny_cache):
        oracle_dir = tmp_path / "oracle"
        oracle, tok, _ = load_small(tiny_cache, "retain_oracle")
        oracle.save_pretrained(oracle_dir)
        tok.save_pretrained(oracle_dir)
        out = tmp_path / "out"
        capsys.readouterr()
        rc = main(["run", *RUN, "--model", str(checkpoints[0]), "--retain-model", str(oracle_dir), "--out", str(out),
                   "--no-fisher", *split_args(splits)])
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        assert report["complete"] is True and report["runs"][0]["method"] == "ga"
        assert report["config"]["data"]["forget"].endswith("forget.jsonl")
        assert set(report["nulls"]) == {"random_init", "retain_oracle"}  # no other-seed model given
        assert "relearned" in report["nulls"]["retain_oracle"]
        layers = report["runs"][0]["stages"][1]["structure"]["forget"]["layers"]
        assert all(r["fisher_mass_ratio"] is None for r in layers)
        printed = capsys.readouterr().out
        assert "ga_lr0.003_single_seed0" in printed and "thresholds:" in printed and "Spearman" in printed

    def test_analyze_two_checkpoints(self, tmp_path, capsys, splits, checkpoints):
        ref_dir, upd_dir = checkpoints
        out = tmp_path / "analysis"
        rc = main(["analyze", "--ref", str(ref_dir), "--upd", str(upd_dir), "--data", str(splits["unrelated"]),
                   "--forget", str(splits["forget"]), "--out", str(out), "--device", "cpu", "--no-progress"])
        assert rc == 0
        analysis = json.loads((out / "analysis.json").read_text())
        assert analysis["complete"] is True and len(analysis["layers"]) == 2
        for row in analysis["layers"]:
            assert 0.0 < row["cka"] < 1.0 and row["fisher_mass_ratio"] > 0
        assert (out / "analysis.md").read_text().count("\n| ") >= 3
        assert (out / "analysis.png").stat().st_size > 0
        assert "layer   0" in capsys.readouterr().out

    def test_python_dash_m_entry_point(self):
        proc = subprocess.run([sys.executable, "-m", "repforget_kernels.driver", "--help"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "demo" in proc.stdout and "analyze" in proc.stdout

    def test_demo_grid_and_defaults(self):
        from repforget_kernels.driver.cli import DEMO_LRS, DEMO_METHODS, DEMO_REQUESTS

        METHOD_NAMES = DEMO_METHODS
        args = build_parser().parse_args(["demo"])
        assert str(args.out) == "runs/demo" and args.model == "tiny" and args.seeds == 1
        specs = demo_specs(args)
        assert {s.method for s in specs} == {"ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "rlabel"}
        single = {(s.method, s.lr) for s in specs if s.setting == "single"}
        assert single == {(m, lr) for m in METHOD_NAMES for lr in DEMO_LRS} and len(DEMO_LRS) >= 3
        continual = {(s.method, s.requests) for s in specs if s.setting == "continual"}
        assert continual == {(m, n) for m in METHOD_NAMES for n in DEMO_REQUESTS}
        assert 5 in DEMO_REQUESTS and max(DEMO_REQUESTS) >= 10
        assert all(s.reference == "original" for s in specs)
        three = demo_specs(build_parser().parse_args(["demo", "--seeds", "3"]))
        assert len(three) == 3 * len(specs) and {s.seed for s in three} == {0, 1, 2}

    def test_run_grid_of_settings(self):
        args = build_parser().parse_args(["run", "--out", "x", "--method", "ga", "npo", "--lr", "1e-4", "1e-3",
                                          "--setting", "single", "continual", "--requests", "2", "4"])
        from repforget_kernels.driver.cli import _specs

        ids = [s.run_id for s in _specs(args)]
        assert len(ids) == 2 * 2 * 3 and "npo_lr0.001_continual4_seed0" in ids and "ga_lr0.0001_single_seed0" in ids

    def test_training_knobs_reach_the_specs(self):
        from repforget_kernels.driver.cli import _specs

        args = build_parser().parse_args(["run", "--out", "x", "--method", "simnpo", "rmu", "--gamma", "0.5",
                                          "--warmup", "3", "--scheduler", "cosine", "--grad-accum", "2",
                                          "--weight-decay", "0.01", "--forget-weight", "2", "--max-steps", "7",
                                          "--rmu-layer", "1", "--rmu-steer", "4"])
        specs = _specs(args)
        assert specs[0].options == {"forget_weight": 2.0, "gamma": 0.5, "grad_accum": 2, "max_steps": 7,
                                    "rmu_layer": 1, "rmu_steer": 4.0, "scheduler": "cosine", "warmup": 3,
                                    "weight_decay": 0.01}
        assert "_gamma-0.5_" in specs[0].run_id and specs[1].method == "rmu"
        plain = _specs(build_parser().parse_args(["run", "--out", "x"]))[0]
        assert plain.options == {} and "options" not in plain.record()  # stored specs of earlier runs still match

    def test_bad_knob_is_a_usage_error(self, tmp_path, capsys):
        assert main(["run", "--out", str(tmp_path), "--scheduler", "step"]) == 2
        assert "--scheduler" in capsys.readouterr().err


def launch(args: list, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """``python -m repforget_kernels.driver ARGS`` in two CPU (gloo) processes, under torchrun or under
    ``accelerate launch`` with the shipped FSDP config."""
    if launcher == "torchrun":
        head = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        config = Path(driver_package.__file__).parent / "configs" / "accelerate_fsdp.yaml"
        head = ["accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
                "--main_process_port", str(free_port())]
    return subprocess.run([sys.executable, "-m", *head, "-m", "repforget_kernels.driver", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# SGD at a large rate moves the weights a lot, with float rounding between the ranks staying at its level
RUN_ARGS = ["run", "--method", "ga_gd", "npo", "--lr", "0.2", "--relearn-lr", "0.2", "--optimizer", "sgd",
            "--relearn-optimizer", "sgd",
            "--setting", "continual", "--requests", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--no-progress", "--diag-batch-size", "4", "--no-nulls", "--eval-items", "48", "--probe-items", "16"]


@pytest.fixture
def one_process_run(tmp_path, splits, checkpoints):
    """(arguments, report of one process) of RUN_ARGS on the saved tiny model (a directory: gradient checkpointing on)."""
    args = [*RUN_ARGS, "--model", str(checkpoints[0]), *split_args(splits)]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    return args, json.loads((tmp_path / "one" / "report.json").read_text())


class TestSeveralProcesses:
    def test_analyze_under_torchrun_equals_one_process(self, tmp_path, splits, checkpoints):
        """Two gloo ranks (torchrun) split the probe batches and merge: the numbers of one process."""
        ref_dir, upd_dir = checkpoints
        common = ["analyze", "--ref", str(ref_dir), "--upd", str(upd_dir), "--data", str(splits["unrelated"]),
                  "--forget", str(splits["forget"]), "--device", "cpu", "--no-progress", "--diag-batch-size", "4",
                  "--no-token-cka"]
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
        done = launch([*common, "--out", str(tmp_path / "two")])
        assert done.returncode == 0, done.stderr[-2000:]
        one = json.loads((tmp_path / "one" / "analysis.json").read_text())
        two = json.loads((tmp_path / "two" / "analysis.json").read_text())
        assert two["world_size"] == 2 and one["world_size"] == 1
        for a, b in zip(one["layers"], two["layers"]):
            for key in ("cka", "cka_debiased", "pca_similarity", "fisher_mass_ratio"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    @pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
    def test_run_on_two_processes_equals_one_process(self, tmp_path, one_process_run, launcher):
        """FSDP2-sharded training on two gloo ranks, continual then relearned: the report of one process."""
        if launcher == "accelerate":
            pytest.importorskip("accelerate")
        args, one = one_process_run
        done = launch([*args, "--out", str(tmp_path / "two")], launcher)
        assert done.returncode == 0, done.stderr[-2000:]
        two = json.loads((tmp_path / "two" / "report.json").read_text())
        assert (one["config"]["world_size"], two["config"]["world_size"]) == (1, 2)
        assert two["complete"] and done.stdout.count("report:") == 1  # rank 0 alone prints and writes
        assert one["runs"][0]["stages"][2]["em"]["forget"] < one["runs"][0]["stages"][0]["em"]["forget"]
        assert_stages_match(one, two)

    @pytest.mark.parametrize("env, argv, fragment", [
        ({"WORLD_SIZE": "2"}, ["--optimizer", "adafactor"], "--optimizer adafactor"),
        ({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "fp16"}, [], "ACCELERATE_MIXED_PRECISION='fp16'"),
        ({"WORLD_SIZE": "2", "FSDP_OFFLOAD_PARAMS": "true"}, [], "FSDP_OFFLOAD_PARAMS"),
    ])
    def test_settings_several_processes_cannot_honour_fail_before_any_work(self, tmp_path, capsys, monkeypatch,
                                                                           splits, env, argv, fragment):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        out = tmp_path / "out"
        rc = main(["run", *argv, "--out", str(out), "--cache-dir", str(tmp_path), *split_args(splits)])
        assert_error(capsys, rc, out, fragment, report=True)
        assert not (out / "state").exists()
