"""The report's accuracy-vs-speed summary over recipes: one point per mechanism, averaged over the suite.

Which recipes: every comparison (:mod:`harness.report.groups`) in which ``full`` and at least one other
mechanism have an ok run, one per recipe file (the comparison with the most ok runs, on a tie the one with the
recipe file's settings: a ladder rung of ``quick/mqar`` does not count MQAR twice); none is named in code, so
whatever the suite ran is averaged. Which
mechanisms: those with an ok run in every one of these recipes; a mechanism missing one (no causal form,
a failed run) is left out and named, because an average over fewer recipes would not be comparable.

Per mechanism, each recipe is first averaged over its seeds (as in the recipe's table), then

* accuracy: the arithmetic mean over recipes of the test accuracy (%);
* speed: the geometric mean over recipes of training examples/s relative to ``full`` in the same recipe;
* memory: the geometric mean over recipes of a training step's peak memory relative to ``full``;
* majority: the mean over recipes of the majority-class accuracy (the average a constant predictor scores).

Ratios are averaged geometrically so that 2x in one recipe and 0.5x in another average to 1x.

Owns: this section. Imports: :mod:`harness.display`, the other :mod:`harness.report` modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.display import not_run
from harness.report.groups import Comparison
from harness.report.page import Page
from harness.report.plots import SEEDS_NOTE, plot_accuracy_speed
from harness.report.recipe_files import experiment_of, matches_recipe_file
from harness.report.tables import comparison_table

AVERAGE_PNG = "accuracy_vs_speed_average.png"


@dataclass(frozen=True)
class RecipeAverage:
    """``points``: index mechanism; columns accuracy, majority, speed (= speed_vs_full), memory_vs_full,
    recipes, seeds_min, seeds_max, by_seed (seed -> accuracy averaged over the recipes, for the seeds all of
    them ran). ``recipes``: the titles averaged; ``left_out``: mechanism -> the
    titles of the averaged recipes it has no ok run in; ``variants``: comparisons not averaged because another
    comparison of the same recipe file stands for it; ``why``: variant title -> why it is not the one averaged
    (``fewer runs``, ``other settings than the file's``)."""

    points: pd.DataFrame
    recipes: list[str]
    left_out: dict[str, list[str]]
    variants: list[str] = dataclasses.field(default_factory=list)
    why: dict[str, str] = dataclasses.field(default_factory=dict)


def _geometric_mean(values: pd.Series) -> float:
    values = values.astype(float)
    return float(np.exp(np.log(values).mean())) if len(values) and (values > 0).all() else float("nan")


def recipe_average(comps: list[Comparison], mechanisms: list[str] | None = None,
                   conf: Path | None = None) -> RecipeAverage:
    """Average every mechanism over the recipes in which ``full`` and another mechanism ran (module doc).

    ``mechanisms``: the order of the rows (registry order); others follow in the order they ran.
    Speed or memory is NaN where a recipe lacks the measurement (never a guessed value). ``conf``: the config
    folder the recipe files are read from (default: :func:`harness.plugins.conf_dir`)."""
    per_recipe: dict[str, pd.DataFrame] = {}
    variants: list[str] = []
    why: dict[str, str] = {}
    for comp in _one_per_recipe_file(comps, variants, why, conf):
        _, numeric = comparison_table(comp, mechanisms)
        ok = numeric[np.isfinite(numeric["accuracy"])]
        if "full" in ok.index and len(ok) >= 2:
            per_recipe[comp.title] = ok
    ran = list(dict.fromkeys(m for frame in per_recipe.values() for m in frame.index))
    rows, left_out = {}, {}
    for name in ran:
        missing = [title for title, frame in per_recipe.items() if name not in frame.index]
        if missing:
            left_out[name] = missing
            continue
        mine = pd.DataFrame([frame.loc[name] for frame in per_recipe.values()])
        rows[name] = {"accuracy": float(mine["accuracy"].astype(float).mean()),
                      "majority": float(np.mean([f["majority"].iloc[0] for f in per_recipe.values()])),
                      "speed": _geometric_mean(mine["speed_vs_full"]),
                      "memory_vs_full": _geometric_mean(mine["memory_vs_full"]),
                      "recipes": len(mine), "seeds_min": int(mine["seeds"].min()),
                      "seeds_max": int(mine["seeds"].max()), "by_seed": _seed_means(list(mine["by_seed"]))}
    points = pd.DataFrame.from_dict(rows, orient="index",
                                    columns=["accuracy", "majority", "speed", "memory_vs_full", "recipes",
                                             "seeds_min", "seeds_max", "by_seed"])
    points.index.name = "mechanism"
    return RecipeAverage(points=points, recipes=list(per_recipe), left_out=left_out, variants=variants,
                         why=why)


def _seed_means(per_recipe: list[dict[int, float]]) -> dict[int, float]:
    """Seed -> its accuracy averaged over the recipes, for the seeds every recipe ran (what one suite run with
    that seed scored on average); empty where the recipes share no seed."""
    shared = set.intersection(*(set(d) for d in per_recipe)) if per_recipe else set()
    return {seed: float(np.mean([d[seed] for d in per_recipe])) for seed in sorted(shared)}


def _one_per_recipe_file(comps: list[Comparison], variants: list[str], why: dict[str, str],
                         conf: Path | None = None) -> list[Comparison]:
    """One comparison per recipe file (``experiment``): the one with the most ok runs (the recipe as the suite
    runs it with all its seeds, not a one-seed ladder rung), on a tie the one whose settings are the recipe
    file's (:func:`harness.report.recipe_files.matches_recipe_file`: not the rung, not a changed setting), so
    that no recipe file counts twice in the mean. The titles of the others are appended to ``variants`` and
    ``why`` says why each was not averaged (``fewer runs`` / ``other settings than the file's``)."""
    by_file: dict[str, list[Comparison]] = {}
    for comp in comps:
        experiment = experiment_of(comp)
        by_file.setdefault(experiment or comp.title, []).append(comp)
    chosen = []
    for group in by_file.values():
        ok = {c.title: int((c.runs["status"] == "ok").sum()) for c in group}
        as_file = {c.title: len(group) > 1 and matches_recipe_file(c, experiment_of(c), conf) for c in group}
        best = max(group, key=lambda c: (ok[c.title], as_file[c.title]))  # max keeps the first of equals
        chosen.append(best)
        for comp in group:
            if comp is best:
                continue
            variants.append(comp.title)
            why[comp.title] = ("fewer runs" if ok[comp.title] < ok[best.title] else "other settings than the file's"
                               if as_file[best.title] else "as many runs, neither as the file sets it: the first "
                               "listed stands for the file")
    return chosen


def _seeds(points: pd.DataFrame) -> str:
    low, high = int(points["seeds_min"].min()), int(points["seeds_max"].max())
    return f"{low} seed{'s' if high > 1 else ''}" if low == high else f"{low}-{high} seeds"


def average_caption(avg: RecipeAverage) -> str:
    """Names the recipes averaged, the seeds behind each recipe's mean, and the mechanisms left out."""
    text = (f"Mean over {len(avg.recipes)} recipes, each first averaged over its seeds ({_seeds(avg.points)} per "
            f"mechanism and recipe): " + "; ".join(avg.recipes) + ".")
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, titles in avg.left_out.items():
        groups.setdefault(tuple(titles), []).append(name)
    if avg.variants:
        text += (" Not averaged (a variant of the same recipe file: fewer runs / other settings than the file's): "
                 + "; ".join(f"{t} ({avg.why[t]})" if t in avg.why else t for t in avg.variants) + ".")
    if groups:
        text += " Left out, no ok run in every recipe: " + "; ".join(
            f"{', '.join(names)} (none in {' and '.join(titles)})" for titles, names in groups.items()) + "."
    return text


def average_table(avg: RecipeAverage) -> pd.DataFrame:
    """Display rows: the averaged mechanisms, then those left out (``— (missing k of N recipes)``)."""
    def ratio(x: float) -> str:
        return f"{x:.2f}x" if np.isfinite(x) else not_run("not measured")

    rows = {name: {"mean test acc % over recipes": f"{r['accuracy']:.2f}",
                   "speed vs full (geo. mean)": ratio(r["speed"]),
                   "peak memory vs full (geo. mean)": ratio(r["memory_vs_full"]),
                   "recipes": str(int(r["recipes"])),
                   "seeds per recipe": (f"{int(r['seeds_min'])}" if r["seeds_min"] == r["seeds_max"]
                                        else f"{int(r['seeds_min'])}-{int(r['seeds_max'])}")}
            for name, r in avg.points.iterrows()}
    for name, titles in avg.left_out.items():
        rows[name] = {"mean test acc % over recipes": not_run(f"missing {len(titles)} of {len(avg.recipes)} "
                                                              "recipes"),
                      "speed vs full (geo. mean)": "", "peak memory vs full (geo. mean)": "",
                      "recipes": str(len(avg.recipes) - len(titles)), "seeds per recipe": ""}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "mechanism"
    return table


def average_section(page: Page, comps: list[Comparison], out: Path, files: list[Path],
                    mechanisms: list[str] | None = None) -> None:
    """The summary figure and its table, when at least two recipes can be averaged (one recipe is its own
    panel in the per-recipe figure already)."""
    avg = recipe_average(comps, mechanisms)
    if len(avg.recipes) < 2 or avg.points.empty:
        return
    caption = average_caption(avg)
    points = avg.points[np.isfinite(avg.points["speed"])].copy()
    points.attrs.update(relative=True, majority_label="majority class, mean over recipes",
                        accuracy_label="test accuracy (%), mean over recipes",
                        speed_label="training examples/s relative to full (geometric mean over recipes)")
    if len(points) >= 2:
        title = f"accuracy vs training speed, mean over {len(avg.recipes)} recipes"
        files.append(plot_accuracy_speed([(title, points)], out / AVERAGE_PNG, caption=caption,
                                         size_label="bubble area = peak memory vs full (geometric mean over "
                                                    "recipes)"))
        page.heading("Accuracy vs training speed, averaged over recipes", place="figures")
        page.note(caption + " y: mean test accuracy; x: geometric mean of the speed relative to full; bubble: "
                  "geometric mean of the peak memory relative to full. Seeds: each seed's accuracy averaged over the "
                  f"recipes (the seeds every recipe ran). {SEEDS_NOTE}", place="figures")
        page.image(files[-1], AVERAGE_PNG)
    page.heading("Accuracy, speed and memory averaged over recipes")
    page.note(caption + " Speed and memory: geometric means of the ratios to full in each recipe. A mean over "
              "recipes hides where a mechanism fails: read it with the recipe tables.")
    page.table(average_table(avg))
