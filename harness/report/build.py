"""The report builder: load the store, write each section, render ``report.md`` and ``report.html``.

Owns: the sections of the page and ``arena-report``'s ``main``. Imports: ``attentions`` (the registry),
:mod:`harness.store`, :mod:`harness.analysis`, :mod:`harness.display` and the other
:mod:`harness.report` modules.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attentions import available_attentions, get_attention_info
from harness.analysis import DEFAULT_MEMORY_BUDGET_GB, FULL_REFERENCE, SDPA_OVERHEAD_TARGET, full_overhead
from harness.display import (
    MISSING,
    analysis_note,
    derived_display,
    format_bytes,
    format_time_spread,
    one_line_interrupt,
    shown_path,
)
from harness.plugins import add_absent_keys, conf_dir, exit_on_settings_error, prepare
from harness.report.average import average_section
from harness.report.decoding import DECODE_KIND, decoding_section, recall_cost_section
from harness.report.groups import Comparison, Setting, comparisons, is_smoke, settings
from harness.report.lra import published_section
from harness.report.multiquery import multiquery_section
from harness.report.page import Page
from harness.report.plots import SEEDS_NOTE, plot_accuracy_speed, plot_approx, plot_scaling
from harness.report.published import LRA_TABLE_2, TABLE_2_NOTE
from harness.report.recall import recall_section
from harness.report.summary import summary_section
from harness.report.tables import (
    approx_seeds,
    approx_table,
    bench_cells,
    comparison_table,
    peer_table,
    pivot_cells,
    published_ratio_table,
    relative_table,
    shrinking_budgets,
)
from harness.settings import check_known
from harness.store import KINDS, load_records, nested_stores


@dataclass(frozen=True)
class StoreFrames:
    """The store's records by kind, and the record files that could not be read (path -> why)."""

    train: pd.DataFrame
    bench: pd.DataFrame
    approx: pd.DataFrame
    peer: pd.DataFrame
    unreadable: dict[str, str]
    root: Path  # the results folder, as given
    decode: pd.DataFrame = field(default_factory=pd.DataFrame)  # decode cells (arena-bench mode=decode)


class NothingToReport(ValueError):
    """The results folder holds no readable record: no report is written (an empty page would read like a
    finished one). Its message names the folder, what it holds instead and what to run."""


