"""The benchmark's scan: every (mechanism, pass, n) cell measured or reused, planned against the budgets.

Owns: the order of the scan, budget skips, the ``bench`` records, the console summary and ``main``.
Imports: the other :mod:`harness.bench` modules, :mod:`harness.allocator`, :mod:`harness.measure`,
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display`, :mod:`harness.plugins`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from harness.allocator import configure_cpu_allocator
from harness.analysis import NOISE_FLOOR_S, SDPA_DIRECT, full_overhead, predict_at, trend_suspects
from harness.bench import peers
from harness.bench.approx import approximation_errors
from harness.bench.cells import (
    REUSABLE,
    cell_key,
    cell_record_id,
    check_params,
    family,
    flat_cell,
    measure_cell,
    mechanism_params,
    record_outcome,
    select_mechanisms,
)
from harness.bench.settings import BenchSettings, resolve_settings
from harness.display import analysis_note, derived_display, format_cell, one_line_interrupt
from harness.measure import command_line, device_info, jsonable_params, progress_bar
from harness.plugins import add_absent_keys, conf_dir, exit_on_settings_error, load_plugins, prepare
from harness.store import find_record, now_iso, write_record


@dataclass
class _Row:
    """What one (mechanism, pass) row of the scan has learnt so far: measured points and a stop reason."""

    ns: list[int] = field(default_factory=list)
    peak_bytes: list[float] = field(default_factory=list)
    median_s: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    def learn(self, n: int, record: dict) -> None:
        outcome = record_outcome(record)
        if outcome == "ok":
            self.ns.append(n)
            self.peak_bytes.append(float(record["memory"]["peak_bytes"]))
            self.median_s.append(float(record["time"]["median_s"]))
        elif outcome == "oom" and self.stop_reason is None:
            self.stop_reason = f"not run: out of memory already at n={n}"


def run_benchmark(cfg: dict | BenchSettings | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the efficiency scan (and the approximation errors and peers when enabled).

    Returns the efficiency cells as a DataFrame (one row per mechanism, n, pass). Existing
    records with the same settings are reused when ``reuse`` is set (except ``error`` cells,
    which are retried).
    """
    settings, mechanisms = prepare_benchmark(cfg)
    settings = replace(settings, cpu_allocator_used=configure_cpu_allocator(settings.cpu_allocator))
    df = pd.DataFrame(_scan(settings, mechanisms))
    if settings.approx.enabled and settings.causal:
        log("approximation errors: measured for the bidirectional pattern only (run without causal=true)")
    elif settings.approx.enabled:
        approximation_errors(settings, mechanisms=[m for m in mechanisms if m != SDPA_DIRECT], log=log)
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
    mechanisms = select_mechanisms(settings.mechanisms, settings.causal)
    if settings.include_sdpa_direct and "full" in mechanisms and SDPA_DIRECT not in mechanisms:
        mechanisms.insert(mechanisms.index("full") + 1, SDPA_DIRECT)
    return mechanisms


def _scan(settings: BenchSettings, mechanisms: list[str]) -> list[dict[str, Any]]:
    info = device_info(settings.device)
    cells = [(m, p) for m in mechanisms for p in settings.passes]
    bar = progress_bar(len(cells) * len(settings.seq_lens), "bench", settings.progress)
    measured = []
    for name, pass_ in cells:
        row, records = _Row(), []
        for n in settings.seq_lens:
            bar.set_postfix_str(f"{name} {pass_} n={n}")
            record = _cell_record(name, n, pass_, settings, row, info)
            row.learn(n, record)
            records.append(record)
            bar.update(1)
        measured += recheck_trend(records, settings)
    bar.close()
    return [flat_cell(r) for r in flag_pass_inversions(measured, settings)]


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
                ok[i].update({k: v for k, v in again.items() if k != "outcome"}, created_at=now_iso())
                write_record(ok[i], settings.results_dir)
    for i in suspects():
        ok[i]["noise"] = {**(ok[i].get("noise") or {}), "noisy": True,
                          "why": "time out of line with the neighbouring lengths after re-measuring"}
        write_record(ok[i], settings.results_dir)
    return records


