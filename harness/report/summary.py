"""The page's summary: what was run (commands, machine, load) and the findings, computed from the records.

Every finding is a sentence built from the same frames as the tables (never written by hand), so it
changes when the numbers change: per recipe whether anything learned and which mechanism led; at the
largest length every mechanism ran, the fastest and the smallest against ``full``; how many cells the
benchmark found disturbed.

Owns: the summary's sentences. Imports: :mod:`harness.analysis`, :mod:`harness.display`, the other
:mod:`harness.report` modules.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from harness.analysis import clean_cells, crossover_length
from harness.display import format_bytes
from harness.report.groups import Comparison, Setting, is_smoke
from harness.report.page import Page
from harness.report.tables import bench_cells, comparison_table, learned

MAX_COMMANDS = 6


def summary_section(page: Page, store, comps: list[Comparison], groups: list[Setting],
                    analysis_of: Callable) -> None:
    """What was run, then the findings, at the top of the page."""
    page.heading("What was run", place="summary")
    page.bullets(what_was_run(store, comps, groups))
    findings = []
    for comp in comps:
        findings.append(accuracy_finding(comp))
    for setting in groups[:2]:
        if is_smoke(setting):
            findings.append(SMOKE_FINDING.format(label=setting.label))
            continue
        cells = bench_cells(setting.records)
        findings += [f for f in (speed_finding(cells, setting), memory_finding(cells), noise_finding(cells)) if f]
    page.heading("Findings", place="summary")
    page.bullets(findings or ["no records to draw a finding from"])


# Smoke cells are timed once, at a few dozen tokens: neither noise nor speed can be judged from them (a busy
# moment made a plug-in "35.6x faster than full" in a new user's smoke run), so no finding is drawn.
SMOKE_FINDING = ("{label}: smoke settings (one repeat, tiny n): a check that every stage runs, not a measurement; "
                 "no speed, memory or noise finding is drawn from these cells")


def what_was_run(store, comps: list[Comparison], groups: list[Setting]) -> list[str]:
    """Commands, training recipes, benchmark settings, the machine and its load."""
    lines = []
    commands = [c for frame in (store.bench, store.train) if "command" in frame
                for c in frame.sort_values("created_at")["command"].dropna()]
    if commands:
        unique = list(dict.fromkeys(commands))
        lines.append("commands: " + "; ".join(f"`{c}`" for c in unique[:MAX_COMMANDS])
                     + (f" (+{len(unique) - MAX_COMMANDS} more)" if len(unique) > MAX_COMMANDS else ""))
    if comps:
        runs = sum(len(c.runs) for c in comps)
        lines.append(f"training: {runs} run(s) in {len(comps)} recipe(s): " + "; ".join(
            f"{c.title} ({c.runs['attention'].nunique()} mechanism(s), seeds "
            f"{sorted(int(s) for s in c.runs['seed'].dropna().unique())})" for c in comps))
    for s in groups:
        lines.append(f"benchmark: {len(s.records)} cells, {s.label}")
    lines += machine_lines(store)
    return lines


def machine_lines(store) -> list[str]:
    """The machine (from the records' device facts) and its load while the benchmark measured."""
    lines = []
    for frame, what in ((store.bench, "benchmark"), (store.train, "training")):
        if frame.empty:
            continue
        name = frame.get("device_info.device_name", frame.get("device.device_name"))
        threads = frame.get("device_info.num_threads", frame.get("device.num_threads"))
        cpus = frame.get("device_info.cpu_count", frame.get("device.cpu_count"))
        torch_v = frame.get("device_info.torch_version", frame.get("device.torch_version"))
        facts = [f"{_first(name)}", f"{_first(threads)} torch thread(s)", f"{_first(cpus)} CPUs",
                 f"torch {_first(torch_v)}"]
        facts = [f for f in facts if "None" not in f]
        if facts:
            lines.append(f"machine ({what}): " + ", ".join(facts))
    if "noise.load_before" in store.bench:
        loads = pd.concat([store.bench["noise.load_before"], store.bench["noise.load_after"]]).dropna()
        cpus = store.bench.get("noise.cpus", pd.Series(dtype=float)).dropna()
        if len(loads) and len(cpus):
            busy = loads.max() > float(cpus.max())
            lines.append(f"load during the benchmark: 1-minute load average {loads.min():.1f}–{loads.max():.1f} on "
                         f"{int(cpus.max())} CPUs" + (" (other work was running: times are the least disturbed "
                                                      "of re-measured attempts)" if busy else " (quiet)"))
    return lines


def _first(series) -> str:
    if series is None:
        return "None"
    values = series.dropna()
    return str(values.iloc[0]) if len(values) else "None"


def accuracy_finding(comp: Comparison) -> str:
    """Whether anything beat the majority class in this recipe, and which mechanism led."""
    _, numeric = comparison_table(comp)
    numeric = numeric[np.isfinite(numeric["accuracy"])]
    if numeric.empty:
        return f"{comp.title}: no run finished."
    majority = float(numeric["majority"].iloc[0])
    best = numeric["accuracy"].idxmax()
    if not learned(numeric).any():
        return (f"{comp.title}: no mechanism beat the majority class ({majority:.1f}%) by more than 1 point: "
                "not learned in this recipe, so its accuracies are no ranking.")
    spread = numeric["accuracy"].max() - numeric["accuracy"].min()
    return (f"{comp.title}: {int(learned(numeric).sum())} of {len(numeric)} mechanisms beat the majority class "
            f"({majority:.1f}%) by more than 1 point; best {best} {numeric.loc[best, 'accuracy']:.1f}%, "
            f"spread {spread:.1f} points "
            f"(seeds: {int(numeric['seeds'].min())}–{int(numeric['seeds'].max())}).")


def _largest_common_n(cells: pd.DataFrame, pass_: str) -> tuple[pd.DataFrame, int | None]:
    ok = clean_cells(cells[cells["pass"] == pass_])
    ok = ok[ok["mechanism"] != "sdpa_direct"]
    if ok.empty or "full" not in set(ok["mechanism"]):
        return ok, None
    counts = ok.groupby("n")["mechanism"].nunique()
    n = int(counts[counts == counts.max()].index.max())
    return ok[ok["n"] == n].set_index("mechanism"), n


def speed_finding(cells: pd.DataFrame, setting: Setting) -> str | None:
    """The fastest mechanism vs full at the largest n most mechanisms ran, and how many cross over."""
    at, n = _largest_common_n(cells, "fwd+bwd")
    if n is None or len(at) < 2:
        return None
    speedup = at.loc["full", "median_s"] / at["median_s"].drop("full")
    best = speedup.idxmax()
    ok = clean_cells(cells[cells["pass"] == "fwd+bwd"])
    full = ok[ok["mechanism"] == "full"].set_index("n")["median_s"]
    crossings = []
    for _, g in ok[~ok["mechanism"].isin(["full", "sdpa_direct"])].groupby("mechanism"):
        g = g.sort_values("n")
        x, _note = crossover_length(list(g["n"]), list(g["median_s"]), [full.get(v) for v in g["n"]])
        crossings.append(np.isfinite(x))
    where = f"fwd+bwd at n = {n} ({setting.label.split(', n =')[0]})"
    time_ratio = 1.0 / speedup[best]  # the fastest's time over full's
    if speedup[best] > 1:
        lead = f"{where}: fastest {best}, {speedup[best]:.1f}x full's speed ({time_ratio:.2f}x full's time)"
    else:
        lead = (f"{where}: no mechanism is faster than full; the closest, {best}, takes {time_ratio:.1f}x "
                "full's time")
    return (f"{lead}; {sum(crossings)} of {len(crossings)} mechanisms become faster than full within the measured "
            "lengths.")


def memory_finding(cells: pd.DataFrame) -> str | None:
    """The smallest peak memory at the largest n most mechanisms ran, against full's."""
    at, n = _largest_common_n(cells, "fwd+bwd")
    if n is None or len(at) < 2:
        return None
    peaks = at["peak_bytes"].astype(float)
    low = peaks.idxmin()
    rank = int((peaks < peaks["full"]).sum())
    return (f"peak memory, fwd+bwd at n = {n}: smallest {low} ({format_bytes(peaks[low])}, "
            f"{peaks[low] / peaks['full']:.2f}x full's {format_bytes(peaks['full'])}); {rank} mechanism(s) below full.")


def noise_finding(cells: pd.DataFrame) -> str:
    """How many cells stayed disturbed after re-measuring (they are flagged, not hidden)."""
    ok = cells[cells["outcome"] == "ok"]
    noisy = int(ok["noisy"].sum()) if "noisy" in ok else 0
    if noisy:
        names = sorted(set(ok[ok["noisy"]]["mechanism"]))
        return (f"{noisy} of {len(ok)} measured cells stayed noisy after re-measuring ({', '.join(names[:5])}): "
                "marked (noisy) in the tables and hollow in the plots, left out of slopes and crossovers; "
                "re-run with force=true on a quieter machine.")
    return f"all {len(ok)} measured cells were clean (p90/p10 spread within the limit, in line with their neighbours)."
