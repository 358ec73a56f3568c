"""Report (``arena-report``): the results store as tables and plots, in Markdown and one self-contained HTML page.

    arena-report                                   # results/ -> results/report/
    arena-report results_dir=results out=report    # explicit folders

Reads every record with :func:`harness.store.load_records` (pandas) and writes ``report.md``,
``report.html`` (PNG plots embedded as base64: one file to send around) and the PNGs:

- accuracy: mechanisms x tasks, test accuracy at the best validation checkpoint, mean +- std
  over seeds, the majority-class baseline row and the average column;
- efficiency: time and peak memory per n (median, p10-p90), relative to ``full`` (LRA Table 2
  layout), log-log slopes, the crossover length, the longest n within a memory budget, the
  registry-vs-direct-SDPA overhead;
- peers (ours / peer ratios) and the approximation error against exact attention;
- plots: accuracy vs speed (memory as bubble size), time vs n and memory vs n (log-log, one
  line per mechanism, cells that could not run marked), approximation error vs budget.

A cell without a number is shown as ``—`` with the reason (not run, oom, unsupported, ...),
never as zero.
"""

from __future__ import annotations

import base64
import html
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attentions import available_attentions, get_attention_info
from harness.store import config_hash, load_records

MISSING = "—"
TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
# Columns of a training record that define a recipe (everything but the mechanism and the seed).
RECIPE_PREFIXES = ("config.task.", "config.model.", "config.train.", "config.optimizer.", "config.scheduler.")
GROUP_COLUMNS = ("batch", "heads", "head_dim", "dtype", "device", "cpu_allocator")


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


def task_labels(train: pd.DataFrame) -> pd.Series:
    """The task name, suffixed with a recipe hash when one task was run with more than one recipe."""
    recipe_cols = sorted(c for c in train.columns if c.startswith(RECIPE_PREFIXES))
    if not recipe_cols:
        return train["task"].astype(str)
    recipes = train[recipe_cols].apply(
        lambda r: config_hash({k: (None if _isnan(v) else v) for k, v in r.items()})[:6], axis=1)
    labels = train["task"].astype(str).copy()
    for task in labels.unique():
        mask = labels == task
        if recipes[mask].nunique() > 1:
            labels[mask] = [f"{task} ({r})" for r in recipes[mask]]
    return labels


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _task_sort_key(label: str) -> tuple[int, str]:
    base = label.split(" ")[0]
    return (TASK_ORDER.index(base) if base in TASK_ORDER else len(TASK_ORDER), label)


