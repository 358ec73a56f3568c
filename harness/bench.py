"""Efficiency benchmark (``arena-bench``): time and peak memory of every mechanism against sequence length.

For each mechanism, sequence length ``n`` and pass (``fwd``: forward under ``torch.no_grad``,
``fwd+bwd``: forward then backward of ``out.sum()``) it records the wall time (warm-up, then
repeats: median, p10, p90) and the allocator peak of one step (method named, see
:mod:`harness.measure`). The mechanism alone is measured: inputs are already projected
``q, k, v`` of shape ``(batch, heads, n, head_dim)``, no padding. ``sdpa_direct`` is a
pseudo-mechanism calling ``torch.nn.functional.scaled_dot_product_attention`` directly,
to show what the registry's ``full`` costs on top of the kernel.

Cells that cannot run say why (the record's ``status``, with a ``reason``): ``oom`` (the allocator
ran out), ``unsupported`` (the mechanism raised a ValueError for these inputs, e.g.
``n > max_seq_len``), ``error`` (anything else, message kept), ``skipped_budget`` (not run: the
peak predicted from smaller ``n`` exceeds ``memory_budget_gb``, or the predicted time exceeds
``max_cell_s``; ``budget`` says which, ``memory`` or ``time``, and ``reason`` starts with it).

It also measures each non-``full`` mechanism's approximation error against exact softmax
attention as a function of its budget parameter (:func:`approximation_errors`), and, when
the ``peers`` extra is installed, the public implementations side by side (:mod:`harness.peers`).

Records go to the results store: kind ``bench`` (one per mechanism, n, pass, settings),
``approx`` (one per mechanism, budget value, input variant) and ``peer``.

    arena-bench                                   # issue 2's setup: CPU/auto, 1K..16K
    arena-bench mechanisms=[full,performer] seq_lens=[1024,2048] repeats=3
    arena-bench smoke=true results_dir=/tmp/r     # tiny shapes, seconds
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attentions import available_attentions, build_attention, get_attention_info
from harness.allocator import CPU_ALLOCATORS, configure_cpu_allocator
from harness.measure import device_info, measure_peak_memory, time_fn
from harness.settings import merge_settings
from harness.store import config_hash, find_record, now_iso, write_record

PASSES = ("fwd", "fwd+bwd")
SDPA_DIRECT = "sdpa_direct"
OUTCOMES = ("ok", "oom", "unsupported", "error", "skipped_budget")
# Outcomes a re-run takes from the store; errors are retried and budget skips re-planned.
REUSABLE = ("ok", "oom", "unsupported")

# The benchmark's documented settings (issue 2): every other parameter keeps its registry default.
# Linformer's projection is sized to the sequence: max_seq_len = n for each cell.
BENCH_SETTINGS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 256},
    "longformer": {"window": 256, "global_positions": (0,)},
    "bigbird": {"block_size": 64, "num_global_blocks": 2, "num_random_blocks": 3},
    "performer": {"num_features": 256},
    "linformer": {"proj_dim": 256},
}

# Smoke size (tests, seconds): budgets smaller than the tiny sequences so every real path runs.
SMOKE_SETTINGS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 8},
    "longformer": {"window": 8, "global_positions": (0,)},
    "bigbird": {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2},
    "linformer": {"proj_dim": 8},
    "performer": {"num_features": 16},
    "rfa": {"num_features": 16},
    "reformer": {"bucket_size": 4, "n_hashes": 2},
    "aft": {"mode": "local", "window": 6},
    "clustered": {"num_clusters": 4},
    "memory_compressed": {"compression": 2},
}
SMOKE_OVERRIDES: dict[str, Any] = {
    "seq_lens": [32, 64],
    "batch": 1,
    "heads": 2,
    "head_dim": 8,
    "repeats": 1,
    "warmup": 0,
    "approx": {"n": 64, "seeds": 1, "batch": 1, "budgets": "smoke"},
    "slope_range": [32, 64],
    "peers": {"seq_lens": [32, 64]},
}

# Budget parameter swept for the approximation error, per mechanism (at the default n = 1024).
APPROX_BUDGETS: dict[str, tuple[str, list]] = {
    "performer": ("num_features", [16, 32, 64, 128, 256, 512]),
    "rfa": ("num_features", [16, 32, 64, 128, 256, 512]),
    "linformer": ("proj_dim", [16, 32, 64, 128, 256, 512]),
    "clustered": ("num_clusters", [8, 16, 32, 64, 128, 256]),
    "reformer": ("n_hashes", [1, 2, 4, 8]),
    "memory_compressed": ("compression", [2, 3, 4, 8, 16]),
    "sliding_window": ("window", [16, 32, 64, 128, 256, 512]),
    "longformer": ("window", [16, 32, 64, 128, 256, 512]),
    "bigbird": ("block_size", [8, 16, 32, 64, 128]),
    "aft": ("window", [16, 32, 64, 128, 256, 512]),
}
APPROX_SMOKE_BUDGETS: dict[str, tuple[str, list]] = {
    "performer": ("num_features", [8, 32]),
    "rfa": ("num_features", [8, 32]),
    "linformer": ("proj_dim", [8, 32]),
    "clustered": ("num_clusters", [4, 16]),
    "reformer": ("n_hashes", [1, 2]),
    "memory_compressed": ("compression", [2, 4]),
    "sliding_window": ("window", [8, 128]),
    "longformer": ("window", [8, 128]),
    "bigbird": ("block_size", [4, 8]),
    "aft": ("window", [4, 16]),
}
APPROX_VARIANTS = ("iid", "smooth")
APPROX_INPUT_DOC = {
    "iid": "q, k, v ~ N(0, 1) per entry (logits ~ N(0, 1): flat attention)",
    "smooth": "trained-like: AR(1) channels (rho 0.95), k = q + 0.3 noise; self logit ~ sqrt(d), distant ~ N(0, 1)",
}

DEFAULTS: dict[str, Any] = {
    "mechanisms": "all",
    "include_sdpa_direct": True,
    "seq_lens": [1024, 2048, 4096, 8192, 16384],
    "passes": list(PASSES),
    "batch": 2,
    "heads": 4,
    "head_dim": 32,
    "dtype": "float32",
    "device": "auto",
    "cpu_allocator": "default",
    "repeats": 5,
    "warmup": 2,
    "memory_budget_gb": 6.0,
    "max_cell_s": None,
    "params": {},
    "slope_range": [2048, 16384],
    "approx": {"enabled": True, "n": 1024, "seeds": 3, "batch": 1, "variants": list(APPROX_VARIANTS),
               "budgets": "default"},
    "peers": {"enabled": True, "seq_lens": [1024, 4096]},
    "results_dir": "results",
    "reuse": True,
    "smoke": False,
    "progress": True,
    "print_table": True,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def resolve_settings(cfg: dict | None = None) -> dict[str, Any]:
    """Defaults, then the user's ``cfg``; with ``smoke`` set, tiny sizes replace every value left at its default."""
    user = dict(cfg or {})
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown benchmark setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    settings = merge_settings(DEFAULTS, user)
    if settings["smoke"]:
        settings = _apply_smoke(settings, user, DEFAULTS, SMOKE_OVERRIDES)
    if settings["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {settings['dtype']!r}")
    if settings["cpu_allocator"] not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {settings['cpu_allocator']!r}")
    bad = [p for p in settings["passes"] if p not in PASSES]
    if bad:
        raise ValueError(f"passes must be among {PASSES}, got {bad}")
    if settings["device"] == "auto":
        settings["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    settings["seq_lens"] = sorted(int(n) for n in settings["seq_lens"])
    settings["params"] = dict(settings["params"] or {})
    return settings


def _apply_smoke(settings: dict, user: dict, defaults: dict, smoke: dict) -> dict:
    # A Hydra config hands over every key, so "left at its default" means "equal to the default".
    out = dict(settings)
    for key, value in smoke.items():
        given = user.get(key, defaults[key])
        if isinstance(value, dict):
            out[key] = _apply_smoke(out[key], given if isinstance(given, dict) else {}, defaults[key], value)
        elif key not in user or given == defaults[key]:
            out[key] = value
    return out


def select_mechanisms(requested: str | Sequence[str]) -> list[str]:
    """``"all"`` -> every registered mechanism; otherwise the listed names, checked against the registry."""
    registered = available_attentions()
    if isinstance(requested, str):
        if requested == "all":
            return registered
        requested = [requested]
    unknown = [m for m in requested if m not in registered and m != SDPA_DIRECT]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; registered: {', '.join(registered)}")
    return list(requested)


def mechanism_params(name: str, n: int, settings: dict) -> dict[str, Any]:
    """Constructor keywords for ``name`` at length ``n``: benchmark settings, then the user's ``params``."""
    if name == SDPA_DIRECT:
        return {}
    table = SMOKE_SETTINGS if settings["smoke"] else BENCH_SETTINGS
    params = dict(table.get(name, {}))
    params.update(dict(settings["params"].get(name, {}) or {}))
    if get_attention_info(name).needs_max_seq_len and params.get("max_seq_len") is None:
        params["max_seq_len"] = n
    params["num_heads"] = settings["heads"]
    params["head_dim"] = settings["head_dim"]
    return params


# ----------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's 'can't allocate' RuntimeErrors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or any(
            s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
        )
    return False


