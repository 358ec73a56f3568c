"""The report's plots (matplotlib, Agg backend): each function draws one PNG from a frame and returns its path.

Every mechanism has one fixed style (:func:`mechanism_style`: a colour *and* a marker, the same in every
plot), the reference ``sdpa_direct`` is a thin dotted grey line drawn under the mechanisms so it never
hides one, every figure names its setting, and log axes are labelled with plain numbers.

Owns: figures. Imports: matplotlib, adjustText (label placement), numpy, pandas only (frames come from
:mod:`harness.report.tables`).
"""

from __future__ import annotations

import hashlib
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The registry's mechanisms in a fixed order: colour i and marker i of the tables below. `full`, the exact
# reference every ratio is taken against, is black; the others take matplotlib's tab10 colours, except two:
# tab10's grey (aft) read as the grey sdpa_direct reference and its olive (clustered) as bigbird's green, so
# those two are gold and navy. Every pair differs by a CIEDE2000 distance of at least 15 (red/brown and
# purple/pink, tab10's own, are the closest: 16 and 17; tests/test_report.py checks it).
MECHANISM_ORDER = ("full", "sliding_window", "longformer", "bigbird", "reformer", "linformer", "performer", "rfa",
                   "aft", "clustered", "memory_compressed")
COLOURS = ("#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#e6b800",
           "#000080", "#17becf")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8")
# Mechanisms registered later (plug-ins) get a style from their name: stable across plots and runs.
EXTRA_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
REFERENCE = "sdpa_direct"


def mechanism_style(name: str) -> dict[str, Any]:
    """Colour, marker, line style and drawing order of ``name``: one fixed style per mechanism name."""
    if name == REFERENCE:
        return {"color": "#999999", "marker": "", "linestyle": ":", "lw": 1.2, "zorder": 1}
    if name in MECHANISM_ORDER:
        i = MECHANISM_ORDER.index(name)
        return {"color": COLOURS[i], "marker": MARKERS[i], "linestyle": "-", "lw": 2.0 if name == "full" else 1.4,
                "zorder": 4 if name == "full" else 3}
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return {"color": EXTRA_COLOURS[h % len(EXTRA_COLOURS)], "marker": MARKERS[(h // 7) % len(MARKERS)],
            "linestyle": "--", "lw": 1.4, "zorder": 3}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def length_label(n: float) -> str:
    """Tick text of a sequence length: ``256``, ``1K``, ``16K`` (powers of two in K = 1024)."""
    n = int(round(n))
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _number(x: float, _pos: Any = None) -> str:
    return f"{x:g}" if x >= 0.01 else f"{x:.0e}"


def _length_axis(ax, ns: Sequence[float]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ns))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: length_label(x)))
    ax.xaxis.set_minor_locator(NullLocator())


# Up to this span (max / min) a log axis labels 1, 2 and 5 of every decade; beyond it, every decade only.
LOG_LABEL_SPAN = 1000


