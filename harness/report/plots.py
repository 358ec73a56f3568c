"""The report's plots (matplotlib, Agg backend): each function draws one PNG from a frame and returns its path.

Owns: figures. Imports: matplotlib, numpy, pandas only (frames come from :mod:`harness.report.tables`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    return {name: cmap(i % 20) for i, name in enumerate(sorted(names))}


def plot_scaling(cells: pd.DataFrame, metric: str, path: Path) -> Path:
    """Log-log ``metric`` (median_s or peak_bytes) vs n, one panel per pass, one line per mechanism.

    Cells that could not run are marked with an ``x`` at the top edge of the panel, labelled
    with their outcome, at their n.
    """
    plt = _pyplot()
    passes = [p for p in ("fwd", "fwd+bwd") if p in set(cells["pass"])]
    fig, axes = plt.subplots(1, max(len(passes), 1), figsize=(6.5 * max(len(passes), 1), 5), squeeze=False)
    colors = _colors(cells["mechanism"].unique())
    scale = 1e3 if metric == "median_s" else 1 / 2**20
    ylabel = "median time (ms)" if metric == "median_s" else "peak memory (MiB)"
    for ax, pass_ in zip(axes[0], passes):
        sub = cells[cells["pass"] == pass_]
        failed = []
        for name, group in sub.groupby("mechanism"):
            ok = group[group["outcome"] == "ok"].sort_values("n")
            style = "--" if name in ("full", "sdpa_direct") else "-"
            if len(ok):
                ax.plot(ok["n"], ok[metric].astype(float) * scale, style, marker="o", ms=3, label=name,
                        color=colors[name], lw=1.5)
            for _, r in group[group["outcome"] != "ok"].iterrows():
                failed.append((r["n"], name, "over budget" if r["outcome"] == "skipped_budget" else r["outcome"]))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} vs n, {pass_}")
        ax.grid(True, which="both", alpha=0.3)
        if failed:
            top = ax.get_ylim()[1]
            for n, name, _ in failed:
                ax.plot([n], [top], "x", color=colors[name], ms=8, mew=2, clip_on=False)
            ax.text(0.01, 0.99, "x at top = not run (" + ", ".join(sorted({o for _, _, o in failed})) + ")",
                    transform=ax.transAxes, va="top", fontsize=7)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_approx(approx: pd.DataFrame, path: Path) -> Path:
    """Relative error vs budget parameter: one panel per mechanism, one line per input variant."""
    plt = _pyplot()
    ok = approx[approx["status"] == "ok"]
    names = sorted(ok["mechanism"].unique())
    cols = min(5, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        sub = ok[ok["mechanism"] == name]
        for variant, group in sub.groupby("variant"):
            group = group.sort_values("value")
            ax.errorbar(group["value"].astype(float), group["error_mean"].astype(float),
                        yerr=group["error_std"].astype(float), marker="o", ms=3, capsize=2, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(str(sub["param"].iloc[0]), fontsize=8)
        ax.set_ylabel("rel. Frobenius error", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("approximation error vs exact softmax attention", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_speed(points: pd.DataFrame, path: Path, xlabel: str) -> Path:
    """LRA Figure 3: average accuracy (y) vs speed relative to full (x), bubble area ~ memory relative to full."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = _colors(points.index)
    for name, r in points.iterrows():
        size = 600 * float(r["memory_vs_full"]) if np.isfinite(r["memory_vs_full"]) else 60
        ax.scatter([r["speed_vs_full"]], [r["accuracy"]], s=size, alpha=0.5, color=colors[name], edgecolor="k")
        ax.annotate(name, (r["speed_vs_full"], r["accuracy"]), fontsize=8, ha="center", va="center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title("accuracy vs speed (bubble area ~ peak memory relative to full)")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