def make_inputs(shape: tuple[int, ...], settings: dict, seed: int, requires_grad: bool) -> list[torch.Tensor]:
    """Three N(0, 1) tensors of ``shape`` on the benchmark's device and dtype (drawn on CPU for reproducibility)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[settings["dtype"]]
    tensors = [torch.randn(shape, generator=gen).to(device=settings["device"], dtype=dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def measure_forward(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], pass_: str,
                    settings: dict) -> dict[str, Any]:
    """Time and peak memory of ``forward()`` (``fwd``, under no_grad) or of it plus ``out.sum().backward()``.

    ``leaves`` are the tensors whose gradients the step creates (inputs, parameters): they are
    cleared before each timed step and before the memory step, outside the measurement, so
    every measured step allocates its gradients afresh. Raises what the step raises.
    """

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    if pass_ == "fwd+bwd":

        def step():
            clear_grads()
            forward().sum().backward()

    else:

        def step():
            with torch.no_grad():
                forward()

    device = settings["device"]
    try:
        timing = time_fn(step, device, warmup=settings["warmup"], repeats=settings["repeats"])
        # Freed here, outside the measured step: the CPU profiler cannot see frees of memory
        # allocated before it starts.
        clear_grads()
        _, reading = measure_peak_memory(step, device)
    finally:
        clear_grads()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {
        "time": {k: timing[k] for k in ("median_s", "p10_s", "p90_s", "times_s")},
        "memory": {"peak_bytes": reading.peak_bytes, "method": reading.method},
    }


def measure_cell(name: str, n: int, pass_: str, settings: dict) -> dict[str, Any]:
    """Time and peak memory of one (mechanism, n, pass); never raises for a mechanism's failure."""
    params = mechanism_params(name, n, settings)
    result: dict[str, Any] = {"outcome": "ok", "reason": None, "params": _jsonable_params(params)}
    shape = (settings["batch"], settings["heads"], n, settings["head_dim"])
    try:
        q, k, v = make_inputs(shape, settings, seed=1234 + n, requires_grad=pass_ == "fwd+bwd")
        if name == SDPA_DIRECT:
            module, attend = None, F.scaled_dot_product_attention
        else:
            module = build_attention(name, **params).to(device=settings["device"], dtype=DTYPES[settings["dtype"]])
            attend = module.eval()
    except ValueError as exc:
        return {**result, "outcome": "error", "reason": f"settings rejected: {exc}"}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, not raised
        return {**result, **_failure(exc)}
    leaves = [q, k, v] + ([p for p in module.parameters() if p.requires_grad] if module is not None else [])
    try:
        measured = measure_forward(lambda: attend(q, k, v), leaves, pass_, settings)
    except Exception as exc:  # noqa: BLE001
        return {**result, **_failure(exc)}
    backend = getattr(module, "backend", "torch") if module is not None else "sdpa"
    return {**result, **measured, "backend": backend}


