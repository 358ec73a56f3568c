"""The report's tables: store rows (DataFrames from :func:`harness.store.load_records`) -> display frames.

Owns: how the cells of a table read (a mechanism's budget and state size relative to full included).
Imports: :mod:`attentions` (state sizes), :mod:`harness.analysis`, :mod:`harness.display`,
:mod:`harness.report.groups` (which records form a table).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from attentions import AttentionConfig, available_attentions, get_attention_info
from harness.analysis import FULL_REFERENCE, SDPA_DIRECT, relative_to_full
from harness.display import MISSING, format_bytes, missing_cell, not_run
from harness.report.groups import Comparison
from harness.report.published import LRA_TABLE_2, PublishedEfficiency


def comparison_table(comp: Comparison, mechanisms: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric frame) of one comparison: a row per mechanism that ran, and the
    majority class. Seeds are averaged (mean ± sample std, k seeds); failed runs are counted beside them;
    a mechanism with no ok run is ``— (statuses)``. Throughput and step memory are given with their ratio
    to ``full`` of the same comparison. Numeric columns: accuracy, std, seeds, best_val, majority,
    examples_per_s, peak_bytes, speed_vs_full, memory_vs_full (NaN where unknown); ``by_seed``: seed -> test
    accuracy % of each ok run (what the plots draw when there are few seeds)."""
    runs = comp.runs
    ran = list(dict.fromkeys(runs["attention"].dropna()))
    names = [m for m in (mechanisms or []) if m in ran] + [m for m in ran if m not in (mechanisms or [])]
    majority = _mean(runs.get("majority_test_acc")) * 100
    numeric = pd.DataFrame([_mechanism_numbers(runs[runs["attention"] == m], majority) for m in names], index=names)
    if "full" in numeric.index:
        numeric["speed_vs_full"] = numeric["examples_per_s"] / numeric.loc["full", "examples_per_s"]
        numeric["memory_vs_full"] = numeric["peak_bytes"] / numeric.loc["full", "peak_bytes"]
    else:
        numeric["speed_vs_full"] = numeric["memory_vs_full"] = float("nan")
    display = pd.DataFrame({name: _display_row(runs[runs["attention"] == name], numeric.loc[name])
                            for name in names}).T
    display["budget (state vs full)"] = [budget_text(runs[runs["attention"] == name], name) for name in names]
    display.loc["majority class"] = [f"{majority:.2f}" if np.isfinite(majority) else not_run("unknown")] + \
        [""] * (display.shape[1] - 1)
    display.index.name = "mechanism"
    return display, numeric


def _mean(values: pd.Series | None) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna() if values is not None else pd.Series([], dtype=float)
    return float(values.mean()) if len(values) else float("nan")


def _mechanism_numbers(runs: pd.DataFrame, majority: float) -> dict[str, Any]:
    ok = runs[runs["status"] == "ok"]
    acc = pd.to_numeric(ok.get("test_acc"), errors="coerce").dropna() * 100
    seeds = pd.to_numeric(ok["seed"], errors="coerce") if "seed" in ok else pd.Series(range(len(ok)), index=ok.index)
    return {
        "by_seed": {int(seeds[i]) if np.isfinite(seeds[i]) else k: float(a)
                    for k, (i, a) in enumerate(acc.items())},  # the seeds themselves, for the plots
        "accuracy": float(acc.mean()) if len(acc) else float("nan"),
        "std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
        "seeds": len(acc), "majority": majority,
        "best_val": _mean(ok.get("best_val_acc")) * 100,
        "examples_per_s": _mean(ok.get("throughput.examples_per_s")),
        "peak_bytes": _mean(ok.get("peak_memory_bytes")),
    }


