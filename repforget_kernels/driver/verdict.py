"""The verdict of a run: behaviour (the paper's four regimes), structure relative to the nulls, uncertainty.

Behaviour follows Definition 2.1 of Xu et al. (2025), on exact match E of generated answers, with theta_0
the original, theta_u the model after the last unlearning request and theta_r after relearning on the
forget set with a budget matched to it (one epoch):

- the *knowledge gap* of a split is what the original knows beyond a model that never saw its facts:
  gap(forget) = E(theta_0, forget) - E(oracle, forget) with the retain oracle (pretrained without the
  forget entities; without one, the original's E on the holdout entities, which it never saw);
  gap(retain) = E(theta_0, retain) - E(theta_0, holdout), gap(utility) = E(theta_0, utility);
- ``forget_drop`` = E(theta_0, forget) - E(theta_u, forget); forgetting happened when
  forget_drop >= ``forgotten`` x gap(forget) (default one half: closer to the oracle than to the original);
- ``collateral`` = the larger of retain_drop / gap(retain) and utility_drop / gap(utility); the run is
  catastrophic when collateral >= ``catastrophic`` (default one half: half of what the model knew beyond
  chance on retain or utility is gone);
- ``recovery`` = (E(theta_r, forget) - E(theta_u, forget)) / forget_drop; the run is reversible when
  recovery >= (1 + r_oracle) / 2, halfway between what the same relearning teaches the oracle from
  scratch (r_oracle = (E(oracle_r, forget) - E(oracle, forget)) / gap(forget); 0 without an oracle) and
  full recovery; ``recovery_threshold`` overrides that;

giving ``not_forgotten``, ``reversible``, ``reversible_catastrophic``, ``irreversible`` and
``irreversible_catastrophic``. Reversibility and catastrophe are judged independently (neither hides the
other).

Structure: for each structural metric m (:func:`structure_summary`: 0 = identical to the original),
the run's drift at the last unlearning stage is placed between "identical to the original" (0) and "as
far as the retain oracle" (1): position_m = drift_m(run) / drift_m(oracle), on the forget probes. The
label is ``drifted`` when the position of the primary metric (``STRUCTURE_METRIC``) is >= ``drifted``
(default one half), else ``intact``: the threshold is a point on the nulls' scale, not a value tuned on
the runs. The other-seed and random-initialisation nulls are reported on the same scale.

Uncertainty: every number behind a label carries a 95% percentile interval from an item-level bootstrap
(``BOOTSTRAP`` resamples, seeded): forget items resampled jointly across the stages they are compared
over (paired), retain and utility items likewise; structural positions from the bootstrap draws of the
probe rows that the pipeline stores (the same resampled rows for the run and the oracle). A label whose
interval crosses its threshold is marked uncertain.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = [
    "LABELS",
    "THRESHOLDS",
    "THRESHOLD_TEXT",
    "STRUCTURE_METRICS",
    "STRUCTURE_METRIC",
    "BOOTSTRAP",
    "structure_summary",
    "item_outcomes",
    "bootstrap_indices",
    "behaviour",
    "structure",
    "verdict",
    "spearman",
    "spearman_ci",
    "structure_vs_recovery",
]

LABELS = ("not_forgotten", "reversible", "reversible_catastrophic", "irreversible", "irreversible_catastrophic")
THRESHOLDS = {"forgotten": 0.5, "catastrophic": 0.5, "recovery_threshold": None, "drifted": 0.5}
THRESHOLD_TEXT = {
    "forgotten": "forgetting happened: the forget drop is at least this fraction of the forget knowledge gap "
                 "(original minus retain oracle)",
    "catastrophic": "catastrophic: retain or utility lost at least this fraction of what the original knew beyond "
                    "chance",
    "recovery_threshold": "reversible: relearning restored at least this fraction of the forget drop (None: "
                          "halfway between the oracle's from-scratch relearning and full recovery)",
    "drifted": "structure drifted: the run's drift is at least this far from the original towards the retain "
               "oracle (position of the primary metric on the forget probes)",
}
# Structural drift metrics, each 0 for a model identical to the original (see structure_summary).
STRUCTURE_METRICS = ("cka_pooled", "cka_debiased", "cka_tokens", "pca_similarity", "pca_subspace", "pca_distance",
                     "fisher_rank", "fisher_mass")
STRUCTURE_METRIC = "cka_pooled"  # the label's metric: its position has a bootstrap interval
BOOTSTRAP = 1000
_SEED = 20250522


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def structure_summary(layers: list, fisher: Optional[dict] = None) -> dict:
    """Drift metrics of one comparison's per-layer rows (``ModelComparison.to_dict()["layers"]``), 0 = identical.

    cka_pooled / cka_debiased / cka_tokens: mean over layers of 1 - CKA; pca_similarity: mean of 1 - |cos|
    of the first principal directions; pca_subspace: mean of 1 - the top-k principal-angle similarity;
    pca_distance: the mean PCA distance, mean over layers of the Euclidean norm of the normalised PCA shift
    (the centroid's displacement in the reference's top principal directions, in its standard deviations);
    fisher_rank: mean of 1 - the Fisher rank correlation; fisher_mass: |log| of the total Fisher mass ratio.
    None where the comparison did not measure it.
    """
    def one_minus(key):
        return _mean([None if r.get(key) is None else 1.0 - r[key] for r in layers])

    shift = [math.sqrt(sum(v * v for v in r["pca_shift"])) for r in layers
             if r.get("pca_shift") and None not in r["pca_shift"]]
    ratio = (fisher or {}).get("mass_ratio")
    return {"cka_pooled": one_minus("cka_pooled"), "cka_debiased": one_minus("cka_debiased"),
            "cka_tokens": one_minus("cka_tokens"), "pca_similarity": one_minus("pca_similarity"),
            "pca_subspace": one_minus("pca_similarity_k"), "pca_distance": _mean(shift),
            "fisher_rank": one_minus("fisher_rank_corr"),
            "fisher_mass": abs(math.log(ratio)) if ratio is not None and ratio > 0 else None}


# --------------------------------------------------------------------------- bootstrap


def item_outcomes(stage: dict, split: str) -> Optional[np.ndarray]:
    """(N,) float64 0/1 exact-match outcomes of one split at one stage (from ``em_items``), or None."""
    text = (stage.get("em_items") or {}).get(split)
    return None if text is None else np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.float64) - 48


def bootstrap_indices(n: int, draws: int = BOOTSTRAP, seed: int = _SEED) -> np.ndarray:
    """(draws, n) int indices of resamples with replacement, a pure function of (n, draws, seed)."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(draws, n))


