"""Derived figures: pure functions from measured cells (DataFrames, sequences) to the numbers a reader compares.

Log-log growth slopes, the crossover length against ``full``, ratios to ``full`` (LRA Table 2
layout), the longest n within a memory budget, the registry's overhead over calling SDPA directly,
and the power-law extrapolation the benchmark uses to skip cells that would not fit.

Owns: the arithmetic of every derived figure, for the benchmark's printed summary and the report alike.
Imports: numpy, pandas and the standard library only (no ``attentions``, ``tasks`` or other ``harness``
module): the figures are functions of the cell frame, whose columns are mechanism, pass, n, outcome,
median_s, peak_bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

# The benchmark's pseudo-mechanism: torch's scaled_dot_product_attention called directly.
SDPA_DIRECT = "sdpa_direct"
# full on its reference backend (the materialised n x n softmax matrix): the second exact baseline of the
# benchmark, LRA Table 2's and most papers' "Transformer" (issue 23).
FULL_REFERENCE = "full_reference"
# The memory budget of "longest n within budget" and of the benchmark's budget skips, when none is given:
# one figure for the benchmark's console, the report and the suite.
DEFAULT_MEMORY_BUDGET_GB = 6.0
# A power-law fit is trusted up to this multiple of the largest measured n; beyond it: "> X, not measured".
EXTRAPOLATION_LIMIT = 4


def slope_range_for(ns: Iterable[float], given: Sequence[float] | None = None) -> tuple[float, float] | None:
    """The n range of the log-log slope fit: ``given``, else the three largest measured lengths (all of
    them with fewer than three); None without two distinct lengths. Every command uses this one rule, so
    the console, the report and the suite print the same slopes for the same cells."""
    if given is not None and len(given) == 2:
        return float(given[0]), float(given[1])
    distinct = sorted({float(n) for n in ns})
    if len(distinct) < 2:
        return None
    return distinct[-3] if len(distinct) >= 3 else distinct[0], distinct[-1]


def clean_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The ok cells not flagged noisy (a ``noisy`` column set True): the only ones slopes and crossovers use."""
    ok = df[df["outcome"] == "ok"] if "outcome" in df else df
    if "noisy" in ok:
        ok = ok[~ok["noisy"].fillna(False).astype(bool)]
    return ok


# Steps shorter than this are dominated by fixed overheads and timer jitter: their spread and their trend
# against n say nothing about a disturbance (their median, robust to one slow repeat, is still reported).
NOISE_FLOOR_S = 1e-3


def trend_suspects(ns: Sequence[float], times: Sequence[float], tolerance: float = 1.25,
                   min_time_s: float = NOISE_FLOOR_S) -> list[int]:
    """Indices of cells whose time contradicts their neighbours: slower than a longer input of the same
    row by more than ``tolerance`` (time never falls with n), more than ``tolerance`` x cubic growth
    above the previous length, or a log-log slope more than :data:`MAX_SLOPE_RISE` above every earlier
    segment's (times of at least 10 x ``min_time_s``). A disturbed repeat makes one cell jump; the
    neighbours show it. Pairs whose times are both under ``min_time_s`` are not compared: sub-millisecond
    steps are dominated by fixed overheads and may be flat or fall with n without any disturbance."""
    pts = sorted((float(n), float(t), i) for i, (n, t) in enumerate(zip(ns, times)) if t is not None and t > 0)
    suspects: set[int] = set()
    for (n0, t0, i0), (n1, t1, i1) in zip(pts, pts[1:]):
        if max(t0, t1) < min_time_s:
            continue
        if t0 > tolerance * t1:
            suspects.add(i0)
        elif t1 > tolerance * t0 * (n1 / n0) ** 3:
            suspects.add(i1)
    rest = [p for p in pts if p[2] not in suspects]  # a cell already out of line would skew the slopes
    return sorted(suspects | _slope_jumps(rest, 10 * min_time_s))