def _display_row(runs: pd.DataFrame, r: pd.Series) -> dict[str, str]:
    failed = runs[runs["status"] != "ok"]["status"].value_counts()
    failed_text = ", ".join(f"{c} {s}" for s, c in failed.items())
    seeds = int(r["seeds"])
    if not seeds:
        missing = not_run(failed_text or "not run")
        return {"test acc %": missing, "vs majority (points)": "", "best val %": "",
                "examples/s (vs full)": "", "step peak memory (vs full)": ""}
    acc = f"{r['accuracy']:.2f} ± {r['std']:.2f} ({seeds} seeds)" if seeds > 1 else \
        f"{r['accuracy']:.2f} (1 seed)"  # no spread from one seed

    def ratio(x):
        return f" ({x:.2f}x)" if np.isfinite(x) else ""

    return {
        "test acc %": acc + (f" [+{failed_text}]" if failed_text else ""),
        "vs majority (points)": f"{r['accuracy'] - r['majority']:+.1f}" if np.isfinite(r["majority"]) else MISSING,
        "best val %": f"{r['best_val']:.2f}" if np.isfinite(r["best_val"]) else MISSING,
        "examples/s (vs full)": (f"{r['examples_per_s']:.0f}" + ratio(r["speed_vs_full"])
                                 if np.isfinite(r["examples_per_s"]) else MISSING),
        "step peak memory (vs full)": (format_bytes(r["peak_bytes"]) + ratio(r["memory_vs_full"])
                                       if np.isfinite(r["peak_bytes"]) else MISSING),
    }


def record_params(row: pd.Series, name: str) -> dict[str, Any] | None:
    """The resolved parameters of mechanism ``name`` from a flattened training record's ``attention_config.*``
    cells, or None when the record has none. Cells the record lacks (NaN: another mechanism's column) take
    the config's default; pandas' floats for ints (16.0) become ints again, lists stored as JSON text lists.
    Raises ValueError (from the registry) for a mechanism that is not registered."""
    fields = [f.name for f in dataclasses.fields(get_attention_info(name).config_cls)]
    params = {}
    for field in fields:
        value = row.get(f"attention_config.{field}")
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        params[field] = value
    return params or None


GENERIC_PARAMS = {f.name for f in dataclasses.fields(AttentionConfig)} | {"backend"}


def budget_text(runs: pd.DataFrame, name: str) -> str:
    """What the recipe gives mechanism ``name`` (its ``attention_overrides`` entry and any
    ``attention.params``), the budget-defining parameters it left at their values (``compression=3
    (default)``; :func:`budget_params`), and its state size relative to full attention's KV cache at the
    recipe's length (``state_size / (2 n head_dim)``, see :meth:`attentions.registry.AttentionInfo.state_size`):
    e.g. ``window=32; state 0.52x full``. ``exact`` for full; ``—`` where nothing is known."""
    if name == "full":
        return "exact"
    row = runs.iloc[0]
    given = {c.rsplit(".", 1)[-1]: _plain(row[c]) for c in runs.columns
             if c.startswith((f"config.attention_overrides.{name}.", "config.attention.params."))
             and not (isinstance(row[c], float) and math.isnan(row[c]))}
    texts = [f"{k}={v}" for k, v in sorted(given.items())]
    defaults = {f.name: f.default for f in dataclasses.fields(get_attention_info(name).config_cls)} \
        if name in available_attentions() else {}
    for key, value in budget_params(row, name).items():
        if key not in given:
            origin = "default" if defaults.get(key) == value else "not set by the recipe"
            texts.append(f"{key}={value} ({origin})")
    parts = [", ".join(texts)] if texts else []
    ratio = _state_vs_full(row)
    if ratio is not None:
        parts.append(f"state {ratio:.2f}x full")
    return "; ".join(parts) or MISSING


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def record_state_size(row: pd.Series, n: Any) -> tuple[float, dict[str, Any] | None, str]:
    """(state size in floats per head per layer, or NaN; the resolved parameters; why there is none, ``""``
    when there is one) of one training record's mechanism for ``n`` tokens, from its ``attention_config``.
    The one place the report asks the registry for a record's state size."""
    name = str(row["attention"])
    if name not in available_attentions():
        return math.nan, None, "not registered when the report ran (plug-in not loaded)"
    try:
        params = record_params(row, name)
        if params is None:
            return math.nan, None, "record without attention_config"
        size = get_attention_info(name).state_size(params, int(n))
    except (ValueError, TypeError) as exc:
        return math.nan, None, f"not computed: {str(exc).splitlines()[0]}"
    return (math.nan, params, "declares none") if size is None else (float(size), params, "")


