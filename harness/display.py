"""Text of numbers and of missing numbers: one place that decides how a cell is written.

A cell without a number is never written as zero: in the report it is ``— (why)``
(:func:`missing_cell`), in the benchmark's console table the bare outcome (:func:`format_cell`).
Both take their wording from :data:`OUTCOME_LABELS`.

Owns: the formatting of cells, sizes, durations, derived figures and Markdown tables; the one line a
training run ends with (:func:`run_done_line`, written by ``arena-train`` and read back by ``arena-suite``
with :func:`parse_run_done`); how an app ends on Ctrl-C (:func:`one_line_interrupt`).
Imports: :mod:`harness.analysis` (to format the derived figures), numpy, pandas.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from harness.analysis import EXTRAPOLATION_LIMIT, derived_table, slope_range_for

MISSING = "—"
# How an outcome without a number is named: console (short) and report (with the record's reason).
OUTCOME_LABELS = {"skipped_budget": ("skip(budget)", "over budget")}


def format_cell(row: pd.Series) -> str:
    """``"12.3ms/45.6MiB"`` for an ok cell, else the outcome (never a zero): the console table."""
    if row["outcome"] != "ok":
        return OUTCOME_LABELS.get(row["outcome"], (row["outcome"],))[0]
    flag = " noisy" if is_noisy(row) else ""
    return f"{row['median_s'] * 1e3:.1f}ms/{row['peak_bytes'] / 2**20:.1f}MiB{flag}"


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


def format_duration(seconds: float) -> str:
    """A wall time as a reader wants it: ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_time_spread(row: pd.Series) -> str:
    """Median time in ms with the p10–p90 spread: ``12.3 [11.9–13.0]``; a cell still disturbed after
    re-measuring is marked ``(noisy)``: shown, never silently, and left out of slopes and crossovers."""
    text = f"{row['median_s'] * 1e3:.1f} [{row['p10_s'] * 1e3:.1f}–{row['p90_s'] * 1e3:.1f}]"
    return text + (" (noisy)" if is_noisy(row) else "")


def is_noisy(row: pd.Series) -> bool:
    """The cell was flagged noisy by the benchmark (a missing flag, from older records, reads as clean)."""
    value = row.get("noisy")
    return isinstance(value, (bool, np.bool_)) and bool(value)


def derived_display(cells: pd.DataFrame, slope_range: Sequence[float] | None,
                    budget_bytes: float | None) -> pd.DataFrame:
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
        out["longest n extrapolated"] = derived.apply(_extrapolated, axis=1)
    return out


def _extrapolated(r: pd.Series) -> str:
    """The power-law estimate, or "> X, not measured" past the evidence (4x the largest measured n)."""
    if np.isfinite(r.get("max_n_beyond", np.nan)):
        return f"> {r['max_n_beyond']:.0f}, not measured"
    x = r["max_n_extrapolated"]
    return f"{x:.0f}" if x is not None and np.isfinite(x) else not_run("no fit")


def analysis_note(cells: pd.DataFrame, slope_range: Sequence[float] | None, budget_gb: float | None) -> str:
    """The one sentence saying which slope range and memory budget the derived figures used."""
    used = slope_range_for(cells["n"], slope_range) if len(cells) else None
    fit = f"n in [{used[0]:.0f}, {used[1]:.0f}]" if used else "— (fewer than two lengths)"
    budget = f"{budget_gb:g} GB" if budget_gb else "— (no budget)"
    return (f"log-log slopes over {fit} (1 = linear, 2 = quadratic), crossover length vs full and longest n "
            f"within {budget}, from clean cells only; extrapolation stops at {EXTRAPOLATION_LIMIT}x the largest "
            "measured n")


# A cell reads as a number when it starts like one: 12.3, -0.4, +1.2, 3.4x, <= 256, > 65536, 12 MiB.
_NUMERIC = re.compile(r"^\s*([<>]=?\s*)?[-+±]?\d")


def table_rows(df: pd.DataFrame, index: bool = True) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows of cell text, alignment per column ``l``/``r``) of ``df``; the index (named or not)
    becomes the first column, so there is exactly one header row."""
    frame = df.reset_index() if index else df.copy()
    header = [str(c) for c in frame.columns]
    rows = [[MISSING if v is None or (isinstance(v, float) and v != v) else str(v) for v in row]
            for row in frame.itertuples(index=False)]
    align = []
    for j in range(len(header)):
        values = [r[j] for r in rows if r[j] and not r[j].startswith(MISSING)]
        align.append("r" if j > 0 and values and all(_NUMERIC.match(v) for v in values) else "l")
    return header, rows, align


def markdown_table(df: pd.DataFrame | None, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table with one header row and per-column alignment."""
    if df is None or df.empty:
        return "_no data_"
    header, rows, align = table_rows(df, index)

    def cell(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
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


# The line each arena-train run ends with, in every mode (single run, sweep, suite worker):
#   <attention>/<task>/seed<N> [<recipe>]: <outcome> after <wall> s[, test@best <acc>]; <details>
# arena-suite reads it back (parse_run_done) to show its own line per finished run; free text only after "; ".
RUN_DONE = re.compile(r"(?P<label>(?P<attention>[\w.-]+)/(?P<task>[\w.-]+)/seed(?P<seed>-?\d+)) "
                      r"\[(?P<recipe>[^\]\s]*)\]: (?P<outcome>[^;]+?) after (?P<wall>\d+(?:\.\d+)?) s"
                      r"(?:, test@best (?P<test_acc>\d+(?:\.\d+)?|nan))?(?:; (?P<details>.*))?$")


def run_done_line(label: str, recipe: str | None, outcome: str, wall_s: float, test_acc: float | None = None,
                  details: str = "") -> str:
    """The line a finished run is logged with (:data:`RUN_DONE`). ``label`` is ``<attention>/<task>/seed<N>``,
    ``recipe`` the experiment file (None: ``-``), ``outcome`` e.g. ``ok``, ``skipped``, ``error (during
    training)``, ``not started``; ``wall_s`` in seconds; ``test_acc`` a fraction (0..1)."""
    test = "" if test_acc is None else f", test@best {float(test_acc):.4f}"
    line = f"{label} [{recipe or '-'}]: {outcome} after {float(wall_s):.0f} s{test}"
    return f"{line}; {details}" if details else line


def parse_run_done(line: str) -> dict | None:
    """The fields of a :func:`run_done_line` found in ``line`` (a log line around it is fine), else None:
    attention, task, seed (int), recipe, outcome, wall_s (float), test_acc (float or None), details (the free
    text, or None), label."""
    match = RUN_DONE.search(line)
    if match is None:
        return None
    fields = match.groupdict()
    return {**fields, "seed": int(fields["seed"]), "wall_s": float(fields["wall"]),
            "test_acc": None if fields["test_acc"] is None else float(fields["test_acc"])}


@contextlib.contextmanager
def one_line_interrupt(app: str, kept: str) -> Iterator[None]:
    """Ctrl-C inside the block: one line on stderr (``<app>: interrupted (Ctrl-C); <kept>``), exit 130, no
    traceback. Records are written one file at a time, atomically, so what was recorded is kept as is.

    After that line a second Ctrl-C ends the process at once, silently (SIGINT back to the system's default):
    without this, one pressed while the interpreter shuts down (an atexit handler still joining a pool's
    processes, flushing logs) printed "Exception ignored in atexit callback ... KeyboardInterrupt"."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{app}: interrupted (Ctrl-C); {kept}", file=sys.stderr, flush=True)
        with contextlib.suppress(ValueError):  # not the main thread: nothing to change there
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise SystemExit(130) from None
