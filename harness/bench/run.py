"""The benchmark's scan: every (mechanism, pass, n) cell reused, planned away by the guard, or measured.

Owns: the order of the scan (length by length; the mechanisms of one length and pass measured together in
interleaved rounds), the judgement of disturbed cells and their re-measuring, the ``bench`` records, the
console summary and ``main``. The budget decisions are :mod:`harness.bench.guard`'s.
Imports: the other :mod:`harness.bench` modules, :mod:`harness.allocator`, :mod:`harness.measure`,
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display`, :mod:`harness.plugins`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd

from harness.allocator import configure_cpu_allocator
from harness.analysis import FULL_REFERENCE, NOISE_FLOOR_S, SDPA_DIRECT, full_overhead, trend_suspects
from harness.bench import peers
from harness.bench.approx import approximation_errors
from harness.bench.cells import (
    REUSABLE,
    cell_key,
    cell_record_id,
    check_params,
    family,
    flat_cell,
    measure_cells,
    mechanism_params,
    record_outcome,
    select_mechanisms,
)
from harness.bench.decode import run_decode
from harness.bench.guard import LONG_CELL_S, Plan, Prediction, Row, plan, seconds
from harness.bench.settings import BenchSettings, resolve_settings
from harness.display import analysis_note, derived_display, format_cell, one_line_interrupt
from harness.measure import command_line, device_info, jsonable_params, progress_bar
from harness.plugins import add_absent_keys, conf_dir, exit_on_settings_error, load_plugins, prepare
from harness.store import find_record, now_iso, write_record


def run_benchmark(cfg: dict | BenchSettings | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the efficiency scan (and the approximation errors and peers when enabled).

    Returns the efficiency cells as a DataFrame (one row per mechanism, n, pass). Existing
    records with the same settings are reused when ``reuse`` is set (except ``error`` cells,
    which are retried).
    """
    settings, mechanisms = prepare_benchmark(cfg)
    settings = replace(settings, cpu_allocator_used=configure_cpu_allocator(settings.cpu_allocator))
    if settings.mode == "decode":  # incremental decoding: its own scan and records (harness.bench.decode)
        return run_decode(settings, mechanisms, log)
    df = pd.DataFrame(_scan(settings, mechanisms, log))
    if settings.approx.enabled and settings.causal:
        log("approximation errors: measured for the bidirectional pattern only (run without causal=true)")
    elif settings.approx.enabled:
        approximation_errors(settings, mechanisms=[m for m in mechanisms if m not in (SDPA_DIRECT, FULL_REFERENCE)],
                             log=log)
    if settings.peers.enabled:
        peers.run_peers(settings, log=log)
    if settings.print_table:
        log(format_table(df))
        log(format_derived(df, settings))
    return df


def prepare_benchmark(cfg: dict | BenchSettings | None = None) -> tuple[BenchSettings, list[str]]:
    """(settings, mechanisms to measure): :func:`resolve_settings`, the plug-ins loaded, the mechanisms and
    their ``params`` checked (:func:`~harness.bench.cells.check_params`). Nothing is measured.

    Raises ValueError naming an unknown setting, mechanism or parameter and what is allowed."""
    settings = resolve_settings(cfg)
    load_plugins(settings.plugins)
    mechanisms = _mechanisms(settings)
    check_params(settings)
    return settings, mechanisms


def _mechanisms(settings: BenchSettings) -> list[str]:
    if settings.mode == "decode":  # decoding is the causal pattern; no pseudo-mechanisms
        return select_mechanisms(settings.mechanisms, causal=True)
    mechanisms = select_mechanisms(settings.mechanisms, settings.causal)
    if settings.include_sdpa_direct and "full" in mechanisms and SDPA_DIRECT not in mechanisms:
        mechanisms.insert(mechanisms.index("full") + 1, SDPA_DIRECT)
    if settings.include_full_reference and "full" in mechanisms and FULL_REFERENCE not in mechanisms:
        mechanisms.insert(mechanisms.index("full") + 1, FULL_REFERENCE)
    return mechanisms


