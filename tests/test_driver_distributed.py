"""Driver diagnostics under torch.distributed: two gloo processes on CPU, each running its share of the
probe and forget batches, give the numbers of one process (pooled rows and per-example scores gathered
back in order, StreamingCKA all-reduced, Fisher sums added across ranks)."""
from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from repforget_kernels import collect_activations, compare_models
from repforget_kernels.driver import diagnostics as D
from repforget_kernels.driver.data import iterate_batches
from repforget_kernels.driver.evaluate import split_scores

from conftest import free_port, gloo_group
from test_driver_diagnostics import random_models

CFG = D.DiagnosticsConfig(batch_size=3, fisher_samples=5000)


def _diagnose():
    """Everything the two ranks split: pooled and token rows (the latter cut at an awkward 50 rows, inside a
    batch of rank 1), a probe pass with fewer batches than ranks, all diagnostics, and split_scores."""
    ref, upd, enc = random_models()

    def rows(batch_size, **kw):
        return torch.stack(collect_activations(ref, iterate_batches(enc["probe"], batch_size), share=D.RankShare(), **kw))

    rows = {"mean": rows(CFG.batch_size), "tokens": rows(CFG.batch_size, sample="tokens", max_rows=50),
            "one_batch": rows(64, sample="last")}
    scores = split_scores(upd, enc["holdout"], batch_size=CFG.batch_size)
    return rows, scores, compare_models(ref, upd, **D.comparison_options(CFG, enc["probe"], enc["forget"])).to_dict()


def _worker(rank: int, world: int, port: int, path: str) -> None:
    with gloo_group(rank, world, port):
        rows, scores, out = _diagnose()
        torch.save({"rows": rows, "scores": scores, "out": out}, f"{path}.{rank}")


def _close(a, b, tol):
    if a is None or b is None:
        return a is b
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v, tol) for u, v in zip(a, b))
    return a == pytest.approx(b, rel=tol, abs=tol)


class TestTwoGlooProcesses:
    def test_same_numbers_as_one_process(self, tmp_path):
        rows_one, scores_one, want = _diagnose()
        path = str(tmp_path / "rank")
        mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
        got = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
        assert rows_one["tokens"].shape[1] == 50
        for g in got:
            for sample, rows in rows_one.items():  # gathered back in probe order: the very same rows
                torch.testing.assert_close(g["rows"][sample], rows, rtol=0, atol=0)
            for key, value in scores_one.items():  # per-example scores, in row order
                torch.testing.assert_close(g["scores"][key], value, rtol=0, atol=0)
            for row_got, row_want in zip(g["out"]["layers"], want["layers"]):
                for key, value in row_want.items():
                    tol = 1e-3 if key == "fisher_rank_corr" else 1e-5
                    assert _close(row_got[key], value, tol), (key, row_got[key], value)
            assert g["out"]["fisher"]["mass_ratio"] == pytest.approx(want["fisher"]["mass_ratio"], rel=1e-5)
        assert got[0]["out"]["layers"] == got[1]["out"]["layers"]
