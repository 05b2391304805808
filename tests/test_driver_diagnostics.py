"""Driver diagnostics: the settings become compare_models' arguments, and the driver's numbers are the library's.

The library side (hooks, pooling, every metric against the kernels) is tested in test_activations.py
and test_compare.py. ``random_models`` (an untrained small model and a perturbed copy) is used by other
driver test files too.
"""
from __future__ import annotations

import copy

import pytest
import torch

from repforget_kernels import ReferenceStatistics, compare_models
from repforget_kernels.driver import diagnostics as D
from repforget_kernels.driver.data import encode, iterate_batches

from conftest import random_small_model


def random_models():
    """(reference, perturbed copy, encoded small-benchmark splits): an untrained small Qwen2 (instant, seeded);
    ``probe`` is the unrelated split."""
    ref, tok, corpus = random_small_model()
    upd = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in upd.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    enc = {k: encode(tok, v) for k, v in corpus.items()}
    enc["probe"] = enc["unrelated"]
    return ref, upd, enc


@pytest.fixture(scope="module")
def random_pair():
    return random_models()


class TestOptions:
    def test_batches_fisher_and_row_cap_follow_the_config(self, random_pair):
        _, _, enc = random_pair
        cfg = D.DiagnosticsConfig(batch_size=5, max_token_rows=17)
        opts = D.statistics_options(cfg, enc["probe"], enc["forget"])
        want = list(iterate_batches(enc["probe"], 5))
        assert len(opts["batches"]) == len(want)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(opts["batches"], want))
        assert len(opts["fisher_batches"]) == len(list(iterate_batches(enc["forget"], 5)))
        assert opts["max_rows"] is None and opts["sample"] == "mean"  # the cap is for token rows only
        tokens = D.statistics_options(D.DiagnosticsConfig(sample="tokens", max_token_rows=17), enc["probe"], None)
        assert tokens["max_rows"] == 17 and tokens["fisher_batches"] is None
        off = D.comparison_options(D.DiagnosticsConfig(fisher=False, token_cka=False, pca_k=3), enc["probe"], enc["forget"])
        assert off["fisher_batches"] is None and off["token_cka"] is False and off["pca_k"] == 3

    def test_one_process_share_runs_every_batch(self):
        share = D.RankShare()
        assert share.processes == 1 and all(share.runs(i) for i in range(7))


class TestPipelinePath:
    def test_statistics_then_comparison_equal_one_direct_comparison(self, random_pair):
        """The pipeline's path (statistics once, token CKA by running the original again) gives analyze's numbers."""
        ref, upd, enc = random_pair
        cfg = D.DiagnosticsConfig(batch_size=6, pca_k=2, fisher_samples=500)
        stats = ReferenceStatistics.compute(ref, **D.statistics_options(cfg, enc["probe"], enc["forget"]),
                                            tokens="model")
        staged = compare_models(stats, upd, **D.comparison_options(cfg, enc["probe"], enc["forget"])).to_dict()
        direct = compare_models(ref, upd, **D.comparison_options(cfg, enc["probe"], enc["forget"])).to_dict()
        assert staged == direct
        assert {"cka", "cka_pooled", "cka_debiased", "cka_tokens", "pca_similarity", "pca_similarity_k", "pca_shift",
                "fisher_mass", "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"} == set(direct["layers"][0]) - {"layer"}
