"""From the Hydra config to what a run builds: the task, the backbone's config, the step counts, the run's hash.

It also says which keys a config may hold (:func:`check_config`: a key that no mechanism, task or setting
reads is an error naming the valid ones, checked before anything is built) and what a run will cost at least
(:func:`time_estimate`).

Owns: the config's meaning for the task and the model, which keys the config hash covers, the config's valid
keys. Imports: ``tasks`` (inside functions, so a swapped-in factory needs no LRA data code), ``attentions``
(the mechanisms' config fields), :mod:`harness.model`, :mod:`harness.measure` (the matmul rate),
:mod:`harness.plugins` (the config folder), :mod:`harness.settings`, hydra, omegaconf.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from attentions import available_attentions, get_attention_info
from harness.measure import matmul_flops_per_s, transformer_step_flops
from harness.model import _RESERVED_ATTENTION_PARAMS as RESERVED_ATTENTION_PARAMS
from harness.model import ModelConfig
from harness.plugins import conf_dir
from harness.settings import as_float, as_int, close_match
from harness.store import NON_SEMANTIC_KEYS
from harness.train.settings import OptimizerSettings, TrainSettings, resolve_device, resolve_precision

log = logging.getLogger("arena-train")


def abs_path(path: str) -> Path:
    """Paths in the config are relative to where arena-train was started (Hydra may chdir)."""
    try:
        return Path(hydra.utils.to_absolute_path(str(path)))
    except ValueError:  # Hydra not initialised (run() called directly)
        return Path(path).resolve()


def attention_params(cfg: DictConfig) -> dict[str, Any]:
    """The mechanism's effective overrides: the recipe's ``attention_overrides[<name>]`` (budgets scaled to
    the recipe's length), then ``attention.params`` (the command line) on top."""
    node = cfg.get("attention_overrides")
    presets = OmegaConf.to_container(node, resolve=True) if node else {}
    params = OmegaConf.to_container(cfg.attention.params, resolve=True) or {}
    return {**(presets.get(str(cfg.attention.name)) or {}), **params}


def resolved_choices(cfg: DictConfig) -> dict[str, str]:
    """``device`` and ``precision`` as the run uses them (``auto`` resolved): equivalent configs
    (``device=auto`` on a CPU machine and ``device=cpu``) then hash, and group, as one."""
    try:
        device = resolve_device(str(cfg.device))
        return {"device": str(device), "precision": resolve_precision(str(cfg.precision), device.type)}
    except ValueError:  # an invalid choice is kept as written; the run records the error
        return {"device": str(cfg.device), "precision": str(cfg.precision)}


# Config keys added after records existed, at the value that leaves a run as it was: left out of the hash and the
# recipe when they hold it, so a store's earlier records still match the runs they describe (a re-run reuses them).
NEUTRAL_DEFAULTS = {("model", "num_kv_heads"): None}


def _without_neutral(config: dict[str, Any]) -> dict[str, Any]:
    for (group, key), neutral in NEUTRAL_DEFAULTS.items():
        section = config.get(group)
        if isinstance(section, dict) and key in section and section[key] == neutral:
            config[group] = {k: v for k, v in section.items() if k != key}
    return config


def hashed_config(cfg: DictConfig) -> dict[str, Any]:
    """What the config hash covers: the resolved config minus the non-semantic keys, with the
    attention's effective params (other mechanisms' presets do not change this run's hash) and
    ``device``/``precision`` resolved (:func:`resolved_choices`)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    hashed = {k: v for k, v in resolved.items() if k not in NON_SEMANTIC_KEYS and k not in ("hydra",
                                                                                          "attention_overrides")}
    hashed["attention"] = {**hashed["attention"], "params": attention_params(cfg)}
    hashed.update(resolved_choices(cfg))
    return _without_neutral(hashed)


def recipe_config(cfg: DictConfig) -> dict[str, Any]:
    """What makes runs one comparison: the hashed config without the mechanism's name and the seed.

    The recipe's ``attention_overrides`` (budgets sized for its length, the same for every mechanism)
    and ``attention.params`` given on the command line stay in: a run with
    ``+attention.params.num_features=128`` is a comparison of its own, never a seed of the default one.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    recipe = {k: v for k, v in resolved.items() if k not in NON_SEMANTIC_KEYS and k not in ("hydra", "seed")}
    recipe["attention"] = {"params": recipe["attention"].get("params") or {}}
    recipe.update(resolved_choices(cfg))
    return _without_neutral(recipe)


def experiment_name() -> str | None:
    """The recipe file the run was started with (``quick/listops``), from Hydra's choices; None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("experiment")
    except (ValueError, AttributeError):
        return None
    return str(choice) if choice not in (None, "null") else None


def make_task(cfg: DictConfig):
    """Build the task; ``task.factory`` ("module:function") swaps in another builder (tests)."""
    factory_path = cfg.task.get("factory")
    if factory_path:
        module, _, attr = str(factory_path).partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        from tasks import build_task as factory
    params = OmegaConf.to_container(cfg.task.params, resolve=True) or {}
    if cfg.get("data_root"):  # an extracted lra_release: each task finds its files there (tasks.build_task)
        params["data_root"] = str(abs_path(cfg.data_root))
    return factory(cfg.task.name, cache_dir=str(abs_path(cfg.cache_dir)), seed=int(cfg.task.data_seed), **params)


def model_config_for(cfg: DictConfig, task) -> ModelConfig:
    """The backbone config: sizes from ``cfg.model``, shapes from the task, the mechanism from ``cfg.attention``."""
    model_params = OmegaConf.to_container(cfg.model, resolve=True)
    if getattr(task, "requires_causal", False) and not model_params.get("causal", False):
        raise ValueError(f"task {cfg.task.name!r} with these parameters is next-token prediction (its inputs hold "
                         "each answer one position later), so it needs model.causal=true")
    return ModelConfig(
        vocab_size=int(task.vocab_size),
        max_length=int(task.max_length),
        num_classes=int(task.num_classes),
        two_sequence=bool(task.two_sequence),
        token_level=bool(getattr(task, "token_level", False)),
        attention=str(cfg.attention.name),
        attention_params=attention_params(cfg),
        seed=int(cfg.seed),
        **model_params,
    )


def schedule_lengths(cfg: DictConfig, num_train: int) -> tuple[int, int, int]:
    """(steps_per_epoch, max_steps, warmup_steps) with epoch-based settings converted to steps."""
    batch = as_int(cfg.train.batch_size, "train.batch_size", minimum=1)
    steps_per_epoch = num_train // batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"invalid 'train.batch_size': {batch} is larger than the training split ({num_train} examples)"
        )
    epochs = as_float(cfg.train.get("epochs"), "train.epochs", minimum=0, strict=True, optional=True)
    max_steps = (int(math.ceil(epochs * steps_per_epoch)) if epochs is not None
                 else as_int(cfg.train.max_steps, "train.max_steps", minimum=1))
    if max_steps < 1:
        raise ValueError(f"invalid 'train.max_steps' / 'train.epochs': gives {max_steps} steps; need >= 1")
    warmup_epochs = as_float(cfg.scheduler.get("warmup_epochs"), "scheduler.warmup_epochs", minimum=0, optional=True)
    warmup = (
        int(round(warmup_epochs * steps_per_epoch)) if warmup_epochs is not None
        else as_int(cfg.scheduler.warmup_steps, "scheduler.warmup_steps", minimum=0)
    )
    return steps_per_epoch, max_steps, warmup


# ----------------------------------------------------------------------------- the config's valid keys

# ModelConfig fields the run fills from the task, the mechanism and the seed: not keys of ``model``.
MODEL_FROM_RUN = ("vocab_size", "max_length", "num_classes", "two_sequence", "token_level", "attention",
                  "attention_params", "seed")
# ``task`` node: the registry name, the data generator's seed, its parameters, a swapped-in builder (tests).
TASK_KEYS = ("name", "data_seed", "params", "factory")


@functools.lru_cache(maxsize=1)
def _declared_keys() -> dict[str, tuple[str, ...]]:
    """The keys ``conf/train.yaml`` declares (top level, ``train``, ``fault``, the config groups) and the
    union of the scheduler files' keys: the settings the run reads."""
    conf = conf_dir()
    base = OmegaConf.load(conf / "train.yaml")
    groups = [next(iter(d)) for d in base.defaults if isinstance(d, Mapping | DictConfig)]
    schedulers = {k for f in (conf / "scheduler").glob("*.yaml") for k in OmegaConf.load(f)}
    return {"": (*[k for k in base if k != "defaults"], *[g for g in groups if g != "experiment"]),
            "train": tuple(base.train), "fault": tuple(base.fault), "scheduler": tuple(sorted(schedulers))}


def _mechanism_fields(name: str) -> tuple[str, ...]:
    """The parameters of mechanism ``name`` a config may set: its config dataclass's fields, less those the
    backbone sets (``num_heads``, ``head_dim``, ``dropout``: from ``model``)."""
    return tuple(f.name for f in dataclasses.fields(get_attention_info(name).config_cls)
                 if f.name not in RESERVED_ATTENTION_PARAMS)


def _task_fields(cfg: Mapping) -> tuple[str, ...] | None:
    """The task's parameters (its config dataclass, without ``seed``: ``task.data_seed`` sets it), or None when
    a swapped-in ``factory`` or an unregistered name takes them (checked where the task is built)."""
    from tasks import available_tasks, get_task_info

    task = cfg.get("task") or {}
    if task.get("factory") or task.get("name") not in available_tasks():
        return None
    return tuple(f.name for f in dataclasses.fields(get_task_info(task["name"]).config_cls) if f.name != "seed")


def key_schema(cfg: Mapping) -> dict[str, Any]:
    """The keys a run's config may hold: ``{key: None}`` for a value, ``{key: {...}}`` for a section whose own
    keys are checked. The mechanism's and the task's parameters are their config dataclasses' fields."""
    declared = _declared_keys()
    attention = str((cfg.get("attention") or {}).get("name"))
    task_fields = _task_fields(cfg)
    schema: dict[str, Any] = {k: None for k in declared[""]}
    schema.update(
        hydra=None,
        train=dict.fromkeys(declared["train"]), fault=dict.fromkeys(declared["fault"]),
        scheduler=dict.fromkeys(declared["scheduler"]),
        model=dict.fromkeys(f.name for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_FROM_RUN),
        optimizer=dict.fromkeys(f.name for f in dataclasses.fields(OptimizerSettings)),
        attention={"name": None, "params": dict.fromkeys(_mechanism_fields(attention))},
        task={**dict.fromkeys(TASK_KEYS), "params": None if task_fields is None else dict.fromkeys(task_fields)},
        attention_overrides={n: dict.fromkeys(_mechanism_fields(n)) for n in available_attentions()},
    )
    return schema


def _unknown(values: Mapping, schema: Mapping, path: str = "") -> list[tuple[str, Mapping]]:
    """(dotted key, the schema of its section) for every key of ``values`` that ``schema`` does not hold."""
    found = []
    for key, value in values.items():
        full = f"{path}{key}"
        if key not in schema:
            found.append((full, schema))
        elif isinstance(schema[key], Mapping) and isinstance(value, Mapping):
            found += _unknown(value, schema[key], full + ".")
    return found


def _node_at(cfg: Mapping, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _suggestion(cfg: Mapping, path: str, value: Any) -> str:
    """How to set ``path`` on the command line: ``path=value`` when the config has it, else ``+path=value``
    (Hydra's way to add a key); the value only when it is a plain scalar."""
    shown = "" if value is None or isinstance(value, Mapping | list) else f"={value}"
    return f"{'' if _node_at(cfg, path) is not None else '+'}{path}{shown}"


def _unknown_key_message(cfg: Mapping, key: str, section: Mapping) -> str:
    """One unknown key, what its section takes, and the nearest valid key written as it would be set."""
    parent, _, leaf = key.rpartition(".")
    attention = str((cfg.get("attention") or {}).get("name"))
    if parent == "attention":  # attention.<x>: Hydra's hint leads here; the parameters live one level down
        fields = _mechanism_fields(attention)
        near = close_match(leaf, fields)
        takes = (f"attention takes name and params, and {attention}'s parameters (its config "
                 f"{get_attention_info(attention).config_cls.__name__}) go under attention.params: {', '.join(fields)}")
        best = f"attention.params.{near}" if near else None
    elif parent == "attention.params" or parent.startswith("attention_overrides."):
        mechanism = attention if parent == "attention.params" else parent.split(".", 1)[1]
        set_by_model = ("; num_heads, head_dim and dropout come from model.num_heads, model.qkv_dim / num_heads and "
                        "model.attention_dropout" if leaf in RESERVED_ATTENTION_PARAMS else "")
        takes = (f"{mechanism} takes no parameter {leaf!r} here; its parameters (config "
                 f"{get_attention_info(mechanism).config_cls.__name__}) are {', '.join(section)}{set_by_model}")
        best = f"{parent}.{close_match(leaf, section)}" if close_match(leaf, section) else None
    elif parent == "attention_overrides":
        takes = f"attention_overrides takes registered mechanisms: {', '.join(section)}"
        best = f"{parent}.{close_match(leaf, section)}" if close_match(leaf, section) else None
    else:
        where = parent or "the top level"
        takes = f"{where} takes {', '.join(k for k in section if k != 'hydra')}"
        best = f"{parent + '.' if parent else ''}{close_match(leaf, section)}" if close_match(leaf, section) else None
    hint = f" (did you mean {_suggestion(cfg, best, _node_at(cfg, key))}?)" if best else ""
    return f"unknown key {key!r}: nothing reads it; {takes}{hint}"


def check_keys(cfg: DictConfig | Mapping) -> None:
    """ValueError (one line) naming every key of the run's config that no mechanism, task or setting reads,
    with what its section takes and the nearest valid key: ``+attention.nb_features=-3`` (Hydra's own hint
    for ``attention.nb_features=-3``) or ``+trian.steps=5`` would otherwise train with the defaults."""
    values = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(values, dict)
    name = str((values.get("attention") or {}).get("name"))
    if name not in available_attentions():
        raise ValueError(f"unknown attention {name!r}: registered are {', '.join(available_attentions())}")
    unknown = _unknown(values, key_schema(values))
    if unknown:
        raise ValueError("; ".join(_unknown_key_message(values, key, section) for key, section in unknown))


def check_config(cfg: DictConfig) -> TrainSettings:
    """Everything about ``cfg`` that can be checked before the task is built: its keys (:func:`check_keys`),
    the loop's settings (:meth:`TrainSettings.from_cfg`: types, ranges, device) and the step counts' types.
    Returns the settings; raises ValueError (one line) naming the first problem."""
    check_keys(cfg)
    settings = TrainSettings.from_cfg(cfg)
    as_int(cfg.train.max_steps, "train.max_steps", minimum=1)
    as_float(cfg.train.get("epochs"), "train.epochs", minimum=0, strict=True, optional=True)
    as_int(cfg.scheduler.get("warmup_steps", 0), "scheduler.warmup_steps", minimum=0)
    as_float(cfg.scheduler.get("warmup_epochs"), "scheduler.warmup_epochs", minimum=0, optional=True)
    as_int(cfg.task.get("data_seed", 0), "task.data_seed", minimum=0)
    return settings


# ----------------------------------------------------------------------------- what a run costs at least


@functools.lru_cache(maxsize=8)
def _matmul_rate(dtype: torch.dtype, device: str, threads: int) -> float:
    """The measured matmul rate, once per process for a dtype, device and thread count (a sweep's runs share it)."""
    return matmul_flops_per_s(dtype, device)


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 days``, ``10 years``: the unit a person reads at a glance."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or (unit == "min" and seconds >= 60):
            return f"{seconds / size:.2g} {unit}" if seconds / size < 10 else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def time_estimate(settings: TrainSettings, model: ModelConfig, steps: int) -> dict[str, Any]:
    """The least time ``steps`` training steps can take on this CPU: steps x FLOPs of one step
    (:func:`harness.measure.transformer_step_flops`; full attention's scores only for ``full``, whose work they
    are) / this machine's measured matmul rate (:func:`harness.measure.matmul_flops_per_s`, the run's dtype and
    threads). Returns ``seconds``, ``step_flops``, ``flops_per_s`` and ``message``, the line arena-train prints."""
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    threads = torch.get_num_threads()
    rate = _matmul_rate(dtype, str(settings.device), threads)
    full = model.attention == "full"
    step = transformer_step_flops(embed_dim=model.embed_dim, qkv_dim=model.qkv_dim, mlp_dim=model.mlp_dim,
                                  num_layers=model.num_layers, length=model.seq_len,
                                  sequences=settings.batch_size * (2 if model.two_sequence else 1),
                                  attention_scores=full)
    seconds = steps * step / rate
    counted = "projections, feed-forward and full attention's scores" if full else (
        f"projections and feed-forward; {model.attention}'s own attention work not counted")
    message = (f"{settings.label}: {steps} steps will take at least {_duration(seconds)} on this CPU (a lower bound: "
               f"{steps} steps x {step / 1e9:.3g} GFLOP per step, 3x the forward's matrix multiplies ({counted}), "
               f"at the {rate / 1e9:.0f} GFLOP/s {str(dtype).removeprefix('torch.')} matmul rate measured here with "
               f"{threads} thread(s); data, evaluation and the rest come on top)")
    return {"seconds": seconds, "step_flops": step, "flops_per_s": rate, "message": message}


def log_time_estimate(cfg: DictConfig, settings: TrainSettings, task, steps: int) -> dict[str, Any] | None:
    """On a CPU, log :func:`time_estimate`'s line for ``steps`` steps of this run (the task need not be prepared:
    its sizes are known before its data are made) and return the estimate. Elsewhere nothing (None): a GPU's
    rate is not a matmul of this kind."""
    if settings.device.type != "cpu":
        return None
    estimate = time_estimate(settings, model_config_for(cfg, task), steps)
    log.info(estimate["message"])
    return estimate
