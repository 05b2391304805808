"""PNG figures of a driver report, drawn from the numbers in report.json (matplotlib, Agg backend).

  drift_vs_recovery.png   the headline: structural drift (position between the original and the retain
                          oracle, forget probes) against non-recovery after relearning on the forget set,
                          one point per run, coloured by method, marked by setting
  selectivity.png         forget EM drop against retain EM drop, one point per run
  recovery_curves.png     forget EM during each relearning control, one panel per method (the retain
                          oracle's relearning dashed)
  cka_by_layer.png        layer CKA (pooled rows, forget probes) after the last unlearning request, one
                          panel per method, one line per learning rate and setting (the nulls in grey)
  pca_shift.png           normalised (dPC1, dPC2) per layer after the last unlearning request, per method
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .files import atomic_write  # noqa: E402

__all__ = ["PLOTS", "plot_report", "plot_layers"]

PLOTS = ("drift_vs_recovery.png", "selectivity.png", "recovery_curves.png", "cka_by_layer.png", "pca_shift.png")
_MARKERS = {"single": "o", "continual": "s"}


def _grid(n: int, title: str):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=90))
    plt.close(fig)


def _colours(names: list) -> dict:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _methods(report: dict) -> list:
    return list(dict.fromkeys(run["method"] for run in report["runs"]))


def _label(run: dict) -> str:
    setting = "single" if run["setting"] == "single" else f"cont{run['requests']}"
    return f"lr {run['lr']:g} {setting}"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _last_unlearned(run: dict) -> dict:
    return [s for s in run["stages"] if s["name"].startswith("unlearned")][-1]


def _drift_vs_recovery(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = _colours(_methods(report))
    for run in report["runs"]:
        b, s = run["verdict"]["behaviour"], run["verdict"]["structure"]
        if b["recovery"] is None or s["position"] is None or b["label"] == "not_forgotten":
            continue
        colour = colours[run["method"]]  # catastrophic runs hollow: the whole model broke
        ax.scatter(s["position"], 1 - b["recovery"], edgecolors=colour,
                   facecolors="none" if b.get("catastrophic") else colour,
                   marker=_MARKERS.get(run["setting"], "o"), s=28)
    for method, colour in colours.items():
        ax.scatter([], [], color=colour, label=method, s=20)
    for setting, marker in _MARKERS.items():
        ax.scatter([], [], color="grey", marker=marker, label=setting, s=20)
    ax.scatter([], [], edgecolors="grey", facecolors="none", label="catastrophic", s=20)
    h = report["summary"]["structure_vs_recovery"]
    r = _spearman_text(h)
    ax.axvline(report["thresholds"].get("drifted", 0.5), color="grey", lw=0.5, ls=":")
    ax.set(xlabel=f"drift position ({h['metric']}, forget probes; 1 = retain oracle)",
           ylabel="1 - recovery (forget relearning)",
           title=f"Structure vs recovery: Spearman {r} over {h['runs']} runs\n"
                 f"{_spearman_text(h.get('non_catastrophic'))} without the catastrophic (hollow) ones")
    _legend(ax)
    _save(fig, path)


def _spearman_text(h: Optional[dict]) -> str:
    return "-" if h is None or h["spearman"] is None else f"{h['spearman']:.2f}"


def _selectivity(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = _colours(_methods(report))
    for run in report["runs"]:
        b = run["verdict"]["behaviour"]
        if b.get("retain_drop") is None:
            continue
        ax.scatter(b["retain_drop"], b["forget_drop"], color=colours[run["method"]],
                   marker=_MARKERS.get(run["setting"], "o"), s=28)
    for method, colour in colours.items():
        ax.scatter([], [], color=colour, label=method, s=20)
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.axvline(0.1, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="retain EM drop", ylabel="forget EM drop", title="Selectivity of unlearning (selective: upper left)")
    _legend(ax)
    _save(fig, path)


def _recovery_curves(report: dict, path: Path) -> None:
    methods = _methods(report)
    fig, axes = _grid(len(methods), "Forget EM during relearning (solid: forget, dashed: retain, dotted: unrelated)")
    styles = {"relearned_forget": "-", "relearned_retain": "--", "relearned_unrelated": ":"}
    oracle = ((report.get("nulls") or {}).get("retain_oracle") or {}).get("relearned")
    for method, ax in zip(methods, axes):
        runs = [r for r in report["runs"] if r["method"] == method]
        colours = _colours([_label(r) for r in runs])
        for run in runs:
            for stage in run["stages"]:
                if stage.get("curve") and stage["name"] in styles:
                    ax.plot(stage["curve"], ls=styles[stage["name"]], color=colours[_label(run)],
                            label=_label(run) if stage["name"] == "relearned_forget" else None)
        if oracle and oracle.get("curve"):
            ax.plot(oracle["curve"], color="black", lw=1, ls="-.", label="retain oracle")
        ax.set(title=method, xlabel="relearning step", ylabel="forget EM", ylim=(-0.02, 1.02))
        _legend(ax)
    _save(fig, path)


def _cka_by_layer(report: dict, path: Path) -> None:
    methods = _methods(report)
    fig, axes = _grid(len(methods), "Layer CKA vs the original after the last unlearning request (forget probes)")
    nulls = report.get("nulls") or {}
    for method, ax in zip(methods, axes):
        runs = [r for r in report["runs"] if r["method"] == method]
        colours = _colours([_label(r) for r in runs])
        for run in runs:
            layers = ((_last_unlearned(run).get("structure") or {}).get("forget") or {}).get("layers") or []
            pts = [(r["layer"], r["cka_pooled"]) for r in layers if r.get("cka_pooled") is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colours[_label(run)], label=_label(run))
        for name, null in nulls.items():
            layers = ((null["record"].get("structure") or {}).get("forget") or {}).get("layers") or []
            pts = [(r["layer"], r["cka_pooled"]) for r in layers if r.get("cka_pooled") is not None]
            if pts:
                ax.plot(*zip(*pts), color="grey", lw=0.8, ls="--")
                ax.annotate(name, pts[-1], fontsize=5, color="grey")
        ax.set(title=method, xlabel="layer", ylabel="CKA")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(top=1.02)
        _legend(ax)
    _save(fig, path)


def _shift_panel(ax, entries: list, title: str) -> None:
    """entries: (label, colour, layer rows); one point per layer at its (dPC1, dPC2)."""
    for label, colour, layers in entries:
        pts = [r["pca_shift"][:2] for r in layers if r.get("pca_shift") and None not in r["pca_shift"][:2]]
        if pts and len(pts[0]) == 2:
            ax.scatter(*zip(*pts), s=12, color=colour, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel="dPC1 (ref. std)", ylabel="dPC2 (ref. std)")
    _legend(ax)


def _pca_shift(report: dict, path: Path) -> None:
    methods = _methods(report)
    fig, axes = _grid(len(methods), "Mean shift along the original's PC1/PC2 per layer (forget probes)")
    for method, ax in zip(methods, axes):
        runs = [r for r in report["runs"] if r["method"] == method]
        colours = _colours([_label(r) for r in runs])
        entries = [(_label(r), colours[_label(r)],
                    ((_last_unlearned(r).get("structure") or {}).get("forget") or {}).get("layers") or [])
                   for r in runs]
        _shift_panel(ax, entries, method)
    _save(fig, path)


def plot_report(report: dict, out) -> list:
    """Draw the figures of a pipeline report into ``out``; returns their paths."""
    out = Path(out)
    drawers = {"drift_vs_recovery.png": _drift_vs_recovery, "selectivity.png": _selectivity,
               "recovery_curves.png": _recovery_curves, "cka_by_layer.png": _cka_by_layer, "pca_shift.png": _pca_shift}
    for name in PLOTS:
        drawers[name](report, out / name)
    return [out / name for name in PLOTS]


def plot_layers(analysis: dict, out) -> Path:
    """One figure for ``repforget analyze``: CKA and PCA similarity by layer, and the PCA shift."""
    layers = analysis["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, ylabel in ((axes[0], "cka", "CKA"), (axes[1], "pca_similarity", "|cos PC1|")):
        pts = [(r["layer"], r[key]) for r in layers if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label="updated vs reference")
        ax.set(xlabel="layer", ylabel=ylabel, title=ylabel + " by layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(top=1.02)
        _legend(ax)
    _shift_panel(axes[2], [("updated vs reference", "C0", layers)], "PCA shift")
    path = Path(out) / "analysis.png"
    _save(fig, path)
    return path