def _plain_log_y(ax, values=None) -> None:
    """Log y axis with plain labels: every decade and its 2 and 5 (so an axis spanning less than a decade still
    gets labelled ticks, and one from 0.03 to 7 reads 0.05 ... 5, not only 0.1 and 1), or every decade only when
    ``values`` span more than three decades (readable, not crowded)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    positive = [float(v) for v in (values if values is not None else []) if v > 0]
    wide = bool(positive) and max(positive) / min(positive) > LOG_LABEL_SPAN
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(_number))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ordered(names) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [m for m in (*MECHANISM_ORDER, REFERENCE) if m in names]
    return known + sorted(m for m in names if m not in known)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_scaling(cells: pd.DataFrame, metric: str, path: Path, setting: str = "") -> Path:
    """Log-log ``metric`` (median_s or peak_bytes) vs n, one panel per pass, one line per mechanism.

    Times carry p10-p90 bars; a cell flagged noisy is a hollow marker (and left out of the slopes);
    cells that could not run are an ``x`` at the panel's top edge at their n. ``setting`` is the subtitle.
    """
    plt = _pyplot()
    passes = [p for p in ("fwd", "fwd+bwd") if p in set(cells["pass"])]
    fig, axes = plt.subplots(1, max(len(passes), 1), figsize=(6.2 * max(len(passes), 1), 4.8), squeeze=False)
    time_plot = metric == "median_s"
    scale = 1e3 if time_plot else 1 / 2**20
    ylabel = "median time (ms), bars p10-p90" if time_plot else "peak memory (MiB)"
    failed_any, noisy_any = set(), False
    for ax, pass_ in zip(axes[0], passes):
        sub = cells[cells["pass"] == pass_]
        for name in _ordered(sub["mechanism"]):
            noisy_any |= _draw_mechanism(ax, sub[sub["mechanism"] == name], name, metric, scale, time_plot)
        failed_any |= _mark_failed(ax, sub)
        _length_axis(ax, sub["n"])
        _plain_log_y(ax)
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'time' if time_plot else 'peak memory'} vs n, {pass_}")
        ax.grid(True, which="major", alpha=0.3)
    notes = []
    if failed_any:
        notes.append("x at the top edge = not run (" + ", ".join(sorted(failed_any)) + ")")
    if noisy_any:
        notes.append("hollow marker = noisy cell (left out of slopes)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(setting + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _draw_mechanism(ax, group: pd.DataFrame, name: str, metric: str, scale: float, bars: bool) -> bool:
    """One mechanism's line (with p10-p90 bars for times); returns whether it has a noisy cell."""
    style = mechanism_style(name)
    ok = group[group["outcome"] == "ok"].sort_values("n")
    if ok.empty:
        return False
    y = ok[metric].astype(float) * scale
    yerr = None
    if bars and {"p10_s", "p90_s"} <= set(ok.columns):
        yerr = np.vstack([y - ok["p10_s"].astype(float) * scale, ok["p90_s"].astype(float) * scale - y]).clip(0)
    # "reference" alone would read as full_reference (the materialised n x n baseline): say what it is.
    label = f"{name} (SDPA called directly)" if name == REFERENCE else name
    ax.errorbar(ok["n"], y, yerr=yerr, color=style["color"], marker=style["marker"] or None, ms=5,
                linestyle=style["linestyle"], lw=style["lw"], zorder=style["zorder"], capsize=2, elinewidth=0.8,
                label=label)
    noisy = ok["noisy"].fillna(False).astype(bool) if "noisy" in ok else pd.Series(False, index=ok.index)
    if noisy.any():
        ax.plot(ok["n"][noisy], y[noisy], linestyle="none", marker=style["marker"] or "o", ms=9, mfc="white",
                mec=style["color"], mew=1.5, zorder=style["zorder"] + 1)
    return bool(noisy.any())


def _mark_failed(ax, sub: pd.DataFrame) -> set[str]:
    failed = sub[sub["outcome"] != "ok"]
    if failed.empty:
        return set()
    top = ax.get_ylim()[1]
    outcomes = set()
    for _, r in failed.iterrows():
        style = mechanism_style(r["mechanism"])
        ax.plot([r["n"]], [top], "x", color=style["color"], ms=8, mew=2, clip_on=False, zorder=5)
        outcomes.add("over budget" if r["outcome"] == "skipped_budget" else str(r["outcome"]))
    return outcomes


