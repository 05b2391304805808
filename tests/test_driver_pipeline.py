"""Driver pipeline: stages, relearning controls, nulls, verdicts, report schema, atomic state, resume, workers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from repforget_kernels.driver.benchmark import BenchmarkConfig
from repforget_kernels.driver.diagnostics import DiagnosticsConfig
from repforget_kernels.driver.pipeline import Pipeline, PipelineConfig, RunSpec, split_requests
from repforget_kernels.driver.plots import PLOTS
from repforget_kernels.driver.state import StateCorrupt, StateMismatch
from repforget_kernels.driver.verdict import LABELS, THRESHOLDS

from conftest import SMALL_BENCHMARK, SMALL_TINY, free_port, gloo_group, small_benchmark

SPECS = [RunSpec("ga", 3e-3, "single", epochs=2, batch_size=4),
         RunSpec("npo_kl", 3e-3, "continual", requests=2, epochs=2, batch_size=4)]
NULLS = ("random_init", "retain_oracle")  # other_seed is one more pretraining of the same code


def config(out, cache, **kw) -> PipelineConfig:
    settings = dict(benchmark=BenchmarkConfig(**SMALL_BENCHMARK), tiny_options=SMALL_TINY, progress=False, eval_items=48,
                    probe_items=16, relearn_lr=3e-3, nulls=NULLS,
                    diagnostics=DiagnosticsConfig(batch_size=8, fisher_samples=2000))
    return PipelineConfig(out=out, cache_dir=cache, **dict(settings, **kw))


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny, tiny_cache):  # noqa: F811
    out = tmp_path_factory.mktemp("full")
    report = Pipeline(config(out, tiny_cache)).run(SPECS)
    return out, report


CONTROLS = ["relearned_forget", "relearned_retain", "relearned_unrelated"]


class TestEndToEnd:
    def test_stage_names_and_files(self, finished):
        out, report = finished
        names = [[s["name"] for s in run["stages"]] for run in report["runs"]]
        assert names == [["original", "unlearned", *CONTROLS], ["original", "unlearned_1", "unlearned_2", *CONTROLS]]
        for name in ("report.json", "report.md", *PLOTS):
            assert (out / name).stat().st_size > 0
        assert [p.name for p in (out / "state").rglob("*.pt")] == ["reference.pt"]  # checkpoints gone once done
        assert sorted(p.name for p in (out / "state" / "nulls").iterdir()) == [f"{n}.json" for n in sorted(NULLS)]
        assert not list(out.rglob("*.tmp"))

    def test_report_json_schema(self, finished):
        out, _ = finished
        report = json.loads((out / "report.json").read_text())
        assert report["complete"] is True
        assert {"config", "versions", "thresholds", "nulls", "runs", "summary"} <= report.keys()
        assert report["thresholds"] == THRESHOLDS
        assert set(report["summary"]) >= {"regimes", "structure_vs_recovery", "nulls", "selective_runs"}
        assert set(report["summary"]["structure_vs_recovery"]) >= {"spearman", "ci95", "runs", "by_metric"}
        assert set(report["summary"]["nulls"]) == set(NULLS)
        assert "relearned" in report["nulls"]["retain_oracle"]
        for run in report["runs"]:
            assert {"method", "lr", "setting", "requests", "seed", "stages", "verdict", "recoveries"} <= run.keys()
            assert set(run["recoveries"]) == {"forget", "retain", "unrelated"}
            assert run["verdict"]["behaviour"]["label"] in LABELS
            assert run["verdict"]["structure"]["label"] in ("intact", "drifted")
            for stage in run["stages"]:
                assert {"name", "em", "em_items", "token_acc", "mia_auc", "structure"} <= stage.keys()
                assert set(stage["structure"]) == {"forget", "retain", "unrelated"}
                assert set(stage["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
                for probe in stage["structure"].values():
                    assert [r["layer"] for r in probe["layers"]] == [0, 1]
                    assert {"summary", "fisher"} <= probe.keys()
                    assert len(probe["layers"][0]["pca_shift"]) == 2
            last = [s for s in run["stages"] if s["name"].startswith("unlearned")][-1]
            assert all(len(p["draws"]["cka_pooled"]) == 200 for p in last["structure"].values())  # the verdict's stage
            curves = [s["curve"] for s in run["stages"] if s["name"] in CONTROLS]
            assert len(curves) == 3 and all(len(c) == curves[0][0] is not None or len(c) > 1 for c in curves)

    def test_original_stage_is_self_identical_and_unlearning_moves(self, finished):
        _, report = finished
        orig = report["runs"][0]["stages"][0]
        assert orig["em"]["forget"] >= 0.9 and orig["em"]["retain"] >= 0.9
        for probe in orig["structure"].values():
            assert all(r["cka"] == pytest.approx(1.0, abs=1e-5) for r in probe["layers"])
            assert probe["summary"]["cka_pooled"] == pytest.approx(0.0, abs=1e-5)
        unl = report["runs"][0]["stages"][1]
        assert unl["em"]["forget"] < orig["em"]["forget"] and unl["train"]["steps"] > 0
        assert unl["structure"]["forget"]["summary"]["cka_pooled"] > 1e-4

    def test_relearning_controls_start_from_the_unlearned_model(self, finished):
        _, report = finished
        run = report["runs"][0]
        unl = run["stages"][1]["em"]["forget"]
        for stage in run["stages"][2:]:
            assert stage["curve"][0] == pytest.approx(unl)  # before the first step: the unlearned model
            assert len(stage["curve"]) == stage["train"]["steps"] + 1

    def test_markdown_has_tables(self, finished):
        out, report = finished
        md = (out / "report.md").read_text()
        for run in report["runs"]:
            assert f"## {run['run_id']}" in md
        for heading in ("## Verdicts", "## Does structure predict recovery?", "## Nulls", "### Exact match by stage",
                        "## What the numbers are", "## Thresholds"):
            assert heading in md


class TestResume:
    def test_interrupted_run_resumes_to_the_same_report(self, tmp_path, finished, tiny_cache):  # noqa: F811
        _, want = finished
        (tmp_path / "report.json").write_text('{"complete": true, "previous": 1}')  # an earlier good report
        (tmp_path / "report.md").write_text("previous")

        def stop(run_id, stage):
            if stage == "unlearned_1":
                raise Interrupt

        with pytest.raises(Interrupt):
            Pipeline(config(tmp_path, tiny_cache), on_stage_done=stop).run(SPECS)
        # a run that does not finish leaves the previous report as it was
        assert json.loads((tmp_path / "report.json").read_text()) == {"complete": True, "previous": 1}
        assert (tmp_path / "report.md").read_text() == "previous"
        run_dir = tmp_path / "state" / SPECS[1].run_id
        assert (run_dir / "1_unlearned_1.json").exists() and (run_dir / "1_unlearned_1.pt").exists()
        assert not (run_dir / "2_unlearned_2.json").exists()

        seen = []
        got = Pipeline(config(tmp_path, tiny_cache), on_stage_done=lambda r, s: seen.append((r, s))).run(SPECS)
        assert seen == [(SPECS[1].run_id, name) for name in ("unlearned_2", *CONTROLS)]
        assert got == want
        assert json.loads((tmp_path / "report.json").read_text())["complete"] is True

    def test_finished_state_is_not_recomputed(self, finished, tiny_cache):  # noqa: F811
        out, want = finished
        seen = []
        got = Pipeline(config(out, tiny_cache), on_stage_done=lambda r, s: seen.append(s)).run(SPECS)
        assert seen == [] and got == want

    def test_other_config_in_same_out_is_refused(self, finished, tiny_cache):  # noqa: F811
        out, _ = finished
        cfg = config(out, tiny_cache)
        cfg.diagnostics = DiagnosticsConfig(sample="last")
        with pytest.raises(StateMismatch, match=r"settings changed \(diagnostics\).*--restart"):
            Pipeline(cfg).run(SPECS)
        changed = [RunSpec("ga", 3e-3, "single", epochs=2, batch_size=2)]
        with pytest.raises(StateMismatch, match="different settings"):
            Pipeline(config(out, tiny_cache)).run(changed)


def _copy_state(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


class TestStateIntegrity:
    """Edited inputs, damaged state files and --restart (each a one-line error or a fresh state)."""

    def test_edited_data_is_refused_naming_the_split(self, finished, tmp_path, tiny_cache):  # noqa: F811
        out = _copy_state(finished[0], tmp_path / "out")
        corpus = small_benchmark()
        corpus["unrelated"] = corpus["unrelated"][:-1] + [{"prompt": "Which ship is new?", "answer": "the Vola"}]
        cfg = config(out, tiny_cache)
        cfg.examples = corpus
        with pytest.raises(StateMismatch, match="data split unrelated changed"):
            Pipeline(cfg).run(SPECS[:1])

    def test_restart_discards_the_state(self, finished, tmp_path, tiny_cache):  # noqa: F811
        out = _copy_state(finished[0], tmp_path / "out")
        corpus = small_benchmark()
        corpus["unrelated"] = corpus["unrelated"][:-1]
        cfg = config(out, tiny_cache, restart=True)
        cfg.examples = corpus
        seen = []
        report = Pipeline(cfg, on_stage_done=lambda r, s: seen.append(s)).run(SPECS[:1])
        assert seen == ["unlearned", *CONTROLS]  # recomputed, not read back
        assert report["config"]["n_items"]["unrelated"] == len(corpus["unrelated"])
        assert not (out / "state" / SPECS[1].run_id).exists()

    def test_other_model_weights_are_refused(self, finished, tmp_path, tiny_cache):  # noqa: F811
        import shutil

        out = _copy_state(finished[0], tmp_path / "out")
        pipe = Pipeline(config(out, tiny_cache))
        pipe._load()  # noqa: SLF001 - the fingerprint needs the loaded model's directory
        model_dir = tmp_path / "model"
        shutil.copytree(pipe.info["path"], model_dir)
        with open(model_dir / "model.safetensors", "r+b") as handle:  # flip the last byte of the weights
            handle.seek(-1, 2)
            last = handle.read(1)
            handle.seek(-1, 2)
            handle.write(bytes([last[0] ^ 1]))
        pipe.info = dict(pipe.info, path=str(model_dir))
        with pytest.raises(StateMismatch, match="model file model.safetensors changed"):
            pipe._claim_state()  # noqa: SLF001

    @pytest.mark.parametrize("damage", ["truncate", "empty", "edit"])
    def test_damaged_record_names_the_file_and_keeps_the_report(self, finished, tmp_path, tiny_cache, damage):  # noqa: F811
        out = _copy_state(finished[0], tmp_path / "out")
        good = (out / "report.json").read_bytes()
        record = out / "state" / SPECS[0].run_id / "1_unlearned.json"
        text = record.read_text()
        record.write_text({"truncate": text[: len(text) // 2], "empty": "",
                           "edit": text.replace('"steps": ', '"steps": 1', 1)}[damage])
        with pytest.raises(StateCorrupt, match=r"state file .*1_unlearned\.json is damaged .*delete that file"):
            Pipeline(config(out, tiny_cache)).run(SPECS)
        assert (out / "report.json").read_bytes() == good

    def test_damaged_checkpoint_is_detected(self, finished, tmp_path, tiny_cache):  # noqa: F811
        out = tmp_path / "out"

        def stop(run_id, stage):
            if stage == "unlearned":
                raise Interrupt

        with pytest.raises(Interrupt):
            Pipeline(config(out, tiny_cache), on_stage_done=stop).run(SPECS[:1])
        ckpt = out / "state" / SPECS[0].run_id / "1_unlearned.pt"
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
        with pytest.raises(StateCorrupt, match=r"1_unlearned\.pt is damaged \(checksum mismatch\)"):
            Pipeline(config(out, tiny_cache)).run(SPECS[:1])


# Runs for two gloo processes: SGD at a large rate, so the ranks' float rounding stays at that level
DIST_SPECS = [RunSpec("ga_gd", 0.2, "continual", requests=2, batch_size=4, epochs=1, optimizer="sgd"),
              RunSpec("npo", 0.2, "single", batch_size=4, epochs=1, optimizer="sgd")]


def dist_config(out, cache) -> PipelineConfig:
    return config(out, cache, relearn_lr=0.2, relearn_optimizer="sgd", nulls=())


def assert_stages_match(one: dict, two: dict) -> None:
    """Two reports of the same runs, one process and two: equal exact matches and verdicts, MIA AUCs within two
    score pairs (a near-tie may flip), every other number
    within about 5x the float rounding measured between them on the test configurations (rel 4e-5 on Fisher
    masses and token CKA, 1e-5 on losses, 6e-5 absolute on PCA shifts, whose directions move most). The
    histogram bins and bootstrap draws are left out: a value on a bin edge may fall either side."""
    assert [r["run_id"] for r in one["runs"]] == [r["run_id"] for r in two["runs"]]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["verdict"]["behaviour"]["label"] == b["verdict"]["behaviour"]["label"]
        for sa, sb in zip(a["stages"], b["stages"], strict=True):
            assert (sa["name"], sa["em_items"]) == (sb["name"], sb["em_items"])
            pairs = len(sa["em_items"]["forget"]) * len(sa["em_items"]["holdout"])
            # an AUC counts pairs: a near-tie of two scores may flip under the ranks' rounding (two pairs allowed)
            assert sb["mia_auc"] == pytest.approx(sa["mia_auc"], abs=2 / pairs + 1e-12)
            assert sb["perplexity"] == pytest.approx(sa["perplexity"], rel=1e-4)
            if sa["train"] is not None:
                assert sb["train"] == pytest.approx(sa["train"], rel=1e-4)
            for probe in sa["structure"]:
                pa, pb = sa["structure"][probe], sb["structure"][probe]
                for la, lb in zip(pa["layers"], pb["layers"], strict=True):
                    for key in ("cka", "cka_debiased", "cka_tokens", "pca_similarity", "fisher_rank_corr"):
                        assert lb[key] == pytest.approx(la[key], rel=2e-4, abs=1e-6), (sa["name"], probe, key)
                    assert lb["fisher_mass_ratio"] == pytest.approx(la["fisher_mass_ratio"], rel=3e-4)
                    assert lb["pca_shift"] == pytest.approx(la["pca_shift"], abs=3e-4)


def _resume_worker(rank: int, world: int, port: int, out: str, cache: str) -> None:
    """Both ranks stop after the first stage, then rerun the same command: rank 0 saves what the rerun computed."""
    import torch

    with gloo_group(rank, world, port):
        def stop(run_id, stage):
            if stage == "unlearned_1":
                raise Interrupt

        with pytest.raises(Interrupt):
            Pipeline(dist_config(Path(out), Path(cache)), on_stage_done=stop).run(DIST_SPECS)
        checkpoints = sorted(p.name for p in (Path(out) / "state").rglob("*.pt"))
        seen = []
        report = Pipeline(dist_config(Path(out), Path(cache)), on_stage_done=lambda r, s: seen.append(s)).run(DIST_SPECS)
        if rank == 0:
            torch.save({"report": report, "seen": seen, "checkpoints": checkpoints}, Path(out) / "rank0.pt")


class TestSeveralProcesses:
    def test_interrupted_sharded_run_resumes_to_the_one_process_report(self, tmp_path, tiny, tiny_cache):  # noqa: F811
        import torch
        import torch.multiprocessing as mp

        want = Pipeline(dist_config(tmp_path / "one", tiny_cache)).run(DIST_SPECS)
        mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path / "two"), str(tiny_cache)), nprocs=2, join=True)
        got = torch.load(tmp_path / "two" / "rank0.pt", weights_only=False)
        assert got["checkpoints"] == ["1_unlearned_1.pt", "reference.pt"]  # the full master weights of stage 1
        assert got["seen"] == ["unlearned_2", *CONTROLS, "unlearned", *CONTROLS]  # only what was left
        report = json.loads((tmp_path / "two" / "report.json").read_text())
        assert report["complete"] and report["config"]["world_size"] == 2
        assert want["runs"][0]["stages"][2]["em"]["forget"] < want["runs"][0]["stages"][0]["em"]["forget"]
        assert_stages_match(want, got["report"])


class TestWorkers:
    def test_two_workers_give_the_one_process_report(self, finished, tmp_path, tiny_cache):  # noqa: F811
        _, want = finished
        got = Pipeline(config(tmp_path, tiny_cache, workers=2)).run(SPECS)
        assert got["runs"] == want["runs"] and got["summary"] == want["summary"]


class TestSpecs:
    def test_split_requests_keeps_entities_whole(self):
        items = [{"entity": e, "i": i} for i, e in enumerate("aabbbccdde")]
        chunks = split_requests(items, 3)
        assert [[i["entity"] for i in c] for c in chunks] == [list("aabbb"), list("ccdd"), ["e"]]
        assert [len(split_requests(list(range(11)), 3)[k]) for k in range(3)] == [4, 4, 3]  # no entity: items
        with pytest.raises(ValueError, match="cannot split 2 forget entities into 3"):
            split_requests([{"entity": "a"}, {"entity": "b"}], 3)

    def test_runspec_validation_and_ids(self):
        with pytest.raises(ValueError, match="unknown method"):
            RunSpec("gradient_descent", 1e-3)
        with pytest.raises(ValueError, match="setting"):
            RunSpec("ga", 1e-3, "batch")
        with pytest.raises(ValueError, match="reference must be one of"):
            RunSpec("npo", 1e-3, reference="initial")
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            RunSpec("npo", float("inf"))
        assert RunSpec("npo", 1e-3, "continual", requests=5).run_id == "npo_lr0.001_continual5_seed0"
        assert RunSpec("ga", 1e-3, seed=2, reference="current").run_id == "ga_lr0.001_single_seed2_ref-current"
        assert RunSpec("ga", 1e-3, requests=4).requests == 1  # single: one request
        assert RunSpec("ga", 1e-3, "continual", requests=3).unlearning_stages() == [
            "unlearned_1", "unlearned_2", "unlearned_3"]
