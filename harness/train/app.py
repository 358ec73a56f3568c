"""One run = one record: skip a config that already has an ok record, else train and write exactly one record.

A run that fails before training (its settings, data or model cannot be built, or cannot run at this length)
writes no record: it raises :class:`RunNotStarted`. "Before training" is the set-up
(:func:`harness.train.loop.set_up`): the loop's settings checked, the task's data built, the model built and
one forward pass on two validation examples; it ends before the checkpoint is loaded and the first step is
taken. Out of memory is the exception: it is a finding about the mechanism at that size, recorded as ``oom``.

Owns: the record of a training run (status, config, versions, where its checkpoints are), how a
failure becomes a status, the line each run ends with, and how the runs of one ``arena-train`` process
become its exit status (:func:`job`, :func:`exit_if_runs_failed`). Imports: :mod:`harness.store`,
:mod:`harness.plugins` (the run's plug-ins), :mod:`harness.measure` (what counts as out of memory),
:mod:`harness.display` (paths, the run's last line), :mod:`harness.train.config`, :mod:`harness.train.loop`,
hydra, omegaconf.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from harness.display import run_done_line, shown_path
from harness.measure import command_line, is_out_of_memory
from harness.plugins import load_plugins
from harness.store import config_hash, find_record, now_iso, write_record
from harness.train.config import abs_path, experiment_name, hashed_config, recipe_config, resolved_choices
from harness.train.loop import Diverged, train

log = logging.getLogger("arena-train")


def git_sha(cwd: str | Path) -> str | None:
    """HEAD of the checkout at ``cwd``, or None when it is not a git checkout / git is missing."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_sha() -> str | None:
    """The commit of the clone this code runs from; None for an installed wheel (whose site-packages may sit
    inside some other git checkout, e.g. a virtual environment in the user's project)."""
    root = Path(__file__).resolve().parents[2]
    return git_sha(root) if (root / "pyproject.toml").is_file() and (root / "harness").is_dir() else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("hydra", "omegaconf", "pandas"):
        with contextlib.suppress(Exception):
            versions[name] = importlib.import_module(name).__version__
    with contextlib.suppress(Exception):  # the installed distribution (a wheel has no git commit to record)
        versions["attention_arena"] = importlib.metadata.version("attention-arena")
    return versions


def _hydra_output_dir() -> str | None:
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    return None


