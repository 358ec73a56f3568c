"""The report's multi-query section (issue 26): what one key-value head (multi-query attention, Shazeer 2019)
costs each causal mechanism in MQAR recall, beside what it saves in decode state.

Reads the training records of the decoder MQAR with as many key-value heads as query heads
(:data:`MHA_EXPERIMENT`, ``quick/mqar_causal``) and with one (:data:`MQA_EXPERIMENT`, ``quick/mqar_causal_mqa``:
the same recipe with ``model.num_kv_heads: 1``), and the decode cells at :data:`MQA_CONTEXT` of both
configurations: the whole models (``model_size`` ``mqar_causal`` and ``mqar_causal_mqa``) where recorded, else
the mechanism alone (``num_kv_heads`` null and 1). State bytes are read as measured: a mechanism that receives
repeated keys and values (its info's ``grouped_kv``: ``expanded``) holds as much as without groups.

* :func:`multiquery_table`: one row per causal mechanism: recall (mean ± sample std over seeds) with kv heads =
  heads and = 1, the change in points (``≈``: the seeds cannot tell the two apart, :func:`harness.report.recall.
  is_tie`), how the mechanism takes grouped keys and values, the decode state per sequence for both and their
  ratio, and the scope the bytes come from. A mechanism that refuses groups (reformer) says why; a run or a cell
  that is missing says so (``— (why)``), never blank.
* :func:`plot_multiquery`: recall against state bytes, an arrow per mechanism from its multi-head point to its
  multi-query point: the trade-off's direction at a glance (left = state saved, down = recall lost).

Owns: this section only. Imports: pandas, numpy, matplotlib, ``attentions`` (the registry's grouped_kv and its
note), :mod:`harness.display`, :mod:`harness.report.page`, :mod:`harness.report.plots` (styles),
:mod:`harness.report.recall` (ties), :mod:`harness.report.decoding` (the decode frame).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attentions import get_attention_info
from harness.display import MISSING, format_bytes, not_run
from harness.report.decoding import _k, decode_frame
from harness.report.groups import comparisons
from harness.report.page import Page
from harness.report.plots import MECHANISM_ORDER, _pyplot, _save, mechanism_style
from harness.report.recall import is_tie
from harness.report.recipe_files import matches_recipe_file

MHA_EXPERIMENT = "quick/mqar_causal"  # kv heads = heads
MQA_EXPERIMENT = "quick/mqar_causal_mqa"  # one key-value head: the same recipe with model.num_kv_heads: 1
MODEL_SIZES = {"heads": "mqar_causal", "one": "mqar_causal_mqa"}  # the decode model sizes of the two recipes
MQA_CONTEXT = 4096
VARIANTS = ("heads", "one")  # kv heads = heads, kv heads = 1
NOT_TRAINED = {"heads": f"not trained: {MHA_EXPERIMENT}",
               "one": f"not trained: {MQA_EXPERIMENT} (arena-suite size=extended runs it)"}


@dataclass(frozen=True)
class Recall:
    """One mechanism's recall in one configuration: each ok seed's test accuracy (%), and why there is none."""

    values: tuple[float, ...] = ()
    why: str | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    def text(self) -> str:
        if not self.values:
            return not_run(self.why or "no run")
        n = len(self.values)
        if n == 1:
            return f"{self.mean:.1f} (1 seed)"
        return f"{self.mean:.1f} ± {float(np.std(self.values, ddof=1)):.1f} ({n} seeds)"


@dataclass(frozen=True)
class State:
    """One configuration's decode state per sequence at :data:`MQA_CONTEXT` (bytes), and why there is none."""

    bytes: float = float("nan")
    why: str | None = None

    def text(self) -> str:
        return format_bytes(self.bytes) if np.isfinite(self.bytes) else not_run(self.why or "no cell")


def refused_reason(name: str) -> str | None:
    """``refused: <note>`` when the mechanism refuses grouped keys and values (its registry info), else None."""
    try:
        info = get_attention_info(name)
    except ValueError:  # a plug-in not loaded here
        return None
    if info.grouped_kv != "refused":
        return None
    return "refused" + (f": {info.grouped_kv_note}" if info.grouped_kv_note else "")


def grouped_text(name: str) -> str:
    """How the mechanism takes grouped keys and values (``shared``: one summary per key-value head; ``expanded``:
    repeated copies, so its state does not shrink; ``refused``), or ``—`` for a mechanism not registered here."""
    try:
        return get_attention_info(name).grouped_kv
    except ValueError:
        return MISSING