def measure_quietly(name: str, n: int, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """:func:`measure_cell`, repeated (at most ``remeasure`` extra times) while the p90/p10 spread of its
    repeats exceeds ``max_spread`` (steps under :data:`~harness.analysis.NOISE_FLOOR_S` excepted); keeps
    the quiet attempt, or the fastest when none was quiet (a disturbance only adds time). The cell's
    ``noise`` says the machine's load before and after, the spread, the attempts, and ``noisy`` when no
    attempt was quiet enough."""
    attempts = []
    for _ in range(settings.remeasure + 1):
        load_before = _load()
        cell = measure_cell(name, n, pass_, settings)
        if cell["outcome"] != "ok":
            return cell
        spread = cell["time"]["p90_s"] / max(cell["time"]["p10_s"], 1e-12)
        disturbed = spread > settings.max_spread and cell["time"]["median_s"] >= NOISE_FLOOR_S
        attempts.append((cell["time"]["median_s"], spread, load_before, _load(), cell, disturbed))
        if not disturbed:
            break
    noisy = all(a[5] for a in attempts)
    # A quiet attempt if there is one, else the fastest (a disturbance only adds time).
    median, spread, load_before, load_after, cell, _ = min(attempts, key=lambda a: (a[5], a[0]))
    why = f"p90/p10 spread {spread:.2f} > {settings.max_spread:g} in every attempt" if noisy else None
    cell["noise"] = {"spread": spread, "attempts": len(attempts), "load_before": load_before,
                     "load_after": load_after, "cpus": os.cpu_count(), "noisy": noisy, "why": why}
    return cell


def _load() -> float | None:
    """The 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cell_record(name: str, n: int, pass_: str, settings: BenchSettings, row: _Row, info: dict) -> dict:
    """The stored record of one cell: reused when reusable, else planned or measured and written."""
    params = mechanism_params(name, n, settings)
    key = cell_key(name, n, pass_, settings, params)
    record_id = cell_record_id(name, n, pass_, key)
    old = find_record(settings.results_dir, "bench", record_id) if settings.reuse else None
    if old is not None and record_outcome(old) in REUSABLE and not (old.get("noise") or {}).get("noisy"):
        return old  # a noisy cell is measured again: the machine may be quiet now
    cell = _plan_or_measure(name, n, pass_, settings, row)
    record = {
        "kind": "bench", "record_id": record_id, "status": cell.pop("outcome"),
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


def _plan_or_measure(name: str, n: int, pass_: str, settings: BenchSettings, row: _Row) -> dict[str, Any]:
    """A budget skip when the smaller n predict this one would not fit, else the measured cell."""
    params = jsonable_params(mechanism_params(name, n, settings))
    if row.stop_reason is not None:
        return {"outcome": "oom", "reason": row.stop_reason, "params": params}
    budget_bytes = settings.budget_bytes or math.inf
    predicted_mem = predict_at(row.ns, row.peak_bytes, n)
    if predicted_mem is not None and predicted_mem > budget_bytes:
        return {
            "outcome": "skipped_budget",
            "budget": "memory",
            "reason": f"memory, predicted peak {predicted_mem / 1e9:.2f} GB > budget {budget_bytes / 1e9:.2f} GB",
            "predicted_peak_bytes": predicted_mem,
            "params": params,
        }
    max_s = settings.max_cell_s
    predicted_time = predict_at(row.ns, row.median_s, n)
    if max_s and predicted_time is not None:
        cell_s = predicted_time * (settings.warmup + settings.repeats + 1)
        if cell_s > float(max_s):
            return {
                "outcome": "skipped_budget",
                "budget": "time",
                "reason": f"time, predicted cell time {cell_s:.0f} s > max_cell_s {float(max_s):.0f} s",
                "params": params,
            }
    return measure_quietly(name, n, pass_, settings)


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