def accuracy_table(train: pd.DataFrame, mechanisms: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric means in %) : mechanisms x tasks + Average, and a Majority row.

    A cell is ``mean ± std (k seeds)`` of the test accuracy of the ok runs; failed runs are
    counted beside it; a cell with no ok run is ``—`` with the statuses seen or "not run".
    The average needs every task; otherwise it is ``— (incomplete)``.
    """
    train = train.copy()
    train["_task"] = task_labels(train)
    tasks = sorted(train["_task"].unique(), key=_task_sort_key)
    names = list(mechanisms or [])
    names += sorted(set(train["attention"].dropna()) - set(names))
    display: dict[str, dict[str, str]] = {}
    numeric: dict[str, dict[str, float]] = {}
    for name in names:
        display[name], numeric[name] = {}, {}
        for task in tasks:
            runs = train[(train["attention"] == name) & (train["_task"] == task)]
            ok = runs[runs["status"] == "ok"]["test_acc"].dropna().astype(float) * 100
            failed = runs[runs["status"] != "ok"]["status"].value_counts()
            failed_text = ", ".join(f"{c} {s}" for s, c in failed.items())
            if len(ok):
                if len(ok) > 1:
                    cell = f"{ok.mean():.2f} ± {float(ok.std(ddof=1)):.2f} ({len(ok)} seeds)"
                else:
                    cell = f"{ok.mean():.2f} (1 seed)"  # no spread from one seed
                display[name][task] = cell + (f" [+{failed_text}]" if failed_text else "")
                numeric[name][task] = float(ok.mean())
            else:
                display[name][task] = f"{MISSING} ({failed_text or 'not run'})"
                numeric[name][task] = float("nan")
        values = [numeric[name][t] for t in tasks]
        if tasks and all(np.isfinite(values)):
            display[name]["Average"] = f"{np.mean(values):.2f}"
            numeric[name]["Average"] = float(np.mean(values))
        else:
            display[name]["Average"] = f"{MISSING} (incomplete)"
            numeric[name]["Average"] = float("nan")
    majority: dict[str, str] = {}
    for task in tasks:
        values = train[train["_task"] == task].get("majority_test_acc", pd.Series(dtype=float)).dropna()
        majority[task] = f"{float(values.astype(float).mean()) * 100:.2f}" if len(values) else f"{MISSING} (unknown)"
    maj_values = [float(m) for m in majority.values() if not m.startswith(MISSING)]
    majority["Average"] = f"{np.mean(maj_values):.2f}" if tasks and len(maj_values) == len(tasks) else MISSING
    display["Majority class"] = majority
    columns = tasks + ["Average"]
    table = pd.DataFrame(display).T[columns]
    table.index.name = "mechanism"
    return table, pd.DataFrame(numeric).T.reindex(columns=columns)


def training_efficiency(train: pd.DataFrame) -> pd.DataFrame:
    """Per mechanism: mean over tasks of training throughput and step memory relative to ``full`` on the same task."""
    ok = train[train["status"] == "ok"].copy()
    needed = {"throughput.examples_per_s", "peak_memory_bytes"}
    if ok.empty or not needed <= set(ok.columns):
        return pd.DataFrame(columns=["speed_vs_full", "memory_vs_full"])
    ok["_task"] = task_labels(ok)
    per = ok.groupby(["attention", "_task"])[list(needed)].mean()
    rows = {}
    for name in per.index.get_level_values(0).unique():
        speeds, mems = [], []
        for task in per.loc[name].index:
            if ("full", task) not in per.index:
                continue
            ref = per.loc[("full", task)]
            mine = per.loc[(name, task)]
            speeds.append(mine["throughput.examples_per_s"] / ref["throughput.examples_per_s"])
            mems.append(mine["peak_memory_bytes"] / ref["peak_memory_bytes"])
        if speeds:
            rows[name] = {"speed_vs_full": float(np.nanmean(speeds)), "memory_vs_full": float(np.nanmean(mems))}
    return pd.DataFrame(rows).T


# ----------------------------------------------------------------------------------------------
# Efficiency
# ----------------------------------------------------------------------------------------------


def select_bench_group(bench: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The bench records of one setting (batch, heads, head_dim, dtype, device, cpu allocator): the newest one."""
    cols = [c for c in GROUP_COLUMNS if c in bench.columns]
    if bench.empty or not cols:
        return bench, ""
    if "cpu_allocator" in bench.columns:  # records from before the option were measured with the default
        bench = bench.assign(cpu_allocator=bench["cpu_allocator"].fillna("default"))
    keyed = bench.assign(_group=bench[cols].astype(str).agg(" ".join, axis=1))
    latest = keyed.sort_values("created_at").iloc[-1]["_group"]
    chosen = keyed[keyed["_group"] == latest].drop(columns="_group")
    first = chosen.iloc[0]
    label = ", ".join(f"{c}={first[c]}" for c in cols)
    others = keyed["_group"].nunique() - 1
    if others:
        label += f" ({others} other setting(s) in the store not shown)"
    return chosen, label