def plot_approx(approx: pd.DataFrame, path: Path, setting: str = "", shrinking: set[str] = frozenset()) -> Path:
    """Relative error vs budget parameter: one panel per mechanism, titled by what it is compared to, one
    line per input variant, all panels on one shared log y axis. ``shrinking``: the mechanisms whose parameter
    gives a smaller budget as it grows (memory_compressed's compression): their x label says so, since their
    error rises to the right where the others' falls."""
    plt = _pyplot()
    ok = approx[approx["status"] == "ok"]
    names = _ordered(ok["mechanism"])
    cols = min(4, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, sharey=True)
    dashes = {"iid": "-", "smooth": "--"}
    for ax, name in zip(axes.flat, names):
        sub = ok[ok["mechanism"] == name]
        style = mechanism_style(name)
        for variant, group in sub.groupby("variant"):
            group = group.sort_values("value")
            ax.errorbar(group["value"].astype(float), group["error_mean"].astype(float),
                        yerr=group["error_std"].astype(float), color=style["color"], marker=style["marker"], ms=4,
                        capsize=2, linestyle=dashes.get(variant, "-."), label=f"{variant} inputs")
        _length_axis(ax, sub["value"].astype(float))
        _plain_log_y(ax, ok["error_mean"].astype(float))  # the whole shared axis decides the tick density
        reference = str(sub["reference"].iloc[0]) if "reference" in sub else "softmax"
        ax.set_title(f"{name} vs {reference.split(',')[0]}", fontsize=9)
        param = str(sub["param"].iloc[0])
        ax.set_xlabel(f"{param} (larger {param} = smaller budget)" if name in shrinking else param, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative Frobenius error", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("approximation error vs the attention each mechanism approximates (shared log y)"
                 + (f"\n{setting}" if setting else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# Below this many seeds a mean ± std says little (two seeds at 12.5% and 87.3% give 49.9 ± 52.9, a bar from -3% to
# 103%): the seeds themselves are drawn. From this many on, the mean ± sample std, cut at 0% and 100%.
FEW_SEEDS = 5
SEEDS_NOTE = (f"With 2 to {FEW_SEEDS - 1} seeds each seed is a small marker beside the mean, joined by a thin line "
              f"(their range); with {FEW_SEEDS} or more, a bar of ± one sample std, cut at 0% and 100%; one seed: the "
              "value alone.")


def seeds_caption(drawn: set[str | None]) -> str:
    """What the seed marks of a figure are (the kinds :func:`draw_seeds` returned), for the figure itself: the
    README shows the PNGs without the page's captions."""
    parts = []
    if "seeds" in drawn:
        parts.append(f"Small markers beside a mean, joined by a thin line: its seeds (2 to {FEW_SEEDS - 1} seeds).")
    if "std" in drawn:
        parts.append(f"Bars: ± 1 sample std over {FEW_SEEDS} or more seeds, cut at 0% and 100%.")
    return " ".join(parts)


def draw_seeds(ax, x: float, mean: float, values, name: str, offset: float = 1.0) -> str | None:
    """The seed spread of one mean accuracy (%) at ``x``: with fewer than :data:`FEW_SEEDS` seeds each seed's
    value as a small marker at ``x * offset`` (beside the mean on a log axis), joined by a thin line; with more,
    an error bar of one sample std cut to [0, 100]. Returns ``"seeds"``, ``"std"`` or None (one seed: nothing
    to draw), so a caption can say what is drawn."""
    values = [float(v) for v in (values or []) if v is not None and np.isfinite(float(v))]
    if len(values) < 2 or not np.isfinite(mean):
        return None
    style = mechanism_style(name)
    if len(values) < FEW_SEEDS:
        at = x * offset
        ax.plot([at, at], [min(values), max(values)], color=style["color"], lw=0.9, alpha=0.8,
                zorder=style["zorder"] + 0.5, solid_capstyle="butt")
        ax.scatter([at] * len(values), values, s=26, marker=style["marker"] or "o", color=style["color"],
                   edgecolor="white", linewidth=0.3, alpha=0.9, zorder=style["zorder"] + 1)
        return "seeds"
    std = float(np.std(values, ddof=1))
    below, above = min(std, mean), min(std, 100.0 - mean)  # a bar never leaves 0-100%
    ax.errorbar([x], [mean], yerr=[[max(below, 0.0)], [max(above, 0.0)]], color=style["color"], lw=0, elinewidth=1,
                capsize=2, zorder=style["zorder"] + 0.5)
    return "std"


SIZE_LABEL = "bubble area = training step peak memory vs full"


def plot_accuracy_speed(panels: list[tuple[str, pd.DataFrame]], path: Path, caption: str = "",
                        size_label: str = SIZE_LABEL) -> Path:
    """LRA Figure 3 per comparison: test accuracy (y, from 0) vs training speed (x), bubble area ~ peak
    memory, the majority class as a dashed line, labels placed apart (adjustText).

    ``panels``: (title, frame) with index mechanism and columns accuracy, majority, speed, memory_vs_full, and
    optionally by_seed (seed -> accuracy %: the seeds drawn beside the mean, :func:`draw_seeds`);
    ``frame.attrs``: ``speed_label`` (x axis), ``accuracy_label`` (y axis), ``relative`` (x ticks as
    ``2x``), ``majority_label`` (the dashed line's legend text). ``caption``: wrapped text under the
    figure; ``size_label``: the title of the bubble-size key.
    """
    plt = _pyplot()
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 5.0 * rows), squeeze=False)
    drawn: set[str] = set()
    for ax, (title, points) in zip(axes.flat, panels):
        drawn |= _accuracy_panel(ax, title, points)
    caption = " ".join(filter(None, [seeds_caption(drawn), caption]))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _size_key(fig, size_label)
    height = 5.0 * rows  # inches; the size key takes the bottom 0.8 in
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1))
    if caption:
        # Below the size key, whose largest bubbles reach below the figure's bottom edge.
        fig.text(0.02, -0.3 / height, textwrap.fill(caption, width=int(100 * cols)), ha="left", va="top", fontsize=8)
    return _save(fig, path)


