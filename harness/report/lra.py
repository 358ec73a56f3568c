"""The report's LRA section: our accuracy on the official LRA recipes beside the published numbers (theirs).

Only comparisons run with a recipe file under ``conf/experiment/lra/`` (the record's ``experiment``) and
with that file's settings get published numbers beside them: a quick/ or smoke/ recipe, or an lra/ recipe
run with a changed setting (``train.max_steps=100``), is another setup, so it is named in a note and left
out. "The file's settings" are the keys the recipe file sets and those of the config groups it selects
(``override /task: listops`` -> ``conf/task/listops.yaml``), read from the current ``conf_dir()`` and compared
with each run's resolved config; a key no file sets (a task parameter left at its code default) is not
checked.

Owns: this section. Imports: ``attentions`` (registry order of the rows), :mod:`harness.display`,
the other :mod:`harness.report` modules.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attentions import available_attentions
from harness.display import MISSING, not_run
from harness.report.groups import Comparison
from harness.report.page import Page
from harness.report.published import (
    FAIL,
    LRA_TASKS,
    PROTOCOL_NOTE,
    PUBLISHED,
    TASK_LABELS,
    PublishedSet,
    unmatched,
)
from harness.report.recipe_files import experiment_of, recipe_differences, recipe_file_values
from harness.report.tables import comparison_table

LRA_PREFIX = "lra/"
CAVEAT_MARK = " †"


def lra_comparisons(comps: list[Comparison], conf: Path | None = None) -> tuple[list[Comparison], dict[str, str]]:
    """(comparisons run with an lra/ recipe as its file sets it, {title: why another lra/ comparison is left
    out}). Comparisons of other recipes are neither."""
    official, left_out = [], {}
    for comp in comps:
        experiment = experiment_of(comp)
        if not experiment or not experiment.startswith(LRA_PREFIX):
            continue
        expected = recipe_file_values(experiment, conf)
        if expected is None:
            left_out[comp.title] = f"recipe file {experiment}.yaml not found, so its settings cannot be checked"
        elif comp.task not in LRA_TASKS:
            left_out[comp.title] = f"task {comp.task} is not an LRA task"
        elif differences := recipe_differences(comp, expected):
            left_out[comp.title] = "changed from the recipe file: " + ", ".join(differences)
        else:
            official.append(comp)
    return official, left_out


def _ordered_tasks(comps: list[Comparison]) -> list[str]:
    return [t for t in LRA_TASKS if any(c.task == t for c in comps)]


def _ours_label(comp: Comparison, same_task: list[Comparison]) -> str:
    label = f"{TASK_LABELS[comp.task]}: ours"
    return label if len(same_task) == 1 else f"{label} ({comp.title})"


def _theirs_cell(pub: PublishedSet, mechanism: str, task: str) -> str:
    value = pub.value(mechanism, task)
    if value is None:
        return not_run("not reported") if pub.model_of(mechanism) else not_run("no counterpart")
    text = value if value == FAIL else f"{value:.2f}"
    return text + (CAVEAT_MARK if mechanism in pub.caveats else "")


def published_table(official: list[Comparison], sets: tuple[PublishedSet, ...] = PUBLISHED) -> pd.DataFrame:
    """Rows: our mechanisms that ran (registry order); per LRA task we ran, in LRA's order, ``<Task>: ours``
    (mean ± sample std over seeds, as the recipe tables) then one column per published set that reports one
    of these mechanisms on that task (``<Task>: LRA Table 1 (theirs)``, ...). Their cells: the printed number,
    ``FAIL`` (chance), ``— (not reported)`` or ``— (no counterpart)``; a mapped model that differs from ours
    in a way the set names is marked ``†``."""
    registered = available_attentions()
    ran = list(dict.fromkeys(m for c in official for m in c.runs["attention"].dropna()))
    rows = [m for m in registered if m in ran] + [m for m in ran if m not in registered]
    columns: dict[str, dict[str, str]] = {}
    for task in _ordered_tasks(official):
        same_task = [c for c in official if c.task == task]
        for comp in same_task:
            display, _ = comparison_table(comp, registered)
            ours = display["test acc %"].drop("majority class", errors="ignore")
            columns[_ours_label(comp, same_task)] = {m: ours.get(m, not_run()) for m in rows}
        for pub in sets:
            if any(pub.value(m, task) is not None for m in rows):
                columns[f"{TASK_LABELS[task]}: {pub.column}"] = {m: _theirs_cell(pub, m, task) for m in rows}
    table = pd.DataFrame(columns, index=rows).fillna(MISSING)
    table.index.name = "mechanism"
    return table


def published_notes(official: list[Comparison], table: pd.DataFrame,
                    sets: tuple[PublishedSet, ...] = PUBLISHED) -> list[str]:
    """What the table's columns are: our recipes and seeds, each set's source and setup, the name map, the
    caveats (†), ours without a counterpart, the data sources."""
    ours = "; ".join(f"{experiment_of(c)} ({c.runs['attention'].nunique()} mechanism(s), seeds "
                     f"{sorted(int(s) for s in c.runs['seed'].dropna().unique())})" for c in official)
    shown = [p for p in sets if any(p.column in col for col in table.columns)]
    notes = [f"Ours: test accuracy % with the official LRA recipes, {ours}; mean ± sample std over seeds. Theirs: "
             "numbers as published, copied into harness/report/published.py, never re-run or averaged with ours."]
    for pub in shown:
        mapped = ", ".join(f"{model} = {ours}" for model, ours in pub.names.items() if ours in table.index)
        notes.append(f"{pub.column}: {pub.source}; {pub.setup}. Their model = our mechanism: {mapped}.")
    notes += [f"† {m} in {p.column}: {text}." for p in shown for m, text in p.caveats.items() if m in table.index]
    alone = unmatched(table.index, sets)
    if alone:
        notes.append("Ours with no published counterpart: " + ", ".join(alone) + ".")
    if any(t.startswith("Retrieval:") and "(theirs)" in t and not t.startswith("Retrieval: LRA") for t in table):
        notes.append(PROTOCOL_NOTE)
    sources = {c.title: sorted(set(c.runs["data_notes.source"].dropna().astype(str)))
               for c in official if "data_notes.source" in c.runs}
    if any(sources.values()):
        notes.append("Our data: " + "; ".join(f"{t}: {', '.join(s)}" for t, s in sources.items() if s) + ".")
    return notes


def published_section(page: Page, comps: list[Comparison], conf: Path | None = None) -> None:
    """The section, only when some comparison ran an lra/ recipe (nothing is added otherwise)."""
    official, left_out = lra_comparisons(comps, conf)
    if not official and not left_out:
        return
    page.heading("LRA: ours beside the published numbers (theirs)")
    if official:
        table = published_table(official)
        for note in published_notes(official, table):
            page.note(note)
        page.table(table)
    else:
        page.note(f"{MISSING} no comparison ran an lra/ recipe as its file sets it.")
    for title, why in left_out.items():
        page.note(f"{title}: not compared with published numbers ({why}).")
