"""The report's decoding section (issue 24): time per token and state bytes against the context, and MQAR recall
against what decoding costs.

Reads ``decode`` records (one per benchmark cell, written by ``arena-bench mode=decode``; fields in
docs/DECODING.md). Nothing is drawn or titled when the store holds none.

* :func:`decoding_section`: one table per (scope, model size, batch and setting): mechanism, decode form (the
  recompute form marked), context, ms/token median [p10–p90], tokens/s, state bytes per sequence, how the state
  grows, what was changed from the trained recipe; the derived slopes, crossover against ``full`` with its KV
  cache and step-vs-recompute speed-up (:func:`harness.analysis.decode_derived`); two log-log figures
  (ms/token and state bytes per sequence against the context, one panel per scope and batch, one line per
  mechanism in its fixed style, recompute forms dashed and hollow).
* :func:`recall_cost_section`: MQAR decoder-form accuracy (training records of ``quick/mqar_causal``) against the
  state bytes per sequence and the tokens/s of the trained configuration (model-scope cells at the
  ``mqar_causal`` size, context :data:`RECALL_COST_CONTEXT`), one point per mechanism, seeds drawn as in
  :mod:`harness.report.recall`; a trained mechanism without such a cell is named under the figure.

Owns: this section only. Imports: pandas, numpy, matplotlib, adjustText, :mod:`harness.analysis` (the derived
figures), :mod:`harness.display`, :mod:`harness.report.page`, :mod:`harness.report.plots` (styles, axes),
:mod:`harness.report.recall` (seed statistics).
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from harness.analysis import DECODE_SPEEDUP_CONTEXT, decode_derived
from harness.display import MISSING, format_bytes, missing_cell, not_run
from harness.report.page import Page
from harness.report.plots import (
    MECHANISM_ORDER,
    _length_axis,
    _ordered,
    _plain_log_y,
    _pyplot,
    _save,
    draw_seeds,
    mechanism_style,
    seeds_caption,
)
from harness.report.recall import MAJORITY_STYLE, seed_stats

DECODE_KIND = "decode"  # the store's kind of a decode cell (harness.store.KINDS once the benchmark writes it)
# The recall-vs-cost figure: the recipe whose trained models give the accuracy, the model size of the decode cells
# measured on their configuration, and the context those cells are read at.
RECALL_COST_EXPERIMENT = "quick/mqar_causal"
RECALL_COST_SIZE = "mqar_causal"
RECALL_COST_CONTEXT = 4096
# The fields that make one decode setting (one table, one panel); the others belong to the cell.
SETTING_FIELDS = ("scope", "model_size", "batch", "heads", "head_dim", "dtype", "device", "threads", "timing_policy",
                  "num_kv_heads")  # grouped-query cells (issue 26) in tables and panels of their own
RECOMPUTE_TEXT = "RECOMPUTE (no step form)"
# A mechanism with a step form also timed in the recompute form (the benchmark's decode.recompute_contexts): the
# step form's speed-up. Shown in the table, left out of the plots and of the recall-vs-cost figure.
FORCED_TEXT = "recompute (forced, for the speed-up)"
RECOMPUTE_NOTE = ("RECOMPUTE (no step form): the mechanism has no incremental form, so each token recomputes its "
                  "causal forward over the whole prefix; its numbers are its true cost, not a step form's.")


def decode_frame(decode: pd.DataFrame) -> pd.DataFrame:
    """The decode records with every schema column present, ``outcome`` (= status, for the shared missing-cell
    text), ``forced_recompute`` (False where absent), ``line`` (mechanism, `` (recompute)`` for the recompute form)
    and a stable order (the mechanisms' fixed order, then context)."""
    cells = decode.copy()
    for col in ("mechanism", "scope", "model_size", "batch", "context", "decode_form", "state_growth", "reason",
                "ms_per_token", "ms_per_token_p10", "ms_per_token_p90", "tokens_per_s", "state_bytes_per_seq",
                "config_changes", "state_filled", "state_note", *SETTING_FIELDS):
        if col not in cells:
            cells[col] = None
    cells["outcome"] = cells["status"]
    forced = cells["forced_recompute"] if "forced_recompute" in cells else pd.Series(False, index=cells.index)
    cells["forced_recompute"] = forced.fillna(False).astype(bool)
    cells["decode_form"] = cells["decode_form"].fillna("step")
    cells["line"] = [f"{m} (recompute)" if f == "recompute" else str(m)
                     for m, f in zip(cells["mechanism"], cells["decode_form"])]
    for col in ("context", "batch", "ms_per_token", "ms_per_token_p10", "ms_per_token_p90", "tokens_per_s",
                "state_bytes_per_seq", "num_kv_heads"):  # num_kv_heads: NaN for None, in old and new records alike
        cells[col] = pd.to_numeric(cells[col], errors="coerce")
    rank = {name: i for i, name in enumerate(MECHANISM_ORDER)}
    cells["_rank"] = cells["mechanism"].map(lambda m: rank.get(m, len(rank)))
    return cells.sort_values(["_rank", "mechanism", "decode_form", "context"]).drop(columns="_rank")


def decode_groups(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, cells) per decode setting: the mechanism scope first, then the models; by batch."""
    keys = pd.Series(["|".join(map(str, row)) for row in cells[list(SETTING_FIELDS)].itertuples(index=False)],
                     index=cells.index)
    groups = [(setting_text(rows), rows) for _, rows in cells.groupby(keys, sort=False)]

    def order(item):
        rows = item[1]
        return (rows["scope"].iloc[0] != "mechanism", str(rows["model_size"].iloc[0]), float(rows["batch"].iloc[0]))

    return sorted(groups, key=order)


def setting_text(rows: pd.DataFrame) -> str:
    """``mechanism alone, batch 1, 4 heads, head dim 32, float32, cpu, 1 thread(s), contexts 1K..16K``."""
    first = rows.iloc[0]
    scope = ("mechanism alone" if first["scope"] == "mechanism"
             else f"whole model at the {first['model_size']} size")
    parts = [scope, f"batch {_int(first['batch'])}"]
    if first["scope"] == "mechanism" and _known(first["heads"]):
        parts.append(f"{_int(first['heads'])} heads, head dim {_int(first['head_dim'])}")
    if first["scope"] == "mechanism" and _known(first["num_kv_heads"]):  # a model's size names its recipe's
        kv = _int(first["num_kv_heads"])
        parts.append(f"{kv} key-value head{'s' if kv > 1 else ''}" + (" (multi-query)" if kv == 1 else ""))
    parts += [str(first[c]) for c in ("dtype", "device") if _known(first[c])]
    if _known(first["threads"]):
        parts.append(f"{_int(first['threads'])} thread(s)")
    if _known(first["timing_policy"]) and first["timing_policy"] != "plain":
        parts.append(f"timing {first['timing_policy']}")
    contexts = sorted(int(c) for c in rows["context"].dropna().unique())
    if contexts:
        parts.append(f"context {_k(contexts[0])}" + (f"..{_k(contexts[-1])}" if len(contexts) > 1 else ""))
    if "smoke" in rows and rows["smoke"].fillna(False).astype(bool).any():
        parts.append("SMOKE settings (tiny sizes: a check that the stage runs, not a measurement)")
    return ", ".join(parts)


def decode_summary(decode: pd.DataFrame) -> str | None:
    """The summary's line: how many decode cells, how many ran, of which scopes, contexts and batches."""
    if decode is None or decode.empty or "mechanism" not in decode:
        return None
    cells = decode_frame(decode)
    scopes = sorted({"mechanism alone" if s == "mechanism" else f"model ({m})"
                     for s, m in zip(cells["scope"], cells["model_size"])})
    contexts = sorted(int(c) for c in cells["context"].dropna().unique())
    batches = sorted(int(b) for b in cells["batch"].dropna().unique())
    return (f"decoding: {len(cells)} cells ({int((cells['status'] == 'ok').sum())} ran) of "
            f"{cells['mechanism'].nunique()} mechanism(s), {', '.join(scopes)}, contexts "
            f"{', '.join(_k(c) for c in contexts)}, batch {', '.join(map(str, batches))}")


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != "None"


def _int(value) -> int:
    return int(float(value))


def _k(n: float) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def decode_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One setting's cells as the page shows them, one row per (mechanism, form, context)."""
    return pd.DataFrame([{
        "mechanism": r["mechanism"],
        "form": form_text(r["decode_form"], r["forced_recompute"]),
        "context": _k(r["context"]) + (" (random state)" if r["state_filled"] == "random" else ""),
        "ms/token median [p10–p90]": _ms(r) if r["status"] == "ok" else why_missing(r),
        "tokens/s": f"{r['tokens_per_s']:,.0f}" if r["status"] == "ok" else MISSING,
        "state bytes / sequence": (format_bytes(r["state_bytes_per_seq"])
                                   if r["status"] == "ok" and np.isfinite(r["state_bytes_per_seq"]) else MISSING),
        "growth": str(r["state_growth"]) if _known(r["state_growth"]) else MISSING,
        "config changes": changes_text(r["config_changes"]),
    } for _, r in rows.iterrows()])


def form_text(form: str, forced: bool = False) -> str:
    """``step``; a mechanism without a step form marked in capitals; a forced recompute form said as such."""
    if forced:
        return FORCED_TEXT
    if form is None or form != form:  # a mechanism without a causal form: not decodable
        return "not decodable"
    return RECOMPUTE_TEXT if form == "recompute" else str(form)


def why_missing(r: pd.Series) -> str:
    """``— (oom: <reason>)``: a cell that did not run says why, in the benchmark's words up to its first
    parenthesis (a budget skip's prediction details stay in the record) and at most 120 characters."""
    if not _known(r["reason"]):
        return missing_cell(r)
    reason = " ".join(str(r["reason"]).split()).split(" (")[0]
    reason = reason[:117] + "..." if len(reason) > 120 else reason
    return missing_cell(pd.Series({"outcome": r["status"], "reason": reason})) if r["status"] == "skipped_budget" \
        else f"{MISSING} ({r['status']}: {reason})"


def _ms(r: pd.Series) -> str:
    def g(x):
        return f"{x:.3g}" if np.isfinite(x) else "?"

    noisy = " (noisy)" if r.get("noisy") is True else ""  # disturbed after a second measurement: not to be trusted
    return f"{g(r['ms_per_token'])} [{g(r['ms_per_token_p10'])}–{g(r['ms_per_token_p90'])}]{noisy}"


def changes_text(value) -> str:
    """The record's ``config_changes`` (a list, or its JSON text as the store flattens it) as one cell."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [value]
    if not isinstance(value, list | tuple):
        return MISSING
    return "; ".join(str(v) for v in value) if value else "none"


def derived_text(rows: pd.DataFrame) -> pd.DataFrame:
    """The derived figures of one setting (:func:`harness.analysis.decode_derived`), formatted, one row per
    mechanism in its own form; a figure that cannot be computed says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        derived = decode_derived(rows)
    if derived.empty:
        return derived
    derived = derived[~derived["forced_recompute"].astype(bool)]
    forms = rows[~rows["forced_recompute"]].groupby("mechanism")["decode_form"].first()

    def num(x, why="too few contexts"):
        ok = x is not None and np.isfinite(float(x))
        return f"{round(float(x), 2) + 0.0:.2f}" if ok else not_run(why)  # never "-0.00"

    table = pd.DataFrame({
        "mechanism": derived["mechanism"],
        "form": [form_text(forms.get(m, "step")) for m in derived["mechanism"]],
        "ms/token slope": derived["ms_slope"].map(num),
        "ms/token slope, 3 largest contexts": derived["ms_slope_top3"].map(num),
        "state bytes slope": derived["bytes_slope"].map(num),
        "faster per token than full from context": derived.apply(_crossover, axis=1),
        f"step vs recompute at {_k(DECODE_SPEEDUP_CONTEXT)}": derived["speedup_vs_recompute"].map(
            lambda x: f"{float(x):.1f}x" if x is not None and np.isfinite(float(x)) else not_run("not measured")),
    })
    if derived["contexts"].max() <= 3:  # the three largest are every context: one slope column
        table = table.drop(columns="ms/token slope, 3 largest contexts")
    measured = pd.to_numeric(derived["speedup_vs_recompute"], errors="coerce").notna().any()
    return table if measured else table.iloc[:, :-1]  # the speed-up only where a mechanism ran in both forms


def _crossover(r: pd.Series) -> str:
    x, note = r["crossover_context"], r["crossover_note"]
    if note == "interpolated":
        return f"{float(x):.0f}"
    if note == "faster at all n":
        return f"<= {float(x):.0f} (faster at every context)"
    return not_run(CROSSOVER_NOTES.get(note, str(note)))


CROSSOVER_NOTES = {"never faster": "never faster here", "no common n": "no ok cell beside full's"}


def decoding_section(page: Page, decode: pd.DataFrame, out: Path, files: list[Path]) -> None:
    """The decoding tables (detailed tables) and the two log-log figures; nothing at all without records."""
    if decode is None or decode.empty or "mechanism" not in decode:
        return
    cells = decode_frame(decode)
    groups = decode_groups(cells)
    recompute = ((cells["decode_form"] == "recompute") & ~cells["forced_recompute"]).any()
    page.heading("Decoding: time per token and state per sequence")
    page.note("arena-bench mode=decode: a prompt of `context` tokens prefilled, then generated tokens timed one "
              "by one (ms/token: median [p10–p90]; tokens/s = batch x 1000 / median ms); state bytes: what "
              "decoding holds per sequence at the context (all heads; a whole model: all layers), the "
              "filled part of a preallocated cache (docs/DECODING.md). '(random state)': the prefill would exceed "
              "the cell time limit, so the state was filled with random keys and values of the right size (the "
              "time per token does not depend on how it was filled)." + (f" {RECOMPUTE_NOTE}" if recompute else ""))
    for label, rows in groups:
        page.note(f"Decoding, {label}")
        table = decode_table(rows)
        changes = table["config changes"].unique()
        if len(changes) == 1 and changes[0] != "none":  # one list for every cell: said once, under the table
            table = table.drop(columns="config changes")
        page.table(table, index=False)
        if "config changes" not in table:
            page.note(f"Config changes from the trained recipe, every cell above: {changes[0]}.")
        derived_part(page, label, rows)
    own = [(label, rows[~rows["forced_recompute"]]) for label, rows in groups]
    scaled = [(label, rows) for label, rows in own if rows.loc[rows["status"] == "ok", "context"].nunique() >= 2]
    if not scaled:
        return
    page.heading("Decoding: time per token and state bytes vs context", place="figures")
    page.note("Log-log, one panel per scope and batch, one line per mechanism in its fixed style; a dashed line with "
              "hollow markers is a recompute form (no step form: the whole causal forward per token). Time: median "
              "with p10–p90 bars. State: bytes per sequence (all heads and layers). x at the top edge: a cell that "
              "did not run (its reason is in the table).", place="figures")
    for metric, name in (("ms_per_token", "decode_time_vs_context.png"),
                         ("state_bytes_per_seq", "decode_state_vs_context.png")):
        files.append(plot_decode_scaling(scaled, metric, out / name))
        page.image(files[-1], name)


def derived_part(page: Page, label: str, rows: pd.DataFrame) -> None:
    """The derived figures of one setting under its table; nothing with fewer than two ok contexts (no slope, and
    the table already compares the mechanisms at its one context)."""
    contexts = sorted(rows.loc[(rows["status"] == "ok") & ~rows["forced_recompute"], "context"].unique())
    if len(contexts) < 2:
        return
    table = derived_text(rows)
    speedup = (f", and the step form's speed-up over its recompute form at {_k(DECODE_SPEEDUP_CONTEXT)}"
               if table.columns[-1].startswith("step vs recompute") else "")
    page.note(f"Derived, {label}: log-log slopes over every measured context ({_k(contexts[0])}..{_k(contexts[-1])}"
              + ("; and over the three largest" if len(contexts) > 3 else "") + "; 0 = flat, 1 = linear), the "
              f"context from which the mechanism's time per token is below full's with its KV cache{speedup} (ok "
              "cells only).")
    page.table(table, index=False)


def plot_decode_scaling(groups: list[tuple[str, pd.DataFrame]], metric: str, path: Path) -> Path:
    """Log-log ``metric`` (``ms_per_token`` or ``state_bytes_per_seq``) vs context, one panel per decode setting
    (``groups``: (label, :func:`decode_frame` rows)), one line per mechanism and form."""
    plt = _pyplot()
    cols = min(2, len(groups))
    rows_n = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 4.6 * rows_n), squeeze=False)
    handles: dict[str, object] = {}
    failed: set[str] = set()
    for ax, (label, rows) in zip(axes.flat, groups):
        for line in _ordered(rows["line"]):
            handle = _decode_line(ax, rows[rows["line"] == line], metric)
            if handle is not None:
                handles.setdefault(line, handle)
        failed |= _decode_failed(ax, rows)
        _length_axis(ax, rows["context"].dropna())
        _decode_y_axis(ax, rows[metric].dropna(), metric)
        ax.set_xlabel("context (tokens in the state)")
        ax.set_title(textwrap.fill(label, 70), fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    what = "time per generated token" if metric == "ms_per_token" else "decoding state per sequence"
    fig.suptitle(f"{what} vs context (log-log); dashed, hollow: recompute form (no step form)"
                 + (f"\nx at the top edge = not run ({', '.join(sorted(failed))})" if failed else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _decode_line(ax, line: pd.DataFrame, metric: str):
    """One mechanism and form: its ok cells joined, p10–p90 bars on times; returns the legend handle."""
    ok = line[line["status"] == "ok"].dropna(subset=[metric]).sort_values("context")
    if ok.empty:
        return None
    first = ok.iloc[0]
    style = mechanism_style(str(first["mechanism"]))
    recompute = first["decode_form"] == "recompute"
    y = ok[metric].astype(float)
    yerr = None
    if metric == "ms_per_token":
        low, high = ok["ms_per_token_p10"].fillna(y), ok["ms_per_token_p90"].fillna(y)
        yerr = np.vstack([y - low, high - y]).clip(0)
    container = ax.errorbar(ok["context"], y, yerr=yerr, color=style["color"], marker=style["marker"] or "o", ms=5,
                            linestyle="--" if recompute else style["linestyle"], lw=style["lw"],
                            zorder=style["zorder"], capsize=2, elinewidth=0.8,
                            mfc="white" if recompute else style["color"], label=str(first["line"]))
    return container.lines[0]


def _decode_failed(ax, rows: pd.DataFrame) -> set[str]:
    """An ``x`` at the panel's top edge for each cell that did not run; returns their statuses."""
    failed = rows[rows["status"] != "ok"].dropna(subset=["context"])
    top = ax.get_ylim()[1]
    for _, r in failed.iterrows():
        ax.plot([r["context"]], [top], "x", color=mechanism_style(str(r["mechanism"]))["color"], ms=8, mew=2,
                clip_on=False, zorder=5)
    return {"over budget" if s == "skipped_budget" else str(s) for s in failed["status"]}


def _decode_y_axis(ax, values: pd.Series, metric: str) -> None:
    """Log y: plain milliseconds, or bytes in binary units (``64 KiB``, ``16 MiB``)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    _plain_log_y(ax, values.astype(float))
    if metric == "ms_per_token":
        ax.set_ylabel("ms per token (median, bars p10-p90)")
        return
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x).replace(".0 ", " ")))
    ax.set_ylabel("state bytes per sequence")


# ------------------------------------------------------------------------------------------ recall against cost

def recall_cost_points(train: pd.DataFrame, decode: pd.DataFrame,
                       context: int = RECALL_COST_CONTEXT) -> tuple[pd.DataFrame, dict[str, str]]:
    """(points, missing): one row per (mechanism, MQAR variant) trained with :data:`RECALL_COST_EXPERIMENT`, with
    its seed statistics (:func:`harness.report.recall.seed_stats`: mean, std, n, values, majority) and the cost of
    its configuration: ``state_bytes`` (per sequence) and ``tokens_per_s`` of the model-scope decode cell at the
    :data:`RECALL_COST_SIZE` size and ``context`` (the smallest batch measured), ``decode_form``.

    ``missing``: each trained mechanism without such an ok cell -> why (no cell; or the cell's status and
    reason). Those are not in ``points``."""
    empty = pd.DataFrame(columns=["attention", "variant", "mean", "std", "n", "values", "majority", "state_bytes",
                                  "tokens_per_s", "decode_form"])
    if train.empty or "experiment" not in train or "test_acc" not in train:
        return empty, {}
    stats = seed_stats(train[train["experiment"] == RECALL_COST_EXPERIMENT])
    if stats.empty:
        return empty, {}
    cells = decode_frame(decode) if decode is not None and not decode.empty and "mechanism" in decode else None
    costs, missing = {}, {}
    for name in stats["attention"].unique():
        cost = _cost_of(cells, str(name), context)
        if isinstance(cost, str):
            missing[str(name)] = cost
        else:
            costs[name] = cost
    points = stats[stats["attention"].isin(list(costs))].copy()
    for col in ("state_bytes", "tokens_per_s", "decode_form"):
        points[col] = [costs[a][col] for a in points["attention"]]
    return points.reset_index(drop=True), missing


def _cost_of(cells: pd.DataFrame | None, name: str, context: int) -> dict | str:
    """The cost fields of ``name``'s model-scope cell at ``context`` in its own form (not a forced recompute), the
    smallest batch measured, or why there is none."""
    wanted = f"no model-scope decode cell at the {RECALL_COST_SIZE} size and context {_k(context)}"
    if cells is None:
        return wanted + " (no decode records)"
    mine = cells[(cells["mechanism"] == name) & (cells["scope"] == "model") & (cells["model_size"] == RECALL_COST_SIZE)
                 & (cells["context"] == context) & ~cells["forced_recompute"]]
    if mine.empty:
        return wanted
    ok = mine[mine["status"] == "ok"].sort_values("batch")
    if ok.empty:
        first = mine.iloc[0]
        reason = f": {first['reason']}" if _known(first["reason"]) else ""
        return f"its {RECALL_COST_SIZE} cell at {_k(context)} did not run ({first['status']}{reason})"
    best = ok.iloc[0]
    return {"state_bytes": float(best["state_bytes_per_seq"]), "tokens_per_s": float(best["tokens_per_s"]),
            "decode_form": str(best["decode_form"])}


COST_AXES = (("state_bytes", "measured state bytes per sequence (all layers and heads, log)"),
             ("tokens_per_s", "decode tokens/s (log)"))


def plot_recall_vs_cost(points: pd.DataFrame, path: Path, missing: dict[str, str] | None = None,
                        context: int = RECALL_COST_CONTEXT) -> Path:
    """MQAR accuracy (%) against measured state bytes per sequence (left) and decode tokens/s (right) at
    ``context``, one row of panels per MQAR variant, one point per mechanism (mean over seeds, the seeds beside
    it); recompute forms hollow; ``missing`` (mechanism -> why) written under the panels."""
    from adjustText import adjust_text

    plt = _pyplot()
    variants = sorted(points["variant"].unique())
    fig, axes = plt.subplots(len(variants), 2, figsize=(11.5, 4.6 * len(variants)), squeeze=False)
    drawn, placed = set(), []
    for row, variant in zip(axes, variants):
        panel = points[points["variant"] == variant]
        for ax, (metric, xlabel) in zip(row, COST_AXES):
            placed.append((ax, panel, metric, _cost_panel(ax, panel, metric, drawn)))
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(f"{variant}: accuracy vs {'state' if metric == 'state_bytes' else 'speed'} at context "
                         f"{_k(context)}", fontsize=9)
    fig.tight_layout()
    for ax, panel, metric, texts in placed:
        adjust_text(texts, x=list(panel[metric]), y=list(panel["mean"]), ax=ax, target_x=list(panel[metric]),
                    target_y=list(panel["mean"]), expand=(1.3, 1.8),
                    arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.5})
    caption = " ".join(filter(None, [seeds_caption(drawn), "Hollow: recompute form (no step form)."
                                     if (points["decode_form"] == "recompute").any() else "",
                                     _missing_text(missing)]))
    if caption:
        fig.text(0.01, 0.0, textwrap.fill(caption, 150), ha="left", va="top", fontsize=8)
    return _save(fig, path)


def _missing_text(missing: dict[str, str] | None) -> str:
    return ("Not drawn: " + "; ".join(f"{name} ({why})" for name, why in sorted(missing.items())) + "."
            if missing else "")


def _cost_panel(ax, panel: pd.DataFrame, metric: str, drawn: set) -> list:
    """One panel: a point per mechanism in its fixed style, its seeds beside it; returns the names' texts."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    texts = []
    for _, r in panel.iterrows():
        style = mechanism_style(str(r["attention"]))
        hollow = r["decode_form"] == "recompute"
        ax.plot([r[metric]], [r["mean"]], ms=7, color=style["color"], marker=style["marker"] or "o", ls="none",
                mfc="white" if hollow else style["color"], zorder=style["zorder"])
        drawn.add(draw_seeds(ax, float(r[metric]), float(r["mean"]), r.get("values"), str(r["attention"]),
                             offset=1.08))
        texts.append(ax.text(r[metric] * 1.12, r["mean"], str(r["attention"]) + (" (recompute)" if hollow else ""),
                             fontsize=7, color=style["color"], va="center", zorder=5))
    if panel["majority"].notna().any():
        ax.axhline(float(panel["majority"].mean()), **MAJORITY_STYLE)
        ax.legend(loc="best", fontsize=7)
    low, high = float(panel[metric].min()), float(panel[metric].max())
    ax.set_xscale("log")
    if metric == "state_bytes":  # powers of 4 bytes: 16 KiB, 64 KiB, 256 KiB, 1 MiB
        ax.xaxis.set_major_locator(LogLocator(base=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x).replace(".0 ", " ")))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if high / low > 100 else (1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low / 3, high * 8)  # room right of the last point for its name
    ax.set_ylim(-8, 105)  # room below 0 for the names of mechanisms that did not learn the task
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy on answers (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    return texts


def recall_cost_section(page: Page, train: pd.DataFrame, decode: pd.DataFrame, out: Path,
                        files: list[Path]) -> None:
    """The recall-vs-cost figure beside the recall-vs-state one, and the mechanisms it could not draw; nothing
    without decode records or without ``quick/mqar_causal`` runs."""
    if decode is None or decode.empty or train is None or train.empty:
        return
    points, missing = recall_cost_points(train, decode)
    if points.empty and not missing:
        return
    page.heading(f"MQAR recall vs decoding cost at context {_k(RECALL_COST_CONTEXT)}", place="figures")
    if not points.empty:
        files.append(plot_recall_vs_cost(points, out / "recall_vs_cost.png", missing))
        page.note(f"MQAR decoder-form test accuracy of the trained models ({RECALL_COST_EXPERIMENT}; mean over seeds, "
                  "the seeds beside it) against what their configuration costs to decode, measured by arena-bench "
                  f"mode=decode on the whole model at the {RECALL_COST_SIZE} size at a context of "
                  f"{RECALL_COST_CONTEXT:,} tokens (only max_seq_len and what derives from it changed: the decoding "
                  "table lists the changes): left, the state bytes it holds per sequence (all layers and heads; "
                  "recall_vs_state.png counts floats per head and layer that one query reads at the training length "
                  "instead); right, the tokens/s it generates. Dashed: the majority class.", place="figures")
        page.image(files[-1], "recall_vs_cost.png")
    if missing:
        page.note("Not drawn in the recall-vs-cost figure (trained, no decode cell to place them by): "
                  + "; ".join(f"{name} ({why})" for name, why in sorted(missing.items())) + ".", place="figures")
