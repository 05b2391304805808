"""The verdict: the five labels on constructed stage tables, bootstrap intervals, positions, the headline."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from repforget_kernels.driver.pipeline import selective_runs, summarize
from repforget_kernels.driver.verdict import (
    LABELS,
    STRUCTURE_METRICS,
    behaviour,
    bootstrap_indices,
    item_outcomes,
    spearman,
    spearman_ci,
    structure,
    structure_summary,
    structure_vs_recovery,
    verdict,
)

N = 40  # items per split in the constructed tables


def _items(correct: int, n: int = N) -> str:
    return "1" * correct + "0" * (n - correct)


def stage(name: str, forget: int, retain: int = N, utility: int = N, holdout: int = 0, structure=None) -> dict:
    """A stage record whose forget / retain / utility splits have the given numbers of correct items."""
    counts = {"forget": forget, "retain": retain, "utility": utility, "holdout": holdout}
    return {"name": name, "em": {k: v / N for k, v in counts.items()},
            "em_items": {k: _items(v) for k, v in counts.items()}, "structure": structure or {}}


def run_stages(unlearned: tuple, relearned: int) -> list:
    """original (all correct) -> unlearned (forget, retain, utility correct) -> relearned_forget."""
    return [stage("original", N), stage("unlearned", *unlearned), stage("relearned_forget", relearned, *unlearned[1:])]


class TestLabels:
    @pytest.mark.parametrize("unlearned,relearned,label", [
        ((36, 40, 40), 38, "not_forgotten"),              # forget fell by 0.1 of the gap
        ((4, 40, 40), 38, "reversible"),                  # forgot, targeted, came back
        ((4, 10, 40), 38, "reversible_catastrophic"),     # retain collapsed too, yet relearning restores forget
        ((4, 40, 40), 8, "irreversible"),                 # forgot, targeted, stays gone
        ((4, 40, 12), 8, "irreversible_catastrophic"),    # utility collapsed, forget stays gone
    ])
    def test_each_label(self, unlearned, relearned, label):
        got = behaviour(*run_stages(unlearned, relearned)[:3])
        assert got["label"] == label
        assert got["label"] in LABELS

    def test_catastrophe_is_not_hidden_by_reversibility(self):
        """The old order tested reversibility first and called this run plain 'reversible'."""
        got = behaviour(*run_stages((0, 4, 4), 40))
        assert got["reversible"] and got["catastrophic"] and got["label"] == "reversible_catastrophic"

    def test_numbers_behind_the_label(self):
        got = behaviour(*run_stages((4, 30, 40), 22))
        assert got["forget_drop"] == pytest.approx(36 / N)
        assert got["retain_drop"] == pytest.approx(10 / N) and got["utility_drop"] == pytest.approx(0.0)
        assert got["collateral"] == pytest.approx(10 / N)  # retain gap is 1.0 (holdout EM 0)
        assert got["recovery"] == pytest.approx((22 - 4) / 36)
        assert got["recovery_threshold"] == pytest.approx(0.5)  # no oracle: halfway between 0 and full recovery

    def test_oracle_sets_the_gap_and_the_recovery_threshold(self):
        orig, unl, rel = run_stages((10, 40, 40), 29)
        oracle, oracle_rel = stage("retain_oracle", 4), stage("retain_oracle_relearned", 16)
        got = behaviour(orig, unl, rel, oracle, oracle_rel)
        assert got["forget_gap"] == pytest.approx(36 / N)
        assert got["oracle_recovery"] == pytest.approx(12 / 36)
        assert got["recovery_threshold"] == pytest.approx((1 + 12 / 36) / 2)
        assert got["recovery"] == pytest.approx(19 / 30) and got["label"] == "irreversible"  # 0.633 < 0.667
        assert behaviour(orig, unl, rel, oracle, oracle_rel, {"recovery_threshold": 0.6})["label"] == "reversible"

    def test_threshold_crossing_interval_marks_uncertain(self):
        got = behaviour(*run_stages((20, 40, 40), 30))  # forgotten = 0.5 exactly at the threshold
        assert "forgotten" in got["uncertain"]
        assert behaviour(*run_stages((0, 40, 40), 40))["uncertain"] == []


class TestBootstrap:
    def test_indices_are_a_pure_function(self):
        a, b = bootstrap_indices(17, 50), bootstrap_indices(17, 50)
        assert a.shape == (50, 17) and np.array_equal(a, b) and a.min() >= 0 and a.max() < 17

    def test_forget_drop_interval_by_hand(self):
        orig, unl, rel = run_stages((10, 40, 40), 30)
        got = behaviour(orig, unl, rel)
        idx = bootstrap_indices(N)
        before, after = item_outcomes(orig, "forget"), item_outcomes(unl, "forget")
        drops = before[idx].mean(1) - after[idx].mean(1)  # paired: the same items at both stages
        assert got["forget_drop_ci95"] == pytest.approx([np.percentile(drops, 2.5), np.percentile(drops, 97.5)])
        lo, hi = got["forget_drop_ci95"]
        assert lo < got["forget_drop"] < hi

    def test_item_outcomes(self):
        assert item_outcomes({"em_items": {"forget": "1011"}}, "forget").tolist() == [1.0, 0.0, 1.0, 1.0]
        assert item_outcomes({}, "forget") is None


def _structure_record(drift: float, draws: list) -> dict:
    summary = {m: drift for m in STRUCTURE_METRICS}
    return {"forget": {"summary": summary, "draws": {"cka_pooled": draws}}}


class TestStructure:
    def test_position_between_original_and_oracle(self):
        run, oracle = _structure_record(0.1, [0.08, 0.1, 0.12]), _structure_record(0.4, [0.4, 0.4, 0.4])
        got = structure(run, oracle)
        assert got["position"] == pytest.approx(0.25) and got["label"] == "intact"
        assert got["position_ci95"] == pytest.approx([np.percentile([0.2, 0.25, 0.3], 2.5),
                                                      np.percentile([0.2, 0.25, 0.3], 97.5)])
        assert structure(_structure_record(0.3, [0.3] * 3), oracle)["label"] == "drifted"
        crossing = structure(_structure_record(0.2, [0.1, 0.2, 0.3]), oracle)
        assert crossing["uncertain"] and crossing["label"] == "drifted"

    def test_summary_of_layer_rows(self):
        layers = [{"cka_pooled": 0.9, "cka_debiased": 0.8, "cka_tokens": 0.7, "pca_similarity": 1.0,
                   "pca_similarity_k": None, "pca_shift": [3.0, 4.0], "fisher_rank_corr": 0.5},
                  {"cka_pooled": 0.7, "cka_debiased": None, "cka_tokens": 0.5, "pca_similarity": 0.5,
                   "pca_shift": [0.0, 1.0], "fisher_rank_corr": 0.25}]
        got = structure_summary(layers, {"mass_ratio": np.e})
        assert got["cka_pooled"] == pytest.approx(0.2) and got["cka_debiased"] == pytest.approx(0.2)
        assert got["cka_tokens"] == pytest.approx(0.4) and got["pca_similarity"] == pytest.approx(0.25)
        assert got["pca_subspace"] is None and got["pca_distance"] == pytest.approx(3.0)  # mean of 5 and 1
        assert got["fisher_rank"] == pytest.approx(0.625) and got["fisher_mass"] == pytest.approx(1.0)


class TestHeadline:
    def test_spearman_matches_scipy_with_ties(self):
        x, y = [1, 2, 2, 3, 5, 4, 7], [0.1, 0.3, 0.2, 0.2, 0.9, 0.5, 0.8]
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
        assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
        assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None

    def test_interval_of_a_perfect_order(self):
        x = list(range(12))
        assert spearman_ci(x, [2 * v for v in x]) == pytest.approx([1.0, 1.0])
        lo, hi = spearman_ci(x, [((7 * v) % 12) for v in x])
        assert -1.0 <= lo <= hi <= 1.0

    def test_structure_vs_recovery_over_runs(self):
        runs = []
        cases = [(0.1, 0.9, False), (0.3, 0.7, False), (0.5, 0.6, False), (0.9, 0.1, True), (0.7, 0.2, True),
                 (0.2, 0.5, False), (0.4, 0.8, False)]
        for i, (position, recovery, catastrophic) in enumerate(cases):
            runs.append({"run_id": f"r{i}", "verdict": {
                "behaviour": {"label": "reversible", "recovery": recovery, "catastrophic": catastrophic},
                "structure": {"positions": {m: position for m in STRUCTURE_METRICS}}}})
        runs.append({"run_id": "skip", "verdict": {"behaviour": {"label": "not_forgotten", "recovery": None},
                                                   "structure": {"positions": {}}}})
        got = structure_vs_recovery(runs)
        # positions 0.1 .. 0.9 against non-recovery 0.1, 0.3, 0.4, 0.9, 0.8, 0.5, 0.2: ranks (1,3,5,7,6,2,4) vs
        # (1,3,4,7,6,5,2): sum d^2 = 0+0+1+0+0+9+4 = 14, rho = 1 - 6*14/(7*48) = 0.75
        assert got["runs"] == 7 and got["spearman"] == pytest.approx(0.75)
        assert set(got["by_metric"]) == set(STRUCTURE_METRICS)
        # without the two catastrophic runs: positions (0.1,0.3,0.5,0.2,0.4) vs (0.1,0.3,0.4,0.5,0.2): ranks
        # (1,3,5,2,4) vs (1,3,4,5,2): sum d^2 = 0+0+1+9+4 = 14, rho = 1 - 6*14/(5*24) = 0.3
        calm = got["non_catastrophic"]
        assert calm["runs"] == 5 and calm["spearman"] == pytest.approx(0.3)


class TestSummary:
    def _run(self, run_id, label, forget_drop, retain_drop, utility_drop=0.0, seed=0):
        return {"run_id": run_id, "method": "ga", "lr": 1e-3, "setting": "single", "requests": 1, "seed": seed,
                "verdict": {"behaviour": {"label": label, "forget_drop": forget_drop, "retain_drop": retain_drop,
                                          "utility_drop": utility_drop, "recovery": 0.5},
                            "structure": {"positions": {m: 0.5 for m in STRUCTURE_METRICS}}}}

    def test_schema(self):
        runs = [self._run("a", "irreversible", 0.8, 0.05), self._run("b", "reversible", 0.6, 0.3, seed=1),
                self._run("c", "irreversible", 0.9, 0.0, utility_drop=0.4, seed=2)]
        nulls = {"retain_oracle": {"record": {"structure": {"forget": {"summary": {"cka_pooled": 0.3}}}}}}
        got = summarize(runs, nulls)
        assert set(got) >= {"regimes", "structure_vs_recovery", "nulls", "selective_runs"}
        assert got["regimes"] == {"irreversible": 2, "reversible": 1}
        assert set(got["structure_vs_recovery"]) >= {"spearman", "ci95", "runs", "by_metric"}
        assert got["nulls"]["retain_oracle"]["forget"] == {"cka_pooled": 0.3}
        assert got["selective_runs"] == ["a"] == selective_runs(runs)
        cell = got["seed_agreement"]["ga_lr0.001_single"]
        assert cell == {"label": "irreversible", "agree": 2, "seeds": 3}

    def test_verdict_reads_the_controls(self):
        stages = run_stages((4, 40, 40), 38) + [stage("relearned_retain", 22), stage("relearned_unrelated", 4)]
        got = verdict(stages)
        assert got["behaviour"]["recovery_retain"] == pytest.approx(0.5)
        assert got["behaviour"]["recovery_unrelated"] == pytest.approx(0.0)