# A cost that is a sum of power laws (a n + b n^2 + ...) changes its log-log slope smoothly: by well under 1
# from one doubling of n to the next. A rise of more than this is a disturbed later cell (measured: linformer
# fwd+bwd 13.4, 27.4, 167 ms at 1K, 2K, 4K, slopes 1.03 then 2.6, against 53 ms at 4K in a quiet run).
MAX_SLOPE_RISE = 1.0


def _slope_jumps(pts: list[tuple[float, float, int]], min_time_s: float) -> set[int]:
    """Indices of cells whose segment's log-log slope exceeds every earlier segment's by more than
    :data:`MAX_SLOPE_RISE` (times of at least ``min_time_s``: shorter steps are overhead-dominated and their
    slopes swing without a disturbance). Against every earlier segment, not only the previous one, so that
    one slow earlier cell (a flat segment before a normal one) does not make the normal one look like a jump.
    Catches a slow last cell, which has no longer neighbour to contradict it."""
    pts = [p for p in pts if p[1] >= min_time_s]
    slopes = [(math.log(t1 / t0) / math.log(n1 / n0), i1)
              for (n0, t0, _), (n1, t1, i1) in zip(pts, pts[1:]) if n1 > n0]
    return {i for k, (slope, i) in enumerate(slopes)
            if k > 0 and slope > max(s for s, _ in slopes[:k]) + MAX_SLOPE_RISE}


def predict_at(ns: Sequence[float], values: Sequence[float], n: float) -> float | None:
    """Extrapolate ``values`` to ``n`` with a power law through the last two points; None with fewer.

    The exponent is clamped to [1, 3]: growth is never assumed slower than linear (so the
    prediction errs towards caution) nor faster than cubic (noise in tiny timings).
    """
    pts = [(float(a), float(b)) for a, b in zip(ns, values) if b is not None and b > 0 and math.isfinite(b)]
    if len(pts) < 2:
        return None
    (n0, v0), (n1, v1) = pts[-2], pts[-1]
    if n1 == n0:
        return v1
    slope = min(max(math.log(v1 / v0) / math.log(n1 / n0), 1.0), 3.0)
    return v1 * (n / n1) ** slope


def loglog_slope(ns: Iterable[float], values: Iterable[float], n_range: Sequence[float] | None = None) -> float:
    """Least-squares slope of log(value) against log(n) over ``n_range`` (inclusive); NaN with < 2 points.

    A value growing as c * n^a has slope a: ~1 for linear-memory mechanisms, ~2 for quadratic.
    Missing, zero or non-finite values are left out.
    """
    lo, hi = (n_range if n_range is not None else (-math.inf, math.inf))
    pts = [
        (math.log(float(n)), math.log(float(v)))
        for n, v in zip(ns, values)
        if v is not None and lo <= float(n) <= hi and np.isfinite(float(v)) and float(v) > 0
    ]
    if len({x for x, _ in pts}) < 2:
        return float("nan")
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def crossover_length(ns: Sequence[float], t_mech: Sequence[float], t_full: Sequence[float]) -> tuple[float, str]:
    """Length from which ``t_mech < t_full`` holds for every larger measured n.

    Returns ``(n, note)``: interpolated in log-log between the last grid point where the
    mechanism is slower and the next one (``note = "interpolated"``); ``(ns[0], "faster at all n")``
    when it is faster everywhere; ``(nan, "never faster")`` when it is not faster at the
    largest n both ran. Points missing in either series are left out.
    """
    pts = [
        (float(n), float(a), float(b))
        for n, a, b in zip(ns, t_mech, t_full)
        if a is not None and b is not None and np.isfinite(float(a)) and np.isfinite(float(b)) and a > 0 and b > 0
    ]
    pts.sort()
    if not pts:
        return float("nan"), "no common n"
    log_ratio = [math.log(a / b) for _, a, b in pts]
    if log_ratio[-1] >= 0:
        return float("nan"), "never faster"
    last_slower = max((i for i, r in enumerate(log_ratio) if r >= 0), default=None)
    if last_slower is None:
        return pts[0][0], "faster at all n"
    i = last_slower
    x0, x1 = math.log(pts[i][0]), math.log(pts[i + 1][0])
    r0, r1 = log_ratio[i], log_ratio[i + 1]
    frac = r0 / (r0 - r1)
    return float(math.exp(x0 + frac * (x1 - x0))), "interpolated"


