"""One benchmark cell: (mechanism, n, pass) -> time and peak memory, or the reason it has no number.

The mechanism alone is measured on already projected ``q, k, v`` of shape
``(batch, heads, n, head_dim)``; ``sdpa_direct`` calls ``torch.nn.functional.scaled_dot_product_attention``
directly, to show what the registry's ``full`` costs on top of the kernel.

Owns: a cell's constructor keywords, its measurement, its record id and key, its flat row.
Imports: ``attentions`` (the registry), :mod:`harness.measure`, :mod:`harness.store` (the key hash),
:mod:`harness.analysis` (the ``sdpa_direct`` name), :mod:`harness.bench.settings`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F

from attentions import available_attentions, build_attention, causal_attentions, get_attention_info, make_config
from attentions.registry import check_causal
from harness.analysis import SDPA_DIRECT
from harness.bench.settings import BENCH_SETTINGS, SMOKE_SETTINGS, BenchSettings
from harness.measure import DTYPES, failure_outcome, jsonable_params, measure_step, random_inputs
from harness.store import config_hash

OUTCOMES = ("ok", "oom", "unsupported", "error", "skipped_budget")
# Outcomes a re-run takes from the store; errors are retried and budget skips re-planned.
REUSABLE = ("ok", "oom", "unsupported")


def select_mechanisms(requested: str | Sequence[str], causal: bool = False) -> list[str]:
    """``"all"`` -> every registered mechanism (``causal``: every one that supports causal); otherwise the
    listed names, checked against the registry (a listed mechanism without a causal form gets an
    ``unsupported`` cell that says why)."""
    registered = available_attentions()
    if isinstance(requested, str):
        if requested == "all":
            return causal_attentions() if causal else registered
        requested = [requested]
    unknown = [m for m in requested if m not in registered and m != SDPA_DIRECT]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; registered: {', '.join(registered)}")
    return list(requested)


def mechanism_params(name: str, n: int, settings: BenchSettings) -> dict[str, Any]:
    """Constructor keywords for ``name`` at length ``n``: benchmark settings, then the user's ``params``."""
    if name == SDPA_DIRECT:
        return {}
    table = SMOKE_SETTINGS if settings.smoke else BENCH_SETTINGS
    params = dict(table.get(name, {}))
    params.update(dict(settings.params.get(name, {}) or {}))
    if get_attention_info(name).needs_max_seq_len and params.get("max_seq_len") is None:
        params["max_seq_len"] = n
    params["num_heads"] = settings.heads
    params["head_dim"] = settings.head_dim
    if settings.causal:
        params["causal"] = True
    return params


def check_params(settings: BenchSettings) -> None:
    """Check ``settings.params`` before anything is measured: every key a registered mechanism, every value a
    mapping its config accepts at each length of ``seq_lens`` (the benchmark's settings, then the user's, as
    :func:`mechanism_params` builds them). Raises ValueError naming the mechanism and the registry's reason
    (an unknown parameter's message lists the allowed ones)."""
    params = dict(settings.params or {})
    registered = available_attentions()
    unknown = sorted(str(m) for m in set(params) - set(registered))
    if unknown:
        raise ValueError(f"params: unknown mechanism(s) {unknown}; registered: {', '.join(registered)}")
    for name, given in params.items():
        if not isinstance(given, dict):
            raise ValueError(f"params.{name} must map parameter names to values, e.g. "
                             f"'+params={{{name}:{{...}}}}', got {given!r}")
        for n in settings.seq_lens:
            keywords = mechanism_params(name, n, settings)
            keywords.pop("causal", None)  # a listed mechanism without a causal form gets an `unsupported` cell
            try:
                make_config(name, **keywords)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"params.{name} {given}: {exc}") from None


def make_inputs(shape: tuple[int, ...], settings: BenchSettings, seed: int, requires_grad: bool) -> list:
    """Three N(0, 1) tensors of ``shape`` on the benchmark's device and dtype (drawn on CPU for reproducibility)."""
    return random_inputs(shape, settings.device, settings.dtype, seed, requires_grad)


