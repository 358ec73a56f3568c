"""One benchmark cell: (mechanism, n, pass) -> time and peak memory, or the reason it has no number.

The mechanism alone is measured on already projected ``q, k, v`` of shape
``(batch, heads, n, head_dim)``; ``sdpa_direct`` calls ``torch.nn.functional.scaled_dot_product_attention``
directly, to show what the registry's ``full`` costs on top of the kernel; ``full_reference`` is the registry's
``full`` with ``backend=reference`` (the materialised ``n x n`` softmax matrix, LRA Table 2's baseline), a named
variant so that both exact baselines are rows of one run (a ``params`` override would replace ``full``'s row).

Owns: a cell's constructor keywords, its measurement (the cells of one length and pass together, in
interleaved rounds), its record id and key, its flat row.
Imports: ``attentions`` (the registry), :mod:`harness.measure`, :mod:`harness.store` (the key hash),
:mod:`harness.analysis` (the ``sdpa_direct`` name), :mod:`harness.bench.settings`, :mod:`harness.plugins`
(how an unknown mechanism is registered).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from attentions import available_attentions, build_attention, causal_attentions, get_attention_info, make_config
from attentions.registry import check_causal
from harness.analysis import FULL_REFERENCE, SDPA_DIRECT
from harness.bench.protocol import PROJECTED, mask_text, protocol
from harness.bench.settings import BENCH_SETTINGS, SMOKE_SETTINGS, BenchSettings
from harness.measure import (
    DTYPES,
    failure_outcome,
    jsonable_params,
    make_step,
    measure_step,
    random_inputs,
    release,
    step_peak,
    time_rounds,
)
from harness.plugins import plugin_hint
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
    unknown = [m for m in requested if m not in registered and m not in (SDPA_DIRECT, FULL_REFERENCE)]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; registered: {', '.join(registered)}. "
                         + plugin_hint(unknown))
    return list(requested)


def mechanism_params(name: str, n: int, settings: BenchSettings) -> dict[str, Any]:
    """Constructor keywords for ``name`` at length ``n``: benchmark settings, then the user's ``params``."""
    if name == SDPA_DIRECT:
        return {}
    if name == FULL_REFERENCE:
        return {**mechanism_params("full", n, settings), "backend": "reference"}
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
        raise ValueError(f"params: unknown mechanism(s) {unknown}; registered: {', '.join(registered)}. "
                         + plugin_hint(unknown))
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
    return measure_cells([name], n, pass_, settings)[name]


@dataclass
class _Ready:
    """A cell built and ready to run: its result so far, its step, what clears the step's gradients, and its
    module (None for ``sdpa_direct``), whose ``backend`` is known once it has run."""

    result: dict[str, Any]
    step: Callable[[], None]
    clear_grads: Callable[[], None]
    module: Any

    @property
    def backend(self) -> str:
        return getattr(self.module, "backend", "torch") if self.module is not None else "sdpa"


def measure_cells(names: Sequence[str], n: int, pass_: str, settings: BenchSettings) -> dict[str, dict[str, Any]]:
    """Time and peak memory of several mechanisms at one (n, pass), timed in interleaved rounds
    (:func:`harness.measure.time_rounds`: each repeat of each mechanism in turn, so a burst of load hits the
    same round of every mechanism), then each one's memory step. Every mechanism gets the same inputs.

    Returns ``{name: cell}`` in the order of ``names``; a cell is ``{"outcome": "ok", "reason": None,
    "params", "time", "memory", "backend"}`` or a failure outcome with its reason. Never raises for a
    mechanism's failure."""
    out: dict[str, dict[str, Any]] = {}
    try:
        shape = (settings.batch, settings.heads, n, settings.head_dim)
        inputs = make_inputs(shape, settings, seed=1234 + n, requires_grad=pass_ == "fwd+bwd")
    except Exception as exc:  # noqa: BLE001 - the inputs alone do not fit: every cell says so
        inputs, out = None, {m: {"outcome": "ok", "reason": None, "params": _params(m, n, settings),
                                 **failure_outcome(exc)} for m in names}
    ready: dict[str, _Ready] = {}
    for name in names if inputs is not None else ():
        cell = _prepare(name, n, pass_, settings, inputs)
        if isinstance(cell, _Ready):
            ready[name] = cell
        else:
            out[name] = cell
    timings = time_rounds([r.step for r in ready.values()], settings.device, settings.warmup, settings.repeats)
    for (name, cell), timing in zip(ready.items(), timings):
        out[name] = _finish(cell, timing, settings.device)
        if out[name]["outcome"] == "ok":
            out[name]["protocol"] = cell_protocol(out[name]["backend"], pass_, settings)
    return {name: out[name] for name in names}


