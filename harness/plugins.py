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
import difflib
import importlib
import os
import sys
import traceback
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
    """Import one plug-in module by name; a ValueError (one line) says which one failed and why: not found
    (with the folders searched, a close name and how ``plugins=`` works), a package it needs that is missing,
    or the exception its own code raised (with the file and line)."""
    folders = _working_dirs()
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise ValueError(_not_found_message(module, folders)) from None
        raise ValueError(f"plug-in module {module!r} could not be imported: it imports {exc.name!r}, which is not "
                         f"installed ({exc}{_raised_at(exc)})") from None
    except Exception as exc:  # the plug-in's own code failed: one line naming it, where and why
        raise ValueError(f"plug-in module {module!r} could not be imported: {type(exc).__name__}: {exc}"
                         f"{_raised_at(exc)}") from None


PLUGINS_HOW = ("plugins=[...] lists modules to import before anything else: plugins=[my_attention] for "
               "./my_attention.py in the folder the command runs from, plugins=[my_pkg.my_attention] for a module "
               "of an installed package")


def _not_found_message(module: str, folders: Sequence[str]) -> str:
    """A module that is nowhere: the file it would be, where it was looked for, a close name if one is there."""
    relative = module.replace(".", "/")
    nearby = sorted({p.stem for f in folders for p in Path(f).glob("*.py")}
                    | {p.parent.name for f in folders for p in Path(f).glob("*/__init__.py")})
    close = difflib.get_close_matches(module, nearby, n=1, cutoff=0.6)
    hint = f" Did you mean plugins=[{close[0]}]?" if close else ""
    return (f"plug-in module {module!r} could not be imported: there is no {relative}.py (nor package "
            f"{relative}/) in {' or '.join(folders)}, and no installed module of that name.{hint} {PLUGINS_HOW}.")


def _raised_at(exc: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame of ``exc``'s traceback (a SyntaxError names its own), or ''."""
    if isinstance(exc, SyntaxError) or exc.__traceback__ is None:
        return ""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f" (at {frame.filename}:{frame.lineno})"


def _mechanisms_of(modules: Iterable[str], before: set[str]) -> list[str]:
    """The registered mechanisms that ``modules`` brought: new since ``before``, or defined in one of them."""
    from attentions import available_attentions, get_attention_info

    def defined_in(name: str) -> bool:
        home = getattr(get_attention_info(name).cls, "__module__", "")
        return any(home == m or home.startswith(m + ".") for m in modules)

    return [n for n in available_attentions() if n not in before or defined_in(n)]


_CHECKED: set[tuple[str, type]] = set()  # (name, class) already held to the contract in this process


def check_plugin_mechanisms(source: str, names: Iterable[str]) -> None:
    """The load-time contract check (:func:`attentions.testing.check_output`: output shape, dtype and
    finiteness on a tiny input, milliseconds) of each mechanism in ``names``, once per class and process.

    Raises ValueError naming ``source`` (the plug-in), the mechanism and what was wrong."""
    from attentions import get_attention_info
    from attentions.testing import ContractViolation, check_output

    for name in names:
        key = (name, get_attention_info(name).cls)
        if key in _CHECKED:
            continue
        try:
            check_output(name)
        except ContractViolation as exc:
            raise ValueError(f"{source}: {exc}; attentions.testing.check_mechanism({name!r}) runs the whole "
                             "contract") from None
        _CHECKED.add(key)


def load_entry_points(groups: Iterable[str] = GROUPS) -> list[str]:
    """Import every installed entry point of ``groups`` (the mechanisms they register held to the load-time
    contract check); returns their ``group:name`` labels."""
    from attentions import available_attentions

    loaded = []
    for group in groups:
        for ep in entry_points(group=group):
            package = getattr(ep.dist, "name", "?")
            source = f"entry point {ep.name!r} = {ep.value!r} in group {group!r} (package {package})"
            before = set(available_attentions())
            try:
                ep.load()
            except Exception as exc:
                raise ValueError(f"{source} failed to load: {exc}") from exc
            check_plugin_mechanisms(source, _mechanisms_of([ep.module], before))
            loaded.append(f"{group}:{ep.name}")
    return loaded


def load_plugins(modules: Sequence[str] | str | None = ()) -> list[str]:
    """Import the named plug-in modules, then every installed entry point; the mechanisms each registers are
    held to the load-time contract check (:func:`check_plugin_mechanisms`). Returns the module names.

    Importing twice is harmless (Python caches modules, a class is checked once), so each process may call it
    again. Raises ValueError (one line) naming a plug-in that cannot be imported or breaks the contract.
    """
    from attentions import available_attentions

    names = [modules] if isinstance(modules, str) else [str(m) for m in modules or ()]
    for name in names:
        before = set(available_attentions())
        import_plugin(name)
        check_plugin_mechanisms(f"plug-in module {name!r}", _mechanisms_of([name], before))
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


def add_absent_keys(argv: Sequence[str], config: Path) -> list[str]:
    """``argv`` with every plain ``key=value`` override whose key the flat app config ``config``
    (``conf/bench.yaml``) lacks written as ``++key=value``. The app's own settings check then takes it: a valid
    one (``params.performer.num_features=128``) is used, a mistyped one (``seed=abc`` in arena-bench) is one line
    naming the valid keys, exit 2. Hydra would stop with a hint to add it with ``+``, which for a mistyped key
    only moves the error. Flags, ``+``/``~`` overrides, config groups and ``hydra.*`` are left as they are."""
    from omegaconf import OmegaConf

    node, absent = OmegaConf.load(config), object()
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("-", "+", "~")) and not key.startswith("hydra")
        if plain and "/" not in key and "@" not in key and OmegaConf.select(node, key, default=absent) is absent:
            arg = f"++{arg}"
        out.append(arg)
    return out


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
    return (f"unknown attention {', '.join(map(repr, unknown))}: registered are {', '.join(available_attentions())}. "
            + plugin_hint(unknown))


