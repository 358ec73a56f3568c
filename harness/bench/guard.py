"""The benchmark's guard: a cell's peak memory and time predicted before it runs, and the skip of a cell
predicted beyond the memory budget (``memory_budget_gb``) or the time limit (``max_cell_s``).

Every (mechanism, pass) row learns points (n, step time, peak) from its measured cells. A cell with fewer
than two points below its n in the row (the first length of a row, always) is preceded by two *probes*:
the same mechanism, pass and shapes at two short lengths (:func:`probe_lengths`: 256 and 512, or a quarter
and a half of a shorter n), each two timed calls (the faster counts) and one memory step, on one CPU thread
(:func:`_one_cpu_thread`). A power law through the two nearest points below n
(:func:`harness.analysis.predict_at`: exponent clamped to [1, 3], so growth is never assumed slower than
linear) predicts the cell; the registry's complexity is only text and plug-ins declare nothing, so the
measurements are the only basis. The prediction and its points go into the cell's
record (``time.predicted_*``, ``memory.predicted_*``, ``*.probes``), measured or skipped.

Owns: the rows' points, the probes, the prediction and the skip decision. Imports: torch (the probes' thread
count), :mod:`harness.analysis`, :mod:`harness.display`, :mod:`harness.bench.cells`, :mod:`harness.bench.settings`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from harness.analysis import predict_at
from harness.bench.cells import measure_cells, record_outcome, unsupported_reason
from harness.bench.settings import BenchSettings
from harness.display import format_bytes

# The shorter probe's length; the longer one is twice it. 256 tokens cost milliseconds for every mechanism
# on a CPU, and are long enough that the probes' growth is not only fixed overheads.
PROBE_N = 256
# A cell predicted to take at least this long (seconds) is announced with its estimate before it starts.
LONG_CELL_S = 10.0


@dataclass(frozen=True)
class Point:
    """One length of a row: the median step time (s) and peak (bytes) measured there; ``probe``: a probe's."""

    n: int
    step_s: float
    peak_bytes: float
    probe: bool = False

    def text(self) -> str:
        return f"n={self.n}{' (probe)' if self.probe else ''}: {seconds(self.step_s)}, {format_bytes(self.peak_bytes)}"


@dataclass
class Row:
    """What one (mechanism, pass) row of the scan has learnt: its points by n, and why it stopped, if it did."""

    points: list[Point] = field(default_factory=list)
    stop_reason: str | None = None

    def add(self, point: Point) -> None:
        self.points = sorted([p for p in self.points if p.n != point.n] + [point], key=lambda p: p.n)

    def learn(self, n: int, record: dict) -> None:
        """Take a stored or measured cell: an ok one is a point, an out-of-memory one stops the row."""
        outcome = record_outcome(record)
        if outcome == "ok":
            self.add(Point(n, float(record["time"]["median_s"]), float(record["memory"]["peak_bytes"])))
        elif outcome == "oom" and self.stop_reason is None:
            self.stop_reason = f"not run: out of memory already at n={n}"

    def below(self, n: int) -> list[Point]:
        return [p for p in self.points if p.n < n]


@dataclass(frozen=True)
class Prediction:
    """A cell's predicted step time, cell time (warm-up + repeats + the memory step) and peak, and the two
    points of the row (probes or measured lengths) the power law went through. A figure is None when the
    points do not give it (a zero peak)."""

    n: int
    step_s: float | None
    cell_s: float | None
    peak_bytes: float | None
    basis: tuple[Point, ...]

    def fields(self) -> dict[str, dict[str, Any]]:
        """The prediction as the record's ``time`` and ``memory`` fields (probes listed as [n, value])."""
        probes = [p for p in self.basis if p.probe]
        return {
            "time": {"predicted_step_s": self.step_s, "predicted_cell_s": self.cell_s,
                     "predicted_from_n": [p.n for p in self.basis],
                     **({"probes": [[p.n, p.step_s] for p in probes]} if probes else {})},
            "memory": {"predicted_peak_bytes": self.peak_bytes,
                       **({"probes": [[p.n, p.peak_bytes] for p in probes]} if probes else {})},
        }

    def basis_text(self) -> str:
        return "power law through " + " and ".join(p.text() for p in self.basis)

    def estimate_text(self) -> str:
        """``about 95 s, peak about 2.1 GiB``: what the console says before a long cell."""
        text = f"about {seconds(self.cell_s)}" if self.cell_s is not None else "time unknown"
        return text + (f", peak about {format_bytes(self.peak_bytes)}" if self.peak_bytes is not None else "")


