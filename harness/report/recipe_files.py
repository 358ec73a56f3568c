"""What a recipe file fixes: the settings of ``conf/experiment/<experiment>.yaml`` and its config groups, and
which of them a comparison's runs changed. Used by the LRA section (only runs as the file sets them get
published numbers beside them) and by the average over recipes (on a tie, the comparison as the file sets it
stands for the recipe file).

Owns: reading recipe files for the report. Imports: omegaconf, :mod:`harness.plugins` (the config folder),
:mod:`harness.store` (the keys that are no setting).
A comparison (:class:`harness.report.groups.Comparison`) is taken by its ``runs`` and ``recipe`` only, so that
:mod:`harness.report.groups` can name comparisons by their recipe file without an import cycle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.plugins import conf_dir, recipe_file
from harness.store import NON_SEMANTIC_KEYS


def experiment_of(comp: Any) -> str | None:
    """The recipe file the comparison's runs were started with (``lra/listops``), None when not recorded."""
    if "experiment" not in comp.runs:
        return None
    names = comp.runs["experiment"].dropna().astype(str).unique()
    return str(names[0]) if len(names) == 1 else None


def recipe_file_values(experiment: str, conf: Path | None = None) -> dict[str, Any] | None:
    """The settings the recipe file ``conf/experiment/<experiment>.yaml`` fixes, as flat ``section.key`` ->
    value: its own keys (and those it inherits from another recipe, :func:`harness.plugins.recipe_file`) over those
    of the config groups its ``defaults`` select. None when the file does not
    exist. Interpolations (``${...}``) are left out (they are resolved per run), and so are the keys that say
    where things go (:data:`harness.store.NON_SEMANTIC_KEYS`), which no record's recipe holds."""
    from omegaconf import OmegaConf

    conf = Path(conf) if conf is not None else conf_dir()
    path = conf / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        return None
    own = recipe_file(experiment, conf)  # with the keys it inherits from another recipe (quick/mqar_causal_mqa)
    merged = OmegaConf.create({})
    for entry in own.pop("defaults", None) or []:
        for key, option in (entry.items() if isinstance(entry, dict) else ()):
            group = key.replace("override", "").strip().strip("/")
            group_file = conf / group / f"{option}.yaml"
            if group and group_file.is_file():
                merged = OmegaConf.merge(merged, {group: OmegaConf.load(group_file)})
    merged = OmegaConf.to_container(OmegaConf.merge(merged, own), resolve=False)
    # Where things go (a smoke recipe's results_dir) is no setting of the recipe: records leave it out too.
    return {k: v for k, v in _flatten(merged).items() if not (isinstance(v, str) and "${" in v)
            and k.split(".")[0] not in NON_SEMANTIC_KEYS}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            flat[f"{prefix}{key}"] = value
    return flat


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(actual, str) and isinstance(expected, list):
        actual = json.loads(actual)  # the store keeps a list as JSON text
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(_same(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and not isinstance(expected, bool):
        return math.isclose(float(expected), float(actual), rel_tol=1e-9, abs_tol=0.0)
    return str(expected) == str(actual)


def recipe_differences(comp: Any, expected: dict[str, Any]) -> list[str]:
    """``key=value (recipe file: value)`` for every key of ``expected`` the comparison's runs changed."""
    return [f"{key}={comp.recipe.get(key, '(unset)')} (recipe file: {value})" for key, value in sorted(expected.items())
            if not _same(value, comp.recipe.get(key))]


def matches_recipe_file(comp: Any, experiment: str | None, conf: Path | None = None) -> bool:
    """Whether the comparison's runs have every setting its recipe file fixes (False without a file)."""
    return recipe_as_file(comp.recipe, experiment, conf)


def recipe_as_file(recipe: dict[str, Any], experiment: str | None, conf: Path | None = None) -> bool:
    """Whether ``recipe`` (a comparison's flat settings) has every setting the recipe file ``experiment`` fixes
    (False without a file)."""
    expected = recipe_file_values(experiment, conf) if experiment else None
    return expected is not None and all(_same(value, recipe.get(key)) for key, value in expected.items())