def plugin_hint(unknown: Sequence[str]) -> str:
    """The sentence after an unknown mechanism's name: how a mechanism of one's own gets registered
    (``plugins=[<module>]``, naming the module when ``<name>.py`` is in the working directory)."""
    here = [n for n in unknown if Path(f"{n}.py").is_file()]
    return ("A mechanism of your own is registered by importing its module first: add plugins=[<module>]"
            + (f" (plugins=[{here[0]}] for ./{here[0]}.py in this folder)" if here else "")
            + ", or install it as a package with an 'attention_arena.attentions' entry point.")


def available_experiments(conf: Path | None = None) -> list[str]:
    """The training recipes, ``conf/experiment/**.yaml`` named as ``experiment=`` takes them (``quick/listops``)."""
    root = (conf or conf_dir()) / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def recipe_file(experiment: str, conf: Path | None = None) -> dict:
    """The recipe file ``conf/experiment/<experiment>.yaml`` as plain data (interpolations unresolved), with what it
    inherits through its ``defaults`` from other recipes (an entry ``/experiment/<name>``, as
    ``quick/mqar_causal_mqa`` inherits ``quick/mqar_causal``): the inherited keys under its own, and ``defaults``
    the inherited recipe's entries then its own others. For readers that cannot compose with Hydra (the suite runs
    inside a Hydra app). Raises FileNotFoundError naming a missing recipe file."""
    from omegaconf import OmegaConf

    conf = Path(conf) if conf is not None else conf_dir()
    path = conf / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file {path}")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    merged: dict = {}
    defaults: list = []
    for entry in own.pop("defaults", None) or []:
        if isinstance(entry, str) and entry.startswith("/experiment/"):
            parent = recipe_file(entry.removeprefix("/experiment/"), conf)
            defaults += parent.pop("defaults", [])
            merged = OmegaConf.to_container(OmegaConf.merge(merged, parent), resolve=False)
        elif entry != "_self_":
            defaults.append(entry)
    merged = OmegaConf.to_container(OmegaConf.merge(merged, own), resolve=False)
    return {**merged, "defaults": defaults} if defaults else merged


def unknown_experiment_message(overrides: Sequence[str]) -> str | None:
    """The error for ``experiment=<name>`` overrides (a sweep included) naming no recipe file, or None; Hydra's
    own error does not list the recipes."""
    available = available_experiments()
    unknown = [n for n in _override_names(overrides, "experiment") if n not in available]
    if not unknown:
        return None
    return f"unknown experiment {', '.join(map(repr, unknown))}: available are {', '.join(available)}"


def prepare(argv: Sequence[str] | None = None, app: str | None = None) -> list[str]:
    """Before an app's Hydra main: load the plug-ins named on the command line (``sys.argv``) and the
    installed ones, and register their config nodes. Returns the plug-in module names.

    With ``app`` (``"arena-train"``), a plug-in that cannot be loaded is one line on stderr and exit 2
    (:func:`exit_on_settings_error`); without it, the ValueError is raised."""
    with exit_on_settings_error(app) if app else contextlib.nullcontext():
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