def seconds(value: float | None) -> str:
    """A duration for people: ``2.1 ms``, ``95 s``, ``4.2 min``, ``3.1 h``."""
    if value is None or not math.isfinite(value):
        return "?"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def probe_lengths(n: int, below: list[Point]) -> list[int]:
    """The lengths to probe before a cell at ``n`` whose row has the points ``below`` it: two short lengths
    below the shortest point known (:data:`PROBE_N` and twice it, or a quarter and a half of a shorter one),
    none when that length is already too short to have two shorter ones."""
    if len(below) >= 2:
        return []
    top = below[0].n if below else n
    p = min(PROBE_N, top // 4)
    return [p, 2 * p] if p >= 1 else []


def probe(name: str, lengths: list[int], pass_: str, settings: BenchSettings, row: Row) -> str | None:
    """Measure the probes of a row at ``lengths`` (two timed calls, of which the faster counts: the first one
    is also the warm-up; then one memory step) and add them to the row. Returns why the probes give no
    prediction (a probe that failed), else None; a probe out of memory stops the row, as an out-of-memory
    cell does."""
    quick = replace(settings, warmup=0, repeats=2)
    for n in lengths:
        with _one_cpu_thread(settings.device):
            cell = measure_cells([name], n, pass_, quick)[name]
        if cell["outcome"] == "oom":
            row.stop_reason = f"not run: out of memory already at the probe n={n} ({cell['reason']})"
            return row.stop_reason
        if cell["outcome"] != "ok":
            return f"probe n={n}: {cell['outcome']}: {cell['reason']}"
        # The faster call: a disturbance or the first call's one-time costs only add time.
        row.add(Point(n, float(min(cell["time"]["times_s"])), float(cell["memory"]["peak_bytes"]), probe=True))
    return None


@contextlib.contextmanager
def _one_cpu_thread(device: str) -> Iterator[None]:
    """On CPU, torch on one thread for the block (restored after). A probe's steps are tiny: a second thread
    gains them nothing, and on a busy machine it made them 5-15x slower (each op waits for a thread that is
    not running). Their times then err high for the cells that use every thread: the guard errs on the safe
    side."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def predict(row: Row, n: int, settings: BenchSettings) -> Prediction | None:
    """The cell at ``n`` predicted from the row's two nearest points below it; None with fewer than two."""
    basis = tuple(row.below(n)[-2:])
    if len(basis) < 2:
        return None
    ns = [p.n for p in basis]
    step_s = predict_at(ns, [p.step_s for p in basis], n)
    peak = predict_at(ns, [p.peak_bytes for p in basis], n)
    cell_s = step_s * (settings.warmup + settings.repeats + 1) if step_s is not None else None
    return Prediction(n, step_s, cell_s, peak, basis)


def over_budget(pred: Prediction, settings: BenchSettings) -> dict[str, Any] | None:
    """The ``skipped_budget`` outcome of a cell predicted beyond the memory budget or the time limit (the
    reason names the budget first, then the prediction and its points), else None."""
    budget_bytes = settings.budget_bytes or math.inf
    if pred.peak_bytes is not None and pred.peak_bytes > budget_bytes:
        return {"outcome": "skipped_budget", "budget": "memory", "predicted_peak_bytes": pred.peak_bytes,
                "reason": f"memory, predicted peak {pred.peak_bytes / 1e9:.2f} GB > budget "
                          f"{budget_bytes / 1e9:.2f} GB ({pred.basis_text()})"}
    max_s = settings.max_cell_s
    if max_s is not None and pred.cell_s is not None and pred.cell_s > float(max_s):
        return {"outcome": "skipped_budget", "budget": "time",
                "reason": f"time, predicted cell time {seconds(pred.cell_s)} > max_cell_s {float(max_s):g} s "
                          f"({pred.basis_text()})"}
    return None


@dataclass(frozen=True)
class Plan:
    """What the guard decided for one cell: ``outcome`` (a stopped row's ``oom`` or a ``skipped_budget``;
    None: measure it), the ``prediction`` (None without one) and, for a cell measured without a prediction
    because a probe failed, why (``unguarded``)."""

    outcome: dict[str, Any] | None = None
    prediction: Prediction | None = None
    unguarded: str | None = None


def plan(name: str, n: int, pass_: str, settings: BenchSettings, row: Row) -> Plan:
    """The guard's decision for the cell at ``n`` before it runs. Probes the row first when it has fewer than
    two points below ``n``. A mechanism that cannot run in this pattern at all is measured (it fails at
    once, saying why) without probes."""
    if row.stop_reason is None and unsupported_reason(name, settings) is not None:
        return Plan()
    lengths = probe_lengths(n, row.below(n)) if row.stop_reason is None else []
    unguarded = probe(name, lengths, pass_, settings, row) if lengths else None
    if row.stop_reason is not None:
        return Plan(outcome={"outcome": "oom", "reason": row.stop_reason})
    if unguarded is not None:
        return Plan(unguarded=unguarded)
    pred = predict(row, n, settings)
    return Plan(outcome=over_budget(pred, settings) if pred is not None else None, prediction=pred)
