"""arena-train: train one mechanism on one task and write one record; Hydra makes sweeps of it.

    arena-train attention=performer task=listops
    arena-train experiment=quick/listops attention=performer
    arena-train -m experiment=quick/listops attention=full,performer seed=0,1,2

One run = one record in the results store (``<results_dir>/train/<config hash>.json``):
status (ok / oom / diverged / error), best validation accuracy, test accuracy AT THE BEST
CHECKPOINT, majority-class accuracy, throughput, peak memory of a training step, and the
resolved config. A run never loses work: a config hash with an ``ok`` record is skipped
(``force=true`` reruns it), and a run killed mid-training resumes from its last
checkpoint (model, optimizer, scheduler, RNG states, epoch and position in the epoch) to
the same result as an uninterrupted run. A failing run of a sweep is recorded and the
sweep goes on; a failing single run exits 1 after recording, a sweep with a failed run exits 1 at its end
naming them. A run that fails before training (its settings, data or model; see :mod:`~harness.train.app`)
records nothing: a single run prints one line and exits 2 (an invalid setting) or 1 (a crash).

The package's rooms, in the order a run goes through them: :mod:`~harness.train.settings` (the loop's
typed settings, device and precision), :mod:`~harness.train.config` (config -> task, backbone config,
step counts, the run's hash), :mod:`~harness.train.loop` (set-up, resume, epochs, evaluation,
checkpoints, the results), :mod:`~harness.train.app` (one run = one record). This module holds the
Hydra entry point ``main`` (``arena-train``, ``python -m harness.train``).

Owns: producing ``train`` records. May import ``tasks``, :mod:`harness.model`, :mod:`harness.schedules`,
:mod:`harness.checkpoint`, :mod:`harness.measure`, :mod:`harness.store`, :mod:`harness.display`,
:mod:`harness.settings`, :mod:`harness.plugins`; never :mod:`harness.bench`, :mod:`harness.report` or
:mod:`harness.suite`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from harness.display import one_line_interrupt
from harness.measure import is_out_of_memory as is_oom
from harness.plugins import (
    conf_dir,
    exit_on_settings_error,
    load_plugins,
    prepare,
    unknown_attention_message,
    unknown_experiment_message,
)
from harness.train.app import exit_if_runs_failed, job, run, start_sweep
from harness.train.config import (
    attention_params,
    check_config,
    check_keys,
    hashed_config,
    make_task,
    model_config_for,
    schedule_lengths,
)
from harness.train.loop import Diverged, SimulatedCrash, evaluate, train
from harness.train.settings import TrainSettings, autocast_context, resolve_device, resolve_precision

CONF_DIR = str(conf_dir())

__all__ = [
    "CONF_DIR", "Diverged", "SimulatedCrash", "TrainSettings", "attention_params", "autocast_context", "check_config",
    "check_keys", "evaluate",
    "hashed_config", "is_oom", "main", "make_task", "model_config_for", "resolve_device", "resolve_precision",
    "run", "schedule_lengths", "train",
]


def _is_multirun() -> bool:
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    return False


# Defined here, in ``harness.train``, so Hydra names the job ``train`` (its log file train.log) as before.
@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    # Every job of a sweep, in whatever process a launcher runs it: a config that cannot work is one line and
    # exit 2 before its task is built, never a record.
    with exit_on_settings_error("arena-train"):
        load_plugins(list(cfg.get("plugins") or []))
        check_config(cfg)
    return job(cfg, multirun=_is_multirun())  # a failed run: exit status (single) or counted (sweep)


# Hydra's own command-line flags that ask for something other than a run (help, printing the config, ...).
_NOT_A_RUN = ("help", "hydra_help", "cfg", "info", "shell_completion", "config_path", "config_name", "config_dir",
              "experimental_rerun")


def _is_group(key: str) -> bool:
    """Whether an override's key chooses a config file (``attention=performer``, ``hydra/launcher=x``)."""
    from hydra.core.config_store import ConfigStore

    return "/" in key or ("." not in key and ((conf_dir() / key).is_dir() or key in ConfigStore.instance().repo))


def first_job_overrides(argv: list[str]) -> list[str] | None:
    """The first job's overrides of an ``arena-train`` command line (a sweep's first value each), with every
    plain value override made a force-add (``++key=value``) so that a key the config lacks composes and is
    judged by :func:`check_keys` rather than by Hydra's hint to add it; Hydra's own settings left out.
    None when the command line asks Hydra for something other than a run, or uses what this cannot replay
    (``glob(...)`` sweeps, ``@package`` overrides): Hydra and each job's own check then decide."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    if "--version" in argv:
        return None
    try:
        args = get_args_parser().parse_args(argv)
        if any(getattr(args, flag, None) for flag in _NOT_A_RUN):
            return None
        jobs = []
        for o in OverridesParser.create().parse_overrides(args.overrides):
            key = o.key_or_group
            if key.split(".")[0].split("/")[0] == "hydra":
                continue
            if o.package:
                return None
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
            prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(o.type, "")
            if o.type == OverrideType.CHANGE and not _is_group(key):
                prefix = "++"
            jobs.append(f"~{key}" if o.type == OverrideType.DEL and o.value() is None else f"{prefix}{key}={value}")
    except Exception:  # noqa: BLE001 - anything this cannot replay is left to Hydra, which reports it itself
        return None
    return jobs


def check_command_line(argv: list[str]) -> None:
    """Compose the first job of ``argv`` and check it (:func:`check_config`) before Hydra starts: a key that
    nothing reads, with or without Hydra's ``+``, or a value of the wrong type is a ValueError (one line).
    Anything that does not compose here is left to Hydra's own error."""
    from hydra import compose, initialize_config_dir

    overrides = first_job_overrides(argv)
    if overrides is None:
        return
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception:  # noqa: BLE001 - Hydra says what is wrong when it composes the same overrides
        return
    check_config(cfg)


def main() -> None:
    """Console entry point ``arena-train``."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    # plug-ins named by plugins=[...] and installed ones, before Hydra resolves attention=<name>
    prepare(app="arena-train")
    with exit_on_settings_error("arena-train"):  # one line and exit 2, as arena-bench and arena-suite
        unknown = unknown_attention_message(sys.argv[1:]) or unknown_experiment_message(sys.argv[1:])
        if unknown:
            raise ValueError(unknown)
        check_command_line(sys.argv[1:])
    with one_line_interrupt("arena-train", "finished runs keep their records; the same command resumes the "
                                           "interrupted run from its last checkpoint"):
        start_sweep()
        _hydra_main()
    exit_if_runs_failed()  # a sweep: exit 1 naming its failed runs (a single run has exited already)
