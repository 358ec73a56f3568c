"""The report's tables: store rows (DataFrames from :func:`harness.store.load_records`) -> display frames.

Owns: which records form a table and how its cells read. Imports: ``attentions`` (mechanism facts),
:mod:`harness.store` (``config_hash`` for recipe labels), :mod:`harness.analysis`, :mod:`harness.display`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis import relative_to_full
from harness.display import MISSING, missing_cell, not_run
from harness.store import config_hash

TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
# Columns of a training record that define a recipe (everything but the mechanism and the seed).
RECIPE_PREFIXES = ("config.task.", "config.model.", "config.train.", "config.optimizer.", "config.scheduler.")
GROUP_COLUMNS = ("batch", "heads", "head_dim", "dtype", "device", "cpu_allocator")


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
                display[name][task] = not_run(failed_text or "not run")
                numeric[name][task] = float("nan")
        values = [numeric[name][t] for t in tasks]
        if tasks and all(np.isfinite(values)):
            display[name]["Average"] = f"{np.mean(values):.2f}"
            numeric[name]["Average"] = float(np.mean(values))
        else:
            display[name]["Average"] = not_run("incomplete")
            numeric[name]["Average"] = float("nan")
    majority: dict[str, str] = {}
    for task in tasks:
        values = train[train["_task"] == task].get("majority_test_acc", pd.Series(dtype=float)).dropna()
        majority[task] = f"{float(values.astype(float).mean()) * 100:.2f}" if len(values) else not_run("unknown")
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


def pivot_cells(cells: pd.DataFrame, pass_: str, fmt) -> pd.DataFrame:
    """mechanisms x n of ``fmt(row)`` for ok cells, ``— (why)`` for the others, ``— (not run)`` for absent ones."""
    sub = cells[cells["pass"] == pass_]
    if sub.empty:
        return pd.DataFrame()
    values = sub.apply(lambda r: fmt(r) if r["outcome"] == "ok" else missing_cell(r), axis=1)
    table = sub.assign(value=values).pivot_table(index="mechanism", columns="n", values="value", aggfunc="first")
    return table.fillna(not_run())


def relative_table(cells: pd.DataFrame, pass_: str) -> pd.DataFrame:
    """LRA Table 2 layout: ``speed-up x / memory ratio`` relative to ``full`` per n."""
    rel = relative_to_full(cells[cells["pass"] == pass_])
    if rel.empty:
        return pd.DataFrame()
    merged = rel.merge(cells[cells["pass"] == pass_][["mechanism", "n", "outcome", "reason"]], on=["mechanism", "n"])

    def fmt(r):
        if r["outcome"] != "ok":
            return missing_cell(r)
        if not np.isfinite(r["speedup"]):
            return not_run("no full")
        return f"{r['speedup']:.2f}x / {r['memory_ratio']:.2f}"

    merged["value"] = merged.apply(fmt, axis=1)
    return merged.pivot_table(index="mechanism", columns="n", values="value", aggfunc="first").fillna(
        not_run())


def accuracy_speed_points(train: pd.DataFrame, numeric: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if numeric.empty:
        return pd.DataFrame(), ""
    tasks = [c for c in numeric.columns if c != "Average"]
    accuracy = numeric[tasks].drop(index="Majority class", errors="ignore").mean(axis=1, skipna=True).dropna()
    eff = training_efficiency(train)
    xlabel = "training throughput relative to full (mean over tasks)"
    if eff.empty and not cells.empty:
        # No training throughput: the benchmark's fwd+bwd speed at the largest n every mechanism ran.
        rel = relative_to_full(cells[cells["pass"] == "fwd+bwd"]).dropna()
        if not rel.empty:
            n = rel.groupby("n")["mechanism"].nunique().idxmax()
            at = rel[rel["n"] == n].set_index("mechanism")
            eff = pd.DataFrame({"speed_vs_full": at["speedup"], "memory_vs_full": at["memory_ratio"]})
            xlabel = f"benchmark fwd+bwd speed-up vs full at n={n}"
    points = eff.join(accuracy.rename("accuracy"), how="inner").dropna(subset=["speed_vs_full", "accuracy"])
    return points, xlabel


def peer_table(peer: pd.DataFrame) -> pd.DataFrame:
    def fmt(r):
        if r["status"] != "ok":
            return not_run(r["status"])
        return f"{r['time_ratio']:.2f} / {r['memory_ratio']:.2f}"

    pattern = peer["pattern"].fillna("bidirectional") if "pattern" in peer else "bidirectional"
    peer = peer.assign(value=peer.apply(fmt, axis=1), col=peer["pass"] + " n=" + peer["n"].astype(int).astype(str),
                       pattern=pattern)
    table = peer.pivot_table(index=["peer", "level", "pattern"], columns="col", values="value", aggfunc="last")
    table = table.fillna(not_run()).reset_index()
    table.columns.name = None
    return table.rename(columns=lambda c: c if c in ("peer", "level", "pattern") else f"{c}: time / memory")


def approx_table(approx: pd.DataFrame) -> pd.DataFrame:
    def fmt(r):
        if r["status"] != "ok":
            return not_run(r["status"])
        return f"{r['error_mean']:.3f} ± {r['error_std']:.3f}"

    approx = approx.assign(cell=approx.apply(fmt, axis=1), _v=pd.to_numeric(approx["value"], errors="coerce"),
                           budget=approx["param"].astype(str) + "=" + approx["value"].astype(str))
    table = approx.pivot_table(index=["mechanism", "_v", "budget"], columns="variant", values="cell",
                               aggfunc="last")
    table = table.reset_index().sort_values(["mechanism", "_v"]).drop(columns="_v")
    table = table.set_index(["mechanism", "budget"])
    table.columns.name = None
    return table.fillna(not_run())
