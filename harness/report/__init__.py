"""Report (``arena-report``): the results store as tables and plots, in Markdown and one self-contained HTML page.

    arena-report                                   # results/ -> results/report/
    arena-report results_dir=results out=report    # explicit folders

Reads every record with :func:`harness.store.load_records` (pandas) and writes ``report.md``,
``report.html`` (PNG plots embedded as base64: one file to send around) and the PNGs. The page starts
with a summary (what was run, the machine and its load, computed findings), then the figures, then the
detailed tables:

- accuracy: one table per recipe (runs identical except mechanism and seed; never averaged across
  recipes, settings or mechanism parameters), test accuracy at the best validation checkpoint, mean ±
  std over seeds, the majority class, throughput and step memory relative to ``full``;
- efficiency, one section per benchmark setting: time (median, p10-p90, disturbed cells marked) and peak
  memory per n, relative to ``full`` (LRA Table 2 layout), log-log slopes, the crossover length, the
  longest n within the memory budget (never beyond 4x the largest measured n), the registry-vs-SDPA overhead;
- accuracy, speed and memory per mechanism averaged over every recipe with ``full`` (mean accuracy,
  geometric means of the ratios to ``full``; :mod:`~harness.report.average`);
- runs of the official LRA recipes (``experiment=lra/...``, settings as the recipe file sets them) beside
  the published LRA numbers, labelled as theirs (:mod:`~harness.report.published`, :mod:`~harness.report.lra`);
- peers (ours / peer ratios) and the approximation error against what each mechanism approximates;
- plots: accuracy vs speed per recipe and averaged over recipes (memory as bubble size, majority line),
  time and memory vs n (log-log, one fixed colour and marker per mechanism, p10-p90 bars), approximation
  error vs budget.

A cell without a number is shown as ``—`` with the reason (not run, oom, unsupported, ...),
never as zero.

The package's rooms, in the order the data flows: :mod:`~harness.report.groups` (which records are
compared), :mod:`~harness.report.tables` (store rows -> display frames), :mod:`~harness.report.plots`
(frames -> PNGs), :mod:`~harness.report.summary` (the findings), :mod:`~harness.report.page` (Markdown
and HTML), :mod:`~harness.report.build` (the page's sections and ``main``).

Owns: presenting what is in the store. May import ``attentions`` (mechanism facts),
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display`; never a runner
(:mod:`harness.bench`, :mod:`harness.train`, :mod:`harness.suite`): it reads records, it measures nothing.
"""

from harness.display import MISSING, markdown_table
from harness.report.build import NothingToReport, build_report, main
from harness.report.groups import comparisons, settings
from harness.report.tables import comparison_table

__all__ = ["MISSING", "NothingToReport", "build_report", "comparison_table", "comparisons", "main", "markdown_table",
           "settings"]
