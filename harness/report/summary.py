"""The page's summary: what was run (commands, machine, load) and the findings, computed from the records.

Every finding is a sentence built from the same frames as the tables (never written by hand), so it
changes when the numbers change: per recipe whether anything learned and which mechanism led; at the
largest length every mechanism ran, the fastest and the smallest against ``full``; how many cells the
benchmark found disturbed.

Owns: the summary's sentences. Imports: :mod:`harness.analysis`, :mod:`harness.display`, the other
:mod:`harness.report` modules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from harness.analysis import SDPA_DIRECT, clean_cells, crossover_length
from harness.display import format_bytes, shown_path
from harness.report.decoding import decode_summary
from harness.report.groups import Comparison, Setting, is_smoke
from harness.report.page import Page
from harness.report.recall import is_tie
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
    """Commands, training recipes, benchmark settings, the machine and its load; first, the record files
    that could not be read (left out of every table and plot)."""
    lines = [skipped_line(store.unreadable, store.root)] if store.unreadable else []
    commands = [relative_command(c, store.root) for frame in (store.bench, store.train) if "command" in frame
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
    decoding = decode_summary(getattr(store, "decode", None))
    if decoding:
        lines.append(decoding)
    lines += machine_lines(store)
    return lines


def skipped_line(unreadable: dict[str, str], root: Path) -> str:
    """The summary's line naming every record file that could not be read (paths inside the results folder)."""
    names = [f"{_inside(path, root)} ({why})" for path, why in unreadable.items()]
    return (f"SKIPPED {len(names)} unreadable record file(s) in {shown_path(root)}, left out of every table and "
            "plot (a mechanism may show fewer seeds than were run): " + "; ".join(names))


def _inside(path: str, root: Path) -> str:
    relative = os.path.relpath(Path(path).resolve(), Path(root).resolve())
    return shown_path(path) if relative.startswith("..") else relative


# An absolute path in a recorded command: after a space, '=', a quote, '[' or ',' (or at the start).
_ABSOLUTE = re.compile(r"(?:(?<=[\s='\"\[,])|^)/[^\s'\",\]]*")
_RESULTS_DIR = re.compile(r"(?:^|\s)\+*results_dir=(/[^\s'\",\]]+)")


def relative_command(command: str, results_dir: Path) -> str:
    """``command`` without machine paths: the recorded ``results_dir=/abs/results`` (and every path under it)
    as the results folder is shown now (``results``), another absolute path under the working folder relative
    to it; other absolute paths (a data folder elsewhere) are kept, they say where the data came from."""
    recorded = _RESULTS_DIR.search(command)
    root = recorded.group(1).rstrip("/") if recorded else None
    shown_root = shown_path(results_dir)

    def relative(match: re.Match) -> str:
        path = match.group(0)
        if root and (path == root or path.startswith(root + "/")):
            return shown_root + path[len(root):]
        shown = shown_path(path)
        return shown if not shown.startswith("..") else path

    return _ABSOLUTE.sub(relative, command)


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


def _seeds(row: pd.Series) -> list[float]:
    """A comparison row's accuracies, one per seed (its mean when the seeds are not known)."""
    by_seed = row.get("by_seed")
    return list(by_seed.values()) if isinstance(by_seed, dict) and by_seed else [float(row["accuracy"])]


def accuracy_finding(comp: Comparison) -> str:
    """Whether anything beat the majority class in this recipe, which mechanism led, and which are tied with
    it (the seeds cannot tell them apart: :func:`harness.report.recall.is_tie`, as the "Seeds, ties and recall"
    table marks them)."""
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
    top = numeric.loc[best]
    tied = [name for name, r in numeric.sort_values("accuracy", ascending=False).iterrows() if name != best
            and (r["accuracy"] == top["accuracy"] or is_tie(_seeds(top), _seeds(r)))]
    ties = ("; tied with it (the seeds cannot tell them apart): " + ", ".join(
        f"{name} {numeric.loc[name, 'accuracy']:.1f}%" for name in tied)) if tied else ""
    return (f"{comp.title}: {int(learned(numeric).sum())} of {len(numeric)} mechanisms beat the majority class "
            f"({majority:.1f}%) by more than 1 point; best {best} {top['accuracy']:.1f}%{ties}; "
            f"spread {spread:.1f} points "
            f"(seeds: {int(numeric['seeds'].min())}–{int(numeric['seeds'].max())}).")


# A headline cell is tied with the leader when their p10-p90 time ranges overlap, or when its value is within
# this fraction of the leader's: repeats of one cell understate how much a time moves from run to run (a quiet
# re-run moves CPU times by a few percent), and memory has no spread at all.
TIE_TOLERANCE = 0.05


def _at_largest_common_n(cells: pd.DataFrame, pass_: str) -> tuple[pd.DataFrame, int | None]:
    """The ok cells of ``pass_`` at the largest n where the most mechanisms ran and ``full``'s cell is clean
    (noisy cells included: they decide the length, they are not ranked), indexed by mechanism."""
    ok = cells[(cells["pass"] == pass_) & (cells["outcome"] == "ok") & (cells["mechanism"] != SDPA_DIRECT)]
    full = clean_cells(ok[ok["mechanism"] == "full"])
    ok = ok[ok["n"].isin(set(full["n"]))]  # every ratio is to a clean full
    if ok.empty:
        return ok, None
    counts = ok.groupby("n")["mechanism"].nunique()
    n = int(counts[counts == counts.max()].index.max())
    at = ok[ok["n"] == n].set_index("mechanism")
    return at.assign(noisy=at["noisy"].fillna(False).astype(bool) if "noisy" in at else False), n