def relative_to_full(df: pd.DataFrame, reference: str = "full") -> pd.DataFrame:
    """LRA Table 2 layout: per mechanism, pass and n, ``speedup`` = t_full / t and ``memory_ratio`` = m / m_full.

    ``df`` has columns mechanism, pass, n, median_s, peak_bytes (rows with missing values give NaN).
    """
    ok = df[df["outcome"] == "ok"] if "outcome" in df else df
    ref = ok[ok["mechanism"] == reference][["pass", "n", "median_s", "peak_bytes"]]
    ref = ref.rename(columns={"median_s": "ref_s", "peak_bytes": "ref_bytes"})
    merged = df.merge(ref, on=["pass", "n"], how="left")
    ok_row = merged["outcome"] == "ok" if "outcome" in merged else True
    merged["speedup"] = np.where(ok_row, merged["ref_s"] / merged["median_s"], np.nan)
    merged["memory_ratio"] = np.where(ok_row, merged["peak_bytes"] / merged["ref_bytes"], np.nan)
    return merged[["mechanism", "pass", "n", "speedup", "memory_ratio"]]


def longest_n_within_budget(ns: Sequence[float], peak_bytes: Sequence[float], budget_bytes: float,
                            n_range: Sequence[float] | None = None) -> dict[str, float]:
    """Longest n whose peak fits ``budget_bytes``: the largest measured one, and an extrapolation.

    The extrapolation follows the power law fitted over ``n_range`` (see :func:`loglog_slope`)
    through the largest measured point: n* = n_last * (budget / m_last)^(1/slope), and is only given up to
    ``cap`` = :data:`EXTRAPOLATION_LIMIT` x the largest measured n. Beyond the cap ``extrapolated`` is NaN
    and ``beyond`` = cap (shown as "> cap, not measured"); ``beyond`` is NaN otherwise.
    """
    pts = sorted((float(n), float(m)) for n, m in zip(ns, peak_bytes) if m is not None and np.isfinite(float(m)))
    fitting = [n for n, m in pts if m <= budget_bytes]
    measured = max(fitting) if fitting else float("nan")
    slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts], n_range)
    nan = float("nan")
    if not pts or not np.isfinite(slope) or slope <= 0:
        return {"measured": measured, "extrapolated": nan, "beyond": nan, "slope": slope}
    n_last, m_last = pts[-1]
    cap = EXTRAPOLATION_LIMIT * n_last
    estimate = n_last * (budget_bytes / m_last) ** (1.0 / slope)
    if estimate > cap:
        return {"measured": measured, "extrapolated": nan, "beyond": cap, "slope": slope}
    return {"measured": measured, "extrapolated": estimate, "beyond": nan, "slope": slope}