def load_store(results_dir: Path) -> StoreFrames:
    """Every record of the four kinds; unreadable files are listed with their reason, not raised.

    Raises FileNotFoundError naming ``results_dir`` when it is not a folder, and :class:`NothingToReport`
    when it holds no readable record (a typo or a folder of reports must not give an empty report)."""
    if not Path(results_dir).is_dir():
        # As the user typed it (shown_path would turn /nonexistent into ../../nonexistent).
        raise FileNotFoundError(f"results_dir {str(results_dir)!r} does not exist or is not a folder; "
                                "run arena-bench / arena-train / arena-suite first, or pass results_dir=<store>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each unreadable file is said once, by the caller, with its reason
        frames = {kind: load_records(results_dir, kind=kind) for kind in store_kinds()}
    unreadable = {path: why for frame in frames.values() for path, why in frame.attrs["unreadable_why"].items()}
    if all(frame.empty for frame in frames.values()):
        raise NothingToReport(nothing_to_report(Path(results_dir), unreadable))
    return StoreFrames(**frames, unreadable=unreadable, root=Path(results_dir))


def store_kinds() -> tuple[str, ...]:
    """The kinds the report reads: the store's, and ``decode`` cells even where the store does not list them."""
    return KINDS if DECODE_KIND in KINDS else (*KINDS, DECODE_KIND)


def nothing_to_report(results_dir: Path, unreadable: dict[str, str]) -> str:
    """The one-line message of a results folder without a readable record: what it holds instead (only
    unreadable files, a built report, a store nested in it) and what to do."""
    where = shown_path(results_dir)
    kinds = "/, ".join(store_kinds())
    text = f"nothing to report: {where!r} holds no readable records (none under {kinds}/)"
    if unreadable:
        text += f"; {len(unreadable)} unreadable record file(s) skipped: " + ", ".join(
            f"{shown_path(p)} ({why})" for p, why in unreadable.items())
    if (results_dir / "report.md").is_file():
        text += "; it holds a built report (report.md), not the records it was built from"
    nested = nested_stores(results_dir)
    if nested:
        text += "; stores inside it: " + ", ".join(f"arena-report results_dir={shown_path(d)}" for d in nested)
    return text + ". Run arena-suite, arena-bench or arena-train first, or pass results_dir=<a results store>"


def say_unreadable(unreadable: dict[str, str]) -> None:
    """One line on stderr per record file left out of the report, naming it and why (a truncated file
    otherwise only shows as a mechanism with fewer seeds)."""
    for path, why in unreadable.items():
        print(f"arena-report: skipped unreadable record file {shown_path(path)}: {why}; its record is left out "
              "of the report", file=sys.stderr, flush=True)


def build_report(results_dir: str | Path = "results", out: str | Path | None = None,
                 memory_budget_gb: float | None = None, slope_range: Sequence[float] | None = None,
                 title: str = "attention-arena report") -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and the PNGs to ``out`` (default ``<results_dir>/report``).

    ``memory_budget_gb`` and ``slope_range`` None: those the benchmark recorded with its cells (its own
    default budget, the slope range derived from the measured lengths), so the console, the suite and
    this page print the same derived figures. Returns ``{"out": folder, "files": [...], "build_s": s}``.
    Raises FileNotFoundError when ``results_dir`` does not exist and :class:`NothingToReport` when it holds
    no readable record (nothing is written then). Each unreadable record file is named on stderr.
    """
    started = time.perf_counter()
    results_dir = Path(results_dir)
    store = load_store(results_dir)
    say_unreadable(store.unreadable)
    out = Path(out) if out is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    page = Page(title)
    files: list[Path] = []
    comps = comparisons(store.train)
    groups = settings(store.bench)
    summary_section(page, store, comps, groups, _analysis_of)
    accuracy_section(page, store.train, comps, out, files)
    average_section(page, comps, out, files, available_attentions())
    published_section(page, comps)
    recall_section(page, store.train, out, files)
    recall_cost_section(page, store.train, store.decode, out, files)
    multiquery_section(page, store.train, store.decode, out, files)
    for setting in groups:
        budget, fit = _analysis_of(setting, memory_budget_gb, slope_range)
        efficiency_section(page, setting, out, files, budget, fit, file_prefix(setting, groups[0]))
    if not groups:
        page.note(f"{MISSING} no benchmark records (kind=bench): run arena-bench.", place="tables")
    decoding_section(page, store.decode, out, files)
    approx_section(page, store.approx, out, files)
    peer_section(page, store.peer)
    page.note(f"Results store: {shown_path(results_dir)}. Generated {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} "
              f"UTC. '{MISSING} (reason)' marks a cell without a number; no missing value is shown as zero.")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(page.markdown(), encoding="utf-8")
    html_path.write_text(page.html(), encoding="utf-8")
    return {"out": out, "files": [md_path, html_path, *files], "build_s": time.perf_counter() - started}


def _analysis_of(setting: Setting, budget_gb: float | None = None,
                 slope_range: Sequence[float] | None = None) -> tuple[float | None, tuple | None]:
    """(memory budget in GB, slope range) of a setting: given ones, else the newest its cells recorded."""
    rows = setting.records.sort_values("created_at")
    if budget_gb is None:
        recorded = rows["memory_budget_gb"].dropna() if "memory_budget_gb" in rows else pd.Series([], dtype=float)
        budget_gb = float(recorded.iloc[-1]) if len(recorded) else DEFAULT_MEMORY_BUDGET_GB
    if slope_range is None and "slope_range" in rows:
        recorded = [json.loads(v) for v in rows["slope_range"].dropna() if isinstance(v, str)]
        slope_range = tuple(recorded[-1]) if recorded else None
    return budget_gb, (tuple(slope_range) if slope_range is not None else None)


def accuracy_section(page: Page, train: pd.DataFrame, comps: list[Comparison], out: Path,
                     files: list[Path]) -> None:
    """One table per comparison (recipe) and the accuracy-vs-speed figure, one panel per comparison."""
    page.heading("Accuracy: one table per recipe (runs that differ only in mechanism and seed)")
    if not comps:
        page.note(f"{MISSING} no training records (kind=train) in the store.")
        return
    registered = available_attentions()
    panels = []
    for comp in comps:
        display, numeric = comparison_table(comp, registered)
        page.heading(comp.title, level=4)
        page.note(f"test accuracy % at the best validation checkpoint, mean ± sample std over seeds; "
                  f"[+k status] = failed runs beside them. {BUDGET_NOTE} {_recipe_note(comp)}")
        page.table(display)
        alias_note(page, comp)
        points = _accuracy_points(numeric)
        if len(points) >= 2:
            panels.append((comp.title, points))
    ran = set(train["attention"].dropna())
    no_dropout = [m for m in registered if m in ran and not get_attention_info(m).applies_dropout]
    if no_dropout:
        page.note("attention dropout has no effect in " + ", ".join(no_dropout) + " (no probability matrix to "
                  "drop), so with attention_dropout > 0 they train with less regularisation than the others.")
    if panels:
        files.append(plot_accuracy_speed(panels, out / "accuracy_vs_speed.png"))
        page.heading("Accuracy vs training speed, one panel per recipe", place="figures")
        page.note("y: test accuracy from 0, the dashed line is the majority class (a mechanism on it learned "
                  "nothing); x: training examples/s relative to full in the same recipe; bubble area: peak memory "
                  f"of a training step relative to full; the bubble's centre is the mean over seeds. {SEEDS_NOTE}",
                  place="figures")
        page.image(files[-1], "accuracy_vs_speed.png")


BUDGET_NOTE = ("budget: what the recipe gives the mechanism (its attention_overrides entry), and the parameters "
               "that set its budget left at their values ('(default)'); state vs full: floats one query reads "
               "relative to full attention's keys and values at this length (docs/MQAR.md, State size).")


def alias_note(page: Page, comp: Comparison) -> None:
    """Runs of this recipe that validated on the test split (LRA's protocol for some tasks): their test
    accuracy is the best of many test evaluations, and the page says so under their table."""
    if "validation_is_test" not in comp.runs:
        return
    alias = comp.runs["validation_is_test"].fillna(False).astype(bool)
    if alias.any():
        page.note(f"{comp.title}: {int(alias.sum())} run(s) validated on the test split (LRA's protocol, "
                  "validation=test), so their test accuracy is the best of many test evaluations (optimistic); "
                  "see docs/DATA.md.")


def _recipe_note(comp: Comparison) -> str:
    facts = [f"device {comp.recipe['device']}" if "device" in comp.recipe else None,
             f"{comp.recipe['train.max_steps']} steps" if comp.recipe.get("train.epochs") is None
             and "train.max_steps" in comp.recipe else None,
             f"{comp.recipe['train.epochs']} epochs" if comp.recipe.get("train.epochs") is not None else None]
    facts = [f for f in facts if f] + [_length_note(comp.runs)]
    return ("Recipe: " + ", ".join(f for f in facts if f) + ".") if any(facts) else ""


def _length_note(runs: pd.DataFrame) -> str:
    """The sequence length the mechanisms were built for, which their budgets are relative to."""
    if "attention_config.max_seq_len" not in runs:
        return ""
    lengths = pd.to_numeric(runs["attention_config.max_seq_len"], errors="coerce").dropna().unique()
    if len(lengths) != 1:
        return ""
    pooling = runs["model_config.pooling"] if "model_config.pooling" in runs else pd.Series(dtype=object)
    token_level = runs["model_config.token_level"] if "model_config.token_level" in runs else pd.Series(dtype=object)
    cls = len(pooling) > 0 and pooling.eq("cls").all() and not token_level.fillna(False).astype(bool).any()
    return f"sequences of up to n = {int(lengths[0])} positions" + (" (CLS token included)" if cls else "")


def _accuracy_points(numeric: pd.DataFrame) -> pd.DataFrame:
    points = numeric[np.isfinite(numeric["accuracy"]) & np.isfinite(numeric["examples_per_s"])].copy()
    relative = "full" in points.index and np.isfinite(points["speed_vs_full"]).all()
    points["speed"] = points["speed_vs_full"] if relative else points["examples_per_s"]
    points.attrs["relative"] = relative
    points.attrs["speed_label"] = ("training examples/s relative to full" if relative
                                   else "training examples/s (no full run in this recipe)")
    return points


def file_prefix(setting: Setting, first: Setting) -> str:
    """The plots' file name prefix: empty for the first setting, else what differs from it (``causal_``)."""
    differs = [str(v) for k, v in setting.values.items() if first.values.get(k) != v]
    return "".join(re.sub(r"[^A-Za-z0-9.]+", "-", d) + "_" for d in differs) if setting is not first else ""


def efficiency_section(page: Page, setting: Setting, out: Path, files: list[Path], budget_gb: float | None,
                       slope_range: tuple | None, prefix: str = "") -> pd.DataFrame:
    """One setting: the scaling plots, then time, memory, ratios to full, derived figures; returns the cells."""
    cells = bench_cells(setting.records)
    methods = ", ".join(sorted(cells["memory_method"].dropna().unique())) or MISSING
    busy = busy_load(setting.records)
    smoke = is_smoke(setting)
    busy_text = (f" Measured on a busy machine (1-minute load up to {busy[0]:.1f} on {busy[1]} CPUs): other work "
                 "slowed every cell, so absolute times and slopes are not trustworthy; re-run with force=true on a "
                 "quiet machine." if busy else "")
    if smoke:
        busy_text += (" SMOKE SETTINGS (one repeat at tiny n): a check that every stage runs, not a measurement; "
                      "the times, slopes, crossovers and overheads below mean nothing.")
    page.heading(f"Efficiency: {setting.label}", place="figures")
    page.note(f"The mechanism alone on projected q, k, v. Memory method: {methods}.{busy_text}", place="figures")
    title = setting.label + (f"\nbusy machine (load up to {busy[0]:.1f} on {busy[1]} CPUs): times not trustworthy"
                             if busy else "") + ("\nsmoke settings: a check, not a measurement" if smoke
                                                  else "")
    for metric, name in (("median_s", f"{prefix}time_vs_n.png"), ("peak_bytes", f"{prefix}memory_vs_n.png")):
        files.append(plot_scaling(cells, metric, out / name, setting=title))
        page.image(files[-1], name)
    page.heading(f"Efficiency: {setting.label}")
    noisy = int(cells["noisy"].sum()) if "noisy" in cells else 0
    page.note("Times: median [p10–p90] in ms" + (f"; {noisy} cell(s) marked (noisy) stayed disturbed after "
                                                 "re-measuring: shown, left out of slopes and crossovers" if noisy
                                                 else "") + "." + (busy_text if smoke else ""))
    reference = " ".join(filter(None, [str(setting.values.get("pattern") or ""), "full"]))
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ in set(cells["pass"]):
            page.note(f"Time, {pass_} (ms)")
            page.table(pivot_cells(cells, pass_, format_time_spread))
            page.note(f"Peak memory, {pass_}")
            page.table(pivot_cells(cells, pass_, lambda row: format_bytes(row["peak_bytes"])))
            page.note(f"Relative to {reference}, {pass_}: speed-up x / memory ratio (LRA Table 2 layout)")
            page.table(relative_table(cells, pass_))
            baseline_sections(page, cells, pass_)
    page.note(analysis_note(cells, slope_range, budget_gb) + ".")
    page.table(derived_display(cells, slope_range, budget_gb * 1e9 if budget_gb else None), index=False)
    overhead_section(page, cells)
    return cells


def baseline_sections(page: Page, cells: pd.DataFrame, pass_: str) -> None:
    """The second exact baseline (``full_reference``, the materialised ``n x n`` matrix) where it was measured:
    every mechanism relative to it, and for ``fwd+bwd`` (a training step's pass) LRA Table 2's ratios beside ours."""
    if FULL_REFERENCE not in set(cells[cells["pass"] == pass_]["mechanism"]):
        return
    page.note(f"Relative to {FULL_REFERENCE} (full with backend=reference: the materialised n x n softmax, LRA "
              f"Table 2's baseline), {pass_}: speed-up x / memory ratio")
    page.table(relative_table(cells, pass_, FULL_REFERENCE))
    theirs = published_ratio_table(cells, pass_) if pass_ == "fwd+bwd" else pd.DataFrame()
    if not theirs.empty:
        page.note(f"Ours against {FULL_REFERENCE} beside LRA Table 2's published ratios against its Transformer "
                  f"({LRA_TABLE_2.source}; {LRA_TABLE_2.setup}): speed-up x / memory ratio. {TABLE_2_NOTE}")
        page.table(theirs)


def overhead_section(page: Page, cells: pd.DataFrame) -> None:
    """full through the registry vs SDPA called directly, every value over the target marked."""
    overhead = full_overhead(cells)
    if overhead.empty:
        return
    over = overhead["overhead"] > SDPA_OVERHEAD_TARGET
    overhead["overhead"] = [f"{x:+.1%}" + (" (over target)" if o else "") for x, o in zip(overhead["overhead"], over)]
    verdict = (f"{int(over.sum())} of {len(over)} over the target, marked" if over.any()
               else "every value within it")
    page.note(f"full through the registry vs torch SDPA called directly (target <= {SDPA_OVERHEAD_TARGET:+.0%}; "
              f"clean cells only; {verdict}):")
    page.table(overhead, index=False)


def busy_load(records: pd.DataFrame) -> tuple[float, int] | None:
    """(highest 1-minute load, CPUs) when the load exceeded the CPUs while these cells were measured, else
    None. A uniform slowdown moves no spread and no trend: only the load shows it."""
    if "noise.load_before" not in records or "noise.cpus" not in records:
        return None
    loads = pd.concat([records["noise.load_before"], records["noise.load_after"]]).dropna()
    cpus = records["noise.cpus"].dropna()
    if not len(loads) or not len(cpus) or loads.max() <= float(cpus.max()):
        return None
    return float(loads.max()), int(cpus.max())


# Why Performer's iid curve is flat near 2: the estimator's variance, not a numerical fault (measured in
# float64 with the same module; see the note's text for the numbers).
PERFORMER_VARIANCE = (
    "Performer's positive random features are unbiased, but the relative variance of each kernel estimate is "
    "about exp(||x + y||^2) / m with x = q / d^(1/4), y = k / d^(1/4) (Choromanski et al. 2021, Lemma 2). "
    "On iid N(0, 1) inputs at head dim 32 that is about e^11.3 / m = 8e4 / m, so its iid error stays near 2 "
    "for any affordable m (float64, n = 1024: 2.5, 2.2, 2.2, 2.9, 2.0 at m = 16, 64, 256, 1024, 4096), while "
    "at input scale 0.25 it falls as 1 / sqrt(m) (0.18 at m = 16 to 0.012 at m = 4096).")


def approx_section(page: Page, approx: pd.DataFrame, out: Path, files: list[Path]) -> None:
    """Relative error against the attention each mechanism approximates vs its budget: plot and table."""
    page.heading("Approximation error")
    if approx.empty or "error_mean" not in approx:
        page.note(f"{MISSING} no approximation records (kind=approx).")
        return
    approx = comparable_approx(approx)
    setting = _approx_setting(approx)
    shrinking = shrinking_budgets(approx)
    files.append(plot_approx(approx, out / "approx_error.png", setting, shrinking))
    page.heading("Approximation error vs budget", place="figures")
    page.note("Relative error against what each mechanism approximates (panel title) vs its budget parameter, one "
              "line per input kind, one shared log y axis. " + _shrinking_note(approx, shrinking), place="figures")
    page.image(files[-1], "approx_error.png")
    inputs = approx.drop_duplicates("variant").set_index("variant").get("inputs", pd.Series(dtype=str))
    references = approx.drop_duplicates("mechanism").set_index("mechanism")["reference"]
    page.note(f"Relative Frobenius error ||A - R||_F / ||R||_F, {_approx_seed_text(approx)}, {setting}, where R "
              "is what the mechanism approximates: " + "; ".join(f"{m}: {r}" for m, r in references.items())
              + ". AFT approximates no attention function and is left out. Inputs: "
              + "; ".join(f"{v}: {d}" for v, d in inputs.items())
              + ". Linformer's E/F and the memory-compressed convolution are untrained. "
              + _shrinking_note(approx, shrinking) + PERFORMER_VARIANCE)
    page.table(approx_table(approx))


def _shrinking_note(approx: pd.DataFrame, shrinking: set[str]) -> str:
    """Which panels read the other way round: their parameter grows as their budget shrinks."""
    if not shrinking:
        return ""
    params = approx.drop_duplicates("mechanism").set_index("mechanism")["param"]
    named = ", ".join(f"{m} ({params[m]}: larger {params[m]} = smaller budget)" for m in sorted(shrinking))
    return (f"In every panel but {named} the budget grows to the right and the error should fall; in those it "
            "shrinks to the right, so their error rises. ")


def _approx_seed_text(approx: pd.DataFrame) -> str:
    """``mean ± std over 3 seeds``; ``(1 seed)`` when every ok record has one (its cells show no ±)."""
    seeds = approx_seeds(approx[approx["status"] == "ok"]).dropna()
    if len(seeds) and (seeds == 1).all():
        return "(1 seed; no spread measured)"
    counts = sorted({int(s) for s in seeds if s > 1})
    over = "" if not counts else f"{counts[0]} " if len(counts) == 1 else f"{counts[0]}-{counts[-1]} "
    one = "; a cell of one seed: the value alone" if (seeds == 1).any() else ""
    return f"mean ± std over {over}seeds{one}"


def comparable_approx(approx: pd.DataFrame) -> pd.DataFrame:
    """The records whose reference is what the mechanism approximates: records written before the study
    named its reference compared everything to softmax, which is right except for RFA (its own kernel)
    and AFT (nothing); those two are dropped from old records."""
    reference = approx["reference"] if "reference" in approx else pd.Series(None, index=approx.index, dtype=object)
    old = reference.isna()
    keep = ~(old & approx["mechanism"].isin(["rfa", "aft"]))
    return approx[keep].assign(reference=reference[keep].astype(object).where(~old[keep], "softmax"))


def _approx_setting(approx: pd.DataFrame) -> str:
    first = approx.iloc[0]
    parts = [f"n = {first.get('n')}" if "n" in approx else None,
             f"batch {first.get('batch')}" if "batch" in approx else None,
             f"{first.get('heads')} heads, head dim {first.get('head_dim')}" if "heads" in approx else None,
             "float32 on CPU vs a float64 reference"]
    return ", ".join(p for p in parts if p and "nan" not in p)


def peer_section(page: Page, peer: pd.DataFrame) -> None:
    """Ours / public implementation ratios."""
    page.heading("Peers (ours / public implementation)")
    if peer.empty:
        page.note(f"{MISSING} no peer records (the optional 'peers' extra was not installed or not run).")
        return
    page.note("Ratios < 1: ours is faster / smaller. level core = same projected q, k, v; level layer = ours "
              "wrapped in the peer's Q/K/V/output projections.")
    page.table(peer_table(peer), index=False)


def main() -> None:
    """``arena-report``: Hydra app over conf/report.yaml. A missing store, or one without a readable record,
    exits 2 with one line naming it; Ctrl-C exits 130 with one line."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(conf_dir()), config_name="report", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        with exit_on_settings_error("arena-report"):  # a key nothing reads: one line naming the valid ones
            check_known(cfg, [k for k in OmegaConf.load(conf_dir() / "report.yaml") if k != "hydra"])
        slope = tuple(cfg.slope_range) if cfg.get("slope_range") is not None else None
        try:
            result = build_report(cfg.results_dir, cfg.out, memory_budget_gb=cfg.memory_budget_gb,
                                  slope_range=slope, title=cfg.title)
        except (FileNotFoundError, NothingToReport) as exc:
            print(f"arena-report: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"report written in {result['build_s']:.1f} s: {shown_path(Path(result['out']) / 'report.html')}")

    prepare(app="arena-report")  # plug-ins' mechanisms (family, complexity) for the tables
    sys.argv[1:] = add_absent_keys(sys.argv[1:], conf_dir() / "report.yaml")  # unknown keys: our one-line error
    with one_line_interrupt("arena-report", "nothing in the store was changed"):
        _app()


if __name__ == "__main__":
    main()
