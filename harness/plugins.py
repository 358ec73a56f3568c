"""Plug-ins and config discovery: what every app does before Hydra resolves a name.

A plug-in is any importable module that registers mechanisms (``@register_attention``) or tasks
(``@register_task``) when imported. The apps take them two ways:

- ``plugins=[my_pkg.my_attention]`` on the command line (a list of module names; the working directory
  is on the import path, so ``my_attention.py`` beside you is ``plugins=[my_attention]``);
- installed packages that declare an entry point in the group ``attention_arena.attentions`` or
  ``attention_arena.tasks`` (``[project.entry-points."attention_arena.attentions"] mine = "my_pkg.mine"``),
  loaded by every app without being named.

:func:`prepare` loads both, then gives every registered mechanism and task that has no YAML file a Hydra
config node (``attention=<name>`` / ``task=<name>`` with the defaults of its config dataclass), so a
plug-in needs no YAML; YAML files remain for presets. :func:`conf_dir` is where the apps' configs are:
``conf/`` of a clone, or ``harness/conf`` inside an installed wheel.

:func:`exit_on_settings_error` is how an app reports a setting it cannot take: one line, exit 2.

Owns: plug-in loading, entry-point discovery, the generated config nodes, the config folder, the apps'
one-line settings errors.
May import ``attentions`` and ``tasks`` (their registries); nothing in the harness.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path

ATTENTION_GROUP = "attention_arena.attentions"
TASK_GROUP = "attention_arena.tasks"
GROUPS = (ATTENTION_GROUP, TASK_GROUP)


def conf_dir() -> Path:
    """The Hydra config folder: ``harness/conf`` in an installed wheel, else ``conf/`` at the clone's root."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def _working_dirs() -> list[str]:
    """Where a plug-in file named by module may sit: the working directory, and the one the run was started
    from when Hydra has changed into its output folder (``hydra.job.chdir=true``) in a fresh job process."""
    dirs = [os.getcwd()]
    with contextlib.suppress(Exception):  # Hydra not initialised: the working directory is the start
        from hydra.utils import get_original_cwd

        dirs.append(get_original_cwd())
    return list(dict.fromkeys(dirs))


def import_plugin(module: str) -> None:
    """Import one plug-in module by name; a ValueError says which one failed and why."""
    for folder in reversed(_working_dirs()):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"plug-in module {module!r} could not be imported ({exc}); a plug-in is a module "
                         f"name importable from the working directory or the installed packages, e.g. "
                         f"plugins=[my_attention] for ./my_attention.py") from exc


def load_entry_points(groups: Iterable[str] = GROUPS) -> list[str]:
    """Import every installed entry point of ``groups``; returns their ``group:name`` labels."""
    loaded = []
    for group in groups:
        for ep in entry_points(group=group):
            try:
                ep.load()
            except Exception as exc:
                raise ValueError(f"entry point {ep.name!r} = {ep.value!r} in group {group!r} (package "
                                 f"{getattr(ep.dist, 'name', '?')}) failed to load: {exc}") from exc
            loaded.append(f"{group}:{ep.name}")
    return loaded


def load_plugins(modules: Sequence[str] | str | None = ()) -> list[str]:
    """Import the named plug-in modules, then every installed entry point. Returns the module names.

    Importing twice is harmless (Python caches modules), so each process may call it again.
    """
    names = [modules] if isinstance(modules, str) else [str(m) for m in modules or ()]
    for name in names:
        import_plugin(name)
    load_entry_points()
    return names


