"""Report (``arena-report``): the results store as tables and plots, in Markdown and one self-contained HTML page.

    arena-report                                   # results/ -> results/report/
    arena-report results_dir=results out=report    # explicit folders

Reads every record with :func:`harness.store.load_records` (pandas) and writes ``report.md``,
``report.html`` (PNG plots embedded as base64: one file to send around) and the PNGs:

- accuracy: mechanisms x tasks, test accuracy at the best validation checkpoint, mean +- std
  over seeds, the majority-class baseline row and the average column;
- efficiency: time and peak memory per n (median, p10-p90), relative to ``full`` (LRA Table 2
  layout), log-log slopes, the crossover length, the longest n within a memory budget, the
  registry-vs-direct-SDPA overhead;
- peers (ours / peer ratios) and the approximation error against exact attention;
- plots: accuracy vs speed (memory as bubble size), time vs n and memory vs n (log-log, one
  line per mechanism, cells that could not run marked), approximation error vs budget.

A cell without a number is shown as ``—`` with the reason (not run, oom, unsupported, ...),
never as zero.

The package's rooms, in the order the data flows: :mod:`~harness.report.tables` (store rows ->
display frames), :mod:`~harness.report.plots` (frames -> PNGs), :mod:`~harness.report.page` (Markdown
and HTML), :mod:`~harness.report.build` (the page's sections and ``main``).

Owns: presenting what is in the store. May import ``attentions`` (mechanism facts),
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display`; never a runner
(:mod:`harness.bench`, :mod:`harness.train`, :mod:`harness.suite`): it reads records, it measures nothing.
"""

from harness.display import MISSING, markdown_table
from harness.report.build import build_report, main
from harness.report.tables import accuracy_table, task_labels

__all__ = ["MISSING", "accuracy_table", "build_report", "main", "markdown_table", "task_labels"]
