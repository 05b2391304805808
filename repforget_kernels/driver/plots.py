"""PNG figures of a driver report, drawn from the numbers in report.json (matplotlib, Agg backend).

One subplot per run in each figure:
  cka_by_layer.png             layer CKA vs the original, one line per stage
  pca_similarity_by_layer.png  PC1 |cos| vs the original, one line per stage
  pca_shift.png                normalised (dPC1, dPC2) per layer, one colour per stage
  fisher_histograms.png        log-binned Fisher histograms (forget data), one line per stage
  accuracy_by_stage.png        forget and retain accuracy by stage
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .report import atomic_write  # noqa: E402

__all__ = ["PLOTS", "plot_report", "plot_layers"]

PLOTS = ("cka_by_layer.png", "pca_similarity_by_layer.png", "pca_shift.png", "fisher_histograms.png",
         "accuracy_by_stage.png")


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


def _stage_colours(names: list) -> dict:
    cmap = plt.get_cmap("viridis")
    return {name: cmap(i / max(1, len(names) - 1)) for i, name in enumerate(names)}


def _legend(ax) -> None:
    """A small legend, or a note when the panel has nothing to show (e.g. --no-fisher)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _by_layer(run: dict, ax, key: str, ylabel: str) -> None:
    colours = _stage_colours([s["name"] for s in run["stages"]])
    for stage in run["stages"]:
        pts = [(r["layer"], r[key]) for r in stage["layers"] if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=stage["name"], color=colours[stage["name"]])
    ax.set(title=run["run_id"], xlabel="layer", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(top=1.02)
    _legend(ax)


def _shift(run: dict, ax) -> None:
    colours = _stage_colours([s["name"] for s in run["stages"]])
    for stage in run["stages"]:
        pts = [r["pca_shift"][:2] for r in stage["layers"] if r.get("pca_shift") and None not in r["pca_shift"][:2]]
        if pts and len(pts[0]) == 2:
            ax.scatter(*zip(*pts), s=12, label=stage["name"], color=colours[stage["name"]])
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(title=run["run_id"], xlabel="dPC1 (ref. std)", ylabel="dPC2 (ref. std)")
    _legend(ax)


def _fisher(run: dict, ax) -> None:
    colours = _stage_colours([s["name"] for s in run["stages"]])
    for stage in run["stages"]:
        hist = (stage.get("fisher") or {}).get("histogram")
        if hist:
            centres = [math.sqrt(a * b) for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
            ax.plot(centres, hist["counts"], label=stage["name"], color=colours[stage["name"]])
    ax.set_xscale("log")
    ax.set(title=run["run_id"], xlabel="Fisher value", ylabel="count")
    _legend(ax)


def _accuracy(run: dict, ax) -> None:
    names = [s["name"].replace("unlearned", "unl") for s in run["stages"]]
    for key, marker in (("forget_acc", "o"), ("retain_acc", "s")):
        ax.plot(names, [s[key] for s in run["stages"]], marker=marker, label=key)
    ax.set(title=run["run_id"], ylabel="answer accuracy", ylim=(-0.02, 1.02))
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=6)


def plot_report(report: dict, out) -> list:
    """Draw the five figures of a pipeline report into ``out``; returns their paths."""
    out = Path(out)
    runs = report["runs"]
    drawers = {
        "cka_by_layer.png": ("Layer CKA vs original", lambda r, a: _by_layer(r, a, "cka", "CKA")),
        "pca_similarity_by_layer.png": ("PC1 similarity vs original",
                                        lambda r, a: _by_layer(r, a, "pca_similarity", "|cos PC1|")),
        "pca_shift.png": ("Mean shift along the original's PC1/PC2 (per layer)", _shift),
        "fisher_histograms.png": ("Diagonal Fisher on forget data", _fisher),
        "accuracy_by_stage.png": ("Forget / retain accuracy by stage", _accuracy),
    }
    paths = []
    for name in PLOTS:
        title, draw = drawers[name]
        fig, axes = _grid(len(runs), title)
        for run, ax in zip(runs, axes):
            draw(run, ax)
        _save(fig, out / name)
        paths.append(out / name)
    return paths


def plot_layers(analysis: dict, out) -> Path:
    """One figure for ``repforget analyze``: CKA and PCA similarity by layer, and the PCA shift."""
    run = {"run_id": "updated vs reference", "stages": [{"name": "updated", "layers": analysis["layers"]}]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    _by_layer(run, axes[0], "cka", "CKA")
    _by_layer(run, axes[1], "pca_similarity", "|cos PC1|")
    _shift(run, axes[2])
    path = Path(out) / "analysis.png"
    _save(fig, path)
    return path
