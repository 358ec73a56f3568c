"""``arena-bench mode=decode``: incremental decoding, time per generated token and state bytes against context.

    arena-bench mode=decode                                            # CPU: contexts 1K..64K, batch 1 and 8
    arena-bench mode=decode mechanisms=[full,performer] decode.scopes=[mechanism] decode.batches=[1]

For every causal mechanism, scope (``mechanism``: the mechanism alone on projected q, k, v of ``heads`` x
``head_dim``; ``model``: a whole ArenaModel at each of ``decode.model_sizes``, :mod:`harness.bench.decode_models`),
batch and context, one cell (:mod:`harness.bench.decode_cells`): the prefill time of a random prompt, ms per
generated token (median, p10, p90 over ``decode.tokens`` steps), tokens/s, the state's bytes per sequence and its
allocated capacity, and the allocator peak of a step. A mechanism with its own step form is also measured in the
recompute form at ``decode.recompute_contexts`` (4K), for its speed-up over recomputation. A mechanism without a
causal form gets ``unsupported`` cells naming why. Grouped-query attention (issue 26): the mechanism scope has one
row per ``decode.num_kv_heads`` entry (None = ``heads``; 1 = multi-query), the mechanism built with it; a model's
key-value heads come from its size's recipe (``mqar_causal_mqa``); every cell records ``num_kv_heads`` and
``kv_heads``, and a mechanism that refuses grouped keys and values (its info's ``grouped_kv``) gets
``unsupported`` cells saying why. Records: kind ``decode`` (fields: /work/wt/DECODE_SCHEMA.md,
docs/DECODING.md), reused on a re-run like the efficiency scan's cells.

The guard, per row (mechanism, scope, size, form, batch): every cell is predicted before it runs from the row's two
nearest contexts below it (the first from two short probes, 256 and 512 tokens or a quarter and a half of a
shorter context, on one CPU thread), by :func:`harness.analysis.predict_at` (power law, exponent clamped to
[1, 3]): its prefill time, its step time and its memory (state capacity plus a step's peak). A cell predicted
over ``memory_budget_gb`` is skipped; one whose steps alone exceed ``max_cell_s`` is skipped with its prediction
(the recompute form at long contexts: each of its steps is a whole causal forward); one whose prefill would take
it over the limit builds its state directly (``state_filled: "random"``,
:meth:`attentions.decoding.DecodeState.fill_random`; a step's time depends on the state's shapes and lengths,
not on its values), and says so in ``state_note``.

CUDA: every step is timed between two ``torch.cuda.synchronize`` calls, plain launches (``timing_policy: "plain"``:
CUDA graphs are not used, since a state's tensors change shape or are reallocated by some step forms, which a
captured graph cannot follow).

Owns: the decode scan, its guard and its records, the console table. Imports: torch, ``attentions``,
:mod:`harness.bench.cells`, :mod:`harness.bench.decode_cells`, :mod:`harness.bench.decode_models`,
:mod:`harness.bench.guard` (the probes' thread), :mod:`harness.bench.settings`, :mod:`harness.analysis`,
:mod:`harness.measure`, :mod:`harness.store`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from attentions import get_attention_info, make_config
from harness.analysis import DECODE_SPEEDUP_CONTEXT, decode_derived, predict_at
from harness.bench import decode_models
from harness.bench.cells import REUSABLE, mechanism_params, unsupported_reason
from harness.bench.decode_cells import DecodeRun, MechanismRunner, ModelRunner, measure_decode
from harness.bench.guard import PROBE_N, _one_cpu_thread, seconds
from harness.bench.settings import BenchSettings
from harness.display import format_bytes
from harness.measure import (
    DTYPES,
    command_line,
    device_info,
    failure_outcome,
    jsonable_params,
    matmul_flops_per_s,
    progress_bar,
)
from harness.store import config_hash, find_record, now_iso, write_record

PROBE_TOKENS = 4  # timed steps of a probe (the fastest counts), after one warm-up step


@dataclass(frozen=True)
class DecodeRow:
    """A row of the scan (every setting of a cell but its context): the mechanism, scope, model size (None for
    the mechanism alone), batch, whether the recompute form is forced on a mechanism with a step form, and the
    key-value heads (None: as many as the query heads; for a model, what its size's recipe sets)."""

    mechanism: str
    scope: str
    model_size: str | None
    batch: int
    forced_recompute: bool = False
    num_kv_heads: int | None = None

    def label(self) -> str:
        size = f" {self.model_size}" if self.model_size else ""
        kv = f" kv={self.num_kv_heads}" if self.num_kv_heads is not None and self.scope == "mechanism" else ""
        return (f"{self.mechanism}{' (recompute)' if self.forced_recompute else ''} {self.scope}{size}{kv} "
                f"b={self.batch}")


@dataclass(frozen=True)
class Point:
    """A measured context of a row: prefill seconds (None when the state was filled at random), step seconds,
    memory (state capacity + a step's peak, bytes)."""

    context: int
    prefill_s: float | None
    step_s: float
    memory_bytes: float
    probe: bool = False


@dataclass
class Learnt:
    """What a row has learnt: its points, and why it stopped (out of memory at a shorter context)."""

    points: list[Point] = field(default_factory=list)
    stop_reason: str | None = None

    def add(self, point: Point) -> None:
        self.points = sorted([p for p in self.points if p.context != point.context] + [point],
                             key=lambda p: p.context)

    def below(self, context: int) -> list[Point]:
        return [p for p in self.points if p.context < context]


@dataclass(frozen=True)
class Prediction:
    """A cell predicted: prefill seconds, step seconds, the cell's seconds (prefill + every step), memory bytes,
    and the contexts it was predicted from."""

    prefill_s: float | None
    step_s: float | None
    cell_s: float | None
    memory_bytes: float | None
    from_contexts: tuple[int, ...]
    probes: tuple[int, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {"predicted_prefill_s": self.prefill_s, "predicted_step_s": self.step_s,
                "predicted_cell_s": self.cell_s, "predicted_memory_bytes": self.memory_bytes,
                "predicted_from_contexts": list(self.from_contexts), "probes": list(self.probes)}

    def text(self) -> str:
        return (f"predicted prefill {seconds(self.prefill_s)}, {seconds(self.step_s)} per step, from contexts "
                f"{', '.join(str(c) for c in self.from_contexts)}")


# ----------------------------------------------------------------------------------------------
# The scan
# ----------------------------------------------------------------------------------------------


def run_decode(settings: BenchSettings, mechanisms: list[str], log: Callable[[str], None] = print) -> pd.DataFrame:
    """The decode scan over ``mechanisms`` (rows in :func:`rows_of` order, each row's contexts shortest first).
    Returns the records as a DataFrame (one row per cell); prints the table and the derived figures when
    ``print_table``."""
    rows = rows_of(settings, mechanisms)
    total = sum(len(_contexts(row, settings)) for row in rows)
    bar = progress_bar(total, "decode", settings.progress)
    env = _environment(settings)

    def say(line: str) -> None:
        with bar.external_write_mode():
            log(line)

    records = []
    for row in rows:
        learnt = Learnt()
        for context in _contexts(row, settings):
            bar.set_postfix_str(f"{row.label()} context={context}")
            record = _cell(row, context, settings, learnt, env, say)
            records.append(record)
            bar.update(1)
    bar.close()
    df = pd.DataFrame(records)
    if settings.print_table:
        log(format_decode_table(df))
        log(format_decode_derived(df, _speedup_context(settings)))
    return df


def rows_of(settings: BenchSettings, mechanisms: list[str]) -> list[DecodeRow]:
    """Every row: per scope (and model size; the mechanism scope per ``decode.num_kv_heads``), batch and
    mechanism; then the forced recompute rows of the mechanisms with a step form (when
    ``decode.recompute_contexts`` is not empty)."""
    d = settings.decode
    sizes = [(scope, size, kv) for scope in d.scopes
             for size, kvs in ([(None, d.num_kv_heads)] if scope == "mechanism" else
                               [(size, [decode_models.size_kv_heads(size)]) for size in d.model_sizes])
             for kv in kvs]
    rows = [DecodeRow(m, scope, size, b, num_kv_heads=kv) for scope, size, kv in sizes for b in d.batches
            for m in mechanisms]
    if d.recompute_contexts:
        rows += [replace(r, forced_recompute=True) for r in rows if _has_step_form(r.mechanism)]
    return rows


def _has_step_form(name: str) -> bool:
    info = get_attention_info(name)
    return bool(getattr(info, "supports_decoding", False)) and info.supports_causal


def _contexts(row: DecodeRow, settings: BenchSettings) -> list[int]:
    if row.forced_recompute:  # only where the step form is measured too: the speed-up needs both
        return [c for c in settings.decode.recompute_contexts if c in settings.decode.contexts]
    return settings.decode.contexts


def _cell(row: DecodeRow, context: int, settings: BenchSettings, learnt: Learnt, env: dict,
          say: Callable[[str], None]) -> dict:
    """One cell's record: reused, planned away, or measured; written."""
    identity = cell_identity(row, context, settings)
    record_id = decode_record_id(row, context, identity)
    old = find_record(settings.results_dir, "decode", record_id) if settings.reuse else None
    if old is not None and old.get("status") in REUSABLE and not old.get("noisy"):  # a noisy cell: measured again
        _learn(learnt, old)
        return old
    why = _unsupported(row, settings)
    if why is not None:
        return _write(row, context, settings, identity, env, {"outcome": "unsupported", "reason": why})
    if learnt.stop_reason is not None:
        return _write(row, context, settings, identity, env, {"outcome": "oom", "reason": learnt.stop_reason})
    note, prediction = _probe_if_needed(row, context, settings, learnt)
    if learnt.stop_reason is not None:  # a probe ran out of memory
        return _write(row, context, settings, identity, env, {"outcome": "oom", "reason": learnt.stop_reason})
    fill, outcome = decide(prediction, settings, context)
    if outcome is not None:
        say(f"decode: {row.label()} context={context} not measured: {outcome['reason']}")
        return _write(row, context, settings, identity, env, outcome, prediction)
    if fill == "random":
        say(f"decode: {row.label()} context={context}: state filled at random (prefill over max_cell_s)")
    cell = _steady(lambda: _measure(row, context, settings, fill))
    if cell.get("noisy"):
        say(f"decode: {row.label()} context={context}: {cell['noise']}")
    if cell["outcome"] == "skipped_budget":
        say(f"decode: {row.label()} context={context} not measured: {cell['reason']}")
    if cell["outcome"] == "ok":
        if fill == "random":
            cell["state_note"] = (f"state built directly from random values (fill_random), not prefilled: "
                                  f"{prediction.text()}; prefill and steps together over max_cell_s "
                                  f"{settings.max_cell_s:g} s")
        elif note:
            cell["state_note"] = f"measured without a prediction ({note})"
    record = _write(row, context, settings, identity, env, cell, prediction)
    _learn(learnt, record)
    return record


# A cell is disturbed when the medians of the first and second halves of its timed tokens differ by more than this
# factor: a burst of load (another process, the allocator) covered part of it. Its steps all do the same work.
DISTURBED_RATIO = 1.5


def disturbed(times: list[float]) -> bool:
    """Whether the two halves of a cell's per-token times disagree by more than :data:`DISTURBED_RATIO`."""
    half = len(times) // 2
    if half < 1:
        return False
    first, second = (float(torch.tensor(t).median()) for t in (times[:half], times[half:]))
    return max(first, second) > DISTURBED_RATIO * max(min(first, second), 1e-12)


def _steady(measure: Callable[[], dict]) -> dict:
    """A cell measured once, and once more when disturbed (the quicker attempt kept); one still disturbed is marked
    ``noisy`` (shown so in the report, measured again on the next run rather than reused)."""
    cell = measure()
    if cell["outcome"] != "ok" or not disturbed(cell["times_s"]):
        return cell
    again = measure()
    if again["outcome"] == "ok" and again["median_s"] < cell["median_s"]:
        cell = again
    if disturbed(cell["times_s"]):
        cell["noisy"] = True
        cell["noise"] = (f"noisy: the halves of its timed tokens differ by more than {DISTURBED_RATIO}x after "
                         "measuring it twice (the quicker attempt kept); run it again on a quieter machine")
    else:
        cell["noise"] = "measured again: the first attempt's halves disagreed"
    return cell


def _unsupported(row: DecodeRow, settings: BenchSettings) -> str | None:
    """Why the row cannot run at all: no causal form, or grouped keys and values it refuses (the registry's
    words)."""
    causal = unsupported_reason(row.mechanism, replace(settings, causal=True))
    if causal is not None or row.num_kv_heads is None:
        return causal
    info = get_attention_info(row.mechanism)
    if info.grouped_kv != "refused":
        return None
    return (f"refuses grouped keys and values (num_kv_heads={row.num_kv_heads}): "
            + (info.grouped_kv_note or "its registry info says grouped_kv='refused'"))


def _learn(learnt: Learnt, record: dict) -> None:
    """A stored or measured cell: an ok one is a point; out of memory stops the row."""
    if record.get("status") == "ok":
        prefill = record.get("prefill_ms")
        learnt.add(Point(int(record["context"]), prefill / 1e3 if prefill is not None else None,
                         float(record["ms_per_token"]) / 1e3, _memory(record)))
    elif record.get("status") == "oom" and learnt.stop_reason is None:
        learnt.stop_reason = f"not run: out of memory already at context {record['context']}"


def _memory(record: dict) -> float:
    """A cell's memory: the state's allocated bytes (all sequences) plus a step's peak."""
    per_seq = record.get("state_capacity_bytes_per_seq") or record.get("state_bytes_per_seq") or 0
    return float(per_seq * record["batch"] + (record.get("peak_bytes") or 0))


# ----------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------


def _probe_if_needed(row: DecodeRow, context: int, settings: BenchSettings,
                     learnt: Learnt) -> tuple[str | None, Prediction | None]:
    """(why there is no prediction, or None; the prediction). Probes the row at two short contexts first when
    it has fewer than two points below ``context``."""
    below = learnt.below(context)
    probes: tuple[int, ...] = ()
    if len(below) < 2:
        top = below[0].context if below else context
        p = min(PROBE_N, top // 4)
        if p < 1:
            return "context too short to probe", None
        probes = (p, 2 * p)
        for n in probes:
            with _one_cpu_thread(settings.device):
                cell = _measure(row, n, settings, "prefill", tokens=PROBE_TOKENS, warmup=1)
            if cell["outcome"] == "oom":
                learnt.stop_reason = f"not run: out of memory already at the probe context {n} ({cell['reason']})"
                return learnt.stop_reason, None
            if cell["outcome"] != "ok":
                return f"probe context {n}: {cell['outcome']}: {cell['reason']}", None
            memory = (cell["state_capacity_bytes"] or cell["state_bytes"]) + cell["peak_bytes"]
            learnt.add(Point(n, cell["prefill_s"], min(cell["times_s"]), memory, probe=True))
    return None, predict(learnt, context, settings, probes)


def predict(learnt: Learnt, context: int, settings: BenchSettings, probes: tuple[int, ...] = ()) -> Prediction:
    """The cell at ``context`` from the row's two nearest points below it (prefill from the two nearest that
    were prefilled), by :func:`harness.analysis.predict_at`."""
    basis = learnt.below(context)[-2:]
    prefilled = [p for p in learnt.below(context) if p.prefill_s is not None][-2:]
    cs = [p.context for p in basis]
    step_s = predict_at(cs, [p.step_s for p in basis], context)
    memory = predict_at(cs, [p.memory_bytes for p in basis], context)
    prefill_s = predict_at([p.context for p in prefilled], [p.prefill_s for p in prefilled], context)
    steps = min(settings.warmup, context) + settings.decode.tokens + 1
    cell_s = (prefill_s or 0.0) + steps * step_s if step_s is not None else None
    return Prediction(prefill_s, step_s, cell_s, memory, tuple(cs), probes)


def decide(pred: Prediction | None, settings: BenchSettings, context: int) -> tuple[str, dict | None]:
    """(how the state is built, the skip outcome or None): over the memory budget or with steps alone over
    ``max_cell_s``: skipped; prefill and steps together over it: the state filled at random."""
    if pred is None:
        return "prefill", None
    budget = settings.budget_bytes
    if budget is not None and pred.memory_bytes is not None and pred.memory_bytes > budget:
        return "prefill", {"outcome": "skipped_budget", "budget": "memory",
                           "reason": f"memory, predicted {pred.memory_bytes / 1e9:.2f} GB (state and a step's peak) "
                                     f"> budget {budget / 1e9:.2f} GB ({pred.text()})"}
    limit = settings.max_cell_s
    if limit is None or pred.step_s is None:
        return "prefill", None
    steps = min(settings.warmup, context) + settings.decode.tokens + 1
    if steps * pred.step_s > limit:
        return "prefill", {"outcome": "skipped_budget", "budget": "time",
                           "reason": f"time, predicted {steps} steps x {seconds(pred.step_s)} = "
                                     f"{seconds(steps * pred.step_s)} > max_cell_s {limit:g} s ({pred.text()})"}
    if pred.cell_s is not None and pred.cell_s > limit:
        return "random", None
    return "prefill", None


# ----------------------------------------------------------------------------------------------
# One cell: its runner, its identity, its record
# ----------------------------------------------------------------------------------------------


def _measure(row: DecodeRow, context: int, settings: BenchSettings, fill: str, tokens: int | None = None,
             warmup: int | None = None) -> dict[str, Any]:
    run = DecodeRun(batch=row.batch, context=context, tokens=tokens or settings.decode.tokens,
                    warmup=settings.warmup if warmup is None else warmup, fill=fill, device=settings.device)
    try:
        runner = _runner(row, context, settings)
    except Exception as exc:  # noqa: BLE001 - the constructor refused: the cell says why
        return failure_outcome(exc)
    cell = measure_decode(runner, run)
    cell.update(decode_form=runner.decode_form, backend=_backend(runner), heads=runner.heads,
                head_dim=runner.head_dim, prompt_tokens=run.prompt, warmup_steps=run.warmup_steps,
                state_filled=fill)
    return cell


def _backend(runner) -> str | None:
    try:
        return runner.backend
    except Exception:  # noqa: BLE001 - a module that never ran may not know its backend
        return None


def _runner(row: DecodeRow, context: int, settings: BenchSettings):
    max_len = context + settings.decode.tokens + 1
    if row.scope == "mechanism":
        return MechanismRunner(row.mechanism, _params(row.mechanism, max_len, settings, row.num_kv_heads),
                               settings.device,
                               settings.dtype, force_recompute=row.forced_recompute)
    config, _ = model_config(row, max_len)
    return ModelRunner(config, settings.device, settings.dtype, force_recompute=row.forced_recompute)


def _params(name: str, max_len: int, settings: BenchSettings, num_kv_heads: int | None = None) -> dict[str, Any]:
    """The mechanism's keywords: the efficiency benchmark's documented settings, the user's params, causal, and
    ``num_kv_heads`` when the row groups keys and values."""
    params = mechanism_params(name, max_len, replace(settings, causal=True))
    return params if num_kv_heads is None else {**params, "num_kv_heads": num_kv_heads}


def model_config(row: DecodeRow, max_len: int) -> tuple[dict[str, Any], list[str]]:
    """The model cell's configuration (the recipe's at its size) at ``max_length = max_len``, and the changes."""
    return decode_models.at_context(decode_models.recipe_model_config(row.mechanism, row.model_size), max_len)


def cell_identity(row: DecodeRow, context: int, settings: BenchSettings) -> dict[str, Any]:
    """Every setting that changes a cell's numbers (hashed into its record id; a re-run reuses a cell whose
    identity is the same)."""
    max_len = context + settings.decode.tokens + 1
    identity: dict[str, Any] = {
        "mechanism": row.mechanism, "scope": row.scope, "model_size": row.model_size, "batch": row.batch,
        "forced_recompute": row.forced_recompute, "context": context, "tokens": settings.decode.tokens,
        "warmup": settings.warmup, "dtype": settings.dtype, "device": settings.device,
        "threads": torch.get_num_threads(),
    }
    if row.num_kv_heads is not None:  # left out when None: the cells measured before grouping keep their key
        identity["num_kv_heads"] = row.num_kv_heads
    if row.scope == "mechanism":
        identity.update(params=jsonable_params(_params(row.mechanism, max_len, settings, row.num_kv_heads)),
                        heads=settings.heads, head_dim=settings.head_dim)
    else:
        try:
            config = dict(model_config(row, max_len)[0])
            if config.get("num_kv_heads") is None:  # as before grouped-query attention: the cells keep their key
                config.pop("num_kv_heads", None)
            identity["model_config"] = config
        except ValueError as exc:
            identity["model_config"] = str(exc)
    if settings.cpu_allocator_used != "default":
        identity["cpu_allocator"] = settings.cpu_allocator_used
    return identity


def decode_record_id(row: DecodeRow, context: int, identity: dict[str, Any]) -> str:
    """``performer.mechanism.own.c4096.b8.<hash>`` (``.kv1`` after the scope for one key-value head): readable
    prefix, then the identity's hash."""
    scope = row.scope + (f"-{row.model_size}" if row.model_size else "")
    scope += f".kv{row.num_kv_heads}" if row.num_kv_heads is not None and row.scope == "mechanism" else ""
    form = "recompute" if row.forced_recompute else "own"
    return f"{row.mechanism}.{scope}.{form}.c{context}.b{row.batch}.{config_hash(identity)}".replace("_", "-")


def _environment(settings: BenchSettings) -> dict[str, Any]:
    """What every record of the run carries about the machine (as bench records do), and its matmul rate."""
    return {"device_info": device_info(settings.device), "command": command_line(),
            "matmul_flops_per_s": matmul_flops_per_s(DTYPES[settings.dtype], settings.device),
            "cpu_allocator": settings.cpu_allocator_used, "smoke": bool(settings.smoke),
            "plugins": list(settings.plugins)}


def _write(row: DecodeRow, context: int, settings: BenchSettings, identity: dict, env: dict, cell: dict,
           prediction: Prediction | None = None) -> dict:
    """The cell's record (every field of the decode schema; None where not applicable), written."""
    max_len = context + settings.decode.tokens + 1
    ok = cell["outcome"] == "ok"
    batch = row.batch
    filled, capacity = cell.get("state_bytes"), cell.get("state_capacity_bytes")
    median = cell.get("median_s")
    config, changes = (None, [])
    if row.scope == "model":
        try:
            config, changes = model_config(row, max_len)
        except ValueError:
            pass
    params = resolved_params(row, max_len, settings, config)
    form = cell.get("decode_form") or ("recompute" if row.forced_recompute else _form(row.mechanism))
    record = {
        "kind": "decode", "record_id": decode_record_id(row, context, identity), "status": cell["outcome"],
        "reason": cell.get("reason"), "budget": cell.get("budget"), "created_at": now_iso(),
        "mechanism": row.mechanism, "backend": cell.get("backend"), "scope": row.scope,
        "model_size": row.model_size, "model_config": config,
        "attention_params": params,
        "config_changes": changes, "context": context, "prompt_tokens": cell.get("prompt_tokens"),
        "warmup_steps": cell.get("warmup_steps"), "batch": batch,
        "heads": cell.get("heads", config["num_heads"] if config else settings.heads),
        "num_kv_heads": row.num_kv_heads,
        "kv_heads": row.num_kv_heads or cell.get("heads", config["num_heads"] if config else settings.heads),
        "head_dim": cell.get("head_dim", config["qkv_dim"] // config["num_heads"] if config else settings.head_dim),
        "dtype": settings.dtype, "device": torch.device(settings.device).type, "threads": torch.get_num_threads(),
        "decode_form": form, "forced_recompute": row.forced_recompute,
        "state_growth": decode_models.state_growth(row.mechanism, params, form),
        "state_filled": cell.get("state_filled") if ok else None, "state_note": cell.get("state_note"),
        "noisy": bool(cell.get("noisy", False)), "noise": cell.get("noise"),
        "prefill_ms": cell["prefill_s"] * 1e3 if ok and cell.get("prefill_s") is not None else None,
        "tokens": settings.decode.tokens,
        "ms_per_token": median * 1e3 if median is not None else None,
        "ms_per_token_p10": cell["p10_s"] * 1e3 if ok else None,
        "ms_per_token_p90": cell["p90_s"] * 1e3 if ok else None,
        "times_ms": [t * 1e3 for t in cell["times_s"]] if ok else None,
        "tokens_per_s": batch / median if median else None,
        "state_bytes_per_seq": filled // batch if filled is not None else None,
        "state_capacity_bytes_per_seq": capacity // batch if capacity is not None else None,
        "peak_bytes": cell.get("peak_bytes"), "peak_method": cell.get("peak_method"),
        "timing_policy": "plain", "timing_note": _timing_note(settings.device),
        "prediction": prediction.fields() if prediction is not None else None,
        "settings_key": config_hash(identity), "max_cell_s": settings.max_cell_s,
        "memory_budget_gb": settings.memory_budget_gb, **env,
    }
    write_record(record, settings.results_dir)
    return record


def resolved_params(row: DecodeRow, max_len: int, settings: BenchSettings, config: dict | None) -> dict | None:
    """The mechanism's config as built (every field, defaults included): for the mechanism alone from the cell's
    keywords, for a model from its first layer's (the layers differ only in their seed). The keywords as given
    when the registry refuses them (the cell then says why); None for a model whose config is unknown."""
    if row.scope == "mechanism":
        keywords = _params(row.mechanism, max_len, settings, row.num_kv_heads)
    elif config is not None:
        from harness.model import ModelConfig

        try:
            keywords = ModelConfig(**config).attention_kwargs(0)
        except (TypeError, ValueError):
            return jsonable_params(config.get("attention_params") or {})
    else:
        return None
    try:
        return jsonable_params(dataclasses.asdict(make_config(row.mechanism, **keywords)))
    except (TypeError, ValueError):
        return jsonable_params(keywords)


def _timing_note(device: str) -> str:
    """Why the steps are timed as plain launches (the schema's "say which and why")."""
    if torch.device(device).type != "cuda":
        return "plain: each step timed alone with perf_counter (CPU)"
    return ("plain: each step timed alone between torch.cuda.synchronize calls; no CUDA graphs, since a step form "
            "may reallocate its state's tensors or read host-side lengths, which a captured graph would not follow")


def _form(name: str) -> str | None:
    """``step``, ``recompute``, or None for a mechanism without a causal form (not decodable)."""
    if not get_attention_info(name).supports_causal:
        return None
    return "step" if _has_step_form(name) else "recompute"


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def format_decode_table(df: pd.DataFrame) -> str:
    """One block per scope (and model size) and batch: mechanisms x contexts, each cell 'ms/token, state
    bytes per sequence' (``*``: state filled at random), or the status for a cell without numbers."""
    if df.empty:
        return "(no decode cells)"
    blocks = []
    df = df.assign(model_size=df["model_size"].fillna("-"), kv=_kv_column(df))
    for (scope, size, batch, kv), group in df.groupby(["scope", "model_size", "batch", "kv"], sort=False):
        cells = group.assign(cell=group.apply(_cell_text, axis=1), row=group.apply(_row_text, axis=1))
        table = cells.pivot_table(index="row", columns="context", values="cell", aggfunc="first", sort=False)
        table = table.fillna("")  # a context the row does not run (the recompute rows run at few)
        head = f"decode scope={scope}{'' if size == '-' else f' size={size}'} batch={batch}{kv}"
        blocks.append(f"{head}  (ms per token median, state bytes per sequence; * = state filled at random)\n"
                      + table.to_string())
    return "\n\n".join(blocks)


def _kv_column(df: pd.DataFrame) -> pd.Series:
    """Per cell, `` kv_heads=<n>`` for grouped keys and values (``num_kv_heads`` set), else ``""``: what separates
    its table and its derived figures from the plain multi-head cells of the same scope and batch."""
    kv = df["num_kv_heads"] if "num_kv_heads" in df else pd.Series(None, index=df.index, dtype=object)
    return kv.map(lambda k: "" if k is None or k != k else f" kv_heads={int(k)}")


def _row_text(r: pd.Series) -> str:
    form = r.get("decode_form") or "?"
    return f"{r['mechanism']} [{'recompute, forced' if r.get('forced_recompute') else form}]"


def _cell_text(r: pd.Series) -> str:
    if r["status"] != "ok":
        return r["status"]
    star = "*" if r.get("state_filled") == "random" else ""
    return f"{milliseconds(r['ms_per_token'])}{star}, {format_bytes(r['state_bytes_per_seq'])}"


def milliseconds(value: float) -> str:
    """``0.123 ms``, ``12.3 ms``, ``3290 ms``: three significant figures, never an exponent."""
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"


def _speedup_context(settings: BenchSettings) -> int:
    """Where the step form's speed-up is read: 4096 when the recompute form was timed there, else the largest
    recompute context."""
    contexts = settings.decode.recompute_contexts
    return DECODE_SPEEDUP_CONTEXT if DECODE_SPEEDUP_CONTEXT in contexts or not contexts else max(contexts)


def format_decode_derived(df: pd.DataFrame, speedup_context: int = DECODE_SPEEDUP_CONTEXT) -> str:
    """The derived figures (:func:`harness.analysis.decode_derived`) as text, per key-value head count (grouped
    and plain cells of one mechanism are different rows)."""
    if not df.empty:
        kvs = _kv_column(df)
        if kvs.nunique() > 1:
            parts = [format_decode_derived(df[kvs == kv], speedup_context) for kv in kvs.unique()]
            return "\n".join(f"{kv.strip() or 'kv_heads=heads'}: {part}" for kv, part in zip(kvs.unique(), parts)
                             if part)
    derived = decode_derived(df, speedup_context=speedup_context)
    if derived.empty:
        return ""
    shown = pd.DataFrame({
        "scope": derived["scope"], "size": derived["model_size"], "batch": derived["batch"],
        "mechanism": derived["mechanism"],
        "ms/token slope": derived["ms_slope"].map(_slope), "(3 largest)": derived["ms_slope_top3"].map(_slope),
        "bytes slope": derived["bytes_slope"].map(_slope),
        "below full from": derived.apply(_crossover, axis=1),
        f"step vs recompute at {speedup_context}": derived["speedup_vs_recompute"].map(
            lambda x: f"{x:.0f}x" if pd.notna(x) else "-"),
    })
    return ("decode: log-log slopes against context (ms per token over all contexts and over the three largest; "
            "state bytes per sequence), the context from which ms per token is below full's, and the step form's "
            "speed-up over recomputing:\n" + shown.to_string(index=False))


def _slope(value: float) -> str:
    return "-" if pd.isna(value) else f"{value + 0.0:.2f}".replace("-0.00", "0.00")


def _crossover(r: pd.Series) -> str:
    note = r.get("crossover_note")
    if note == "interpolated":
        return f"{r['crossover_context']:.0f}"
    if note == "faster at all n":
        return f"<= {r['crossover_context']:.0f} (all contexts)"
    return "-" if note == "reference" or pd.isna(note) else str(note)