def bench_cells(bench: pd.DataFrame) -> pd.DataFrame:
    """Store rows -> the cell frame of :mod:`harness.bench` (mechanism, pass, n, outcome, median_s, ...)."""
    def col(name: str) -> pd.Series:
        return bench[name] if name in bench.columns else pd.Series([None] * len(bench), index=bench.index)

    cells = pd.DataFrame({
        "mechanism": bench["mechanism"], "family": col("family"), "pass": bench["pass"],
        "n": bench["n"].astype(int),
        "outcome": col("outcome").fillna(bench["status"]) if "outcome" in bench else bench["status"],
        "reason": col("reason"), "median_s": col("time.median_s"), "p10_s": col("time.p10_s"),
        "p90_s": col("time.p90_s"), "peak_bytes": col("memory.peak_bytes"), "memory_method": col("memory.method"),
        "created_at": col("created_at"),
    })
    # One cell per (mechanism, pass, n): the newest record wins.
    cells = cells.sort_values("created_at").drop_duplicates(["mechanism", "pass", "n"], keep="last")
    return cells.sort_values(["mechanism", "pass", "n"]).reset_index(drop=True)


def _why(row: pd.Series) -> str:
    """``— (oom)``, ``— (unsupported)``, ...; a budget skip says which budget: ``— (over budget: <reason>)``."""
    outcome = str(row["outcome"])
    if outcome == "skipped_budget":
        reason = row.get("reason")
        reason = str(reason) if isinstance(reason, str) and reason else "memory or time"
        return f"{MISSING} (over budget: {reason})"
    return f"{MISSING} ({outcome})"


def pivot_cells(cells: pd.DataFrame, pass_: str, fmt) -> pd.DataFrame:
    """mechanisms x n of ``fmt(row)`` for ok cells, ``— (why)`` for the others, ``— (not run)`` for absent ones."""
    sub = cells[cells["pass"] == pass_]
    if sub.empty:
        return pd.DataFrame()
    values = sub.apply(lambda r: fmt(r) if r["outcome"] == "ok" else _why(r), axis=1)
    table = sub.assign(value=values).pivot_table(index="mechanism", columns="n", values="value", aggfunc="first")
    return table.fillna(f"{MISSING} (not run)")


def _fmt_time(row: pd.Series) -> str:
    return f"{row['median_s'] * 1e3:.1f} [{row['p10_s'] * 1e3:.1f}–{row['p90_s'] * 1e3:.1f}]"


def _fmt_mem(row: pd.Series) -> str:
    return _bytes(row["peak_bytes"])


def _bytes(value: float) -> str:
    value = float(value)
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**10:.1f} KiB"


def relative_table(cells: pd.DataFrame, pass_: str) -> pd.DataFrame:
    """LRA Table 2 layout: ``speed-up x / memory ratio`` relative to ``full`` per n."""
    from harness.bench import relative_to_full

    rel = relative_to_full(cells[cells["pass"] == pass_])
    if rel.empty:
        return pd.DataFrame()
    merged = rel.merge(cells[cells["pass"] == pass_][["mechanism", "n", "outcome", "reason"]], on=["mechanism", "n"])

    def fmt(r):
        if r["outcome"] != "ok":
            return _why(r)
        if not np.isfinite(r["speedup"]):
            return f"{MISSING} (no full)"
        return f"{r['speedup']:.2f}x / {r['memory_ratio']:.2f}"

    merged["value"] = merged.apply(fmt, axis=1)
    return merged.pivot_table(index="mechanism", columns="n", values="value", aggfunc="first").fillna(
        f"{MISSING} (not run)")