def derived_table(df: pd.DataFrame, slope_range: Sequence[float] | None = None,
                  budget_bytes: float | None = None) -> pd.DataFrame:
    """Per mechanism and pass: time and memory slopes, crossover vs ``full``, longest n within the budget.

    Only clean cells count (:func:`clean_cells`: ok and not flagged noisy). ``slope_range`` None: the
    range :func:`slope_range_for` derives from the measured lengths.
    """
    rows = []
    ok = clean_cells(df)
    slope_range = slope_range_for(df["n"], slope_range) if len(df) else None
    full = ok[ok["mechanism"] == "full"]
    for (name, pass_), group in df.groupby(["mechanism", "pass"], sort=False):
        g = clean_cells(group).sort_values("n")
        f = full[full["pass"] == pass_].set_index("n")["median_s"]
        ns = list(g["n"])
        row = {
            "mechanism": name, "pass": pass_,
            "time_slope": loglog_slope(ns, g["median_s"], slope_range),
            "memory_slope": loglog_slope(ns, g["peak_bytes"], slope_range),
        }
        if name != "full" and len(f):
            n_x, note = crossover_length(ns, list(g["median_s"]), [f.get(n) for n in ns])
            row.update(crossover_n=n_x, crossover_note=note)
        else:
            row.update(crossover_n=float("nan"), crossover_note="reference" if name == "full" else "no full")
        if budget_bytes:
            fit = longest_n_within_budget(ns, list(g["peak_bytes"]), budget_bytes, slope_range)
            row.update(max_n_measured=fit["measured"], max_n_extrapolated=fit["extrapolated"],
                       max_n_beyond=fit["beyond"])
        rows.append(row)
    return pd.DataFrame(rows)


# What calling full through the registry may cost over torch SDPA called directly (a fraction of its time).
SDPA_OVERHEAD_TARGET = 0.05


def full_overhead(df: pd.DataFrame) -> pd.DataFrame:
    """Per pass and n: t(full through the registry) / t(sdpa_direct) - 1 (clean cells only)."""
    ok = clean_cells(df)
    a = ok[ok["mechanism"] == "full"].set_index(["pass", "n"])["median_s"]
    b = ok[ok["mechanism"] == SDPA_DIRECT].set_index(["pass", "n"])["median_s"]
    joined = pd.concat({"full": a, "direct": b}, axis=1).dropna()
    if joined.empty:
        return pd.DataFrame()
    joined["overhead"] = joined["full"] / joined["direct"] - 1
    return joined.reset_index()[["pass", "n", "overhead"]]


# ----------------------------------------------------------------------------------------------
# Incremental decoding (``decode`` records, issue 24)
# ----------------------------------------------------------------------------------------------

# A decode row: everything of a cell but its context. ``forced_recompute`` rows time a mechanism that has its own
# step form in the recompute form, for the step form's speed-up.
DECODE_ROW = ("scope", "model_size", "batch", "mechanism", "forced_recompute")
# The context at which the step form's speed-up over recomputation is read (issue 24: "at 4K").
DECODE_SPEEDUP_CONTEXT = 4096


