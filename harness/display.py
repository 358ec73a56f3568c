"""Text of numbers and of missing numbers: one place that decides how a cell is written.

A cell without a number is never written as zero: in the report it is ``— (why)``
(:func:`missing_cell`), in the benchmark's console table the bare outcome (:func:`format_cell`).
Both take their wording from :data:`OUTCOME_LABELS`.

Owns: the formatting of cells, sizes, derived figures and Markdown tables.
Imports: :mod:`harness.analysis` (to format the derived figures), numpy, pandas.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis import derived_table

MISSING = "—"
# How an outcome without a number is named: console (short) and report (with the record's reason).
OUTCOME_LABELS = {"skipped_budget": ("skip(budget)", "over budget")}


def format_cell(row: pd.Series) -> str:
    """``"12.3ms/45.6MiB"`` for an ok cell, else the outcome (never a zero): the console table."""
    if row["outcome"] != "ok":
        return OUTCOME_LABELS.get(row["outcome"], (row["outcome"],))[0]
    return f"{row['median_s'] * 1e3:.1f}ms/{row['peak_bytes'] / 2**20:.1f}MiB"


def missing_cell(row: pd.Series) -> str:
    """``— (oom)``, ``— (unsupported)``, ...; a budget skip says which budget: ``— (over budget: <reason>)``."""
    outcome = str(row["outcome"])
    if outcome == "skipped_budget":
        reason = row.get("reason")
        reason = str(reason) if isinstance(reason, str) and reason else "memory or time"
        return f"{MISSING} ({OUTCOME_LABELS[outcome][1]}: {reason})"
    return f"{MISSING} ({outcome})"


def not_run(why: str = "not run") -> str:
    """The text of a cell with no record at all (or a figure that cannot be computed): ``— (why)``."""
    return f"{MISSING} ({why})"


def format_bytes(value: float) -> str:
    """Bytes in binary units: ``1.23 GiB``, ``4.5 MiB``, ``6.7 KiB``."""
    value = float(value)
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**10:.1f} KiB"


def format_time_spread(row: pd.Series) -> str:
    """Median time in ms with the p10–p90 spread: ``12.3 [11.9–13.0]``."""
    return f"{row['median_s'] * 1e3:.1f} [{row['p10_s'] * 1e3:.1f}–{row['p90_s'] * 1e3:.1f}]"


def derived_display(cells: pd.DataFrame, slope_range: Sequence[float], budget_bytes: float | None) -> pd.DataFrame:
    """Slopes, crossover and longest n within the budget, formatted; NaN shown as ``—`` with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        derived = derived_table(cells, slope_range, budget_bytes)
    if derived.empty:
        return derived

    def num(x, f="{:.2f}", why="too few points"):
        return f.format(x) if x is not None and np.isfinite(x) else not_run(why)

    out = pd.DataFrame({
        "mechanism": derived["mechanism"], "pass": derived["pass"],
        "time slope": derived["time_slope"].map(num), "memory slope": derived["memory_slope"].map(num),
    })

    def crossover(r):
        if r["crossover_note"] == "interpolated":
            return f"{r['crossover_n']:.0f}"
        if r["crossover_note"] == "faster at all n":
            return f"<= {r['crossover_n']:.0f} (faster at all n)"
        return not_run(r["crossover_note"])

    out["crossover vs full (n)"] = derived.apply(crossover, axis=1)
    if budget_bytes and "max_n_measured" in derived:
        out["longest n measured within budget"] = derived["max_n_measured"].map(
            lambda x: num(x, "{:.0f}", "none fits"))
        out["longest n extrapolated"] = derived["max_n_extrapolated"].map(lambda x: num(x, "{:.0f}", "no fit"))
    return out


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


# Set by arena-suite for the training processes it starts in the repository: their log lines then show
# paths relative to where the user ran the suite, not to the subprocess's working directory.
WORKDIR_ENV = "ARENA_WORKDIR"


def shown_path(path: str | Path) -> str:
    """``path`` as a report or log line shows it: relative to the working directory (machine paths stay out)."""
    try:
        return os.path.relpath(Path(path).resolve(), os.environ.get(WORKDIR_ENV) or Path.cwd())
    except ValueError:  # another drive (Windows): nothing relative exists
        return str(path)
