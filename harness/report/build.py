"""The report builder: load the store, write each section, render ``report.md`` and ``report.html``.

Owns: the order of the page and ``arena-report``'s ``main``. Imports: ``attentions`` (the registry),
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display` and the other
:mod:`harness.report` modules.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from attentions import available_attentions, get_attention_info
from harness.analysis import full_overhead
from harness.display import MISSING, derived_display, format_bytes, format_time_spread, shown_path
from harness.plugins import conf_dir, prepare
from harness.report.page import Page
from harness.report.plots import plot_accuracy_speed, plot_approx, plot_scaling
from harness.report.tables import (
    accuracy_speed_points,
    accuracy_table,
    approx_table,
    bench_cells,
    peer_table,
    pivot_cells,
    relative_table,
    select_bench_group,
    task_labels,
)
from harness.store import load_records


@dataclass(frozen=True)
class StoreFrames:
    """The store's records by kind, and the messages of the record files that could not be read."""

    train: pd.DataFrame
    bench: pd.DataFrame
    approx: pd.DataFrame
    peer: pd.DataFrame
    unreadable: list[str]


def load_store(results_dir: Path) -> StoreFrames:
    """Every record of the four kinds; unreadable files are listed, not raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = {kind: load_records(results_dir, kind=kind) for kind in ("train", "bench", "approx", "peer")}
    unreadable = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    return StoreFrames(**frames, unreadable=unreadable)


def build_report(results_dir: str | Path = "results", out: str | Path | None = None,
                 memory_budget_gb: float | None = 16.0, slope_range: Sequence[float] = (2048, 16384),
                 title: str = "attention-arena report") -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and the PNGs to ``out`` (default ``<results_dir>/report``).

    Returns ``{"out": folder, "files": [...], "build_s": seconds}``.
    """
    started = time.perf_counter()
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    store = load_store(results_dir)
    page = Page(title)
    page.note(f"Results store: {shown_path(results_dir)}. Generated {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} "
              f"UTC. '{MISSING} (reason)' marks a cell without a number; no missing value is shown as zero.")
    if store.unreadable:
        page.note(f"{len(store.unreadable)} unreadable record file(s) skipped: " + "; ".join(store.unreadable[:5]))
    files: list[Path] = []
    numeric = accuracy_section(page, store.train)
    cells = efficiency_section(page, store.bench, out, files, memory_budget_gb, slope_range)
    accuracy_speed_section(page, store.train, numeric, cells, out, files)
    peer_section(page, store.peer)
    approx_section(page, store.approx, out, files)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(page.markdown(), encoding="utf-8")
    html_path.write_text(page.html(), encoding="utf-8")
    return {"out": out, "files": [md_path, html_path, *files], "build_s": time.perf_counter() - started}


def accuracy_section(page: Page, train: pd.DataFrame) -> pd.DataFrame:
    """Mechanisms x tasks; returns the numeric means (empty without training records)."""
    page.heading("Accuracy (test accuracy % at the best validation checkpoint)")
    if train.empty or "attention" not in train:
        page.note(f"{MISSING} no training records (kind=train) in the store.")
        return pd.DataFrame()
    registered = available_attentions()
    display, numeric = accuracy_table(train, registered)
    page.note("mean ± sample std over seeds (no ± with one seed); [+k status] = runs that failed beside them.")
    page.table(display)
    ran = set(train["attention"].dropna())
    no_dropout = [m for m in registered if m in ran and not get_attention_info(m).applies_dropout]
    if no_dropout:
        page.note("attention dropout has no effect in " + ", ".join(no_dropout) + " (no probability matrix to "
                  "drop), so with attention_dropout > 0 they train with less regularisation than the others.")
    if "validation_is_test" in train:
        alias = train["validation_is_test"].fillna(False).astype(bool)
        for task, runs in train[alias].groupby(task_labels(train)[alias]):
            page.note(f"{task}: {len(runs)} run(s) validated on the test split (LRA's protocol, validation=test), "
                      "so their test accuracy is the best of many test evaluations (optimistic); see docs/DATA.md.")
    return numeric