def derived_display(cells: pd.DataFrame, slope_range: Sequence[float], budget_bytes: float | None) -> pd.DataFrame:
    """Slopes, crossover and longest n within the budget, formatted; NaN shown as ``—`` with the reason."""
    from harness.bench import derived_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        derived = derived_table(cells, slope_range, budget_bytes)
    if derived.empty:
        return derived

    def num(x, f="{:.2f}", why="too few points"):
        return f.format(x) if x is not None and np.isfinite(x) else f"{MISSING} ({why})"

    out = pd.DataFrame({
        "mechanism": derived["mechanism"], "pass": derived["pass"],
        "time slope": derived["time_slope"].map(num), "memory slope": derived["memory_slope"].map(num),
    })

    def crossover(r):
        if r["crossover_note"] == "interpolated":
            return f"{r['crossover_n']:.0f}"
        if r["crossover_note"] == "faster at all n":
            return f"<= {r['crossover_n']:.0f} (faster at all n)"
        return f"{MISSING} ({r['crossover_note']})"

    out["crossover vs full (n)"] = derived.apply(crossover, axis=1)
    if budget_bytes and "max_n_measured" in derived:
        out["longest n measured within budget"] = derived["max_n_measured"].map(
            lambda x: num(x, "{:.0f}", "none fits"))
        out["longest n extrapolated"] = derived["max_n_extrapolated"].map(lambda x: num(x, "{:.0f}", "no fit"))
    return out


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


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
            seen = set()
            for n, name, outcome in failed:
                ax.plot([n], [top], "x", color=colors[name], ms=8, mew=2, clip_on=False)
                key = (n, outcome)
                if key not in seen:
                    seen.add(key)
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


# ----------------------------------------------------------------------------------------------
# Markdown / HTML
# ----------------------------------------------------------------------------------------------