class RunNotStarted(RuntimeError):
    """A run failed before training (see the module's docstring) and wrote no record: a record would only add
    "— (1 error)" tables to the report for a mistyped command. ``cause`` is the original exception; a ValueError
    is an invalid setting (the registry's, a task's, the loop's: its message names it), anything else a crash
    (a plug-in's bug, unreadable data) whose traceback the caller shows."""

    def __init__(self, label: str, recipe: str | None, cause: BaseException, wall_s: float) -> None:
        self.label, self.recipe, self.cause, self.wall_s = label, recipe, cause, wall_s
        self.reason = str(cause) if self.is_settings_error else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{label} cannot start: {self.reason} (nothing recorded)")

    @property
    def is_settings_error(self) -> bool:
        return isinstance(self.cause, ValueError)

    def traceback_text(self) -> str:
        """The cause's whole traceback."""
        return "".join(traceback.format_exception(self.cause)).rstrip()

    def last_frames(self, count: int = 4) -> str:
        """The cause's last ``count`` frames, one line each (``file:line in function: code``)."""
        frames = traceback.extract_tb(self.cause.__traceback__)[-count:]
        return "\n".join([f"Traceback (last {len(frames)} frames):"]
                         + [f"  {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames])


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run: skip if done, else train and write exactly one record. Returns the record.

    A failure during training is the record's status, never raised. Raises :class:`RunNotStarted` (nothing
    recorded) when the run fails before training, except out of memory (recorded as ``oom``).
    KeyboardInterrupt and other BaseExceptions pass through, leaving the last checkpoint to resume from.
    """
    started = time.time()
    # Again here: a launcher (submitit, joblib) may run this in a fresh process that never saw main().
    load_plugins(list(cfg.get("plugins") or []))
    run_id = config_hash(hashed_config(cfg))
    results_dir = abs_path(cfg.results_dir)
    checkpoint_root = abs_path(cfg.checkpoint_dir) if cfg.get("checkpoint_dir") else results_dir / "checkpoints"
    checkpoint_dir = checkpoint_root / run_id
    label = f"{cfg.attention.name}/{cfg.task.name}/seed{cfg.seed}"

    existing = find_record(results_dir, "train", run_id)
    if existing is not None and existing.get("status") == "ok" and not cfg.force:
        path = shown_path(results_dir / "train" / f"{run_id}.json")
        log.info(run_done_line(label, experiment_name(), "skipped", time.time() - started, existing.get("test_acc"),
                               f"config {run_id} already has an ok record ({path}), skipping it; force=true reruns it"))
        return {**existing, "skipped": True}
    if cfg.force and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)

    record = new_record(cfg, run_id, checkpoint_dir)
    try:
        record.update(train_and_catch(cfg, run_id, checkpoint_dir))
    except Exception as exc:  # train_and_catch lets through only a failure before training
        raise RunNotStarted(label, record["experiment"], exc, time.time() - started) from exc
    record["wall_time_s"] = time.time() - started
    record["created_at"] = now_iso()
    path = write_record(record, results_dir)
    log_outcome(label, record, path)
    if record["status"] == "ok" and not cfg.keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return record


def new_record(cfg: DictConfig, run_id: str, checkpoint_dir: Path) -> dict[str, Any]:
    """The record before training: identity, resolved config, versions, where it ran; status ``error``
    until the run says otherwise."""
    config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    config.update(resolved_choices(cfg))  # device=auto recorded as the device it chose
    return {
        "kind": "train",
        "record_id": run_id,
        "config_hash": run_id,
        # Runs with one recipe_hash differ only in mechanism and seed: one comparison (see recipe_config).
        "recipe_hash": config_hash(recipe_config(cfg)),
        "experiment": experiment_name(),
        "command": command_line(),
        "status": "error",
        "attention": str(cfg.attention.name),
        "task": str(cfg.task.name),
        "seed": int(cfg.seed),
        "plugins": [str(m) for m in cfg.get("plugins") or []],
        "config": config,
        "versions": library_versions(),
        "git_sha": source_sha(),
        "hostname": platform.node(),
        "output_dir": _hydra_output_dir(),
        "checkpoint_dir": str(checkpoint_dir),
    }


def train_and_catch(cfg: DictConfig, run_id: str, checkpoint_dir: Path) -> dict[str, Any]:
    """:func:`harness.train.loop.train`'s result fields with the status; a failure becomes ``diverged``,
    ``oom`` or ``error`` (with the message and the traceback's tail) beside what was known by then.
    A failure before training (stage ``setup``) other than out of memory is raised: nothing to record."""
    results: dict[str, Any] = {}
    try:
        train(cfg, run_id, checkpoint_dir, results)
        results["status"] = "ok"
    except Diverged as exc:
        results.update(status="diverged", error={"type": "Diverged", "message": str(exc)})
    except Exception as exc:  # recorded, never re-raised: a sweep goes on
        if results.get("stage") == "setup" and not is_out_of_memory(exc):
            raise
        results["status"] = "oom" if is_out_of_memory(exc) else "error"
        results["error"] = {"type": type(exc).__name__, "message": str(exc),
                            "traceback": "".join(traceback.format_exc()).splitlines()[-25:]}
        if torch.cuda.is_available():  # pragma: no cover - CUDA only
            torch.cuda.empty_cache()
    return results


# How a failed run's record names the stage it failed in (loop.train sets ``stage`` as it goes).
STAGE_TEXT = {"setup": "before training", "resume": "while resuming", "train": "during training",
              "test": "while testing"}


def log_outcome(label: str, record: dict[str, Any], path: Path) -> None:
    """The one line a recorded run ends with (:func:`harness.display.run_done_line`; ``arena-suite`` reads it)."""
    if record["status"] == "ok":
        log.info(run_done_line(label, record["experiment"], "ok", record["wall_time_s"], record["test_acc"],
                               f"best val {record['best_val_acc']:.4f} (step {record['best_step']}), majority "
                               f"{record['majority_test_acc']:.4f} -> {shown_path(path)}"))
    else:
        stage = STAGE_TEXT.get(record.get("stage"), "")
        message = record.get("error", {}).get("message", "")
        log.error(run_done_line(label, record["experiment"], record["status"] + (f" ({stage})" if stage else ""),
                                record["wall_time_s"], None, f"{message} -> {shown_path(path)}"))


# ----------------------------------------------------------------------------- a process's runs -> exit status


@dataclass
class SweepTally:
    """The runs of the multirun this process launches itself (Hydra's basic launcher runs them in-process)."""

    pid: int | None = None
    runs: int = 0
    failed: list[str] = field(default_factory=list)


SWEEP = SweepTally()


def start_sweep() -> None:
    """Called by ``arena-train``'s main before Hydra runs: jobs in this process report to :data:`SWEEP`."""
    SWEEP.pid, SWEEP.runs, SWEEP.failed = os.getpid(), 0, []


class RunFailed(CompactHydraException):
    """A failed run of a sweep whose jobs run in other processes (joblib, submitit): raised from the job so
    that Hydra's sweep, in the launching process, fails with this one line (exit 1). Compact: Hydra prints
    the message alone, no traceback (the run's own log has the details)."""


def job(cfg: DictConfig, multirun: bool) -> dict[str, Any] | None:
    """One Hydra job of ``arena-train``: :func:`run`, and its outcome made visible to whoever started it.

    A single run that failed exits 1 (after recording); one that could not start prints one line on stderr
    (``arena-train: <label> cannot start: <reason> (nothing recorded)``; a crash's traceback first) and exits 2
    for an invalid setting, else 1. In a sweep every run goes on; a failed run is logged (a run that did not
    start with its own line), counted in :data:`SWEEP` when it runs in this process (the sweep then ends with
    :func:`exit_if_runs_failed`), or raised as :class:`RunFailed` from a launcher's own process."""
    try:
        record, failure = run(cfg), None
        if record["status"] != "ok":
            failure = f"{record['attention']}/{record['task']}/seed{record['seed']} ({record['status']})"
    except RunNotStarted as exc:
        if not multirun:
            _exit_not_started(exc)
        # A crash (not an invalid setting): where it happened, since no record keeps its traceback.
        trace = "" if exc.is_settings_error else "\n" + exc.last_frames()
        log.error(run_done_line(exc.label, exc.recipe, "not started", exc.wall_s, None,
                                f"{exc.reason} (nothing recorded)") + trace)
        record, failure = None, f"{exc.label} (not started)"
    if not multirun:
        if failure:
            sys.exit(1)
        return record
    if SWEEP.pid != os.getpid():
        if failure:
            raise RunFailed(f"arena-train: run {failure} failed; its log says why")
        return record
    SWEEP.runs += 1
    if failure:
        SWEEP.failed.append(failure)
    return record


def _exit_not_started(exc: RunNotStarted) -> None:
    if not exc.is_settings_error:
        print(exc.traceback_text(), file=sys.stderr)
    print(f"arena-train: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2 if exc.is_settings_error else 1)


def exit_if_runs_failed() -> None:
    """After a sweep run in this process: exit 1 naming the failed runs, when there are any."""
    if SWEEP.failed:
        print(f"arena-train: {len(SWEEP.failed)} of {SWEEP.runs} runs failed: {', '.join(SWEEP.failed)}; their "
              "lines above say why (a run that did not start wrote no record)", file=sys.stderr, flush=True)
        sys.exit(1)