def _accuracy_panel(ax, title: str, points: pd.DataFrame) -> set[str]:
    from adjustText import adjust_text
    from matplotlib.ticker import FuncFormatter, NullLocator

    texts, drawn = [], set()
    for name, r in points.iterrows():
        style = mechanism_style(str(name))
        size = 400 * float(r["memory_vs_full"]) if np.isfinite(r["memory_vs_full"]) else 60
        ax.scatter([r["speed"]], [r["accuracy"]], s=size, alpha=0.45, color=style["color"], edgecolor="k",
                   marker="o", zorder=3)
        ax.scatter([r["speed"]], [r["accuracy"]], s=18, color=style["color"], marker=style["marker"], zorder=4)
        drawn.add(draw_seeds(ax, float(r["speed"]), float(r["accuracy"]), _seed_values(r), str(name)))
        texts.append(ax.text(r["speed"], r["accuracy"], str(name), fontsize=8, zorder=5))
    majority = float(points["majority"].iloc[0]) if "majority" in points and len(points) else float("nan")
    seeds = [v for _, r in points.iterrows() for v in _seed_values(r)]
    top = max([float(points["accuracy"].max()), *seeds, majority if np.isfinite(majority) else 0.0]) * 1.15 + 2
    ax.set_ylim(0, min(106.0, top))  # a little above 100: a bubble at 100% is drawn whole, not cut in half
    if np.isfinite(majority):
        # In the legend, not beside the line: a label on the line would sit under the bubbles near it.
        ax.axhline(majority, color="#555555", linestyle="--", lw=1, zorder=1,
                   label=f"{points.attrs.get('majority_label', 'majority class')} {majority:.1f}%")
        ax.legend(loc="best", fontsize=7, frameon=True)  # where it covers the fewest bubbles
        if (points["accuracy"] <= majority + 1.0).all():
            title += "\nno mechanism beat the majority class by more than 1 point: not learned, no ranking"
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x" if points.attrs.get("relative") else f"{x:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    xs = points["speed"].astype(float)
    ax.set_xlim(xs.min() / 1.5, xs.max() * 1.5)
    ax.set_xlabel(points.attrs.get("speed_label", "speed"), fontsize=8)
    ax.set_ylabel(points.attrs.get("accuracy_label", "test accuracy (%)"), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    adjust_text(texts, ax=ax, arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6})
    return drawn - {None}


def _seed_values(row: pd.Series) -> list[float]:
    by_seed = row.get("by_seed")
    return list(by_seed.values()) if isinstance(by_seed, dict) else []


def _size_key(fig, label: str = SIZE_LABEL) -> None:
    """The bubble-size key: what 0.5x, 1x and 2x the peak memory of full look like."""
    handles = [fig.axes[0].scatter([], [], s=400 * r, color="#cccccc", edgecolor="k", alpha=0.6) for r in (0.5, 1, 2)]
    fig.legend(handles, ["0.5x", "1x", "2x"], title=label,
               # Anchored in figure coordinates: a saved tight bbox that grows (a caption) does not move it.
               loc="lower center", bbox_to_anchor=(0.5, 0.0), bbox_transform=fig.transFigure, ncol=3, fontsize=8,
               title_fontsize=8, frameon=False, borderpad=0.2, labelspacing=1.5, handletextpad=1.2,
               columnspacing=2.5)
