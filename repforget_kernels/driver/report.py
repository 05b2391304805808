"""Report files of a driver run: report.json (every number), report.md (tables) and the PNGs.

``report.json`` schema::

    {"complete": true, "kind": "repforget-report", "config": {...}, "versions": {...}, "thresholds": {...},
     "summary": {"regimes": {label: count}, "structure_vs_recovery": {"spearman", "ci95", "runs", "metric",
                 "by_metric": {metric: r}, "by_metric_detail", "non_catastrophic": {the same keys}},
                 "nulls": {null: {probe: drift summary}},
                 "selective_runs": [run_id], "seed_agreement": {cell: {"label", "agree", "seeds"}}},
     "nulls": {null: {"info", "record": stage record, "relearned" (retain oracle only)}},
     "runs": [{"run_id", "method", "lr", "setting", "requests", "seed", "reference", "spec",
               "recoveries": {control: recovery},
               "stages": [{"name": "original" | "unlearned" | "unlearned_i" | "relearned_<control>",
                           "train": {"steps", "first_loss", "final_loss"} | null,
                           "em": {split: exact match}, "em_items": {split: "0110..."},
                           "token_acc": {split: ...}, "perplexity", "mia_auc": {"loss", "zlib", "min_k",
                           "min_k_plus_plus"}, "curve": [forget EM after each relearning step] (relearned),
                           with TOFU / MUSE metrics (``repforget run``, docs/interop.md): "rouge",
                           "probability", "truth_ratio" {split: ...}, "truth_ratio_items" {split: [R]},
                           "model_utility", "forget_quality", "privleak",
                           "structure": {probe: {"layers": [...], "fisher": {...}, "summary": {metric: drift},
                                                 "draws": {"cka_pooled": [...]}}}}],
               "verdict": {"behaviour": {...}, "structure": {...}}}]}

The file is written last and atomically, so a report.json on disk is always a finished one; a run
that fails leaves the previous report as it was (each file is only ever replaced by a complete one).
"""
from __future__ import annotations

import math
import platform
from pathlib import Path

from .files import atomic_write_json, atomic_write_text
from .verdict import STRUCTURE_METRICS, THRESHOLD_TEXT

__all__ = ["versions", "render_markdown", "render_analysis_markdown", "write_report"]

_SPLIT_TEXT = {
    "forget": "trained-template questions about the forget entities (learned, then unlearned)",
    "forget_paraphrase": "the held-out template of every forget fact (never trained): knowledge, not a string",
    "retain": "trained-template questions about other entities (kept)",
    "retain_paraphrase": "the held-out template of retain facts",
    "holdout": "facts of entities never trained (chance level; the MIA non-members)",
    "utility": "rule tasks on operands never trained (repeat, reverse, swap words): ability, not recall",
}


def versions() -> dict:
    """Versions of the software that produced a report."""
    import numpy
    import torch
    import transformers

    import repforget_kernels

    return {"repforget_kernels": repforget_kernels.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- formatting


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, list):
        return "(" + ", ".join(_fmt(u, 2) for u in v) + ")"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) >= 1000 else f"{v:.{digits}f}"


def _ci(value, interval) -> str:
    """``0.62 [0.55, 0.70]``."""
    if value is None:
        return "-"
    lo, hi = interval or (None, None)
    return _fmt(value, 2) + ("" if lo is None else f" [{_fmt(lo, 2)}, {_fmt(hi, 2)}]")


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(v if isinstance(v, str) else _fmt(v) for v in row) + " |" for row in rows]


def _layer_table(layers: list) -> list:
    header = ["layer", "cka", "cka debiased", "cka tokens", "pca sim", "pca shift (dPC1, dPC2)",
              "fisher mass ratio", "fisher rank corr"]
    rows = [[r["layer"], r["cka"], r["cka_debiased"], r["cka_tokens"], r["pca_similarity"], r["pca_shift"],
             r["fisher_mass_ratio"], r["fisher_rank_corr"]] for r in layers]
    return _table(header, rows)


# --------------------------------------------------------------------------- sections