def _failure(exc: BaseException) -> dict[str, Any]:
    if is_out_of_memory(exc):
        return {"outcome": "oom", "reason": f"out of memory: {_short(exc)}"}
    if isinstance(exc, ValueError):
        return {"outcome": "unsupported", "reason": _short(exc)}
    return {"outcome": "error", "reason": f"{type(exc).__name__}: {_short(exc)}"}


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def _jsonable_params(params: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def record_outcome(record: dict) -> str:
    """A bench record's outcome: its ``status`` (records written before the store knew ``skipped_budget``
    kept the real outcome in an ``outcome`` field beside a stand-in ``oom`` status)."""
    return str(record.get("outcome") or record["status"])


# ----------------------------------------------------------------------------------------------
# Budget prediction (skip cells that would not fit)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def cell_record_id(name: str, n: int, pass_: str, key: str) -> str:
    """Record id: readable prefix + hash of every setting that changes the numbers."""
    pass_tag = "fwd" if pass_ == "fwd" else "fwdbwd"
    return f"{name.replace('_', '-')}.{pass_tag}.n{n}.{key}"


def _cell_key(name: str, n: int, pass_: str, settings: dict, params: dict) -> str:
    key = {
        "mechanism": name, "n": n, "pass": pass_, "params": _jsonable_params(params),
        "batch": settings["batch"], "heads": settings["heads"], "head_dim": settings["head_dim"],
        "dtype": settings["dtype"], "device": settings["device"], "repeats": settings["repeats"],
        "warmup": settings["warmup"],
    }
    # Only a non-default allocator policy enters the key, so cells recorded before the option existed stay valid.
    allocator = settings.get("cpu_allocator_used", "default")
    if allocator != "default":
        key["cpu_allocator"] = allocator
    return config_hash(key)


def run_benchmark(cfg: dict | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the efficiency scan (and the approximation errors and peers when enabled).

    Returns the efficiency cells as a DataFrame (one row per mechanism, n, pass). Existing
    records with the same settings are reused when ``reuse`` is set (except ``error`` cells,
    which are retried).
    """
    settings = resolve_settings(cfg)
    mechanisms = select_mechanisms(settings["mechanisms"])
    if settings["include_sdpa_direct"] and "full" in mechanisms and SDPA_DIRECT not in mechanisms:
        mechanisms.insert(mechanisms.index("full") + 1, SDPA_DIRECT)
    info = device_info(settings["device"])
    settings["cpu_allocator_used"] = configure_cpu_allocator(settings["cpu_allocator"])
    root = settings["results_dir"]
    budget_bytes = float(settings["memory_budget_gb"]) * 1e9 if settings["memory_budget_gb"] else math.inf
    rows = []
    cells = [(m, p) for m in mechanisms for p in settings["passes"]]
    total = len(cells) * len(settings["seq_lens"])
    bar = _progress(total, "bench", settings["progress"])
    for name, pass_ in cells:
        done_ns: list[int] = []
        done_mem: list[float] = []
        done_time: list[float] = []
        stop_reason: str | None = None
        for n in settings["seq_lens"]:
            bar.set_postfix_str(f"{name} {pass_} n={n}")
            params = mechanism_params(name, n, settings)
            key = _cell_key(name, n, pass_, settings, params)
            record_id = cell_record_id(name, n, pass_, key)
            old = find_record(root, "bench", record_id) if settings["reuse"] else None
            if old is not None and record_outcome(old) in REUSABLE:
                record = old
            else:
                cell = _plan_or_measure(name, n, pass_, settings, done_ns, done_mem, done_time, budget_bytes,
                                        stop_reason)
                record = {
                    "kind": "bench", "record_id": record_id, "status": cell.pop("outcome"),
                    "created_at": now_iso(), "mechanism": name, "family": _family(name), "pass": pass_, "n": n,
                    "batch": settings["batch"], "heads": settings["heads"], "head_dim": settings["head_dim"],
                    "dtype": settings["dtype"], "device": settings["device"],
                    "cpu_allocator": settings["cpu_allocator_used"], "settings_key": key,
                    "smoke": bool(settings["smoke"]), "device_info": info, **cell,
                }
                write_record(record, root)
            outcome = record_outcome(record)
            if outcome == "ok":
                done_ns.append(n)
                done_mem.append(float(record["memory"]["peak_bytes"]))
                done_time.append(float(record["time"]["median_s"]))
            elif outcome == "oom" and stop_reason is None:
                stop_reason = f"not run: out of memory already at n={n}"
            rows.append(_flat_cell(record))
            bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    if settings["approx"].get("enabled", True):
        approximation_errors(settings, mechanisms=[m for m in mechanisms if m != SDPA_DIRECT], log=log)
    if settings["peers"].get("enabled", True):
        from harness import peers

        peers.run_peers(settings, log=log)
    if settings["print_table"]:
        log(format_table(df))
        log(format_derived(df, settings))
    return df


def _plan_or_measure(name, n, pass_, settings, done_ns, done_mem, done_time, budget_bytes, stop_reason):
    if stop_reason is not None:
        params = _jsonable_params(mechanism_params(name, n, settings))
        return {"outcome": "oom", "reason": stop_reason, "params": params}
    predicted_mem = predict_at(done_ns, done_mem, n)
    if predicted_mem is not None and predicted_mem > budget_bytes:
        return {
            "outcome": "skipped_budget",
            "budget": "memory",
            "reason": f"memory, predicted peak {predicted_mem / 1e9:.2f} GB > budget {budget_bytes / 1e9:.2f} GB",
            "predicted_peak_bytes": predicted_mem,
            "params": _jsonable_params(mechanism_params(name, n, settings)),
        }
    max_s = settings.get("max_cell_s")
    predicted_time = predict_at(done_ns, done_time, n)
    if max_s and predicted_time is not None:
        cell_s = predicted_time * (settings["warmup"] + settings["repeats"] + 1)
        if cell_s > float(max_s):
            return {
                "outcome": "skipped_budget",
                "budget": "time",
                "reason": f"time, predicted cell time {cell_s:.0f} s > max_cell_s {float(max_s):.0f} s",
                "params": _jsonable_params(mechanism_params(name, n, settings)),
            }
    return measure_cell(name, n, pass_, settings)


def _family(name: str) -> str:
    return "exact" if name == SDPA_DIRECT else get_attention_info(name).family


def _flat_cell(record: dict) -> dict[str, Any]:
    time_ = record.get("time") or {}
    mem = record.get("memory") or {}
    return {
        "mechanism": record["mechanism"], "family": record.get("family"), "pass": record["pass"],
        "n": record["n"], "outcome": record_outcome(record), "reason": record.get("reason"),
        "median_s": time_.get("median_s"), "p10_s": time_.get("p10_s"), "p90_s": time_.get("p90_s"),
        "peak_bytes": mem.get("peak_bytes"), "memory_method": mem.get("method"),
    }


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


# ----------------------------------------------------------------------------------------------
# Derived figures (pure functions, unit-tested on synthetic data)
# ----------------------------------------------------------------------------------------------


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
    through the largest measured point: n* = n_last * (budget / m_last)^(1/slope).
    """
    pts = sorted((float(n), float(m)) for n, m in zip(ns, peak_bytes) if m is not None and np.isfinite(float(m)))
    fitting = [n for n, m in pts if m <= budget_bytes]
    measured = max(fitting) if fitting else float("nan")
    slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts], n_range)
    if not pts or not np.isfinite(slope) or slope <= 0:
        return {"measured": measured, "extrapolated": float("nan"), "slope": slope}
    n_last, m_last = pts[-1]
    return {"measured": measured, "extrapolated": n_last * (budget_bytes / m_last) ** (1.0 / slope), "slope": slope}