def efficiency_section(page: Page, bench: pd.DataFrame, out: Path, files: list[Path],
                       memory_budget_gb: float | None, slope_range: Sequence[float]) -> pd.DataFrame:
    """Time, memory, ratios to full, derived figures and the scaling plots; returns the cell frame."""
    page.heading("Efficiency")
    if bench.empty or not {"mechanism", "pass", "n"} <= set(bench.columns):
        page.note(f"{MISSING} no benchmark records (kind=bench): run arena-bench.")
        return pd.DataFrame()
    group, label = select_bench_group(bench)
    cells = bench_cells(group)
    methods = ", ".join(sorted(cells["memory_method"].dropna().unique())) or MISSING
    device_name = group["device_info.device_name"].dropna().iloc[0] if "device_info.device_name" in group else "?"
    threads = group["device_info.num_threads"].dropna().iloc[0] if "device_info.num_threads" in group else "?"
    page.note(f"Setting: {label}; device: {device_name}, {threads} threads; the mechanism alone on projected "
              f"q, k, v. Memory method: {methods}. Times: median [p10–p90] in ms.")
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ in set(cells["pass"]):
            page.note(f"Time, {pass_} (ms)")
            page.table(pivot_cells(cells, pass_, format_time_spread))
            page.note(f"Peak memory, {pass_}")
            page.table(pivot_cells(cells, pass_, lambda row: format_bytes(row["peak_bytes"])))
            page.note(f"Relative to full, {pass_}: speed-up x / memory ratio (LRA Table 2 layout)")
            page.table(relative_table(cells, pass_))
    budget = float(memory_budget_gb) * 1e9 if memory_budget_gb else None
    page.note(f"Log-log slopes over n in [{slope_range[0]}, {slope_range[1]}] (1 = linear, 2 = quadratic), "
              f"crossover length vs full, longest n within {memory_budget_gb} GB.")
    page.table(derived_display(cells, slope_range, budget), index=False)
    overhead = full_overhead(cells)
    if not overhead.empty:
        overhead["overhead"] = overhead["overhead"].map(lambda x: f"{x:+.1%}")
        page.note("full through the registry vs torch SDPA called directly (target <= +5%):")
        page.table(overhead, index=False)
    for metric, name in (("median_s", "time_vs_n.png"), ("peak_bytes", "memory_vs_n.png")):
        files.append(plot_scaling(cells, metric, out / name))
        page.image(files[-1], name)
    return cells


def accuracy_speed_section(page: Page, train: pd.DataFrame, numeric: pd.DataFrame, cells: pd.DataFrame,
                           out: Path, files: list[Path]) -> None:
    """LRA Figure 3: average accuracy vs speed, memory as bubble size."""
    page.heading("Accuracy vs speed vs memory")
    points, xlabel = accuracy_speed_points(train, numeric, cells)
    if points.empty:
        page.note(f"{MISSING} needs training records with accuracy and a speed figure for the same mechanisms.")
        return
    files.append(plot_accuracy_speed(points, out / "accuracy_vs_speed.png", xlabel))
    page.note(f"x: {xlabel}; y: average accuracy over the tasks each mechanism completed "
              f"({', '.join(c for c in numeric.columns if c != 'Average')}).")
    page.image(files[-1], "accuracy_vs_speed.png")


def peer_section(page: Page, peer: pd.DataFrame) -> None:
    """Ours / public implementation ratios."""
    page.heading("Peers (ours / public implementation)")
    if peer.empty:
        page.note(f"{MISSING} no peer records (the optional 'peers' extra was not installed or not run).")
        return
    page.note("Ratios < 1: ours is faster / smaller. level core = same projected q, k, v; level layer = ours "
              "wrapped in the peer's Q/K/V/output projections.")
    page.table(peer_table(peer), index=False)


def approx_section(page: Page, approx: pd.DataFrame, out: Path, files: list[Path]) -> None:
    """Relative error against exact attention vs budget: table and plot."""
    page.heading("Approximation error against exact attention")
    if approx.empty or "error_mean" not in approx:
        page.note(f"{MISSING} no approximation records (kind=approx).")
        return
    files.append(plot_approx(approx, out / "approx_error.png"))
    inputs = approx.drop_duplicates("variant").set_index("variant").get("inputs", pd.Series(dtype=str))
    page.note("Relative Frobenius error ||A - softmax||_F / ||softmax||_F, mean ± std over seeds, on "
              + "; ".join(f"{v}: {d}" for v, d in inputs.items())
              + ". Linformer's E/F, the memory-compressed convolution and AFT's biases are untrained.")
    page.table(approx_table(approx))
    page.image(files[-1], "approx_error.png")


def main() -> None:
    """``arena-report``: Hydra app over conf/report.yaml."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(conf_dir()), config_name="report", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        result = build_report(cfg.results_dir, cfg.out, memory_budget_gb=cfg.memory_budget_gb,
                              slope_range=tuple(cfg.slope_range), title=cfg.title)
        print(f"report written in {result['build_s']:.1f} s: {shown_path(Path(result['out']) / 'report.html')}")

    prepare()  # plug-ins' mechanisms (family, complexity) for the tables
    _app()


if __name__ == "__main__":
    main()