def decode_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The ok decode cells (records or store rows with ``status``, ``context``, ``ms_per_token``,
    ``state_bytes_per_seq`` and the :data:`DECODE_ROW` columns), with ``model_size`` "-" for the mechanism scope
    and ``forced_recompute`` False where absent, so rows group without NaN keys."""
    if df.empty:
        return df
    out = df[df["status"] == "ok"].copy()
    out["model_size"] = out["model_size"].fillna("-") if "model_size" in out else "-"
    out["forced_recompute"] = (out["forced_recompute"].fillna(False).astype(bool) if "forced_recompute" in out
                               else False)
    return out


def decode_slopes(df: pd.DataFrame, context_range: Sequence[float] | None = None) -> pd.DataFrame:
    """Per decode row: the log-log slopes of ms per token and of state bytes per sequence against context over
    ``context_range`` (inclusive; None: every measured context), and of ms per token over the three largest
    contexts (:func:`slope_range_for`, the efficiency scan's rule). NaN with fewer than two contexts.
    A constant has slope 0, a linear growth 1."""
    cells = decode_cells(df)
    rows = []
    for key, g in cells.groupby(list(DECODE_ROW), sort=False):
        g = g.sort_values("context")
        ns = list(g["context"])
        top = slope_range_for(ns)
        rows.append({**dict(zip(DECODE_ROW, key)), "contexts": len(ns),
                     "ms_slope": loglog_slope(ns, g["ms_per_token"], context_range),
                     "ms_slope_top3": loglog_slope(ns, g["ms_per_token"], top) if top else float("nan"),
                     "bytes_slope": loglog_slope(ns, g["state_bytes_per_seq"], context_range)})
    return pd.DataFrame(rows, columns=[*DECODE_ROW, "contexts", "ms_slope", "ms_slope_top3", "bytes_slope"])


def decode_crossover(df: pd.DataFrame, reference: str = "full") -> pd.DataFrame:
    """Per decode row in the mechanism's own form: the context from which its ms per token is below
    ``reference``'s (own form, same scope, size and batch) at every larger measured context
    (:func:`crossover_length`, interpolated in log-log; the first context when it is faster everywhere); None
    (NaN in the frame) when it is never faster within the range or there is nothing to compare."""
    cells = decode_cells(df)
    if cells.empty:
        return pd.DataFrame(columns=[*DECODE_ROW, "crossover_context", "crossover_note"])
    own = cells[~cells["forced_recompute"]]
    rows = []
    for key, g in own.groupby(list(DECODE_ROW), sort=False):
        row = dict(zip(DECODE_ROW, key))
        ref = own[(own["mechanism"] == reference) & (own["scope"] == row["scope"])
                  & (own["model_size"] == row["model_size"]) & (own["batch"] == row["batch"])]
        ref_ms = ref.set_index("context")["ms_per_token"]
        if row["mechanism"] == reference or ref_ms.empty:
            rows.append({**row, "crossover_context": None,
                         "crossover_note": "reference" if row["mechanism"] == reference else f"no {reference}"})
            continue
        g = g.sort_values("context")
        ns = list(g["context"])
        n_x, note = crossover_length(ns, list(g["ms_per_token"]), [ref_ms.get(n) for n in ns])
        rows.append({**row, "crossover_context": n_x if math.isfinite(n_x) else None, "crossover_note": note})
    return pd.DataFrame(rows)


def decode_speedup(df: pd.DataFrame, context: int = DECODE_SPEEDUP_CONTEXT) -> pd.DataFrame:
    """Per decode row with its own step form: ms per token in the (forced) recompute form / in its step form at
    ``context``, where both were measured (else None)."""
    cells = decode_cells(df)
    if cells.empty or "decode_form" not in cells:
        return pd.DataFrame(columns=[*DECODE_ROW, "speedup_vs_recompute"])
    at = cells[cells["context"] == context]
    key = ["scope", "model_size", "batch", "mechanism"]
    step = at[(~at["forced_recompute"]) & (at["decode_form"] == "step")].set_index(key)["ms_per_token"]
    forced = at[at["forced_recompute"]].set_index(key)["ms_per_token"]
    rows = []
    for row_key, ms in step.items():
        ratio = forced.get(row_key) / ms if row_key in forced.index and ms > 0 else None
        rows.append({**dict(zip(key, row_key)), "forced_recompute": False, "speedup_vs_recompute": ratio})
    return pd.DataFrame(rows, columns=[*DECODE_ROW, "speedup_vs_recompute"])


def decode_derived(df: pd.DataFrame, context_range: Sequence[float] | None = None,
                   speedup_context: int = DECODE_SPEEDUP_CONTEXT) -> pd.DataFrame:
    """Slopes (:func:`decode_slopes`), crossover against full (:func:`decode_crossover`) and the step form's
    speed-up over recomputation (:func:`decode_speedup`), one row per decode row in the mechanism's own form (the
    forced recompute rows enter through the speed-up); empty without ok cells."""
    slopes = decode_slopes(df, context_range)
    if slopes.empty:
        return slopes
    slopes = slopes[~slopes["forced_recompute"].astype(bool)]
    keys = list(DECODE_ROW)
    out = slopes.merge(decode_crossover(df), on=keys, how="left").merge(decode_speedup(df, speedup_context),
                                                                          on=keys, how="left")
    return out
