"""Report files of a driver run: atomic writes, report.json, report.md (tables), and the verdict logic.

``report.json`` schema (every number the pipeline measured)::

    {"complete": true, "kind": "repforget-report", "config": {...}, "versions": {...},
     "thresholds": {...},
     "runs": [{"run_id", "method", "lr", "setting": "single" | "continual", "requests", "spec": {...},
               "stages": [{"name": "original" | "unlearned" | "unlearned_i" | "relearned",
                           "forget_acc", "retain_acc", "perplexity",
                           "mia_auc": {"loss", "zlib", "min_k", "min_k_plus_plus"},
                           "train": {...} | null,
                           "layers": [{"layer", "cka", "cka_pooled", "cka_debiased", "cka_tokens",
                                       "pca_similarity", "pca_shift": [dPC1, dPC2], "fisher_mass",
                                       "fisher_mass_ref", "fisher_mass_ratio", "fisher_rank_corr"}],
                           "fisher": {"mass", "mass_ref", "mass_ratio", "histogram": {"counts", "edges"}}}],
               "verdict": {"behaviour": {...}, "structure": {...}}}]}

The file is written last and atomically, so a report.json on disk is always a finished one; a run
that fails leaves the previous report as it was (each file is only ever replaced by a complete one).
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Optional

__all__ = [
    "THRESHOLDS",
    "atomic_write",
    "atomic_write_text",
    "json_safe",
    "atomic_write_json",
    "versions",
    "verdict",
    "render_markdown",
    "render_analysis_markdown",
    "write_report",
]

THRESHOLDS = {
    "forget_drop": 0.3,
    "retain_drop": 0.3,
    "recovery": 0.8,
    "cka_intact": 0.5,
    "pca_intact": 0.5,
}
_THRESHOLD_TEXT = {
    "forget_drop": "forgetting happened: forget accuracy fell by at least this much (absolute)",
    "retain_drop": "catastrophic (when not reversible): retain accuracy also fell by at least this much (absolute)",
    "recovery": "reversible: relearning restored at least this fraction of the forget-accuracy drop (checked first)",
    "cka_intact": "structure intact: minimum layer CKA vs original (token-level when measured) at least this",
    "pca_intact": "structure intact: mean layer PC1 similarity vs original at least this",
}


# --------------------------------------------------------------------------- atomic files


def atomic_write(path, write) -> None:
    """Call ``write(handle)`` on a temporary binary file next to ``path``, fsync, then os.replace it onto
    ``path``: readers see the old file or the new one, never half of one; the temporary goes on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace: readers see old or new, never half."""
    atomic_write(Path(path), lambda h: h.write(text.encode("utf-8")))


def json_safe(obj):
    """``obj`` with every NaN / Inf float (in dicts, lists, tuples) replaced by None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> None:
    """Atomically write ``obj`` as indented strict JSON (undefined numbers, NaN / Inf, stored as None)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def versions() -> dict:
    """Versions of the software that produced a report."""
    import numpy
    import torch
    import transformers

    import repforget_kernels

    return {"repforget_kernels": repforget_kernels.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- verdict


def _values(stage: dict, key: str) -> list:
    return [row[key] for row in stage.get("layers", []) if row.get(key) is not None]


def _structure(stage: dict, th: dict) -> dict:
    """Layer summary of one stage with its ``intact`` / ``drifted`` label (see :func:`verdict`)."""
    pooled, tokens, pca = _values(stage, "cka"), _values(stage, "cka_tokens"), _values(stage, "pca_similarity")
    judged = tokens or pooled
    fisher = stage.get("fisher") or {}
    mean_pca = sum(pca) / len(pca) if pca else None
    intact = bool(judged) and mean_pca is not None and min(judged) >= th["cka_intact"] and mean_pca >= th["pca_intact"]
    return {"stage": stage["name"], "label": "intact" if intact else "drifted",
            "min_cka": min(pooled) if pooled else None, "mean_cka": sum(pooled) / len(pooled) if pooled else None,
            "min_cka_tokens": min(tokens) if tokens else None,
            "min_pca_similarity": min(pca) if pca else None, "mean_pca_similarity": mean_pca,
            "fisher_mass_ratio": fisher.get("mass_ratio")}


def verdict(stages: list, thresholds: Optional[dict] = None) -> dict:
    """Behaviour next to structure for one run (stages: original, unlearned..., relearned).

    Behaviour (the paper's Definition 2.1, on teacher-forced answer accuracy), with
    d_f = forget drop and d_r = retain drop from the original to the last unlearned stage and
    recovery = (forget_acc(relearned) - forget_acc(last unlearned)) / d_f:
      ``not_forgotten`` if d_f < forget_drop; else ``reversible`` if recovery >= the recovery threshold
      (relearning restores forget performance); else ``catastrophic`` if d_r >= retain_drop (forget and
      retain both fell far and relearning does not bring them back); else ``irreversible`` (targeted and
      lasting). Reversibility is tested first because it is what relearning measures: a model whose
      retain accuracy also fell but comes back with the forget facts after a short relearn is
      suppressed, not destroyed; ``retain_collapsed`` records d_r >= retain_drop in every case.
    Structure at the last unlearned stage (and, for reference, after relearning): min and mean layer
    CKA, min token-level CKA, min and mean PCA similarity, total Fisher mass ratio; ``intact`` when the
    min layer CKA (token-level when measured: exact over every probe token, steadier than the pooled
    CKA of a few dozen probe rows) >= cka_intact and the mean PC1 similarity >= pca_intact (the mean,
    because PC1 of a single layer can swap with PC2 when their variances are close), else ``drifted``.
    The default thresholds were set after looking at the tiny-model demo, where reversible runs keep
    token CKA >= 0.66 and mean PC1 similarity >= 0.73 and wrecked runs fall to <= 0.17 and <= 0.34;
    they are printed with every report and can be overridden. The Fisher ratio is reported, not thresholded
    (Fisher on forget data rises whenever the forget loss does, with or without structural change).
    """
    th = dict(THRESHOLDS, **(thresholds or {}))
    by_name = {s["name"]: s for s in stages}
    orig, rel = by_name["original"], by_name.get("relearned")
    unlearned = [s for s in stages if s["name"].startswith("unlearned")]
    last = unlearned[-1]
    d_f = orig["forget_acc"] - last["forget_acc"]
    d_r = orig["retain_acc"] - last["retain_acc"]
    recovery = (rel["forget_acc"] - last["forget_acc"]) / d_f if rel is not None and d_f > 0 else None
    if d_f < th["forget_drop"]:
        label = "not_forgotten"
    elif recovery is not None and recovery >= th["recovery"]:
        label = "reversible"
    elif d_r >= th["retain_drop"]:
        label = "catastrophic"
    else:
        label = "irreversible"
    return {"behaviour": {"label": label, "forget_drop": d_f, "retain_drop": d_r, "relearn_recovery": recovery,
                          "retain_collapsed": d_r >= th["retain_drop"],
                          "forget_acc_relearned": rel["forget_acc"] if rel is not None else None},
            "structure": _structure(last, th),
            "structure_relearned": _structure(rel, th) if rel is not None else None,
            "thresholds": th}


# --------------------------------------------------------------------------- markdown


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, list):
        return "(" + ", ".join(_fmt(u, 2) for u in v) + ")"
    return f"{v:.{digits}g}" if isinstance(v, float) and abs(v) >= 1000 else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _layer_table(stage: dict) -> list:
    header = ["layer", "cka", "cka debiased", "cka tokens", "pca sim", "pca shift (dPC1, dPC2)",
              "fisher mass ratio", "fisher rank corr"]
    rows = [[r["layer"], r["cka"], r["cka_debiased"], r["cka_tokens"], r["pca_similarity"], r["pca_shift"],
             r["fisher_mass_ratio"], r["fisher_rank_corr"]] for r in stage["layers"]]
    return _table(header, rows)


def _thresholds_md(th: dict) -> list:
    return ["## Thresholds", ""] + [f"- `{k}` = {v}: {_THRESHOLD_TEXT.get(k, '')}" for k, v in th.items()] + [""]


def render_markdown(report: dict) -> str:
    """report.md: a summary table of verdicts, thresholds, then per run the stage and layer tables."""
    lines = ["# repforget report", "",
             f"Model `{report['config'].get('model')}`, sample `{report['config'].get('sample')}`, "
             f"seed {report['config'].get('seed')}. Numbers at every stage are against the original model.", "",
             "## Verdicts", ""]
    rows = []
    for run in report["runs"]:
        b, s = run["verdict"]["behaviour"], run["verdict"]["structure"]
        rows.append([run["run_id"], b["label"], b["forget_drop"], b["retain_drop"], b["relearn_recovery"],
                     s["label"], s["min_cka_tokens"], s["mean_pca_similarity"], s["min_cka"], s["mean_cka"],
                     s["fisher_mass_ratio"]])
    # the two columns the structure label is judged on come first (see verdict)
    lines += _table(["run", "behaviour", "forget drop", "retain drop", "relearn recovery", "structure",
                     "min token CKA", "mean PC1 sim", "min pooled CKA", "mean pooled CKA", "Fisher mass ratio"], rows)
    lines += [""] + _thresholds_md(report["thresholds"])
    for run in report["runs"]:
        lines += [f"## {run['run_id']}", "", "### Stages", ""]
        rows = [[s["name"], s["forget_acc"], s["retain_acc"], s.get("perplexity"), s["mia_auc"].get("loss"),
                 s["mia_auc"].get("zlib"), s["mia_auc"].get("min_k"), s["mia_auc"].get("min_k_plus_plus"),
                 (s.get("fisher") or {}).get("mass_ratio")] for s in run["stages"]]
        lines += _table(["stage", "forget acc", "retain acc", "perplexity", "MIA loss", "MIA zlib", "MIA min-k",
                         "MIA min-k++", "Fisher mass ratio"], rows) + [""]
        for stage in run["stages"][1:]:
            lines += [f"### Layers after `{stage['name']}`", ""] + _layer_table(stage) + [""]
    return "\n".join(lines) + "\n"


def render_analysis_markdown(analysis: dict) -> str:
    """analysis.md of ``repforget analyze``: the per-layer table of one checkpoint pair."""
    fisher = analysis.get("fisher") or {}
    return "\n".join(["# repforget analyze", "", f"Reference `{analysis['ref']}`, updated `{analysis['upd']}`, "
                      f"{analysis['n_probe']} probe items, sample `{analysis['config']['sample']}`.", "",
                      f"Total Fisher mass ratio (updated / reference): {_fmt(fisher.get('mass_ratio'))}", ""]
                     + _layer_table(analysis) + [""])


def write_report(out, report: dict, *, plots: bool = True) -> Path:
    """Write report.md and the PNGs, then report.json (with complete = true) last, each atomically."""
    from .plots import plot_report

    out = Path(out)
    atomic_write_text(out / "report.md", render_markdown(report))
    if plots:
        plot_report(report, out)
    atomic_write_json(out / "report.json", dict(report, complete=True))
    return out / "report.json"