def _definitions(report: dict) -> list:
    splits = report["config"].get("eval_splits") or list(_SPLIT_TEXT)
    lines = ["## What the numbers are", "",
             "- **EM** (exact match): the greedy answer, up to EOS (excluded), lower-cased with punctuation "
             "and repeated whitespace removed, equals the reference answer. Per split, the fraction of items.",
             "- **token acc**: teacher-forced accuracy of the answer tokens (EOS excluded).",
             "- **perplexity**: exp(mean NLL) of the supervised retain tokens. **MIA AUC**: forget (members) "
             "vs holdout (non-members), LOSS / ZLib / Min-K% / Min-K%++ scores.",
             "- **drift** metrics (0 = identical to the original): 1 - CKA (pooled rows, debiased, every token), "
             "1 - PCA similarity (PC1, top-k), the mean PCA distance (norm of the normalised centroid shift in the "
             "original's top principal directions), 1 - Fisher rank correlation, |log Fisher mass ratio|.",
             "- **position**: a run's drift divided by the retain oracle's (0 = the original, 1 = as far as a "
             "model that never saw the forget entities).",
             "- **[lo, hi]**: 95% item-level bootstrap intervals; **?** marks a label whose interval crosses "
             "its threshold.", "", "Splits:", ""]
    return lines + [f"- `{s}`: {_SPLIT_TEXT.get(s, 'user data')}" for s in splits] + [""]


def _verdicts(report: dict) -> list:
    rows = []
    for run in report["runs"]:
        b, s = run["verdict"]["behaviour"], run["verdict"]["structure"]
        mark = " ?" if b["uncertain"] else ""
        rows.append([run["run_id"], b["label"] + mark, _ci(b["forget_drop"], b.get("forget_drop_ci95")),
                     _ci(b["collateral"], b.get("collateral_ci95")), _ci(b["recovery"], b.get("recovery_ci95")),
                     _fmt(b.get("recovery_retain"), 2), _fmt(b.get("recovery_unrelated"), 2),
                     (s["label"] or "-") + (" ?" if s["uncertain"] else ""), _ci(s["position"], s["position_ci95"])])
    return ["## Verdicts", ""] + _table(
        ["run", "behaviour", "forget drop", "collateral", "recovery (forget relearn)", "recovery (retain relearn)",
         "recovery (unrelated relearn)", "structure", "position"], rows) + [""]


def _headline(summary: dict) -> list:
    h = summary["structure_vs_recovery"]
    lines = ["## Does structure predict recovery?", "",
             f"Spearman correlation between structural drift at the end of unlearning (position of "
             f"`{h['metric']}` on the forget probes) and non-recovery after relearning on the forget set "
             f"(1 - recovery), over the {h['runs']} runs that forgot: **{_ci(h['spearman'], h['ci95'])}** "
             "(bootstrap over runs). The paper's hypothesis predicts a clearly positive value.", ""]
    calm = h.get("non_catastrophic")
    if calm is not None:
        lines += [f"Over the {calm['runs']} of them without catastrophe (catastrophic runs drift and fail to recover "
                  f"because the whole model broke): **{_ci(calm['spearman'], calm['ci95'])}**.", ""]
    detail = (calm or {}).get("by_metric_detail", {})
    rows = [[m, _ci(d["spearman"], d["ci95"]), d["runs"]]
            + ([_ci(detail[m]["spearman"], detail[m]["ci95"]), detail[m]["runs"]] if m in detail else [])
            for m, d in h["by_metric_detail"].items()]
    header = ["drift metric", "Spearman with 1 - recovery", "runs"]
    if detail:
        header += ["without catastrophe", "runs"]
    return lines + _table(header, rows) + [""]


def _nulls(report: dict) -> list:
    nulls = report.get("nulls") or {}
    if not nulls:
        return []
    lines = ["## Nulls (the same metrics against the original)", ""]
    rows = []
    for name, null in nulls.items():
        rec = null["record"]
        for probe, st in (rec.get("structure") or {}).items():
            rows.append([name, probe] + [_fmt(st["summary"].get(m)) for m in STRUCTURE_METRICS])
    lines += _table(["null", "probe"] + list(STRUCTURE_METRICS), rows) + [""]
    rows = [[name, *[_fmt((null["record"].get("em") or {}).get(s)) for s in ("forget", "retain", "utility")],
             _fmt(((null.get("relearned") or {}).get("em") or {}).get("forget"))] for name, null in nulls.items()]
    return lines + _table(["null", "EM forget", "EM retain", "EM utility", "EM forget after the runs' relearning"],
                          rows) + [""]


def _summary(summary: dict) -> list:
    lines = ["## Regimes", ""] + _table(["label", "runs"], sorted(summary["regimes"].items())) + [""]
    lines += [f"Selective runs (forget EM fell by >= 0.5, retain and utility by <= 0.1): "
              f"{', '.join(summary['selective_runs']) or 'none'}.", ""]
    agreement = summary.get("seed_agreement") or {}
    if any(v["seeds"] > 1 for v in agreement.values()):
        rows = [[cell, v["label"], f"{v['agree']}/{v['seeds']}"] for cell, v in agreement.items()]
        lines += ["## Agreement across seeds", ""] + _table(["cell", "label", "seeds agreeing"], rows) + [""]
    return lines