def markdown_table(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df is None or df.empty:
        return "_no data_"
    frame = df.reset_index() if index else df
    header = [str(c) for c in frame.columns]

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}
"""


class Page:
    """Collects sections once and renders them as Markdown and as self-contained HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.parts.append(("h2", text))

    def note(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, df: pd.DataFrame, index: bool = True) -> None:
        self.parts.append(("table", (df, index)))

    def image(self, path: Path, alt: str) -> None:
        self.parts.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.parts:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":
                out += [markdown_table(*value), ""]
            else:
                out += [f"![{value[1]}]({value[0].name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.parts:
            if kind == "h2":
                out.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "p":
                out.append(f"<p class='note'>{html.escape(value)}</p>")
            elif kind == "table":
                df, index = value
                out.append("<p><em>no data</em></p>" if df is None or df.empty
                           else df.to_html(index=index, escape=True, border=0, na_rep=MISSING))
            else:
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                out.append(f"<p><img alt='{html.escape(value[1])}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def build_report(results_dir: str | Path = "results", out: str | Path | None = None,
                 memory_budget_gb: float | None = 16.0, slope_range: Sequence[float] = (2048, 16384),
                 title: str = "attention-arena report") -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and the PNGs to ``out`` (default ``<results_dir>/report``).

    Returns ``{"out": folder, "files": [...], "build_s": seconds}``.
    """
    started = time.perf_counter()
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_records(results_dir, kind="train")
        bench = load_records(results_dir, kind="bench")
        approx = load_records(results_dir, kind="approx")
        peer = load_records(results_dir, kind="peer")
    unreadable = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    page = Page(title)
    page.note(f"Results store: {results_dir.resolve()}. Generated {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC. "
              f"'{MISSING} (reason)' marks a cell without a number; no missing value is shown as zero.")
    if unreadable:
        page.note(f"{len(unreadable)} unreadable record file(s) skipped: " + "; ".join(unreadable[:5]))
    files: list[Path] = []
    registered = available_attentions()

    # Accuracy
    page.heading("Accuracy (test accuracy % at the best validation checkpoint)")
    numeric = pd.DataFrame()
    if not train.empty and "attention" in train:
        display, numeric = accuracy_table(train, registered)
        page.note("mean ± sample std over seeds (no ± with one seed); [+k status] = runs that failed beside them.")
        page.table(display)
        ran = set(train["attention"].dropna())
        no_dropout = [m for m in registered if m in ran and not get_attention_info(m).applies_dropout]
        if no_dropout:
            page.note("attention dropout has no effect in " + ", ".join(no_dropout) + " (no probability matrix to "
                      "drop), so with attention_dropout > 0 they train with less regularisation than the others.")
        if "validation_is_test" in train:
            alias = train["validation_is_test"].fillna(False).astype(bool)
            for task, runs in train[alias].groupby(task_labels(train)[alias]):
                page.note(f"{task}: {len(runs)} run(s) validated on the test split (LRA's protocol, "
                          "validation=test), so their test accuracy is the best of many test evaluations "
                          "(optimistic); see docs/DATA.md.")
    else:
        page.note(f"{MISSING} no training records (kind=train) in the store.")

    # Efficiency
    cells = pd.DataFrame()
    if not bench.empty and {"mechanism", "pass", "n"} <= set(bench.columns):
        group, label = select_bench_group(bench)
        cells = bench_cells(group)
        methods = ", ".join(sorted(cells["memory_method"].dropna().unique())) or MISSING
        device_name = group["device_info.device_name"].dropna().iloc[0] if "device_info.device_name" in group else "?"
        threads = group["device_info.num_threads"].dropna().iloc[0] if "device_info.num_threads" in group else "?"
        page.heading("Efficiency")
        page.note(f"Setting: {label}; device: {device_name}, {threads} threads; the mechanism alone on projected "
                  f"q, k, v. Memory method: {methods}. Times: median [p10–p90] in ms.")
        for pass_ in ("fwd", "fwd+bwd"):
            if pass_ in set(cells["pass"]):
                page.note(f"Time, {pass_} (ms)")
                page.table(pivot_cells(cells, pass_, _fmt_time))
                page.note(f"Peak memory, {pass_}")
                page.table(pivot_cells(cells, pass_, _fmt_mem))
                page.note(f"Relative to full, {pass_}: speed-up x / memory ratio (LRA Table 2 layout)")
                page.table(relative_table(cells, pass_))
        budget = float(memory_budget_gb) * 1e9 if memory_budget_gb else None
        page.note(f"Log-log slopes over n in [{slope_range[0]}, {slope_range[1]}] (1 = linear, 2 = quadratic), "
                  f"crossover length vs full, longest n within {memory_budget_gb} GB.")
        page.table(derived_display(cells, slope_range, budget), index=False)
        from harness.bench import full_overhead

        overhead = full_overhead(cells)
        if not overhead.empty:
            overhead["overhead"] = overhead["overhead"].map(lambda x: f"{x:+.1%}")
            page.note("full through the registry vs torch SDPA called directly (target <= +5%):")
            page.table(overhead, index=False)
        for metric, name in (("median_s", "time_vs_n.png"), ("peak_bytes", "memory_vs_n.png")):
            files.append(plot_scaling(cells, metric, out / name))
            page.image(files[-1], name)
    else:
        page.heading("Efficiency")
        page.note(f"{MISSING} no benchmark records (kind=bench): run arena-bench.")

    # Accuracy vs speed
    page.heading("Accuracy vs speed vs memory")
    points, xlabel = _accuracy_speed_points(train, numeric, cells)
    if not points.empty:
        files.append(plot_accuracy_speed(points, out / "accuracy_vs_speed.png", xlabel))
        page.note(f"x: {xlabel}; y: average accuracy over the tasks each mechanism completed "
                  f"({', '.join(c for c in numeric.columns if c != 'Average')}).")
        page.image(files[-1], "accuracy_vs_speed.png")
    else:
        page.note(f"{MISSING} needs training records with accuracy and a speed figure for the same mechanisms.")

    # Peers
    page.heading("Peers (ours / public implementation)")
    if not peer.empty:
        page.note("Ratios < 1: ours is faster / smaller. level core = same projected q, k, v; level layer = ours "
                  "wrapped in the peer's Q/K/V/output projections.")
        page.table(_peer_table(peer), index=False)
    else:
        page.note(f"{MISSING} no peer records (the optional 'peers' extra was not installed or not run).")

    # Approximation error
    page.heading("Approximation error against exact attention")
    if not approx.empty and "error_mean" in approx:
        files.append(plot_approx(approx, out / "approx_error.png"))
        inputs = approx.drop_duplicates("variant").set_index("variant").get("inputs", pd.Series(dtype=str))
        page.note("Relative Frobenius error ||A - softmax||_F / ||softmax||_F, mean ± std over seeds, on "
                  + "; ".join(f"{v}: {d}" for v, d in inputs.items())
                  + ". Linformer's E/F, the memory-compressed convolution and AFT's biases are untrained.")
        page.table(_approx_table(approx))
        page.image(files[-1], "approx_error.png")
    else:
        page.note(f"{MISSING} no approximation records (kind=approx).")

    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(page.markdown(), encoding="utf-8")
    html_path.write_text(page.html(), encoding="utf-8")
    build_s = time.perf_counter() - started
    return {"out": out, "files": [md_path, html_path, *files], "build_s": build_s}


def _accuracy_speed_points(train: pd.DataFrame, numeric: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if numeric.empty:
        return pd.DataFrame(), ""
    tasks = [c for c in numeric.columns if c != "Average"]
    accuracy = numeric[tasks].drop(index="Majority class", errors="ignore").mean(axis=1, skipna=True).dropna()
    eff = training_efficiency(train)
    xlabel = "training throughput relative to full (mean over tasks)"
    if eff.empty and not cells.empty:
        # No training throughput: the benchmark's fwd+bwd speed at the largest n every mechanism ran.
        from harness.bench import relative_to_full

        rel = relative_to_full(cells[cells["pass"] == "fwd+bwd"]).dropna()
        if not rel.empty:
            n = rel.groupby("n")["mechanism"].nunique().idxmax()
            at = rel[rel["n"] == n].set_index("mechanism")
            eff = pd.DataFrame({"speed_vs_full": at["speedup"], "memory_vs_full": at["memory_ratio"]})
            xlabel = f"benchmark fwd+bwd speed-up vs full at n={n}"
    points = eff.join(accuracy.rename("accuracy"), how="inner").dropna(subset=["speed_vs_full", "accuracy"])
    return points, xlabel


def _peer_table(peer: pd.DataFrame) -> pd.DataFrame:
    def fmt(r):
        if r["status"] != "ok":
            return f"{MISSING} ({r['status']})"
        return f"{r['time_ratio']:.2f} / {r['memory_ratio']:.2f}"

    peer = peer.assign(value=peer.apply(fmt, axis=1), col=peer["pass"] + " n=" + peer["n"].astype(int).astype(str))
    table = peer.pivot_table(index=["peer", "level"], columns="col", values="value", aggfunc="last")
    table = table.fillna(f"{MISSING} (not run)").reset_index()
    table.columns.name = None
    return table.rename(columns=lambda c: c if c in ("peer", "level") else f"{c}: time / memory")


def _approx_table(approx: pd.DataFrame) -> pd.DataFrame:
    def fmt(r):
        if r["status"] != "ok":
            return f"{MISSING} ({r['status']})"
        return f"{r['error_mean']:.3f} ± {r['error_std']:.3f}"

    approx = approx.assign(cell=approx.apply(fmt, axis=1), _v=pd.to_numeric(approx["value"], errors="coerce"),
                           budget=approx["param"].astype(str) + "=" + approx["value"].astype(str))
    table = approx.pivot_table(index=["mechanism", "_v", "budget"], columns="variant", values="cell",
                               aggfunc="last")
    table = table.reset_index().sort_values(["mechanism", "_v"]).drop(columns="_v")
    table = table.set_index(["mechanism", "budget"])
    table.columns.name = None
    return table.fillna(f"{MISSING} (not run)")


# ----------------------------------------------------------------------------------------------
# Hydra entry point
# ----------------------------------------------------------------------------------------------


def main() -> None:
    """``arena-report``: Hydra app over conf/report.yaml."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="report", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        result = build_report(cfg.results_dir, cfg.out, memory_budget_gb=cfg.memory_budget_gb,
                              slope_range=tuple(cfg.slope_range), title=cfg.title)
        print(f"report written in {result['build_s']:.1f} s: {Path(result['out']).resolve() / 'report.html'}")

    _app()


if __name__ == "__main__":
    main()
