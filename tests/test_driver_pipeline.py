"""Driver pipeline: stages, verdicts, report schema, atomic state, resume after an interruption."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from repforget_kernels.driver.diagnostics import DiagnosticsConfig
from repforget_kernels.driver.pipeline import Pipeline, PipelineConfig, RunSpec, split_requests
from repforget_kernels.driver.plots import PLOTS
from repforget_kernels.driver.report import THRESHOLDS, verdict
from repforget_kernels.driver.state import StateCorrupt, StateMismatch

from conftest import free_port, gloo_group
from test_driver_diagnostics import small_corpus

SPECS = [RunSpec("ga", 3e-3, "single", batch_size=4, relearn_lr=3e-3),
         RunSpec("npo", 3e-3, "continual", requests=2, batch_size=4, relearn_lr=3e-3)]


def config(out, cache, **kw) -> PipelineConfig:
    return PipelineConfig(out=out, cache_dir=cache, examples=small_corpus(), progress=False,
                          diagnostics=DiagnosticsConfig(batch_size=8, fisher_samples=2000), **kw)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny, tiny_cache):  # noqa: F811
    out = tmp_path_factory.mktemp("full")
    report = Pipeline(config(out, tiny_cache)).run(SPECS)
    return out, report


class TestEndToEnd:
    def test_stage_names_and_files(self, finished):
        out, report = finished
        names = [[s["name"] for s in run["stages"]] for run in report["runs"]]
        assert names == [["original", "unlearned", "relearned"],
                         ["original", "unlearned_1", "unlearned_2", "relearned"]]
        for name in ("report.json", "report.md", *PLOTS):
            assert (out / name).stat().st_size > 0
        assert not list((out / "state").rglob("*.pt"))[1:]  # only reference.pt is left
        assert [p.name for p in (out / "state").rglob("*.pt")] == ["reference.pt"]
        assert not list(out.rglob("*.tmp"))

    def test_report_json_schema(self, finished):
        out, _ = finished
        report = json.loads((out / "report.json").read_text())
        assert report["complete"] is True
        assert {"config", "versions", "thresholds", "runs"} <= report.keys()
        assert report["thresholds"] == THRESHOLDS
        for run in report["runs"]:
            assert {"method", "lr", "setting", "stages", "verdict"} <= run.keys()
            assert run["setting"] in ("single", "continual")
            assert {"behaviour", "structure"} <= run["verdict"].keys()
            assert run["verdict"]["behaviour"]["label"] in ("not_forgotten", "reversible", "irreversible", "catastrophic")
            assert run["verdict"]["structure"]["label"] in ("intact", "drifted")
            for stage in run["stages"]:
                assert {"name", "forget_acc", "retain_acc", "mia_auc", "layers"} <= stage.keys()
                assert set(stage["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
                assert [r["layer"] for r in stage["layers"]] == list(range(4))
                for row in stage["layers"]:
                    assert {"layer", "cka", "pca_similarity", "pca_shift", "fisher_mass_ratio"} <= row.keys()
                    assert len(row["pca_shift"]) == 2

    def test_original_stage_is_self_identical_and_unlearning_moves(self, finished):
        _, report = finished
        orig = report["runs"][0]["stages"][0]
        assert orig["forget_acc"] >= 0.9 and orig["retain_acc"] >= 0.9
        assert all(r["cka"] == pytest.approx(1.0, abs=1e-5) for r in orig["layers"])
        unl = report["runs"][0]["stages"][1]
        assert unl["forget_acc"] < orig["forget_acc"]
        assert min(r["cka"] for r in unl["layers"]) < 1.0 - 1e-4
        assert unl["train"]["steps"] > 0

    def test_markdown_has_tables_and_thresholds(self, finished):
        out, report = finished
        md = (out / "report.md").read_text()
        for run in report["runs"]:
            assert f"## {run['run_id']}" in md
        assert "| layer | cka |" in md and "## Thresholds" in md and "`cka_intact`" in md


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
        assert seen == [(SPECS[1].run_id, "unlearned_2"), (SPECS[1].run_id, "relearned")]
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
        changed = [RunSpec("ga", 3e-3, "single", batch_size=2, relearn_lr=3e-3)]
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
        corpus = small_corpus()
        corpus["probe"] = corpus["probe"][:-1] + [{"prompt": "Q: A new probe? A:", "answer": "yes"}]
        cfg = config(out, tiny_cache)
        cfg.examples = corpus
        with pytest.raises(StateMismatch, match="data split probe changed"):
            Pipeline(cfg).run(SPECS[:1])

    def test_restart_discards_the_state(self, finished, tmp_path, tiny_cache):  # noqa: F811
        out = _copy_state(finished[0], tmp_path / "out")
        corpus = small_corpus()
        corpus["probe"] = corpus["probe"][:-1]
        cfg = config(out, tiny_cache, restart=True)
        cfg.examples = corpus
        seen = []
        report = Pipeline(cfg, on_stage_done=lambda r, s: seen.append(s)).run(SPECS[:1])
        assert seen == ["unlearned", "relearned"]  # recomputed, not read back
        assert report["config"]["n_items"]["probe"] == len(corpus["probe"])
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
                           "edit": text.replace('"forget_acc": 0', '"forget_acc": 1', 1)}[damage])
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
DIST_SPECS = [RunSpec("ga_gd", 0.5, "continual", requests=2, batch_size=4, relearn_lr=0.5, optimizer="sgd"),
              RunSpec("npo", 0.5, "single", batch_size=4, relearn_lr=0.5, optimizer="sgd")]


def assert_stages_match(one: dict, two: dict) -> None:
    """Two reports of the same runs, one process and two: equal accuracies, MIA AUCs and verdicts, every other
    number within about 5x the float rounding measured between them on the test configurations (rel 4e-5 on
    Fisher masses and token CKA, 1e-5 on losses, 6e-5 absolute on PCA shifts, whose directions move most).
    The histogram bins are left out: a value on a bin edge may fall either side."""
    assert [r["run_id"] for r in one["runs"]] == [r["run_id"] for r in two["runs"]]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["verdict"]["behaviour"]["label"] == b["verdict"]["behaviour"]["label"]
        assert a["verdict"]["structure"]["label"] == b["verdict"]["structure"]["label"]
        for sa, sb in zip(a["stages"], b["stages"], strict=True):
            assert (sa["name"], sa["forget_acc"], sa["retain_acc"]) == (sb["name"], sb["forget_acc"], sb["retain_acc"])
            assert sb["mia_auc"] == pytest.approx(sa["mia_auc"], abs=1e-9)
            assert sb["perplexity"] == pytest.approx(sa["perplexity"], rel=1e-4)
            if sa["train"] is not None:
                assert sb["train"] == pytest.approx(sa["train"], rel=1e-4)
            for la, lb in zip(sa["layers"], sb["layers"], strict=True):
                for key in ("cka", "cka_debiased", "cka_tokens", "pca_similarity", "fisher_rank_corr"):
                    assert lb[key] == pytest.approx(la[key], rel=2e-4, abs=1e-6), (sa["name"], la["layer"], key)
                assert lb["fisher_mass_ratio"] == pytest.approx(la["fisher_mass_ratio"], rel=3e-4)
                assert lb["pca_shift"] == pytest.approx(la["pca_shift"], abs=3e-4)
            assert sb["fisher"]["mass_ratio"] == pytest.approx(sa["fisher"]["mass_ratio"], rel=3e-4)


def _resume_worker(rank: int, world: int, port: int, out: str, cache: str) -> None:
    """Both ranks stop after the first stage, then rerun the same command: rank 0 saves what the rerun computed."""
    import torch

    with gloo_group(rank, world, port):
        def stop(run_id, stage):
            if stage == "unlearned_1":
                raise Interrupt

        with pytest.raises(Interrupt):
            Pipeline(config(Path(out), Path(cache)), on_stage_done=stop).run(DIST_SPECS)
        checkpoints = sorted(p.name for p in (Path(out) / "state").rglob("*.pt"))
        seen = []
        report = Pipeline(config(Path(out), Path(cache)), on_stage_done=lambda r, s: seen.append(s)).run(DIST_SPECS)
        if rank == 0:
            torch.save({"report": report, "seen": seen, "checkpoints": checkpoints}, Path(out) / "rank0.pt")


class TestSeveralProcesses:
    def test_interrupted_sharded_run_resumes_to_the_one_process_report(self, tmp_path, tiny, tiny_cache):  # noqa: F811
        import torch
        import torch.multiprocessing as mp

        want = Pipeline(config(tmp_path / "one", tiny_cache)).run(DIST_SPECS)
        mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path / "two"), str(tiny_cache)), nprocs=2, join=True)
        got = torch.load(tmp_path / "two" / "rank0.pt", weights_only=False)
        assert got["checkpoints"] == ["1_unlearned_1.pt", "reference.pt"]  # the full master weights of stage 1
        assert got["seen"] == ["unlearned_2", "relearned", "unlearned", "relearned"]  # only what was left
        report = json.loads((tmp_path / "two" / "report.json").read_text())
        assert report["complete"] and report["config"]["world_size"] == 2
        assert want["runs"][0]["stages"][2]["forget_acc"] < want["runs"][0]["stages"][0]["forget_acc"]
        assert_stages_match(want, got["report"])


def stage(name, f, r, cka=1.0, pca=1.0):
    return {"name": name, "forget_acc": f, "retain_acc": r, "fisher": {"mass_ratio": 2.0},
            "layers": [{"layer": 0, "cka": cka, "pca_similarity": pca}, {"layer": 1, "cka": None, "pca_similarity": pca}]}


class TestVerdict:
    def test_token_cka_judges_structure_when_present(self):
        unl = stage("unlearned", 0, 1, cka=0.95)
        for row in unl["layers"]:
            row["cka_tokens"] = 0.2
        v = verdict([stage("original", 1, 1), unl, stage("relearned", 1, 1)])
        assert v["structure"]["label"] == "drifted" and v["structure"]["min_cka_tokens"] == 0.2

    @pytest.mark.parametrize("unl, rel, label", [
        ((0.9, 0.9), (0.95, 0.9), "not_forgotten"),
        ((0.1, 0.9), (0.9, 0.9), "reversible"),
        ((0.1, 0.2), (0.9, 0.9), "reversible"),
        ((0.1, 0.2), (0.2, 0.2), "catastrophic"),
        ((0.1, 0.9), (0.3, 0.9), "irreversible"),
    ])
    def test_behaviour_labels(self, unl, rel, label):
        v = verdict([stage("original", 1.0, 1.0), stage("unlearned", *unl), stage("relearned", *rel)])
        assert v["behaviour"]["label"] == label
        assert v["behaviour"]["forget_drop"] == pytest.approx(1.0 - unl[0])

    def test_structure_uses_last_unlearned_stage_and_thresholds(self):
        stages = [stage("original", 1, 1), stage("unlearned_1", 0.5, 1, cka=0.95), stage("unlearned_2", 0, 1, cka=0.45),
                  stage("relearned", 1, 1, cka=0.97)]
        v = verdict(stages)
        assert v["structure"]["stage"] == "unlearned_2" and v["structure"]["min_cka"] == 0.45
        assert v["structure"]["label"] == "drifted" and v["structure_relearned"]["label"] == "intact"
        assert verdict(stages, {"cka_intact": 0.4})["structure"]["label"] == "intact"
        assert verdict(stages, {"cka_intact": 0.4, "pca_intact": 1.01})["structure"]["label"] == "drifted"
        assert v["structure"]["fisher_mass_ratio"] == 2.0
        assert v["thresholds"] == THRESHOLDS


class TestSpecs:
    def test_split_requests(self):
        chunks = split_requests(list(range(11)), 3)
        assert [len(c) for c in chunks] == [4, 4, 3] and sum(chunks, []) == list(range(11))
        with pytest.raises(ValueError, match="cannot split"):
            split_requests([1, 2], 3)

    def test_runspec_validation_and_ids(self):
        with pytest.raises(ValueError, match="unknown method"):
            RunSpec("gradient_descent", 1e-3)
        with pytest.raises(ValueError, match="setting"):
            RunSpec("ga", 1e-3, "batch")
        assert RunSpec("npo", 1e-3, "continual", requests=5).run_id == "npo_lr0.001_continual5"
        assert RunSpec("ga", 1e-3, relearn_data="retain").stage_names() == ["original", "unlearned", "relearned"]