def _em_table(run: dict, splits: list) -> list:
    rows = [[s["name"]] + [_fmt((s.get("em") or {}).get(k)) for k in splits] +
            [_fmt((s.get("token_acc") or {}).get("forget")), _fmt(s.get("perplexity")),
             _fmt((s.get("mia_auc") or {}).get("min_k_plus_plus"))] for s in run["stages"]]
    return _table(["stage"] + [f"EM {k}" for k in splits] + ["token acc forget", "perplexity", "MIA min-k++"], rows)


def _benchmark_table(run: dict) -> list:
    """TOFU / MUSE numbers by stage (docs/interop.md), when the run computed them."""
    if not any("model_utility" in s for s in run["stages"]):
        return []
    rows = [[s["name"], _fmt((s.get("rouge") or {}).get("forget")), _fmt((s.get("probability") or {}).get("forget")),
             _fmt((s.get("truth_ratio") or {}).get("forget")), _fmt(s.get("forget_quality"), 4),
             _fmt(s.get("model_utility")), _fmt(s.get("privleak"), 2),
             _fmt((s.get("mia_auc") or {}).get("zlib")), _fmt((s.get("mia_auc") or {}).get("min_k"))]
            for s in run["stages"]]
    return ["### TOFU / MUSE metrics by stage", ""] + _table(
        ["stage", "ROUGE-L forget", "prob. forget", "truth ratio forget", "forget quality", "model utility",
         "privleak %", "MIA zlib", "MIA min-k"], rows) + [""]


def _run_section(run: dict, splits: list) -> list:
    lines = [f"## {run['run_id']}", "", "### Exact match by stage", ""] + _em_table(run, splits) + [""]
    lines += _benchmark_table(run)
    curves = [(s["name"], s["curve"]) for s in run["stages"] if s.get("curve")]
    if curves:
        lines += ["### Recovery curves (forget EM after each relearning step)", ""]
        lines += [f"- `{name}`: " + " ".join(_fmt(v, 2) for v in curve) for name, curve in curves] + [""]
    rows = [[s["name"], probe] + [_fmt(st["summary"].get(m)) for m in STRUCTURE_METRICS]
            for s in run["stages"][1:] for probe, st in (s.get("structure") or {}).items()]
    lines += ["### Drift by stage and probe set", ""] + _table(["stage", "probe"] + list(STRUCTURE_METRICS), rows)
    last = [s for s in run["stages"] if s["name"].startswith("unlearned")][-1]
    forget = (last.get("structure") or {}).get("forget")
    if forget:
        lines += ["", f"### Layers after `{last['name']}` (forget probes)", ""] + _layer_table(forget["layers"])
    return lines + [""]


def render_markdown(report: dict) -> str:
    """report.md: definitions, verdicts, the headline correlation, nulls, regimes, then each run in detail."""
    c = report["config"]
    splits = [s for s in c.get("eval_splits", []) if s != "holdout"] or ["forget", "retain"]
    lines = ["# repforget report", "",
             f"Model `{c.get('model')}`, seed {c.get('seed')}, sample `{c.get('sample')}`, probe sets "
             f"{', '.join(c.get('probe_sets', []))}; relearning controls {', '.join(c.get('relearn_controls', []))} "
             f"(one budget: {c.get('relearn')}). Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + ".", ""]
    lines += _definitions(report) + _verdicts(report) + _headline(report["summary"]) + _nulls(report)
    lines += _summary(report["summary"])
    lines += ["## Thresholds", ""] + [f"- `{k}` = {v}: {THRESHOLD_TEXT.get(k, '')}" for k, v in report["thresholds"].items()]
    lines += [""]
    for run in report["runs"]:
        lines += _run_section(run, splits)
    return "\n".join(lines) + "\n"


def render_analysis_markdown(analysis: dict) -> str:
    """analysis.md of ``repforget analyze``: the per-layer table of one checkpoint pair."""
    fisher = analysis.get("fisher") or {}
    return "\n".join(["# repforget analyze", "", f"Reference `{analysis['ref']}`, updated `{analysis['upd']}`, "
                      f"{analysis['n_probe']} probe items, sample `{analysis['config']['sample']}`.", "",
                      f"Total Fisher mass ratio (updated / reference): {_fmt(fisher.get('mass_ratio'))}", ""]
                     + _layer_table(analysis["layers"]) + [""])


def write_report(out, report: dict, *, plots: bool = True) -> Path:
    """Write report.md and the PNGs, then report.json (with complete = true) last, each atomically."""
    from .plots import plot_report

    out = Path(out)
    atomic_write_text(out / "report.md", render_markdown(report))
    if plots:
        plot_report(report, out)
    atomic_write_json(out / "report.json", dict(report, complete=True))
    return out / "report.json"