def recipe_runs(train: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(runs, left out): the training runs of the two recipes, one comparison of each (runs that differ only in
    mechanism and seed, :func:`harness.report.groups.comparisons`): the one with the settings its recipe file
    sets, else the one with the most runs; the titles of the others of these recipes (another step count, say),
    left out so that no mean pools two settings."""
    if train.empty or "experiment" not in train:
        return train, []
    kept, left_out = [], []
    for experiment in (MHA_EXPERIMENT, MQA_EXPERIMENT):
        comps = comparisons(train[train["experiment"] == experiment])
        if not comps:
            continue
        best = max(comps, key=lambda c: (matches_recipe_file(c, experiment), len(c.runs)))
        kept.append(best.runs)
        left_out += [c.title for c in comps if c is not best]
    return (pd.concat(kept) if kept else train.iloc[0:0]), left_out


def recall_of(train: pd.DataFrame, name: str, variant: str) -> Recall:
    """The ok seeds of ``name`` trained with the variant's recipe; else why none: refused, the failed runs'
    statuses, or not trained."""
    experiment = MHA_EXPERIMENT if variant == "heads" else MQA_EXPERIMENT
    runs = train[(train["experiment"] == experiment) & (train["attention"] == name)] if not train.empty else train
    ok = runs[(runs["status"] == "ok") & runs["test_acc"].notna()] if not runs.empty else runs
    if not ok.empty:
        return Recall(tuple(float(a) * 100 for a in ok["test_acc"]))
    refused = refused_reason(name) if variant == "one" else None
    if refused:
        return Recall(why=refused)
    if not runs.empty:
        return Recall(why="failed: " + ", ".join(f"{c} {s}" for s, c in runs["status"].value_counts().items()))
    return Recall(why=NOT_TRAINED[variant])


def _decode_cells(decode: pd.DataFrame | None) -> pd.DataFrame:
    if decode is None or decode.empty or "mechanism" not in decode:
        return pd.DataFrame(columns=["mechanism", "scope", "model_size", "context", "status", "num_kv_heads"])
    cells = decode_frame(decode)
    cells = cells[(cells["context"] == MQA_CONTEXT) & ~cells["forced_recompute"]]
    return cells.sort_values("batch")


def _cell_for(cells: pd.DataFrame, name: str, scope: str, variant: str) -> pd.DataFrame:
    """The mechanism's decode cells of one configuration in one scope (smallest batch first)."""
    mine = cells[(cells["mechanism"] == name) & (cells["scope"] == scope)]
    if scope == "model":
        return mine[mine["model_size"] == MODEL_SIZES[variant]]
    kv = pd.to_numeric(mine["num_kv_heads"], errors="coerce")
    return mine[kv.isna()] if variant == "heads" else mine[kv == 1]


def states_of(cells: pd.DataFrame, name: str) -> tuple[str | None, dict[str, State]]:
    """(scope, state per variant): the whole model's cells when it has an ok one, else the mechanism alone's
    (the scope with more ok cells; the model on a tie), so the two bytes and their ratio come from one scope."""
    def counts(scope: str) -> tuple[int, int, bool]:  # ok variants, variants with a cell, the model first
        found = [_cell_for(cells, name, scope, v) for v in VARIANTS]
        return sum(int((f["status"] == "ok").any()) for f in found), sum(int(not f.empty) for f in found), \
            scope == "model"

    scope = max(("model", "mechanism"), key=counts)
    scope = scope if counts(scope)[1] else None
    states = {}
    for variant in VARIANTS:
        rows = _cell_for(cells, name, scope, variant) if scope else pd.DataFrame()
        ok = rows[rows["status"] == "ok"] if not rows.empty else rows
        if not ok.empty:
            states[variant] = State(float(ok.iloc[0]["state_bytes_per_seq"]))
        elif not rows.empty:
            first = rows.iloc[0]
            reason = str(first["reason"]).split(" (")[0] if isinstance(first["reason"], str) else ""
            states[variant] = State(why=f"{first['status']}" + (f": {reason}" if reason else ""))
        elif variant == "one" and refused_reason(name):
            states[variant] = State(why=refused_reason(name))
        else:
            states[variant] = State(why=f"no decode cell at {_k(MQA_CONTEXT)}")
    return scope, states


def mechanisms_of(train: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    """The causal mechanisms with a record of either configuration (a training run or a decode cell at the
    context), in the report's fixed order."""
    names = set(cells["mechanism"].dropna().astype(str)) if not cells.empty else set()
    if not train.empty and "experiment" in train:
        names |= set(train.loc[train["experiment"].isin([MHA_EXPERIMENT, MQA_EXPERIMENT]), "attention"].dropna())
    rank = {n: i for i, n in enumerate(MECHANISM_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _change(heads: Recall, one: Recall) -> str:
    if not (heads.values and one.values):
        return MISSING
    text = f"{one.mean - heads.mean:+.1f}"
    return text + " (≈, within the seeds)" if is_tie(list(heads.values), list(one.values)) else text


def _ratio(states: dict[str, State]) -> str:
    heads, one = states["heads"].bytes, states["one"].bytes
    return f"{one / heads:.2f}x" if np.isfinite(heads) and np.isfinite(one) and heads > 0 else MISSING


SCOPE_TEXT = {"model": "whole model", "mechanism": "mechanism alone", None: MISSING}


def multiquery_table(train: pd.DataFrame, decode: pd.DataFrame | None) -> pd.DataFrame:
    """One row per causal mechanism (see the module docstring); empty when neither configuration has a record.
    ``train``: the store's training records (``experiment``, ``attention``, ``status``, ``test_acc``);
    ``decode``: its decode records."""
    train = train if train is not None and "experiment" in train and "test_acc" in train else pd.DataFrame()
    train, left_out = recipe_runs(train)
    cells = _decode_cells(decode)
    rows = []
    for name in mechanisms_of(train, cells):
        heads, one = recall_of(train, name, "heads"), recall_of(train, name, "one")
        scope, states = states_of(cells, name)
        rows.append({
            "mechanism": name,
            "recall %, kv heads = heads": heads.text(),
            "recall %, kv heads = 1": one.text(),
            "change (points)": _change(heads, one),
            "grouped keys, values": grouped_text(name),
            f"state / sequence at {_k(MQA_CONTEXT)}, kv heads = heads": states["heads"].text(),
            "kv heads = 1": states["one"].text(),
            "ratio": _ratio(states),
            "state measured on": SCOPE_TEXT[scope],
            "_heads": heads, "_one": one, "_states": states,
        })
    table = pd.DataFrame(rows)
    table.attrs["left_out"] = left_out
    return table


def multiquery_section(page: Page, train: pd.DataFrame, decode: pd.DataFrame | None, out: Path,
                       files: list[Path]) -> None:
    """The table (detailed tables) and its figure; nothing when the store holds no record of a multi-query
    configuration (a multi-query training run, a decode cell with one key-value head)."""
    table = multiquery_table(train, decode)
    if table.empty or not _has_multiquery(train, decode):
        return
    shown = table[[c for c in table.columns if not c.startswith("_")]]
    page.heading("Multi-query attention: recall and decode state")
    page.note(f"What one key-value head serving all query heads (multi-query attention, model.num_kv_heads=1) costs "
              f"each causal mechanism in MQAR recall, beside what it saves in decode state. Recall: decoder-form MQAR "
              f"test accuracy %, mean ± sample std over seeds, of {MHA_EXPERIMENT} (kv heads = heads) and "
              f"{MQA_EXPERIMENT} (the same recipe with one key-value head); change: kv 1 minus kv heads in points, "
              "'≈' where the seeds cannot tell them apart. Grouped keys, values: how the mechanism takes them "
              "(shared: one cache or summary per key-value head, so its state shrinks; expanded: repeated copies, "
              "so it holds as much as without groups; refused: it cannot take them). State: bytes held per "
              f"sequence at a context of {MQA_CONTEXT:,} tokens as arena-bench mode=decode measured it, on the whole "
              "model of each recipe (all layers) where recorded, else on the mechanism alone (one layer; the "
              "decoding tables give its heads and head dim); ratio: kv 1 over kv heads. '— (why)': a run or a "
              "cell that is missing or refused.")
    page.table(shown, index=False)
    if table.attrs.get("left_out"):
        page.note("Runs of these recipes with other settings, left out of this table (one setting per recipe, the "
                  "recipe file's where it ran): " + "; ".join(table.attrs["left_out"]) + ".")
    points = _plot_points(table)
    if len(points) >= 1:
        files.append(plot_multiquery(points, out / "multiquery_recall_vs_state.png"))
        page.heading("Multi-query attention: recall vs decode state", place="figures")
        page.note("Each mechanism's MQAR decoder recall (mean over seeds) against its decode state per sequence at "
                  f"{_k(MQA_CONTEXT)}: an arrow from kv heads = heads (hollow) to kv heads = 1 (filled). Left: state "
                  "saved; down: recall lost. A vertical arrow: the mechanism receives repeated keys and values "
                  "(expanded), so its state does not shrink. Only mechanisms with both runs and both cells are "
                  "drawn; the table has the others.", place="figures")
        page.image(files[-1], "multiquery_recall_vs_state.png")


def _has_multiquery(train: pd.DataFrame, decode: pd.DataFrame | None) -> bool:
    trained = train is not None and "experiment" in train and (train["experiment"] == MQA_EXPERIMENT).any()
    cells = _decode_cells(decode)
    measured = not cells.empty and (
        (pd.to_numeric(cells["num_kv_heads"], errors="coerce") == 1).any()
        | (cells["model_size"] == MODEL_SIZES["one"]).any())
    return bool(trained or measured)


def _plot_points(table: pd.DataFrame) -> pd.DataFrame:
    """The rows with both recalls and both states, as numbers."""
    rows = [{"mechanism": r["mechanism"], "scope": r["state measured on"],
             "recall_heads": r["_heads"].mean, "recall_one": r["_one"].mean,
             "bytes_heads": r["_states"]["heads"].bytes, "bytes_one": r["_states"]["one"].bytes}
            for _, r in table.iterrows()]
    points = pd.DataFrame(rows)
    if points.empty:
        return points
    return points[np.isfinite(points[["recall_heads", "recall_one", "bytes_heads", "bytes_one"]]).all(axis=1)]


def plot_multiquery(points: pd.DataFrame, path: Path) -> Path:
    """Recall (%) against state bytes per sequence (log x), an arrow per mechanism from kv heads = heads (hollow
    marker) to kv heads = 1 (filled), in the mechanism's fixed style; one panel per scope the bytes come from."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    scopes = list(dict.fromkeys(points["scope"]))
    fig, axes = plt.subplots(1, len(scopes), figsize=(6.4 * len(scopes), 4.8), squeeze=False)
    for ax, scope in zip(axes[0], scopes):
        panel = points[points["scope"] == scope]
        for _, r in panel.iterrows():
            style = mechanism_style(str(r["mechanism"]))
            marker = style["marker"] or "o"
            ax.plot([r["bytes_heads"]], [r["recall_heads"]], marker=marker, ms=7, ls="none", color=style["color"],
                    mfc="white")
            ax.plot([r["bytes_one"]], [r["recall_one"]], marker=marker, ms=7, ls="none", color=style["color"])
            ax.annotate("", xy=(r["bytes_one"], r["recall_one"]), xytext=(r["bytes_heads"], r["recall_heads"]),
                        arrowprops={"arrowstyle": "->", "color": style["color"], "lw": 1.2, "shrinkA": 5,
                                    "shrinkB": 5})
            ax.text(max(r["bytes_heads"], r["bytes_one"]) * 1.15, (r["recall_heads"] + r["recall_one"]) / 2,
                    str(r["mechanism"]), fontsize=7, color=style["color"], va="center")
        values = np.concatenate([panel["bytes_heads"], panel["bytes_one"]]).astype(float)
        ax.set_xscale("log")
        ax.set_xlim(values.min() / 3, values.max() * 8)  # room right of the last point for its name
        ax.xaxis.set_major_locator(LogLocator(base=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x).replace(".0 ", " ")))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-5, 105)
        ax.set_xlabel(f"decode state bytes per sequence at {_k(MQA_CONTEXT)} ({scope}; log)", fontsize=8)
        ax.set_ylabel("MQAR decoder test accuracy (%)", fontsize=8)
        ax.set_title(f"multi-query attention: hollow kv heads = heads -> filled kv heads = 1 ({scope})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    fig.text(0.01, 0.0, textwrap.fill("Means over seeds. Left: state saved by one key-value head; down: recall lost. "
                                      "A vertical arrow: the mechanism takes groups as repeated copies (expanded).",
                                      150), ha="left", va="top", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