def derived_table(df: pd.DataFrame, slope_range: Sequence[float] = (2048, 16384),
                  budget_bytes: float | None = None) -> pd.DataFrame:
    """Per mechanism and pass: time and memory slopes, crossover vs ``full``, longest n within the budget."""
    rows = []
    ok = df[df["outcome"] == "ok"]
    full = ok[ok["mechanism"] == "full"]
    for (name, pass_), group in df.groupby(["mechanism", "pass"], sort=False):
        g = group[group["outcome"] == "ok"].sort_values("n")
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
            row.update(max_n_measured=fit["measured"], max_n_extrapolated=fit["extrapolated"])
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Approximation error against exact attention
# ----------------------------------------------------------------------------------------------


def approx_inputs(variant: str, batch: int, heads: int, n: int, head_dim: int, seed: int):
    """Inputs for the approximation error.

    ``iid``: q, k, v ~ N(0, 1) per entry: logits q.k/sqrt(d) ~ N(0, 1), a flat attention map.
    ``smooth``: "trained-like": each channel an AR(1) sequence (rho = 0.95, unit variance) so
    neighbouring tokens are similar, and k = q + 0.3 * noise: a query's logit with itself is
    ~ sqrt(d) (5.7 at d = 32), with distant tokens ~ N(0, 1). Trained attention maps are local
    and peaked; this puts most of the mass near the diagonal, the regime sparse, hashing and
    clustering mechanisms are designed for.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(batch, heads, n, head_dim, generator=gen)

    if variant == "iid":
        return randn(), randn(), randn()
    if variant != "smooth":
        raise ValueError(f"approximation input variant must be one of {APPROX_VARIANTS}, got {variant!r}")
    rho = 0.95
    noise = randn()
    x = torch.empty_like(noise)
    x[:, :, 0] = noise[:, :, 0]
    scale = math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, :, t] = rho * x[:, :, t - 1] + scale * noise[:, :, t]
    return x, x + 0.3 * randn(), randn()


def exact_reference(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention that ``name`` approximates, in float64 (returned as float32).

    Softmax attention ``softmax(q k^T / sqrt(d)) v`` for every mechanism except shared-QK ones
    (reformer): their exact counterpart is shared-QK softmax attention with unit-normalised keys
    and no attention to self (score -1e5, Kitaev et al. 2020), so their error measures the LSH
    restriction alone, not the change of attention function.
    """
    q, k, v = q.double(), k.double(), v.double()
    if not get_attention_info(name).shared_qk:
        return F.scaled_dot_product_attention(q, k, v).float()
    keys = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    eye = torch.eye(q.shape[-2], dtype=torch.bool)
    scores = scores.masked_fill(eye, -1e5)
    return (torch.softmax(scores, dim=-1) @ v).float()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||approx - exact||_F / ||exact||_F."""
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))


def approximation_errors(settings: dict, mechanisms: Sequence[str] | None = None,
                         log: Callable[[str], None] = print) -> pd.DataFrame:
    """Relative error against exact softmax attention per mechanism, budget value and input variant.

    Computed on CPU in fp32 on ``approx.n`` tokens, averaged over ``approx.seeds`` seeds
    (the seed draws the inputs and the mechanism's random state), against :func:`exact_reference`.
    On iid inputs the exact output averages many values and has a small norm, so a mechanism
    that averages few (a narrow window) can exceed relative error 1. Linformer's E/F, the
    memory-compressed convolution and AFT's position biases are untrained (random init):
    their error is that of an untrained layer, an upper bound of what training reaches.
    """
    acfg = settings["approx"]
    table = APPROX_SMOKE_BUDGETS if acfg.get("budgets") == "smoke" else APPROX_BUDGETS
    names = [m for m in (mechanisms or available_attentions()) if m in table]
    n, heads, head_dim, batch = int(acfg["n"]), settings["heads"], settings["head_dim"], int(acfg.get("batch", 1))
    variants = list(acfg.get("variants", APPROX_VARIANTS))
    root = settings["results_dir"]
    todo = [(m, val, var) for m in names for val in table[m][1] for var in variants]
    bar = _progress(len(todo), "approx", settings["progress"])
    rows = []
    for name, value, variant in todo:
        param = table[name][0]
        bar.set_postfix_str(f"{name} {param}={value} {variant}")
        base = mechanism_params(name, n, settings)
        if param == "window" and name == "aft":
            base["mode"] = "local"
        base[param] = value
        key = config_hash({"m": name, "params": _jsonable_params(base), "n": n, "variant": variant,
                           "seeds": acfg["seeds"], "batch": batch,
                           "reference": "shared_qk" if get_attention_info(name).shared_qk else "softmax"})
        record_id = f"{name.replace('_', '-')}.{param}={value}.n{n}.{variant}.{key}"
        old = find_record(root, "approx", record_id) if settings["reuse"] else None
        if old is not None and old["status"] != "error":
            record = old
        else:
            errors, status, reason = [], "ok", None
            try:
                for seed in range(int(acfg["seeds"])):
                    q, k, v = approx_inputs(variant, batch, heads, n, head_dim, seed)
                    if get_attention_info(name).shared_qk:
                        k = q  # as the backbone ties them; the reference is the same shared-QK attention
                    exact = exact_reference(name, q, k, v)
                    attn = build_attention(name, **{**base, "seed": seed}).eval()
                    with torch.no_grad():
                        errors.append(relative_error(attn(q, k, v), exact))
            except Exception as exc:  # noqa: BLE001
                failure = _failure(exc)
                status, reason = failure["outcome"], failure["reason"]
            record = {
                "kind": "approx", "record_id": record_id, "status": status, "created_at": now_iso(),
                "mechanism": name, "family": _family(name), "param": param, "value": value, "n": n,
                "variant": variant, "heads": heads, "head_dim": head_dim, "batch": batch,
                "seeds": int(acfg["seeds"]), "params": _jsonable_params(base), "reason": reason,
                "errors": errors, "error_mean": float(np.mean(errors)) if errors and status == "ok" else None,
                "error_std": float(np.std(errors)) if errors and status == "ok" else None,
                "smoke": bool(settings["smoke"]),
                "inputs": APPROX_INPUT_DOC[variant],
            }
            write_record(record, root)
        rows.append({k: record.get(k) for k in ("mechanism", "param", "value", "variant", "status", "error_mean",
                                                 "error_std", "reason")})
        bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def format_cell(row: pd.Series) -> str:
    """``"12.3 ms / 45.6 MB"`` for an ok cell, else the outcome (never a zero)."""
    if row["outcome"] != "ok":
        return {"skipped_budget": "skip(budget)"}.get(row["outcome"], row["outcome"])
    return f"{row['median_s'] * 1e3:.1f}ms/{row['peak_bytes'] / 2**20:.1f}MiB"


def format_table(df: pd.DataFrame) -> str:
    """One block per pass: mechanisms x n, each cell 'time / peak memory' or why it is missing."""
    if df.empty:
        return "(no benchmark cells)"
    blocks = []
    for pass_, group in df.groupby("pass", sort=False):
        cells = group.assign(cell=group.apply(format_cell, axis=1))
        table = cells.pivot_table(index="mechanism", columns="n", values="cell", aggfunc="first", sort=False)
        method = group["memory_method"].dropna().unique()
        blocks.append(f"pass={pass_}  (median time / peak memory, memory method: {', '.join(method) or '-'})\n"
                      + table.to_string())
    return "\n\n".join(blocks)


def format_derived(df: pd.DataFrame, settings: dict) -> str:
    """Slopes, crossovers and the sdpa_direct overhead as text."""
    if df.empty:
        return ""
    from harness.report import derived_display  # the report's formatting: missing figures say why

    budget = float(settings["memory_budget_gb"] or 0) * 1e9 or None
    derived = derived_display(df, settings.get("slope_range", (2048, 16384)), budget)
    lines = [f"log-log slopes over n in {list(settings.get('slope_range'))}, crossover vs full, "
             f"longest n within {settings['memory_budget_gb']} GB:", derived.to_string(index=False)]
    overhead = full_overhead(df)
    if not overhead.empty:
        lines.append("full (registry) vs sdpa_direct, time ratio - 1:")
        lines.append(overhead.to_string(index=False, float_format=lambda x: f"{x:+.1%}"))
    return "\n".join(lines)


def full_overhead(df: pd.DataFrame) -> pd.DataFrame:
    """Per pass and n: t(full through the registry) / t(sdpa_direct) - 1."""
    ok = df[df["outcome"] == "ok"]
    a = ok[ok["mechanism"] == "full"].set_index(["pass", "n"])["median_s"]
    b = ok[ok["mechanism"] == SDPA_DIRECT].set_index(["pass", "n"])["median_s"]
    joined = pd.concat({"full": a, "direct": b}, axis=1).dropna()
    if joined.empty:
        return pd.DataFrame()
    joined["overhead"] = joined["full"] / joined["direct"] - 1
    return joined.reset_index()[["pass", "n", "overhead"]]


# ----------------------------------------------------------------------------------------------
# Hydra entry point
# ----------------------------------------------------------------------------------------------


def main() -> None:
    """``arena-bench``: Hydra app over conf/bench.yaml."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="bench", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        run_benchmark(OmegaConf.to_container(cfg, resolve=True))

    _app()


if __name__ == "__main__":
    main()
