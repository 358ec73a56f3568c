"""What may be compared: training runs grouped by recipe, benchmark cells grouped by setting.

A **comparison** is the set of training runs whose resolved config is identical except the mechanism
and the seed (:func:`harness.store.recipe_columns`): seeds of one mechanism are averaged inside it,
nothing is averaged across two of them. A mechanism run with other parameters (``+attention.params...``),
another step count, a smoke recipe or another device is another comparison, shown as its own table and
named by what differs.

A benchmark **setting** is every field of a ``bench`` record that is not the cell's own (mechanism, pass,
n, its measurement and bookkeeping): batch, heads, head_dim, dtype, device, CPU allocator policy, and
any field a later benchmark adds (a ``causal`` flag, a sparsity ``pattern``) without changes here.
Each setting is its own section; cells of two settings never share a table, a slope or a plot.

Owns: the grouping and the names of the groups. Imports: :mod:`harness.store` (the recipe columns),
:mod:`harness.report.recipe_files` (which comparison has its recipe file's own settings).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.report.recipe_files import recipe_as_file
from harness.store import config_hash, recipe_columns, recipe_of

# Fields of a bench record that belong to the cell (or to how it was stored), not to its setting. ``plugins``
# says where a mechanism came from: cells measured with and without plug-ins loaded are one setting.
CELL_FIELDS = {"kind", "record_id", "status", "created_at", "mechanism", "family", "pass", "n", "outcome", "reason",
               "settings_key", "smoke", "backend", "budget", "predicted_peak_bytes", "memory_budget_gb", "slope_range",
               "_path", "params", "command", "plugins"}
# ``protocol.``: what the cell timed (docs/FAIRNESS.md), written out per cell; its backend and pass differ between
# the cells of one setting by design, and the parts that are settings (threads, repeats, allocator) have columns.
CELL_PREFIXES = ("time.", "memory.", "params.", "device_info.", "noise.", "protocol.", "peer_protocol.")
# A setting field missing from older records reads as the value those records were measured with.
SETTING_DEFAULTS = {"cpu_allocator": "default", "pattern": "bidirectional"}
# Sections of these values come first (the bidirectional benchmark before the causal one).
FIRST_VALUES = {"pattern": "bidirectional"}
# How many differing keys name a comparison in full; beyond, these many and "+k more keys".
MAX_NAMED_DIFFERENCES = 6


@dataclass(frozen=True)
class Comparison:
    """Training runs of one recipe: ``title`` names it (task, recipe file, what differs from the others)."""

    key: str
    task: str
    title: str
    recipe: dict
    runs: pd.DataFrame


@dataclass(frozen=True)
class Setting:
    """Benchmark cells of one setting: ``values`` are its fields, ``label`` says them in one line."""

    key: str
    values: dict
    label: str
    records: pd.DataFrame


def is_smoke(setting: Setting) -> bool:
    """Whether the setting's cells were measured with the smoke settings (one repeat at tiny n): a check that
    the pipeline runs, not a measurement."""
    smoke = setting.records.get("smoke")
    return smoke is not None and bool(smoke.fillna(False).astype(bool).any())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def comparisons(train: pd.DataFrame) -> list[Comparison]:
    """The training records split by recipe, ordered by task then title."""
    if train.empty or "attention" not in train:
        return []
    columns = recipe_columns(train.columns)
    recipes = [recipe_of(row, columns) for _, row in train.iterrows()]
    keys = pd.Series([config_hash(r) for r in recipes], index=train.index)
    by_key = {k: recipes[i] for i, k in enumerate(keys)}
    titles = comparison_titles(train, keys, by_key)
    out = [Comparison(key=k, task=str(train.loc[keys == k, "task"].iloc[0]), title=titles[k], recipe=by_key[k],
                      runs=train[keys == k]) for k in dict.fromkeys(keys)]
    return sorted(out, key=lambda c: (_task_rank(c.task), natural_key(c.title)))


def natural_key(text: str) -> tuple:
    """Sort key reading the numbers in ``text`` as numbers: ``k8`` before ``k16``, ``=8`` before ``=16``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(text)))


TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def _task_rank(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


def comparison_titles(train: pd.DataFrame, keys: pd.Series, recipes: dict[str, dict]) -> dict[str, str]:
    """``<task> (<recipe file>)`` and, where another recipe of the same task and file exists, the keys that
    differ (``listops (quick/listops): train.max_steps=100``); a recipe alone needs no more.

    Where exactly one of them has the settings its recipe file fixes (:func:`recipe_as_file`: the recipe as
    the file sets it), that one is titled by the file alone and each other by what differs from it (a ladder
    rung: ``mqar (quick/mqar): task.params.num_kv_pairs=16``, never the file's own ``=8``). Otherwise the keys
    that name a comparison with an ok run are those that differ among the comparisons with an ok run: a
    failed run with a misspelt parameter does not rename the tables of good ones. A comparison whose runs
    all failed is named by what differs from its nearest comparison with an ok run (fewest differing keys),
    or, with none, from its failed peers."""
    experiment = train.get("experiment", pd.Series(index=train.index, dtype=object))
    status = train["status"] if "status" in train else pd.Series("ok", index=train.index)
    names, has_ok = {}, {}
    for key in recipes:
        rows = train[keys == key]
        exp = next((str(e) for e in experiment[keys == key] if not _missing(e)), None)
        names[key] = (str(rows["task"].iloc[0]), exp)
        has_ok[key] = bool((status[keys == key] == "ok").any())
    as_file = {key: has_ok[key] and recipe_as_file(recipes[key], exp) for key, (_, exp) in names.items()}
    titles = {}
    for key, (task, exp) in names.items():
        peers = [k for k, v in names.items() if v == (task, exp) and k != key]
        ok_peers = [k for k in peers if has_ok[k]]
        by_file = [k for k in [key, *ok_peers] if as_file[k]]
        if len(by_file) == 1 and has_ok[key]:
            peers = [] if by_file[0] == key else by_file  # the file's own recipe: no difference to name
        elif has_ok[key]:
            peers = ok_peers
        elif ok_peers:
            peers = [min(ok_peers, key=lambda k: len(_differing_keys(recipes[key], [recipes[k]])))]
        title = f"{task} ({exp})" if exp else task
        if peers:
            title += ": " + _differences(recipes[key], [recipes[p] for p in peers])
        titles[key] = title
    return titles


def _differing_keys(mine: dict, others: list[dict]) -> list[str]:
    return sorted(k for k in set(mine).union(*others) if any(o.get(k) != mine.get(k) for o in others))


def _differences(mine: dict, others: list[dict]) -> str:
    keys = _differing_keys(mine, others)
    shown = [f"{k}={mine[k] if k in mine else '(unset)'}" for k in keys[:MAX_NAMED_DIFFERENCES]]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f", +{more} more keys" if more > 0 else "") if shown else "same recipe, another hash"


def setting_columns(bench: pd.DataFrame) -> list[str]:
    """The columns of ``bench`` records that define their setting (everything not a cell's own field)."""
    return [c for c in bench.columns if c not in CELL_FIELDS and not c.startswith(CELL_PREFIXES)]


def settings(bench: pd.DataFrame) -> list[Setting]:
    """The bench records split by setting, newest setting first."""
    if bench.empty or "mechanism" not in bench:
        return []
    cols = setting_columns(bench)
    filled = bench.copy()
    for c in cols:
        filled[c] = filled[c].map(lambda v, c=c: SETTING_DEFAULTS.get(c, "—") if _missing(v) else v)
    keys = filled[cols].astype(str).agg("|".join, axis=1) if cols else pd.Series("", index=bench.index)
    newest = filled.assign(_k=keys).groupby("_k")["created_at"].max().sort_values(ascending=False)
    out = []
    for key in newest.index:
        rows = filled[keys == key]
        values = {c: rows[c].iloc[0] for c in cols}
        out.append(Setting(key=key, values=values, label=setting_label(values, rows), records=rows))
    # Stable sort: the first pattern first, then newest first.
    return sorted(out, key=lambda s: any(s.values.get(k, v) != v for k, v in FIRST_VALUES.items()))


def setting_label(values: dict, rows: pd.DataFrame) -> str:
    """``batch 2, 4 heads, head dim 32, float32, cpu (AMD EPYC ...), n = 256..4096`` and any other field."""
    known = [("pattern", "{}"), ("batch", "batch {}"), ("heads", "{} heads"), ("head_dim", "head dim {}"),
             ("dtype", "{}")]
    parts = [fmt.format(_plain(values[k])) for k, fmt in known if k in values]
    device = str(values.get("device", "?"))
    name = rows["device_info.device_name"].dropna() if "device_info.device_name" in rows else pd.Series([], dtype=str)
    parts.append(f"{device} ({name.iloc[0]})" if len(name) else device)
    if values.get("cpu_allocator") not in (None, "default"):
        parts.append(f"cpu_allocator={values['cpu_allocator']}")
    shown = {"pattern", "batch", "heads", "head_dim", "dtype", "device", "cpu_allocator"}
    parts += [f"{k}={_plain(v)}" for k, v in values.items() if k not in shown]
    ns = sorted(int(n) for n in rows["n"].dropna().unique())
    if ns:
        parts.append(f"n = {ns[0]}..{ns[-1]}" if len(ns) > 1 else f"n = {ns[0]}")
    return ", ".join(parts)


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