def _scan(settings: BenchSettings, mechanisms: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every cell, length by length (shortest first) and pass by pass: at each (n, pass) the mechanisms are
    measured together in interleaved rounds (:func:`measure_group`), after the guard has planned each
    row's cell (:mod:`harness.bench.guard`). Returns the flat cells, row by row (mechanism, pass, n)."""
    info = device_info(settings.device)
    rows = {(m, p): Row() for m in mechanisms for p in settings.passes}
    records: dict[tuple[str, str], list[dict]] = {key: [] for key in rows}
    bar = progress_bar(len(rows) * len(settings.seq_lens), "bench", settings.progress)

    def say(line: str) -> None:
        with bar.external_write_mode():  # a line printed under a live bar would break it
            log(line)

    for n in settings.seq_lens:
        for pass_ in settings.passes:
            bar.set_postfix_str(f"n={n} {pass_}")
            for name, record in _length_records(mechanisms, n, pass_, settings, rows, info, say).items():
                rows[(name, pass_)].learn(n, record)
                records[(name, pass_)].append(record)
            bar.update(len(mechanisms))
    bar.close()
    measured = [r for key in rows for r in recheck_trend(records[key], settings)]
    return [flat_cell(r) for r in flag_pass_inversions(measured, settings)]


def _length_records(mechanisms: list[str], n: int, pass_: str, settings: BenchSettings,
                    rows: dict[tuple[str, str], Row], info: dict, say: Callable[[str], None]) -> dict[str, dict]:
    """The records of every mechanism at one (n, pass): reused from the store, planned away by the guard
    (a budget skip, a stopped row), or measured together in interleaved rounds, then written."""
    out: dict[str, dict] = {}
    todo: dict[str, Plan] = {}
    for name in mechanisms:
        old = _reusable(name, n, pass_, settings)
        if old is not None:
            out[name] = old
            continue
        decided = plan(name, n, pass_, settings, rows[(name, pass_)])
        if decided.outcome is None:
            todo[name] = decided
            if decided.unguarded:
                say(f"bench: {name} {pass_} n={n}: measured without a prediction ({decided.unguarded})")
            continue
        out[name] = _write_cell(name, n, pass_, settings, info, dict(decided.outcome), decided.prediction)
        if decided.outcome["outcome"] == "skipped_budget":
            say(f"bench: {name} {pass_} n={n} not measured: over budget: {decided.outcome['reason']}")
    _announce(todo, n, pass_, settings, say)
    for name, cell in (measure_group(list(todo), n, pass_, settings) if todo else {}).items():
        out[name] = _write_cell(name, n, pass_, settings, info, cell, todo[name].prediction)
    return {name: out[name] for name in mechanisms}


def _announce(todo: dict[str, Plan], n: int, pass_: str, settings: BenchSettings, say: Callable[[str], None]) -> None:
    """Before a long measurement (predicted at least :data:`~harness.bench.guard.LONG_CELL_S` in all): what
    is measured and the estimate, the longest cells named, so a long wait is never silent."""
    preds = {m: p.prediction for m, p in todo.items() if p.prediction is not None and p.prediction.cell_s is not None}
    total = sum(p.cell_s for p in preds.values())
    if total < LONG_CELL_S:
        return
    if len(todo) == 1:
        name, pred = next(iter(preds.items()))
        say(f"bench: n={n} {pass_}: measuring {name}, {pred.estimate_text()}")
        return
    longest = sorted(preds.items(), key=lambda item: -item[1].cell_s)[:3]
    unknown = f" ({len(todo) - len(preds)} without an estimate)" if len(preds) < len(todo) else ""
    say(f"bench: n={n} {pass_}: measuring {len(todo)} mechanisms{unknown} in {settings.repeats} interleaved rounds, "
        f"about {seconds(total)} in all; longest: " + ", ".join(f"{m} {p.estimate_text()}" for m, p in longest))


def flag_pass_inversions(records: list[dict], settings: BenchSettings) -> list[dict]:
    """Flag noisy both cells of a (mechanism, n) whose fwd+bwd median is below its fwd median: a
    forward+backward contains a forward, so one of the two was disturbed (and we cannot tell which).
    Steps under :data:`~harness.analysis.NOISE_FLOOR_S` are overhead-dominated and not judged, as in the
    other noise checks."""
    ok = {(r["mechanism"], r["n"], r["pass"]): r for r in records if record_outcome(r) == "ok"}
    for (name, n, pass_), fwd in ok.items():
        both = ok.get((name, n, "fwd+bwd"))
        if pass_ != "fwd" or both is None or both["time"]["median_s"] >= fwd["time"]["median_s"]:
            continue
        if fwd["time"]["median_s"] < NOISE_FLOOR_S:  # the slower of the two is under the floor
            continue
        for r in (fwd, both):
            r["noise"] = {**(r.get("noise") or {}), "noisy": True,
                          "why": "fwd+bwd measured faster than fwd at the same n: one of them was disturbed"}
            write_record(r, settings.results_dir)
    return records


def recheck_trend(records: list[dict], settings: BenchSettings) -> list[dict]:
    """Measure again the cells of one row whose time contradicts their neighbours (see
    :func:`harness.analysis.trend_suspects`), keeping the faster measurement; a cell the neighbours still
    contradict is flagged noisy. Re-written records replace the stored ones."""
    ok = [r for r in records if record_outcome(r) == "ok"]

    def suspects() -> list[int]:
        return trend_suspects([r["n"] for r in ok], [r["time"]["median_s"] for r in ok])

    for _ in range(settings.remeasure):
        todo = suspects()
        if not todo:
            return records
        for i in todo:
            again = measure_quietly(ok[i]["mechanism"], ok[i]["n"], ok[i]["pass"], settings)
            if again["outcome"] == "ok" and again["time"]["median_s"] < ok[i]["time"]["median_s"]:
                ok[i].update({k: v for k, v in again.items() if k != "outcome"}, created_at=now_iso(),
                             **_guard_fields(ok[i], again))
                write_record(ok[i], settings.results_dir)
    for i in suspects():
        ok[i]["noise"] = {**(ok[i].get("noise") or {}), "noisy": True,
                          "why": "time out of line with the neighbouring lengths after re-measuring"}
        write_record(ok[i], settings.results_dir)
    return records


def _guard_fields(old: dict, new: dict) -> dict[str, dict]:
    """``new``'s time and memory with the guard's prediction of ``old`` kept (what was predicted before the
    cell was first measured)."""
    def guard(values: dict) -> dict:
        return {k: v for k, v in values.items() if k.startswith("predicted") or k == "probes"}

    return {section: {**guard(old.get(section) or {}), **new[section]} for section in ("time", "memory")}


def measure_group(names: list[str], n: int, pass_: str, settings: BenchSettings) -> dict[str, dict[str, Any]]:
    """The cells of one (n, pass), measured together in interleaved rounds (:func:`measure_cells`); a cell
    whose rounds disagree (:func:`disturbance`) is measured again, with the other disturbed ones, at most
    ``remeasure`` extra times. Keeps each cell's quiet attempt, or its fastest when none was quiet (a
    disturbance only adds time). Each cell's ``noise`` says what was done: the machine's load before and
    after, its rounds' spread, how many mechanisms shared its rounds, its attempts, and ``noisy`` (with
    ``why``) when no attempt was quiet enough."""
    attempts: dict[str, list[dict]] = {m: [] for m in names}
    failed: dict[str, dict] = {}
    todo = list(names)
    for _ in range(settings.remeasure + 1):
        load_before = _load()
        cells = measure_cells(todo, n, pass_, settings)
        loads = {"load_before": load_before, "load_after": _load(), "cpus": os.cpu_count()}
        for name, cell in cells.items():
            if cell["outcome"] == "ok":
                attempts[name].append(_judged(cell, settings, loads, interleaved=len(todo)))
            elif not attempts[name]:
                failed[name] = cell  # failed at once: its outcome; a failed re-measurement keeps the earlier one
        todo = [m for m in todo if attempts[m] and attempts[m][-1]["noise"]["why"] is not None]
        if not todo:
            break
    return {m: failed[m] if m in failed else _kept(attempts[m], settings) for m in names}


def measure_quietly(name: str, n: int, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """:func:`measure_group` of one cell."""
    return measure_group([name], n, pass_, settings)[name]


def disturbance(times: dict[str, Any], max_spread: float) -> tuple[float, float, str | None]:
    """(p90/p10 spread, median / fastest round, why the rounds disagree or None) of a cell's ``time``.

    The rounds disagree when the spread exceeds ``max_spread`` or the median is more than ``max_spread``
    times the fastest round (half the rounds or more slowed together: the median itself is disturbed,
    which a spread of three rounds can hide). Steps under :data:`~harness.analysis.NOISE_FLOOR_S` are not
    judged: their fixed overheads dominate."""
    spread = times["p90_s"] / max(times["p10_s"], 1e-12)
    over_fastest = times["median_s"] / max(min(times["times_s"]), 1e-12)
    if times["median_s"] < NOISE_FLOOR_S:
        return spread, over_fastest, None
    if spread > max_spread:
        return spread, over_fastest, f"p90/p10 spread {spread:.2f} > {max_spread:g}"
    if over_fastest > max_spread:
        return spread, over_fastest, f"median {over_fastest:.2f} x the fastest round > {max_spread:g}"
    return spread, over_fastest, None


def _judged(cell: dict, settings: BenchSettings, loads: dict, interleaved: int) -> dict:
    spread, over_fastest, why = disturbance(cell["time"], settings.max_spread)
    cell["noise"] = {"spread": spread, "median_over_fastest": over_fastest, "rounds": len(cell["time"]["times_s"]),
                     "interleaved": interleaved, **loads, "why": why}
    return cell


def _kept(attempts: list[dict], settings: BenchSettings) -> dict:
    """The quiet attempt if there is one, else the fastest; ``noisy`` when none was quiet."""
    cell = min(attempts, key=lambda c: (c["noise"]["why"] is not None, c["time"]["median_s"]))
    noisy = all(c["noise"]["why"] is not None for c in attempts)
    why = f"{cell['noise']['why']} in every attempt" if noisy else None
    cell["noise"] = {**cell["noise"], "attempts": len(attempts), "noisy": noisy, "why": why}
    return cell


def _load() -> float | None:
    """The 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _reusable(name: str, n: int, pass_: str, settings: BenchSettings) -> dict | None:
    """The stored record of this cell when ``reuse`` is on and it may be reused (not noisy: the machine may
    be quiet now; not an error or a budget skip: those are tried or planned again)."""
    if not settings.reuse:
        return None
    params = mechanism_params(name, n, settings)
    old = find_record(settings.results_dir, "bench", cell_record_id(name, n, pass_,
                                                                    cell_key(name, n, pass_, settings, params)))
    if old is not None and record_outcome(old) in REUSABLE and not (old.get("noise") or {}).get("noisy"):
        return old
    return None


def _write_cell(name: str, n: int, pass_: str, settings: BenchSettings, info: dict, cell: dict,
                prediction: Prediction | None) -> dict:
    """The record of a measured or planned cell (with the guard's prediction when there was one), written."""
    params = mechanism_params(name, n, settings)
    key = cell_key(name, n, pass_, settings, params)
    cell.setdefault("params", jsonable_params(params))
    if prediction is not None and cell["outcome"] in ("ok", "skipped_budget"):  # a failed cell has no figures
        for section, values in prediction.fields().items():
            cell[section] = {**values, **(cell.get(section) or {})}
    record = {
        "kind": "bench", "record_id": cell_record_id(name, n, pass_, key), "status": cell.pop("outcome"),
        "created_at": now_iso(), "mechanism": name, "family": family(name), "pattern": settings.pattern,
        "pass": pass_, "n": n,
        "batch": settings.batch, "heads": settings.heads, "head_dim": settings.head_dim,
        "dtype": settings.dtype, "device": settings.device,
        "cpu_allocator": settings.cpu_allocator_used, "settings_key": key,
        "smoke": bool(settings.smoke), "plugins": list(settings.plugins), "device_info": info,
        "command": command_line(),
        # How the derived figures read these cells: the same budget and slope range in console and report.
        "memory_budget_gb": settings.memory_budget_gb, "slope_range": settings.slope_range, **cell,
    }
    write_record(record, settings.results_dir)
    return record


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def format_table(df: pd.DataFrame) -> str:
    """One block per pass: mechanisms x n, each cell 'time / peak memory' or why it is missing."""
    if df.empty:
        return "(no benchmark cells)"
    blocks = []
    pattern = df["pattern"].iloc[0] if "pattern" in df else "bidirectional"
    for pass_, group in df.groupby("pass", sort=False):
        cells = group.assign(cell=group.apply(format_cell, axis=1))
        table = cells.pivot_table(index="mechanism", columns="n", values="cell", aggfunc="first", sort=False)
        method = group["memory_method"].dropna().unique()
        blocks.append(f"pattern={pattern} pass={pass_}  (median time / peak memory, memory method: "
                      f"{', '.join(method) or '-'})\n"
                      + table.to_string())
    return "\n\n".join(blocks)


def format_derived(df: pd.DataFrame, settings: BenchSettings) -> str:
    """Slopes, crossovers and the sdpa_direct overhead as text."""
    if df.empty:
        return ""
    derived = derived_display(df, settings.slope_range, settings.budget_bytes)
    lines = [analysis_note(df, settings.slope_range, settings.memory_budget_gb) + ":", derived.to_string(index=False)]
    overhead = full_overhead(df)
    if not overhead.empty:
        lines.append("full (registry) vs sdpa_direct, time ratio - 1:")
        lines.append(overhead.to_string(index=False, float_format=lambda x: f"{x:+.1%}"))
    return "\n".join(lines)


def main() -> None:
    """``arena-bench``: Hydra app over conf/bench.yaml."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(conf_dir()), config_name="bench", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        with exit_on_settings_error("arena-bench"):  # a bad setting: one line, exit 2; a crash keeps its traceback
            settings, _ = prepare_benchmark(OmegaConf.to_container(cfg, resolve=True))
        run_benchmark(settings)

    prepare(app="arena-bench")  # plugins=[...] and installed plug-ins, before mechanisms=[...] is resolved
    sys.argv[1:] = add_absent_keys(sys.argv[1:], conf_dir() / "bench.yaml")  # unknown keys: our one-line error
    with one_line_interrupt("arena-bench", "the cells measured so far are kept; the same command measures "
                                           "only the missing ones"):
        _app()


if __name__ == "__main__":
    main()
