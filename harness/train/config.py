"""From the Hydra config to what a run builds: the task, the backbone's config, the step counts, the run's hash.

Owns: the config's meaning for the task and the model, and which keys the config hash covers.
Imports: ``tasks`` (inside :func:`make_task`, so a swapped-in factory needs no LRA data code),
:mod:`harness.model`, hydra, omegaconf.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.model import ModelConfig
from harness.store import NON_SEMANTIC_KEYS
from harness.train.settings import resolve_device, resolve_precision


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
    return hashed


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
    return recipe


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
    batch = int(cfg.train.batch_size)
    if batch < 1:
        raise ValueError(f"invalid 'train.batch_size': must be >= 1, got {batch}")
    steps_per_epoch = num_train // batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"invalid 'train.batch_size': {batch} is larger than the training split ({num_train} examples)"
        )
    epochs = cfg.train.get("epochs")
    max_steps = int(math.ceil(float(epochs) * steps_per_epoch)) if epochs is not None else int(cfg.train.max_steps)
    if max_steps < 1:
        raise ValueError(f"invalid 'train.max_steps' / 'train.epochs': gives {max_steps} steps; need >= 1")
    warmup_epochs = cfg.scheduler.get("warmup_epochs")
    warmup = (
        int(round(float(warmup_epochs) * steps_per_epoch)) if warmup_epochs is not None
        else int(cfg.scheduler.warmup_steps)
    )
    return steps_per_epoch, max_steps, warmup