def measure_forward(forward, leaves, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """:func:`harness.measure.measure_step` with the benchmark's device, warm-up and repeats."""
    return measure_step(forward, leaves, pass_, settings.device, settings.warmup, settings.repeats)


def measure_cell(name: str, n: int, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """Time and peak memory of one (mechanism, n, pass); never raises for a mechanism's failure."""
    params = mechanism_params(name, n, settings)
    result: dict[str, Any] = {"outcome": "ok", "reason": None, "params": jsonable_params(params)}
    if settings.causal and name != SDPA_DIRECT:
        try:
            check_causal(name, True)
        except ValueError as exc:
            return {**result, "outcome": "unsupported", "reason": str(exc)}
    shape = (settings.batch, settings.heads, n, settings.head_dim)
    try:
        q, k, v = make_inputs(shape, settings, seed=1234 + n, requires_grad=pass_ == "fwd+bwd")
        if name == SDPA_DIRECT:
            module, attend = None, functools.partial(F.scaled_dot_product_attention, is_causal=settings.causal)
        else:
            module = build_attention(name, **params).to(device=settings.device, dtype=DTYPES[settings.dtype])
            attend = module.eval()
    except ValueError as exc:
        return {**result, "outcome": "error", "reason": f"settings rejected: {exc}"}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, not raised
        return {**result, **failure_outcome(exc)}
    leaves = [q, k, v] + ([p for p in module.parameters() if p.requires_grad] if module is not None else [])
    try:
        measured = measure_forward(lambda: attend(q, k, v), leaves, pass_, settings)
    except Exception as exc:  # noqa: BLE001
        return {**result, **failure_outcome(exc)}
    backend = getattr(module, "backend", "torch") if module is not None else "sdpa"
    return {**result, **measured, "backend": backend}


def record_outcome(record: dict) -> str:
    """A bench record's outcome: its ``status`` (records written before the store knew ``skipped_budget``
    kept the real outcome in an ``outcome`` field beside a stand-in ``oom`` status)."""
    return str(record.get("outcome") or record["status"])


def cell_record_id(name: str, n: int, pass_: str, key: str) -> str:
    """Record id: readable prefix + hash of every setting that changes the numbers."""
    pass_tag = "fwd" if pass_ == "fwd" else "fwdbwd"
    return f"{name.replace('_', '-')}.{pass_tag}.n{n}.{key}"


def cell_key(name: str, n: int, pass_: str, settings: BenchSettings, params: dict) -> str:
    """Hash of every setting that changes a cell's numbers (the store reuses a cell with the same key)."""
    key = {
        "mechanism": name, "n": n, "pass": pass_, "params": jsonable_params(params),
        "batch": settings.batch, "heads": settings.heads, "head_dim": settings.head_dim,
        "dtype": settings.dtype, "device": settings.device, "repeats": settings.repeats,
        "warmup": settings.warmup,
    }
    # Only the causal pattern enters the key (as for the allocator), so bidirectional cells recorded before
    # the option existed stay valid; sdpa_direct has no params to carry it.
    if settings.causal:
        key["pattern"] = settings.pattern
    # Only a non-default allocator policy enters the key, so cells recorded before the option existed stay valid.
    if settings.cpu_allocator_used != "default":
        key["cpu_allocator"] = settings.cpu_allocator_used
    return config_hash(key)


def family(name: str) -> str:
    """The mechanism's family from the registry (``exact`` for ``sdpa_direct``)."""
    return "exact" if name == SDPA_DIRECT else get_attention_info(name).family


def flat_cell(record: dict) -> dict[str, Any]:
    """A bench record as one row of the cell frame (the columns :mod:`harness.analysis` reads)."""
    time_ = record.get("time") or {}
    mem = record.get("memory") or {}
    return {
        "mechanism": record["mechanism"], "family": record.get("family"),
        "pattern": record.get("pattern") or "bidirectional", "pass": record["pass"],
        "n": record["n"], "outcome": record_outcome(record), "reason": record.get("reason"),
        "median_s": time_.get("median_s"), "p10_s": time_.get("p10_s"), "p90_s": time_.get("p90_s"),
        "peak_bytes": mem.get("peak_bytes"), "memory_method": mem.get("method"),
        "noisy": bool((record.get("noise") or {}).get("noisy")),
    }