def _interval(draws: np.ndarray) -> list:
    draws = draws[np.isfinite(draws)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws.size else [None, None]


def _uncertain(interval: list, threshold: Optional[float]) -> bool:
    lo, hi = interval
    return threshold is not None and lo is not None and lo < threshold <= hi


# --------------------------------------------------------------------------- behaviour


def _em(stage: Optional[dict], split: str) -> Optional[float]:
    return None if stage is None else (stage.get("em") or {}).get(split)


def behaviour(original: dict, unlearned: dict, relearned: Optional[dict], oracle: Optional[dict] = None,
              oracle_relearned: Optional[dict] = None, thresholds: Optional[dict] = None) -> dict:
    """The behaviour label of a run and the numbers behind it, each with a bootstrap 95% interval.

    Stage records carry ``em`` {split: E} and ``em_items`` {split: "0110..."} (the same items in the same
    order at every stage). ``oracle`` / ``oracle_relearned``: the retain oracle's records before and after
    the same relearning (None: the holdout stands in for the oracle, r_oracle = 0).
    """
    th = dict(THRESHOLDS, **(thresholds or {}))
    e0, eu = _em(original, "forget"), _em(unlearned, "forget")
    floor = _em(oracle, "forget") if oracle is not None else _em(original, "holdout") or 0.0
    gap_f = max(e0 - floor, 0.0)
    r_oracle = 0.0
    if oracle is not None and oracle_relearned is not None and gap_f > 0:
        r_oracle = max(0.0, (_em(oracle_relearned, "forget") - floor) / gap_f)
    recovery_threshold = th["recovery_threshold"] if th["recovery_threshold"] is not None else (1 + r_oracle) / 2
    gap_r = _em(original, "retain") - (_em(original, "holdout") or 0.0)
    gap_u = _em(original, "utility")

    f = [item_outcomes(s, "forget") for s in (original, unlearned, relearned)]
    idx_f = bootstrap_indices(f[0].size)
    drop_f = f[0][idx_f].mean(1) - f[1][idx_f].mean(1)  # (draws,)
    forgotten_draws = drop_f / gap_f if gap_f > 0 else np.full_like(drop_f, np.nan)
    out = {"forget_drop": e0 - eu, "forget_gap": gap_f, "forgotten": (e0 - eu) / gap_f if gap_f > 0 else None,
           "forgotten_ci95": _interval(forgotten_draws), "forget_drop_ci95": _interval(drop_f)}

    collateral, collateral_draws = [], []
    for split, gap in (("retain", gap_r), ("utility", gap_u)):
        before, after = item_outcomes(original, split), item_outcomes(unlearned, split)
        if before is None or after is None or gap is None or gap <= 0:
            out[f"{split}_drop"] = None
            continue
        idx = bootstrap_indices(before.size)
        drop = before[idx].mean(1) - after[idx].mean(1)
        out[f"{split}_drop"], out[f"{split}_drop_ci95"] = float(before.mean() - after.mean()), _interval(drop)
        collateral.append(float(before.mean() - after.mean()) / gap)
        collateral_draws.append(drop / gap)
    out["collateral"] = max(collateral) if collateral else None
    out["collateral_ci95"] = _interval(np.max(np.stack(collateral_draws), 0)) if collateral_draws else [None, None]

    out["recovery"] = None
    if relearned is not None and f[2] is not None and e0 - eu > 0:
        out["recovery"] = (_em(relearned, "forget") - eu) / (e0 - eu)
        with np.errstate(divide="ignore", invalid="ignore"):
            rec = (f[2][idx_f].mean(1) - f[1][idx_f].mean(1)) / drop_f
        out["recovery_ci95"] = _interval(np.where(drop_f > 0, rec, np.nan))
    out.update(recovery_threshold=recovery_threshold, oracle_recovery=r_oracle)

    forgotten = out["forgotten"] is not None and out["forgotten"] >= th["forgotten"]
    catastrophic = out["collateral"] is not None and out["collateral"] >= th["catastrophic"]
    reversible = out["recovery"] is not None and out["recovery"] >= recovery_threshold
    if not forgotten:
        label = "not_forgotten"
    else:
        label = ("reversible" if reversible else "irreversible") + ("_catastrophic" if catastrophic else "")
    uncertain = [name for name, ci, t, used in (
        ("forgotten", out["forgotten_ci95"], th["forgotten"], True),
        ("catastrophic", out["collateral_ci95"], th["catastrophic"], forgotten),
        ("recovery", out.get("recovery_ci95", [None, None]), recovery_threshold, forgotten)) if used and _uncertain(ci, t)]
    out.update(label=label, uncertain=uncertain, catastrophic=catastrophic, reversible=reversible if forgotten else None)
    return out


# --------------------------------------------------------------------------- structure


def structure(stage_structure: dict, oracle_structure: dict, thresholds: Optional[dict] = None,
              probe: str = "forget", metric: str = STRUCTURE_METRIC) -> dict:
    """Structure label of a stage: positions between the original (0) and the retain oracle (1).

    Each ``*_structure`` is {probe: {"summary": structure_summary(...), "draws": {metric: [bootstrap
    draws]}}}; the run's and the oracle's draws come from the same resampled probe rows, so their ratio
    is a paired bootstrap of the position.
    """
    th = dict(THRESHOLDS, **(thresholds or {}))
    run, oracle = stage_structure.get(probe) or {}, oracle_structure.get(probe) or {}
    positions = {}
    for m in STRUCTURE_METRICS:
        a, b = (run.get("summary") or {}).get(m), (oracle.get("summary") or {}).get(m)
        positions[m] = a / b if a is not None and b is not None and b > 0 else None
    a, b = (np.asarray((x.get("draws") or {}).get(metric) or [], dtype=np.float64) for x in (run, oracle))
    ci = _interval(a / b) if a.size and a.size == b.size and (b > 0).all() else [None, None]
    position = positions.get(metric)
    label = None if position is None else ("drifted" if position >= th["drifted"] else "intact")
    return {"label": label, "metric": metric, "probe": probe, "position": position, "position_ci95": ci,
            "uncertain": _uncertain(ci, th["drifted"]), "positions": positions}


def verdict(stages: list, nulls: Optional[dict] = None, thresholds: Optional[dict] = None) -> dict:
    """Behaviour and structure of one run. ``stages``: original, unlearned (or unlearned_1..N) and
    relearned_* records; ``nulls``: {"retain_oracle": {"record", "relearned"}, ...} (see pipeline)."""
    by_name = {s["name"]: s for s in stages}
    unlearned = [s for s in stages if s["name"].startswith("unlearned")]
    oracle = (nulls or {}).get("retain_oracle") or {}
    out = {"behaviour": behaviour(by_name["original"], unlearned[-1], by_name.get("relearned_forget"),
                                  oracle.get("record"), oracle.get("relearned"), thresholds)}
    for control in ("relearned_retain", "relearned_unrelated"):
        rel, eu, e0 = by_name.get(control), _em(unlearned[-1], "forget"), _em(by_name["original"], "forget")
        out["behaviour"][f"recovery_{control.split('_', 1)[1]}"] = (
            (_em(rel, "forget") - eu) / (e0 - eu) if rel is not None and e0 - eu > 0 else None)
    oracle_structure = (oracle.get("record") or {}).get("structure")
    out["structure"] = structure(unlearned[-1].get("structure") or {}, oracle_structure or {}, thresholds)
    return out


# --------------------------------------------------------------------------- across runs


def spearman(x, y) -> Optional[float]:
    """Spearman rank correlation (ties: average ranks) of two equal-length sequences; None if undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or x.size != y.size:
        return None

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size)
        r[order] = np.arange(1, v.size + 1)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x) - (x.size + 1) / 2, ranks(y) - (y.size + 1) / 2
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else None


def spearman_ci(x, y, draws: int = BOOTSTRAP, seed: int = _SEED) -> list:
    """95% percentile interval of the Spearman correlation under a bootstrap over the pairs (runs)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3:
        return [None, None]
    values = [spearman(x[i], y[i]) for i in bootstrap_indices(x.size, draws, seed)]
    return _interval(np.array([v for v in values if v is not None], dtype=np.float64))


def _correlations(runs: list) -> dict:
    """Spearman (and its bootstrap 95% interval over runs) between each metric's position and 1 - recovery."""
    non_recovery = [1.0 - r["verdict"]["behaviour"]["recovery"] for r in runs]
    by_metric = {}
    for m in STRUCTURE_METRICS:
        pairs = [(r["verdict"]["structure"]["positions"].get(m), nr) for r, nr in zip(runs, non_recovery)]
        pairs = [(a, b) for a, b in pairs if a is not None]
        by_metric[m] = {"spearman": spearman(*zip(*pairs)) if len(pairs) >= 3 else None,
                        "ci95": spearman_ci(*zip(*pairs)) if len(pairs) >= 3 else [None, None], "runs": len(pairs)}
    main = by_metric[STRUCTURE_METRIC]
    return {"metric": STRUCTURE_METRIC, "spearman": main["spearman"], "ci95": main["ci95"], "runs": main["runs"],
            "by_metric": {m: v["spearman"] for m, v in by_metric.items()}, "by_metric_detail": by_metric}


def structure_vs_recovery(runs: list) -> dict:
    """The headline: Spearman between structural drift at the end of unlearning (positions on the forget
    probes, the primary metric and each metric alone) and non-recovery after relearning on the forget set
    (1 - recovery), over the runs where forgetting happened; with a bootstrap 95% interval over runs.

    ``non_catastrophic`` repeats it over the forgotten runs without catastrophe: a catastrophic run both
    drifts and fails to recover because the whole model broke, which can make the pooled correlation
    positive without structure telling reversible from irreversible *selective* forgetting.
    """
    forgot = [r for r in runs if r["verdict"]["behaviour"]["label"] != "not_forgotten"
              and r["verdict"]["behaviour"]["recovery"] is not None]
    out = _correlations(forgot)
    out["non_catastrophic"] = _correlations([r for r in forgot if not r["verdict"]["behaviour"].get("catastrophic")])
    return out
