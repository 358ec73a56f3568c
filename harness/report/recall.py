"""The report's recall section: accuracy with seed spreads and ties, and MQAR accuracy vs number of key-value pairs.

* :func:`spread_table`: mechanisms x task variants, ``mean ± std (n seeds)``; a cell whose distance to the
  column's best mean is smaller than the larger of the two seed spreads (sample std) is marked ``≈`` (a tie
  with the best: the seeds cannot tell them apart). MQAR variants are named by form, length and pairs.
* :func:`plot_recall`: test accuracy vs ``num_kv_pairs``, one panel per (form, seq_len), one line per
  mechanism (mean over seeds, bars = std), the Zoology Figure 2 reading: where a mechanism's recall breaks.

Owns: this section only (kept apart from :mod:`harness.report.build`'s other sections). Imports: pandas,
numpy, matplotlib, :mod:`harness.display`, :mod:`harness.report.page`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.display import MISSING
from harness.report.page import Page
from harness.report.plots import mechanism_style

RECIPE_PREFIXES = ("config.task.", "config.model.", "config.train.", "config.optimizer.", "config.scheduler.")
MQAR_PARAMS = ("config.task.params.form", "config.task.params.seq_len", "config.task.params.num_kv_pairs")


def variant_labels(train: pd.DataFrame) -> pd.Series:
    """Readable column names: ``mqar <form> L<seq_len> k<num_kv_pairs>`` for MQAR runs, else the task name;
    a name shared by runs of different recipes (task, model, train, optimizer, scheduler settings) gets a hash
    of the recipe, so no column pools different recipes."""
    labels = train["task"].astype(str).copy()
    if set(MQAR_PARAMS) <= set(train.columns):
        for i in train.index[train["task"] == "mqar"]:
            form, length, pairs = (train.at[i, c] for c in MQAR_PARAMS)
            labels[i] = f"mqar {form} L{int(length)} k{int(pairs)}"
    recipe_cols = sorted(c for c in train.columns if c.startswith(RECIPE_PREFIXES))
    if recipe_cols:
        # The recipe without the mechanism and its parameters (those differ between a column's rows by design).
        recipes = train[recipe_cols].apply(
            lambda row: hashlib.sha256("|".join(map(str, row)).encode()).hexdigest(), axis=1)
        for label in labels.unique():
            rows = labels == label
            if recipes[rows].nunique() > 1:
                labels[rows] = [f"{label} ({r[:6]})" for r in recipes[rows]]
    return labels


def seed_stats(train: pd.DataFrame) -> pd.DataFrame:
    """One row per (mechanism, variant) with ok runs: mean, std (sample; NaN for one seed), n (seeds), in %."""
    ok = train[(train["status"] == "ok") & train["test_acc"].notna()].copy()
    if ok.empty:
        return pd.DataFrame(columns=["attention", "variant", "mean", "std", "n"])
    ok["variant"] = variant_labels(ok)
    ok["acc"] = ok["test_acc"].astype(float) * 100
    stats = ok.groupby(["attention", "variant"])["acc"].agg(["mean", "std", "count"]).reset_index()
    return stats.rename(columns={"count": "n"})


def is_tie(best_mean: float, best_std: float, mean: float, std: float) -> bool:
    """Whether ``mean`` is within the larger seed spread of the best (a spread of one seed is unknown: no tie)."""
    spread = np.nanmax([best_std, std]) if not (math.isnan(best_std) and math.isnan(std)) else float("nan")
    return bool(not math.isnan(spread) and best_mean - mean <= spread)


def spread_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Display table: mechanisms x variants, ``mean ± std (n)``, ``best`` / ``≈`` (tie with the best) marks."""
    cells: dict[str, dict[str, str]] = {}
    for variant, group in stats.groupby("variant"):
        best = group.loc[group["mean"].idxmax()]
        sole_best = (group["mean"] == best["mean"]).sum() == 1  # equal means: ties, no "best"
        for _, row in group.iterrows():
            text = f"{row['mean']:.1f}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.1f}") + f" ({row['n']})"
            if row["attention"] == best["attention"] and sole_best:
                text += " best"
            elif row["mean"] == best["mean"] or is_tie(best["mean"], best["std"], row["mean"], row["std"]):
                text += " ≈"
            cells.setdefault(row["attention"], {})[variant] = text
    table = pd.DataFrame(cells).T.fillna(MISSING)
    table.index.name = "mechanism"
    return table.reindex(sorted(table.columns), axis=1)


def recall_points(stats: pd.DataFrame) -> pd.DataFrame:
    """The MQAR rows of ``stats`` with form, seq_len and num_kv_pairs parsed from the variant label."""
    mqar = stats[stats["variant"].str.startswith("mqar ")].copy()
    if mqar.empty:
        return mqar
    parts = mqar["variant"].str.extract(r"mqar (\w+) L(\d+) k(\d+)")
    mqar["form"], mqar["seq_len"], mqar["num_kv_pairs"] = parts[0], parts[1].astype(int), parts[2].astype(int)
    return mqar


def plot_recall(points: pd.DataFrame, path: Path) -> Path:
    """Accuracy (%) vs num_kv_pairs, one panel per (form, seq_len), one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(points.groupby(["form", "seq_len"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (form, length) in zip(axes[0], panels):
        panel = points[(points["form"] == form) & (points["seq_len"] == length)]
        for name, line in panel.groupby("attention"):
            line = line.sort_values("num_kv_pairs")
            style = mechanism_style(name)  # the same colour and marker as in every other plot
            ax.errorbar(line["num_kv_pairs"], line["mean"], yerr=line["std"].fillna(0), ms=5, capsize=2,
                        label=name, color=style["color"], marker=style["marker"], ls=style["linestyle"],
                        lw=style["lw"], zorder=style["zorder"])
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 102)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("test accuracy on answers (%)")
        ax.set_title(f"MQAR {form}, {length} tokens")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_section(page: Page, train: pd.DataFrame, out: Path, files: list[Path]) -> None:
    """Seed spreads with ties, the MQAR sequence-level accuracy, and the recall plot."""
    page.heading("Seeds, ties and recall")
    if train.empty or "test_acc" not in train:
        page.note(f"{MISSING} no training records.")
        return
    stats = seed_stats(train)
    if stats.empty:
        page.note(f"{MISSING} no ok training runs.")
        return
    page.note("Test accuracy %: mean ± sample std (number of seeds). 'best' = the column's highest mean; "
              "'≈' = within the larger seed spread of the best (a tie: the seeds cannot tell them apart). "
              "MQAR columns: form (encoder = bidirectional, decoder = causal next-token), sequence length L "
              "and key-value pairs k; accuracy over answer positions only (chance ≈ 1/(vocab/2)).")
    page.table(spread_table(stats))
    points = recall_points(stats)
    if points.empty:
        return
    files.append(plot_recall(points, out / "recall_vs_pairs.png"))
    page.note("Recall: MQAR test accuracy vs number of key-value pairs (Zoology Figure 2 layout); each "
              "mechanism keeps the budget its recipe gives it (window, features, buckets) while the pairs grow.")
    page.image(files[-1], "recall_vs_pairs.png")
