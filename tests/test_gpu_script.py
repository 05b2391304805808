"""bench/gpu/bench_gpu.py --dry-run: the GPU proof script's code paths on tiny CPU tensors (interpreter)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu", "bench_gpu.py")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestDryRun:
    @pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the GPU run")
    def test_every_section_runs_and_reports(self, bench, tmp_path, capsys):
        assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
        result = json.loads((tmp_path / "bench_gpu.json").read_text())
        sections = {r["section"] for r in result["rows"]}
        assert sections == {"ceiling", "cross_products", "centered_gram", "per_sample_fisher", "square_accumulate",
                            "randomized_pca", "histogram"}
        for r in result["rows"]:
            assert ("ms" in r and math.isfinite(r["ms"]) and r["ms"] > 0) or r.get("note"), r
        impls = {(r["section"], r["impl"]) for r in result["rows"]}
        assert ("per_sample_fisher", "triton") in impls and ("square_accumulate", "triton") in impls
        assert {v["target"].split(" ")[0] for v in result["verdicts"]} >= {"cross_products", "per_sample_fisher",
                                                                            "randomized_pca"}
        assert "TARGET" in capsys.readouterr().out.splitlines()[-1]

    def test_unknown_section_is_an_error(self, bench):
        with pytest.raises(SystemExit):
            bench.main(["--dry-run", "--sections", "nope"])
