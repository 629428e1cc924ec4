"""PNG plots for the results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_quality_utility(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """TOFU-paper style: model utility (x) vs forget quality (y, log), one labelled point per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for row in rows:
        quality = max(float(row["forget_quality"]), 1e-20)
        ax.scatter(row["utility"], quality, s=40)
        label = row["name"] if row["layer"] in ("-", "bottleneck") else f"{row['name']} ({row['layer']})"
        ax.annotate(label, (row["utility"], quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.axhline(0.05, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("model utility (harmonic mean, higher is better)")
    ax.set_ylabel("forget quality (KS p-value, log; higher is better)")
    ax.set_title("TOFU: forget quality vs model utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sequential_curves(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """After k sequential requests: each earlier author's forget ROUGE-L, and the model utility; one panel per
    method (points carry "method")."""
    plt = pyplot()
    methods = list(dict.fromkeys(p["method"] for p in points))
    fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 4.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        run = [p for p in points if p["method"] == method]
        for author in sorted({p["author"] for p in run}):
            mine = [p for p in run if p["author"] == author]
            ax.plot([p["requests"] for p in mine], [p["forget_rouge"] for p in mine], marker="o",
                    label=f"forget ROUGE-L, author {author}")
        ks = sorted({p["requests"] for p in run})
        utility = [next(p["utility"] for p in run if p["requests"] == k) for k in ks]
        ax.plot(ks, utility, marker="s", color="black", label="model utility")
        ax.set_xlabel("requests fused so far (k)")
        ax.set_ylabel("score")
        ax.set_title(f"Sequential requests (MUSE C6): {method}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
              path: Path, logx: bool = False) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.bar(list(labels), list(values))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter_points(path: Path, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str,
                   title: str) -> Path:
    """One labelled point per (label, x, y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, x, y in points:
        ax.scatter(x, y, s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(plt, fig, path)
