"""The report's recall section: accuracy with seed spreads and ties, and MQAR accuracy vs number of key-value pairs.

* :func:`spread_table`: mechanisms x task variants, ``mean ± std (n seeds)``; a cell whose distance to the
  column's best mean is smaller than the larger of the two seed spreads (sample std) is marked ``≈`` (a tie
  with the best: the seeds cannot tell them apart); a column whose best is within 1 point of the majority class
  is ``(not learned)`` and unmarked. MQAR variants are named by form, length and pairs.
* :func:`plot_recall`: test accuracy vs ``num_kv_pairs``, one panel per (form, seq_len, recipe family: the
  recipe without the ladder's own pairs and length, :func:`recipe_families`), one line per mechanism (mean over
  seeds, the seeds beside it: :func:`harness.report.plots.draw_seeds`), the majority class dashed, the Zoology
  Figure 2 reading: where a mechanism's recall breaks.
  Runs of another recipe (another step count) get their own panel, never a second point at one x.
* :func:`state_points` / :func:`plot_recall_vs_state`: MQAR test accuracy vs the mechanism's state size
  (floats per head and per layer that one query's output is read from, ``AttentionInfo.state_size``; docs/MQAR.md),
  one panel per MQAR variant, one point per mechanism, the Zoology reading: recall against the state a model
  reads from. Computed here from each record's ``attention`` and ``attention_config``.

Owns: this section only (kept apart from :mod:`harness.report.build`'s other sections). Imports: pandas,
numpy, matplotlib, adjustText, :mod:`harness.display`, :mod:`harness.report.groups` (the numeric order of
names), :mod:`harness.report.page`, :mod:`harness.report.plots`
(the mechanism styles), :mod:`harness.report.tables` (record parameters and state sizes, the learned margin).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.display import MISSING
from harness.report.groups import natural_key
from harness.report.page import Page
from harness.report.plots import FEW_SEEDS, SEEDS_NOTE, draw_seeds, mechanism_style, seeds_caption
from harness.report.tables import LEARNED_MARGIN, record_state_size

RECIPE_PREFIXES = ("config.task.", "config.model.", "config.train.", "config.optimizer.", "config.scheduler.")
MQAR_PARAMS = ("config.task.params.form", "config.task.params.seq_len", "config.task.params.num_kv_pairs")
# The parameters an MQAR ladder varies: the rungs of one recipe differ only in these.
LADDER_PARAMS = ("config.task.params.num_kv_pairs", "config.task.params.seq_len")


def _recipe_hashes(train: pd.DataFrame, leave_out: tuple[str, ...] = ()) -> pd.Series | None:
    """Per row, a hash of its recipe settings (task, model, train, optimizer, scheduler columns, except
    ``leave_out``); None when the frame has no such column."""
    recipe_cols = sorted(c for c in train.columns if c.startswith(RECIPE_PREFIXES) and c not in leave_out)
    if not recipe_cols:
        return None
    return train[recipe_cols].apply(lambda row: hashlib.sha256("|".join(map(str, row)).encode()).hexdigest(), axis=1)


def variant_labels(train: pd.DataFrame) -> pd.Series:
    """Readable column names: ``mqar <form> L<seq_len> k<num_kv_pairs>`` for MQAR runs, else the task name;
    a name shared by runs of different recipes (task, model, train, optimizer, scheduler settings) gets a hash
    of the recipe, so no column pools different recipes."""
    labels = train["task"].astype(str).copy()
    if set(MQAR_PARAMS) <= set(train.columns):
        for i in train.index[train["task"] == "mqar"]:
            form, length, pairs = (train.at[i, c] for c in MQAR_PARAMS)
            labels[i] = f"mqar {form} L{int(length)} k{int(pairs)}"
    # The recipe without the mechanism and its parameters (those differ between a column's rows by design).
    recipes = _recipe_hashes(train)
    if recipes is not None:
        for label in labels.unique():
            rows = labels == label
            if recipes[rows].nunique() > 1:
                labels[rows] = [f"{label} ({r[:6]})" for r in recipes[rows]]
    return labels


def recipe_families(train: pd.DataFrame) -> pd.Series:
    """Per row, its recipe *family*: a short hash of the recipe settings that :func:`variant_labels` hashes,
    except the MQAR ladder's own parameters (``num_kv_pairs``, ``seq_len``). The rungs of one ladder share a
    family; a recipe run with another step count (``train.max_steps=100``) is another family."""
    hashes = _recipe_hashes(train, leave_out=LADDER_PARAMS)
    return pd.Series("", index=train.index, dtype=object) if hashes is None else hashes.str[:6]


def family_titles(train: pd.DataFrame) -> dict[tuple[str, int, str], str]:
    """``(form, seq_len, family)`` -> what tells the family apart from the others of its (form, seq_len):
    the settings that differ (``train.max_steps=100``), or ``recipe <hash>`` when none is in the frame; ``""``
    for a family alone at its (form, seq_len). MQAR rows with an ok run only (those the plot draws)."""
    ok = train[(train["status"] == "ok") & train["test_acc"].notna()]
    rows = ok[ok["task"] == "mqar"].assign(family=recipe_families(ok))
    if rows.empty or not set(MQAR_PARAMS) <= set(rows.columns):
        return {}
    cols = sorted(c for c in rows.columns if c.startswith(RECIPE_PREFIXES) and c not in LADDER_PARAMS)
    titles = {}
    for (form, length), group in rows.groupby(["config.task.params.form", "config.task.params.seq_len"]):
        firsts = group.groupby("family")[cols].first()
        differ = [c for c in cols if firsts[c].astype(str).nunique() > 1]
        for family, settings in firsts.iterrows():
            text = ", ".join(f"{c.removeprefix('config.')}={_plain(settings[c])}" for c in differ)
            titles[(str(form), int(length), family)] = ("" if len(firsts) == 1 else text or f"recipe {family}")
    return titles


def _plain(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def seed_stats(train: pd.DataFrame) -> pd.DataFrame:
    """One row per (mechanism, variant) with ok runs: mean, std (sample; NaN for one seed), n (seeds), values
    (each seed's accuracy, for the plots), in %;
    ``family`` (:func:`recipe_families`) and ``majority`` (the majority class's test accuracy %, mean over the
    runs that record it; NaN when none does)."""
    ok = train[(train["status"] == "ok") & train["test_acc"].notna()].copy()
    if ok.empty:
        return pd.DataFrame(columns=["attention", "variant", "mean", "std", "n", "values", "family", "majority"])
    ok["variant"] = variant_labels(ok)
    ok["family"] = recipe_families(ok)
    ok["acc"] = ok["test_acc"].astype(float) * 100
    majority = ok["majority_test_acc"] if "majority_test_acc" in ok else pd.Series(np.nan, index=ok.index)
    ok["majority"] = pd.to_numeric(majority, errors="coerce") * 100
    groups = ok.groupby(["attention", "variant"])
    stats = groups["acc"].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    stats["values"] = groups["acc"].agg(list)
    stats["family"] = groups["family"].first()
    stats["majority"] = groups["majority"].mean()
    return stats.reset_index()


def is_tie(best: list[float], other: list[float]) -> bool:
    """Whether the seeds cannot tell ``other`` (its accuracies, one per seed) from the best's.

    With fewer than :data:`~harness.report.plots.FEW_SEEDS` seeds on either side the seeds themselves decide,
    as the plots draw them: a tie when the two ranges of seeds overlap (one seed: its value must lie in the
    other's range). A sample std of two seeds is no spread to judge by: seeds at 12.5% and 87.3% give
    ±52.9 and would tie a 49.9% mean with a 99.8% one. From that many seeds on both sides: the difference of
    the means within the larger sample std. One seed on each side: no spread known, no tie claimed."""
    best = [float(v) for v in best if np.isfinite(v)]
    other = [float(v) for v in other if np.isfinite(v)]
    if not best or not other or (len(best) == 1 and len(other) == 1):
        return False
    if min(len(best), len(other)) < FEW_SEEDS:
        return max(other) >= min(best) and max(best) >= min(other)
    spread = max(float(np.std(best, ddof=1)), float(np.std(other, ddof=1)))
    return float(np.mean(best)) - float(np.mean(other)) <= spread


def spread_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Display table: mechanisms x variants, ``mean ± std (n)``, ``best`` / ``≈`` (tie with the best) marks.

    A column whose best mean is not more than ``LEARNED_MARGIN`` points above its majority class (where the
    records give it) learned nothing: it gets no marks and its header ends in ``(not learned)``."""
    cells: dict[str, dict[str, str]] = {}
    for variant, group in stats.groupby("variant"):
        best = group.loc[group["mean"].idxmax()]
        majority = group["majority"].mean() if "majority" in group else math.nan
        marked = not (best["mean"] - majority <= LEARNED_MARGIN)  # NaN majority: unknown, marks kept
        header = variant if marked else f"{variant} (not learned)"
        sole_best = (group["mean"] == best["mean"]).sum() == 1  # equal means: ties, no "best"
        for _, row in group.iterrows():
            text = f"{row['mean']:.1f}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.1f}") + f" ({row['n']})"
            if not marked:
                pass
            elif row["attention"] == best["attention"] and sole_best:
                text += " best"
            elif row["mean"] == best["mean"] or is_tie(best["values"], row["values"]):
                text += " ≈"
            cells.setdefault(row["attention"], {})[header] = text
    table = pd.DataFrame(cells).T.fillna(MISSING)
    table.index.name = "mechanism"
    return table.reindex(sorted(table.columns, key=natural_key), axis=1)  # k8 before k16


def recall_points(stats: pd.DataFrame) -> pd.DataFrame:
    """The MQAR rows of ``stats`` with form, seq_len and num_kv_pairs parsed from the variant label."""
    mqar = stats[stats["variant"].str.startswith("mqar ")].copy()
    if mqar.empty:
        return mqar
    parts = mqar["variant"].str.extract(r"mqar (\w+) L(\d+) k(\d+)")
    mqar["form"], mqar["seq_len"], mqar["num_kv_pairs"] = parts[0], parts[1].astype(int), parts[2].astype(int)
    return mqar


def plot_recall(points: pd.DataFrame, path: Path, titles: dict[tuple[str, int, str], str] | None = None) -> Path:
    """Accuracy (%) vs num_kv_pairs, one panel per (form, seq_len, recipe family), one line per mechanism.

    ``points``: :func:`recall_points` rows (with ``family``; ``majority`` drawn dashed where known).
    ``titles``: (form, seq_len, family) -> what tells the family apart (:func:`family_titles`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = points.assign(family=points["family"] if "family" in points else "")
    titles = titles or {}
    panels = sorted(points.groupby(["form", "seq_len", "family"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.6, 4.5), squeeze=False)
    handles: dict[str, object] = {}
    drawn: set = set()
    for ax, (form, length, family) in zip(axes[0], panels):
        panel = points[(points["form"] == form) & (points["seq_len"] == length) & (points["family"] == family)]
        handles.update(_recall_panel(ax, panel, drawn))
        extra = titles.get((str(form), int(length), family), "")
        ax.set_title(f"MQAR {form}, {length} tokens" + (f"\n{extra}" if extra else ""), fontsize=9)
    # Beside the panels, not on them (with eleven lines any spot inside covers some); every panel's names.
    names = sorted(n for n in handles if n != MAJORITY_LABEL) + [n for n in handles if n == MAJORITY_LABEL]
    fig.legend([handles[n] for n in names], names, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95),
               borderaxespad=0)
    fig.tight_layout()
    _seeds_note(fig, drawn)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


MAJORITY_LABEL = "majority class"
MAJORITY_STYLE = {"color": "#555555", "ls": "--", "lw": 1, "zorder": 1, "label": MAJORITY_LABEL}


def _seeds_note(fig, drawn: set) -> None:
    """Under the panels: what the seed marks are (:func:`harness.report.plots.seeds_caption`)."""
    text = seeds_caption(drawn)
    if text:
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=8)


def _recall_panel(ax, panel: pd.DataFrame, drawn: set) -> dict[str, object]:
    """One (form, seq_len, family): a line per mechanism (mean over seeds, the seeds beside it), the majority class
    dashed; returns label -> legend handle."""
    import matplotlib.ticker

    handles = {}
    for k, (name, line) in enumerate(panel.groupby("attention")):
        line = line.sort_values("num_kv_pairs")
        style = mechanism_style(name)  # the same colour and marker as in every other plot
        (handles[name],) = ax.plot(line["num_kv_pairs"], line["mean"], ms=5, label=name, color=style["color"],
                                   marker=style["marker"], ls=style["linestyle"], lw=style["lw"],
                                   zorder=style["zorder"])
        for _, r in line.iterrows():  # the seeds right of the mean, each mechanism a step further (log x)
            drawn.add(draw_seeds(ax, float(r["num_kv_pairs"]), float(r["mean"]), r.get("values"), str(name),
                                 offset=1.05 + 0.025 * k))
    majority = panel.groupby("num_kv_pairs")["majority"].mean().dropna() if "majority" in panel else pd.Series()
    if len(majority) == 1:  # one rung: a line across the panel (a line through one point would not show)
        handles[MAJORITY_LABEL] = ax.axhline(float(majority.iloc[0]), **MAJORITY_STYLE)
    elif len(majority):
        (handles[MAJORITY_LABEL],) = ax.plot(majority.index, majority.values, **MAJORITY_STYLE)
    ax.set_xscale("log", base=2)
    pairs = sorted(panel["num_kv_pairs"].unique())
    ax.set_xticks(pairs)  # the pairs measured, written as numbers
    ax.set_xlim(pairs[0] / 1.4, pairs[-1] * 1.4)  # room for the seeds beside the last rung; one rung centred
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(0, 102)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("test accuracy on answers (%)")
    ax.grid(True, alpha=0.3)
    return handles


def state_points(stats: pd.DataFrame, train: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """:func:`recall_points` with a ``state`` column, and the mechanisms without a state size (name -> why).

    ``state``: the largest over the (mechanism, variant)'s ok records (seeds may draw BigBird's random
    blocks differently). Points without a state size are left out of the frame and named in the dict.
    """
    points = recall_points(stats)
    if points.empty:
        return points.assign(state=pd.Series(dtype=float)), {}
    ok = train[(train["status"] == "ok") & train["test_acc"].notna()].copy()
    ok["variant"] = variant_labels(ok)
    ok = ok[ok["variant"].isin(set(points["variant"]))]
    # MQAR is token-level: the mechanism reads the task's seq_len tokens.
    sizes = pd.DataFrame([record_state_size(row, row["config.task.params.seq_len"])[::2] for _, row in ok.iterrows()],
                         index=ok.index,
                         columns=["state", "why"])
    ok = ok.join(sizes)
    state = ok.groupby(["attention", "variant"])["state"].max().rename("state").reset_index()
    points = points.merge(state, on=["attention", "variant"], how="left")
    dropped = set(points.loc[points["state"].isna(), "attention"])
    missing = ok[ok["attention"].isin(dropped)].groupby("attention")["why"].max().to_dict()  # "" < any reason
    return points[points["state"].notna()].reset_index(drop=True), missing


def plot_recall_vs_state(points: pd.DataFrame, path: Path) -> Path:
    """Accuracy (%) vs state size (log x), one panel per MQAR variant, one labelled point per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    # One panel per variant label (form, length, pairs, and a recipe hash where recipes differ), in that order.
    panels = sorted(points.groupby(["form", "seq_len", "num_kv_pairs", "variant"]).groups)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.6 * rows), squeeze=False)
    labels, drawn = [], set()
    for ax, (form, length, pairs, variant) in zip(axes.flat, panels):
        recipe = variant.partition(" (")[2].rstrip(")")
        title = f"MQAR {form}, {length} tokens, {pairs} pairs" + (f" (recipe {recipe})" if recipe else "")
        panel = points[points["variant"] == variant].sort_values("state")
        labels.append((ax, panel, _state_panel(ax, panel, title, drawn)))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    # Names placed apart once the panels have their final size (placing them earlier let them overlap).
    for ax, panel, texts in labels:
        adjust_text(texts, x=list(panel["state"]), y=list(panel["mean"]), ax=ax,
                    target_x=list(panel["state"]), target_y=list(panel["mean"]), expand=(1.3, 1.8),
                    arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.5})
    _seeds_note(fig, drawn)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _state_panel(ax, panel: pd.DataFrame, title: str, drawn: set) -> list:
    """One variant: a point per mechanism (mean over seeds, the seeds beside it) in its fixed style; returns the names'
    text objects, which the caller places apart."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    texts = []
    for _, r in panel.iterrows():
        style = mechanism_style(r["attention"])
        ax.plot([r["state"]], [r["mean"]], ms=6, color=style["color"], marker=style["marker"], ls="none",
                zorder=style["zorder"])
        drawn.add(draw_seeds(ax, float(r["state"]), float(r["mean"]), r.get("values"), str(r["attention"]),
                             offset=1.06))
        # Started a little right of the point (log axis: x 1.1) and kept off every point by the caller.
        texts.append(ax.text(r["state"] * 1.1, r["mean"], r["attention"], fontsize=7, color=style["color"],
                             va="center", zorder=5))
    if "majority" in panel and panel["majority"].notna().any():  # one variant: one majority class
        ax.axhline(float(panel["majority"].mean()), **MAJORITY_STYLE)
    low, high = panel["state"].min(), panel["state"].max()
    ax.set_xscale("log")
    # 1, 2, 5 per decade on a narrow axis (else one label or none); decades only on a wide one.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if high / low > 100 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low / 2, high * 2)
    ax.set_ylim(-8, 105)  # room below 0 for the names of mechanisms that did not learn the task
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("state size (floats per head per layer, log)")
    ax.set_ylabel("test accuracy on answers (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    return texts


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
              "'≈' = a tie with the best: the seeds cannot tell them apart (with fewer than 5 seeds: their ranges of "
              "seeds overlap; from 5: the means differ by less than the larger std); "
              f"a column marked '(not learned)': its best is not more than {LEARNED_MARGIN:g} point above the "
              "majority class, so no mechanism is called best there. "
              "MQAR columns: form (encoder = bidirectional, decoder = causal next-token), sequence length L "
              "and key-value pairs k; accuracy over answer positions only (chance ≈ 1/(vocab/2)).")
    page.table(spread_table(stats))
    points = recall_points(stats)
    if points.empty:
        return
    files.append(plot_recall(points, out / "recall_vs_pairs.png", family_titles(train)))
    page.heading("MQAR recall vs number of key-value pairs", place="figures")
    page.note("MQAR test accuracy (mean over seeds) vs number of key-value pairs (Zoology Figure 2 layout); each "
              "mechanism keeps the budget its recipe gives it (window, features, buckets) while the pairs grow. "
              "One panel per recipe: runs that differ in more than the pairs (another step count) get their "
              f"own panel, titled by what differs. Dashed: the majority class (a constant predictor). {SEEDS_NOTE}",
              place="figures")
    page.image(files[-1], "recall_vs_pairs.png")
    page.note("The MQAR recall plots (vs key-value pairs, vs state size) are under Figures.")
    _state_figure(page, stats, train, out, files)


def _state_figure(page: Page, stats: pd.DataFrame, train: pd.DataFrame, out: Path, files: list[Path]) -> None:
    """The recall-vs-state-size plot under its own heading with its caption, and the note naming mechanisms
    without a state size."""
    points, missing = state_points(stats, train)
    if not points.empty:
        files.append(plot_recall_vs_state(points, out / "recall_vs_state.png"))
        page.heading("MQAR recall vs state size", place="figures")
        page.note("MQAR test accuracy (mean over seeds) against the number of floats, per head and per layer, that "
                  "one query's output is computed from after the mechanism's own compression (full attention: its "
                  "KV cache, 2 x length x head_dim; a kernel mechanism: its fixed feature sums; docs/MQAR.md gives "
                  f"each formula). One panel per MQAR variant; log x axis; dashed: the majority class. {SEEDS_NOTE}",
                  place="figures")
        page.image(files[-1], "recall_vs_state.png")
    if missing:
        page.note("no fixed state: " + "; ".join(f"{name} ({why})" for name, why in sorted(missing.items())),
                  place="figures" if not points.empty else "tables")