def plugins_from_overrides(overrides: Sequence[str]) -> list[str]:
    """The modules of a ``plugins=...`` (or ``+plugins=``) command-line override, [] when there is none.

    Read before Hydra composes the config, because ``attention=<plug-in>`` needs the plug-in registered.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        if text.lstrip("+~").split("=", 1)[0] != "plugins" or "=" not in text:
            continue
        value = parser.parse_override(text).value()
        if value is None:
            return []
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str | int | float):
            return [str(value)]
        raise ValueError(f"plugins takes a list of module names, e.g. plugins=[my_attention,my_pkg.mod]; got {text!r}"
                         " (a sweep over plug-ins is not supported: list them all)")
    return []


def register_config_nodes(conf: Path | None = None) -> list[str]:
    """A Hydra ConfigStore node ``attention/<name>`` (``task/<name>``) for every registered mechanism (task)
    without a YAML file in ``conf``: its config dataclass gives the defaults, so ``params`` starts empty.
    Returns the ``group/name`` of the nodes added."""
    from hydra.core.config_store import ConfigStore

    from attentions import available_attentions
    from tasks import available_tasks

    conf = conf or conf_dir()
    store = ConfigStore.instance()
    added = []
    nodes = [("attention", n, {"name": n, "params": {}}) for n in available_attentions()]
    nodes += [("task", n, {"name": n, "data_seed": 0, "params": {}}) for n in available_tasks()]
    for group, name, node in nodes:
        if not (conf / group / f"{name}.yaml").exists():
            store.store(group=group, name=name, node=node)
            added.append(f"{group}/{name}")
    return added


def _override_names(overrides: Sequence[str], key: str) -> list[str]:
    """The names a command line gives ``key`` (``key=a`` or the sweep ``key=a,b``; ``+key=``/``~key=`` too),
    leaving out Hydra's sweep functions (``glob(...)``), which name no file themselves."""
    names = [v.strip() for text in overrides if "=" in text and text.lstrip("+~").split("=", 1)[0] == key
             for v in text.split("=", 1)[1].split(",")]
    return [n for n in names if n and "(" not in n]


def unknown_attention_message(overrides: Sequence[str]) -> str | None:
    """The error for ``attention=<name>`` overrides (a sweep ``attention=a,b`` included) that name no
    registered mechanism, or None. Hydra's own error lists the YAML files only; this one also says how a
    mechanism of one's own gets registered (``plugins=[<module>]``), the usual cause."""
    from attentions import available_attentions

    unknown = [n for n in _override_names(overrides, "attention") if n not in available_attentions()]
    if not unknown:
        return None
    here = [n for n in unknown if Path(f"{n}.py").is_file()]
    return (f"unknown attention {', '.join(map(repr, unknown))}: registered are {', '.join(available_attentions())}."
            " A mechanism of your own is registered by importing its module first: add plugins=[<module>]"
            + (f" (plugins=[{here[0]}] for ./{here[0]}.py in this folder)" if here else "")
            + ", or install it as a package with an 'attention_arena.attentions' entry point.")


def available_experiments(conf: Path | None = None) -> list[str]:
    """The training recipes, ``conf/experiment/**.yaml`` named as ``experiment=`` takes them (``quick/listops``)."""
    root = (conf or conf_dir()) / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def unknown_experiment_message(overrides: Sequence[str]) -> str | None:
    """The error for ``experiment=<name>`` overrides (a sweep included) naming no recipe file, or None; Hydra's
    own error does not list the recipes."""
    available = available_experiments()
    unknown = [n for n in _override_names(overrides, "experiment") if n not in available]
    if not unknown:
        return None
    return f"unknown experiment {', '.join(map(repr, unknown))}: available are {', '.join(available)}"


def prepare(argv: Sequence[str] | None = None) -> list[str]:
    """Before an app's Hydra main: load the plug-ins named on the command line (``sys.argv``) and the
    installed ones, and register their config nodes. Returns the plug-in module names."""
    modules = load_plugins(plugins_from_overrides(sys.argv[1:] if argv is None else argv))
    register_config_nodes()
    return modules


@contextlib.contextmanager
def exit_on_settings_error(app: str) -> Iterator[None]:
    """A ValueError raised inside the block (settings resolution: an unknown name, an unavailable device)
    becomes one line on stderr, ``<app>: <message>``, and exit code 2, as ``arena-train`` reports its
    errors. Wrap only the resolution of settings: a crash while running keeps its traceback."""
    try:
        yield
    except ValueError as exc:
        print(f"{app}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