def tied_with_leader(at: pd.DataFrame, leader: str, value: str, spread: bool) -> list[str]:
    """The mechanisms of ``at`` (clean cells at one n) tied with ``leader`` on ``value``: within
    :data:`TIE_TOLERANCE` of the leader's value or, with ``spread``, p10-p90 ranges that overlap the leader's."""
    lead = at.loc[leader]
    tied = []
    for name, r in at.drop(leader).sort_values(value).iterrows():
        close = abs(float(r[value]) - float(lead[value])) <= TIE_TOLERANCE * float(lead[value])
        overlap = spread and float(r["p10_s"]) <= float(lead["p90_s"]) and float(lead["p10_s"]) <= float(r["p90_s"])
        if close or overlap:
            tied.append(str(name))
    return tied


def _unranked(at: pd.DataFrame) -> str:
    noisy = sorted(at.index[at["noisy"]])
    return f" (not ranked, cell noisy: {', '.join(noisy)})" if noisy else ""


def speed_finding(cells: pd.DataFrame, setting: Setting) -> str | None:
    """The fastest mechanism vs full at the largest n most mechanisms ran, the mechanisms tied with it
    (:func:`tied_with_leader`), and how many cross over. Noisy cells never lead: they are named, not ranked."""
    at, n = _at_largest_common_n(cells, "fwd+bwd")
    ranked = at[~at["noisy"]] if n is not None else at
    if n is None or len(ranked.drop("full", errors="ignore")) < 1:
        return None
    full_s = float(at.loc["full", "median_s"])
    others = ranked.drop("full", errors="ignore")
    best = others["median_s"].astype(float).idxmin()
    speedup = full_s / float(others.loc[best, "median_s"])
    where = f"fwd+bwd at n = {n} ({setting.label.split(', n =')[0]})"
    best_ms = f"{float(others.loc[best, 'median_s']) * 1e3:.1f} ms"
    if speedup > 1:
        lead = f"{where}: fastest {best} ({best_ms}), {speedup:.1f}x full's speed ({1 / speedup:.2f}x full's time)"
    else:
        lead = (f"{where}: no mechanism is faster than full; the closest, {best} ({best_ms}), takes "
                f"{1 / speedup:.1f}x full's time")
    tied = tied_with_leader(ranked, best, "median_s", spread=True)  # full too: "as fast as full" is a tie
    if tied:
        times = [f"{m} ({float(ranked.loc[m, 'median_s']) * 1e3:.1f} ms)" for m in tied]
        lead += f", tied with {', '.join(times)} (p10–p90 ranges overlap or medians within {TIE_TOLERANCE:.0%})"
    return f"{lead}{_unranked(at)}; {_crossings(cells)} within the measured lengths."


def _crossings(cells: pd.DataFrame) -> str:
    """``k of m mechanisms become faster than full`` over every clean fwd+bwd cell."""
    ok = clean_cells(cells[cells["pass"] == "fwd+bwd"])
    full = ok[ok["mechanism"] == "full"].set_index("n")["median_s"]
    crossings = []
    for _, g in ok[~ok["mechanism"].isin(["full", SDPA_DIRECT])].groupby("mechanism"):
        g = g.sort_values("n")
        x, _note = crossover_length(list(g["n"]), list(g["median_s"]), [full.get(v) for v in g["n"]])
        crossings.append(np.isfinite(x))
    return f"{sum(crossings)} of {len(crossings)} mechanisms become faster than full"


def memory_finding(cells: pd.DataFrame) -> str | None:
    """The smallest peak memory at the largest n most mechanisms ran, against full's, and the mechanisms
    within :data:`TIE_TOLERANCE` of it. Noisy cells are named, not ranked (as in :func:`speed_finding`)."""
    at, n = _at_largest_common_n(cells, "fwd+bwd")
    if n is None or len(at) < 2:
        return None
    ranked = at[~at["noisy"]]  # full's cell is clean (_at_largest_common_n)
    peaks = ranked["peak_bytes"].astype(float)
    low = peaks.idxmin()
    rank = int((peaks < peaks["full"]).sum())
    tied = tied_with_leader(ranked.assign(peak_bytes=peaks), low, "peak_bytes", spread=False)
    sizes = [f"{m} ({format_bytes(peaks[m])})" for m in tied]
    ties = f", tied with {', '.join(sizes)} (within {TIE_TOLERANCE:.0%})" if tied else ""
    return (f"peak memory, fwd+bwd at n = {n}: smallest {low} ({format_bytes(peaks[low])}, "
            f"{peaks[low] / peaks['full']:.2f}x full's {format_bytes(peaks['full'])}){ties}{_unranked(at)}; "
            f"{rank} mechanism(s) below full.")


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