def cell_protocol(backend: str, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """A cell's fairness-protocol fields (:mod:`harness.bench.protocol`, docs/FAIRNESS.md)."""
    return protocol(layout=PROJECTED, masks=mask_text(settings.causal), backend=backend, warmup=settings.warmup,
                    repeats=settings.repeats, cpu_allocator=settings.cpu_allocator_used, pass_=pass_)


def _params(name: str, n: int, settings: BenchSettings) -> dict[str, Any]:
    return jsonable_params(mechanism_params(name, n, settings))


def unsupported_reason(name: str, settings: BenchSettings) -> str | None:
    """Why ``name`` cannot run in this benchmark's pattern at any length (no causal form), else None."""
    if settings.causal and name != SDPA_DIRECT:
        try:
            check_causal(registry_name(name), True)
        except ValueError as exc:
            return str(exc)
    return None


def _prepare(name: str, n: int, pass_: str, settings: BenchSettings, inputs: list) -> _Ready | dict[str, Any]:
    """The cell's module and step, or its failure outcome (no causal form, constructor refused, ...)."""
    params = mechanism_params(name, n, settings)
    result: dict[str, Any] = {"outcome": "ok", "reason": None, "params": jsonable_params(params)}
    why = unsupported_reason(name, settings)
    if why is not None:
        return {**result, "outcome": "unsupported", "reason": why}
    q, k, v = inputs
    try:
        if name == SDPA_DIRECT:
            module, attend = None, functools.partial(F.scaled_dot_product_attention, is_causal=settings.causal)
        else:
            module = build_attention(registry_name(name), **params).to(device=settings.device,
                                                                       dtype=DTYPES[settings.dtype])
            attend = module.eval()
    except ValueError as exc:
        return {**result, "outcome": "error", "reason": f"settings rejected: {exc}"}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, not raised
        return {**result, **failure_outcome(exc)}
    leaves = [q, k, v] + ([p for p in module.parameters() if p.requires_grad] if module is not None else [])
    step, clear_grads = make_step(lambda: attend(q, k, v), leaves, pass_)
    return _Ready(result, step, clear_grads, module)


def _finish(cell: _Ready, timing: dict[str, Any] | Exception, device: str) -> dict[str, Any]:
    """The measured cell: its round times and then its memory step, or the outcome of its failure."""
    if isinstance(timing, Exception):
        release(cell.clear_grads, device)
        return {**cell.result, **failure_outcome(timing)}
    try:
        reading = step_peak(cell.step, cell.clear_grads, device)
    except Exception as exc:  # noqa: BLE001
        return {**cell.result, **failure_outcome(exc)}
    return {**cell.result, "time": {k: timing[k] for k in ("median_s", "p10_s", "p90_s", "times_s")},
            "memory": {"peak_bytes": reading.peak_bytes, "method": reading.method}, "backend": cell.backend}


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


def registry_name(name: str) -> str:
    """The registered mechanism a cell's row builds: ``full`` for ``full_reference``, else ``name``."""
    return "full" if name == FULL_REFERENCE else name


def family(name: str) -> str:
    """The mechanism's family from the registry (``exact`` for ``sdpa_direct`` and ``full_reference``)."""
    return "exact" if name == SDPA_DIRECT else get_attention_info(registry_name(name)).family


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
