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
peak predicted from shorter lengths exceeds ``memory_budget_gb``, or the predicted time exceeds
``max_cell_s``; ``budget`` says which, ``memory`` or ``time``, and ``reason`` starts with it). Every length is
predicted before it runs, the first one of a row from two short probes (:mod:`~harness.bench.guard`).

The mechanisms of one (n, pass) are measured together in interleaved rounds (each repeat of each mechanism
in turn), so a burst of load slows the same round of each instead of every repeat of one; a cell whose
rounds disagree is measured again (its ``noise`` says what was done).

It also measures each non-``full`` mechanism's approximation error against exact softmax
attention as a function of its budget parameter (:func:`harness.bench.approx.approximation_errors`), and, when
the ``peers`` extra is installed, the public implementations side by side (:mod:`harness.bench.peers`).

Records go to the results store: kind ``bench`` (one per mechanism, n, pass, settings),
``approx`` (one per mechanism, budget value, input variant) and ``peer``.

``mode=decode`` runs the incremental-decoding scan instead (:mod:`~harness.bench.decode`): per causal mechanism,
scope (the mechanism alone, or a whole model: :mod:`~harness.bench.decode_models`), batch and context, the time
per generated token and the state's bytes per sequence; records of kind ``decode``.

    arena-bench                                   # issue 2's setup: CPU/auto, 1K..16K
    arena-bench mechanisms=[full,performer] seq_lens=[1024,2048] repeats=3
    arena-bench smoke=true results_dir=/tmp/r     # tiny shapes, seconds
    arena-bench mode=decode                       # incremental decoding: ms per token, state bytes, 1K..64K

The package's rooms, in the order the data flows: :mod:`~harness.bench.settings` (what can be asked,
:class:`BenchSettings` built once and every value checked), :mod:`~harness.bench.cells` (the cells of one
length measured in interleaved rounds), :mod:`~harness.bench.guard` (each cell predicted before it runs),
:mod:`~harness.bench.approx` (the approximation-error study), :mod:`~harness.bench.peers` (public
implementations side by side), :mod:`~harness.bench.run` (the scan, records to the store, the console
summary through :mod:`harness.analysis` and :mod:`harness.display`); for ``mode=decode``
:mod:`~harness.bench.decode` (the scan, its guard, the records), :mod:`~harness.bench.decode_cells` (one cell
measured) and :mod:`~harness.bench.decode_models` (the model sizes).

Owns: producing ``bench``, ``approx``, ``peer`` and ``decode`` records. May import ``attentions``,
:mod:`harness.model` (the decode scan's whole models), :mod:`harness.measure`, :mod:`harness.allocator`,
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display`, :mod:`harness.settings`; never
:mod:`harness.report`, :mod:`harness.train` or :mod:`harness.suite`.
"""

from harness.bench.approx import approx_inputs, approximation_errors, exact_reference, relative_error
from harness.bench.cells import (
    OUTCOMES,
    check_params,
    measure_cell,
    measure_cells,
    mechanism_params,
    record_outcome,
    select_mechanisms,
)
from harness.bench.run import format_derived, format_table, main, prepare_benchmark, run_benchmark
from harness.bench.settings import (
    DEFAULTS,
    PASSES,
    SMOKE_OVERRIDES,
    BenchSettings,
    apply_preset,
    check_device,
    resolve_settings,
)

__all__ = [
    "DEFAULTS", "OUTCOMES", "PASSES", "SMOKE_OVERRIDES", "BenchSettings", "apply_preset", "approx_inputs",
    "approximation_errors", "check_device", "check_params",
    "exact_reference", "format_derived", "format_table", "main", "mechanism_params", "measure_cell", "measure_cells",
    "prepare_benchmark", "record_outcome", "relative_error", "resolve_settings", "run_benchmark", "select_mechanisms",
]