def budget_params(row: pd.Series, name: str) -> dict[str, Any]:
    """The parameters of one record's mechanism that set its budget, with the record's values: the integer
    parameters of its config class (not the generic ones every mechanism takes, not flags) on which its declared
    state size at the record's length depends (halving or doubling one changes the state); where none does
    (clustered attention compresses the queries, not the keys it reads), all its integer parameters. Empty
    where the mechanism is not registered, declares no state size, or the record has no ``attention_config``."""
    n = row.get("attention_config.max_seq_len")
    base, params, _ = record_state_size(row, n)
    if math.isnan(base) or params is None:
        return {}
    integers = {k: v for k, v in params.items()
                if k not in GENERIC_PARAMS and isinstance(v, int) and not isinstance(v, bool)}
    found = {}
    for key, value in integers.items():
        for other in {max(1, value // 2), value * 2} - {value}:
            try:
                if get_attention_info(name).state_size({**params, key: other}, int(n)) != base:
                    found[key] = value
                    break
            except (ValueError, TypeError):
                continue  # a value the mechanism does not accept (a window past the length) tells nothing
    return found or integers


def _state_vs_full(row: pd.Series) -> float | None:
    """State size over full attention's ``2 n d`` at the record's length ``n`` (None when unknown)."""
    n = row.get("attention_config.max_seq_len")
    size, params, _ = record_state_size(row, n)
    return None if math.isnan(size) or params is None else size / (2 * int(n) * params["head_dim"])


LEARNED_MARGIN = 1.0  # points above the majority class below which a run learned nothing


def learned(numeric: pd.DataFrame, margin: float = LEARNED_MARGIN) -> pd.Series:
    """Per mechanism: beat the majority class by more than ``margin`` points (a run at chance learned nothing)."""
    return (numeric["accuracy"] - numeric["majority"]) > margin


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
        "created_at": col("created_at"), "noisy": col("noise.noisy").fillna(False).astype(bool),
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
    return _n_columns(table.fillna(not_run()))


def _n_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Columns named ``n=1024`` (a bare number reads as a value), no column-axis name (no second header)."""
    table = table.rename(columns=lambda n: f"n={int(n)}")
    table.columns.name = None
    return table


def relative_table(cells: pd.DataFrame, pass_: str, reference: str = "full") -> pd.DataFrame:
    """LRA Table 2 layout: ``speed-up x / memory ratio`` relative to ``reference`` (``full``, or
    ``full_reference``: the materialised ``n x n`` baseline) per n."""
    rel = relative_to_full(cells[cells["pass"] == pass_], reference)
    if rel.empty:
        return pd.DataFrame()
    merged = rel.merge(cells[cells["pass"] == pass_][["mechanism", "n", "outcome", "reason"]], on=["mechanism", "n"])

    def fmt(r):
        if r["outcome"] != "ok":
            return missing_cell(r)
        if not np.isfinite(r["speedup"]):
            return not_run(f"no {reference}")
        return f"{r['speedup']:.2f}x / {r['memory_ratio']:.2f}"

    merged["value"] = merged.apply(fmt, axis=1)
    return _n_columns(merged.pivot_table(index="mechanism", columns="n", values="value", aggfunc="first").fillna(
        not_run()))


def published_ratio_table(cells: pd.DataFrame, pass_: str = "fwd+bwd",
                          published: PublishedEfficiency = LRA_TABLE_2) -> pd.DataFrame:
    """Ours beside LRA Table 2, against the same baseline (the materialised ``n x n`` softmax, our
    ``full_reference``), at the lengths both have: per mechanism and n, ``ours s.ssx / m.mm; LRA s.ssx / m.mm``
    (speed-up x / memory ratio). Empty when the cells have no ``full_reference`` or no shared length."""
    sub = cells[cells["pass"] == pass_]
    lengths = sorted(set(int(n) for n in sub["n"]) & set(published.lengths))
    if FULL_REFERENCE not in set(sub["mechanism"]) or not lengths:
        return pd.DataFrame()
    rel = relative_to_full(sub[sub["n"].isin(lengths)], FULL_REFERENCE).set_index(["mechanism", "n"])
    rows = {}
    for name in dict.fromkeys(sub["mechanism"]):
        if name in (SDPA_DIRECT, FULL_REFERENCE):
            continue
        row = {}
        for n in lengths:
            ours = rel.loc[(name, n)] if (name, n) in rel.index else None
            theirs = published.ratios(name, n)
            ours_text = (f"{ours['speedup']:.2f}x / {ours['memory_ratio']:.2f}"
                         if ours is not None and np.isfinite(ours["speedup"]) else MISSING)
            row[f"n={n}"] = f"ours {ours_text}; LRA " + (f"{theirs[0]:.2f}x / {theirs[1]:.2f}" if theirs else MISSING)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "mechanism"
    return table


def peer_table(peer: pd.DataFrame) -> pd.DataFrame:
    def fmt(r):
        if r.get("peer_installed") is False:
            return not_run("not installed")
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


def approx_seeds(approx: pd.DataFrame) -> pd.Series:
    """Per approximation record, the number of seeds its error is averaged over: ``seeds``, else the length of
    ``errors`` (a list, or its JSON text as the store keeps it), else NaN (unknown)."""
    def count(r) -> float:
        if "seeds" in r and pd.notna(r["seeds"]):
            return float(r["seeds"])
        errors = r.get("errors")
        if isinstance(errors, str):
            errors = json.loads(errors)
        return float(len(errors)) if isinstance(errors, list) else float("nan")

    return approx.apply(count, axis=1) if len(approx) else pd.Series(dtype=float)


def shrinking_budgets(approx: pd.DataFrame) -> set[str]:
    """The mechanisms of an approximation study whose budget parameter gives a *smaller* state as it grows
    (memory_compressed's ``compression``: more tokens per slot, fewer slots), so their error rises to the right
    where every other panel's falls. Read from the registry's state size at the study's n and head dim; a
    mechanism that declares none, or whose state does not change (clustered), is not in it."""
    shrinking = set()
    needed = {"mechanism", "param", "value", "n", "head_dim"}
    if not needed <= set(approx.columns):
        return shrinking
    for (name, param), group in approx.groupby(["mechanism", "param"]):
        values = sorted(pd.to_numeric(group["value"], errors="coerce").dropna().unique())
        if name not in available_attentions() or len(values) < 2:
            continue
        n, head_dim = int(group["n"].iloc[0]), int(group["head_dim"].iloc[0])
        try:
            low, high = (get_attention_info(name).state_size({"head_dim": head_dim, "max_seq_len": n,
                                                              param: _plain(v)}, n) for v in (values[0], values[-1]))
        except (ValueError, TypeError):
            continue  # a budget the registry does not accept at this n tells nothing
        if low is not None and high is not None and high < low:
            shrinking.add(str(name))
    return shrinking


def approx_table(approx: pd.DataFrame) -> pd.DataFrame:
    """Mechanism x budget rows, one column per input variant: the relative error, ``mean ± std`` over seeds, or
    the value alone for one seed (a std of one seed is not a zero spread)."""
    approx = approx.assign(_seeds=approx_seeds(approx))

    def fmt(r):
        if r["status"] != "ok":
            return not_run(r["status"])
        if r["_seeds"] == 1:
            return f"{r['error_mean']:.3f}"
        return f"{r['error_mean']:.3f} ± {r['error_std']:.3f}"

    approx = approx.assign(cell=approx.apply(fmt, axis=1), _v=pd.to_numeric(approx["value"], errors="coerce"),
                           budget=approx["param"].astype(str) + "=" + approx["value"].astype(str))
    table = approx.pivot_table(index=["mechanism", "_v", "budget"], columns="variant", values="cell",
                               aggfunc="last")
    table = table.reset_index().sort_values(["mechanism", "_v"]).drop(columns="_v")
    table = table.set_index(["mechanism", "budget"])
    table.columns.name = None
    return table.fillna(not_run())
