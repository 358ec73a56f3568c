"""One run = one record: skip a config that already has an ok record, else train and write exactly one record.

Owns: the record of a training run (status, config, versions, where its checkpoints are) and how a
failure becomes a status. Imports: :mod:`harness.store`, :mod:`harness.plugins` (the run's plug-ins),
 :mod:`harness.measure` (what counts as out of
memory), :mod:`harness.train.config`, :mod:`harness.train.loop`, hydra, omegaconf.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import platform
import shutil
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.display import shown_path
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run: skip if done, else train and write exactly one record. Returns the record.

    Never raises for a failed run (the failure is the record's status); KeyboardInterrupt and
    other BaseExceptions pass through, leaving the last checkpoint to resume from.
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
        log.info("skipping %s: config %s already has an ok record (%s); force=true reruns it",
                 label, run_id, shown_path(results_dir / "train" / f"{run_id}.json"))
        return {**existing, "skipped": True}
    if cfg.force and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)

    record = new_record(cfg, run_id, checkpoint_dir)
    log.info("run %s (%s): checkpoints in %s", label, run_id, shown_path(checkpoint_dir))
    record.update(train_and_catch(cfg, run_id, checkpoint_dir))
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
    ``oom`` or ``error`` (with the message and the traceback's tail) beside what was known by then."""
    results: dict[str, Any] = {}
    try:
        train(cfg, run_id, checkpoint_dir, results)
        results["status"] = "ok"
    except Diverged as exc:
        results.update(status="diverged", error={"type": "Diverged", "message": str(exc)})
    except Exception as exc:  # recorded, never re-raised: a sweep goes on
        results["status"] = "oom" if is_out_of_memory(exc) else "error"
        results["error"] = {"type": type(exc).__name__, "message": str(exc),
                            "traceback": "".join(traceback.format_exc()).splitlines()[-25:]}
        if torch.cuda.is_available():  # pragma: no cover - CUDA only
            torch.cuda.empty_cache()
    return results


def log_outcome(label: str, record: dict[str, Any], path: Path) -> None:
    """One log line per finished run (the suite counts these lines: ``<label>: <status> ...``)."""
    if record["status"] == "ok":
        log.info("%s: ok  best val %.4f (step %s)  test@best %.4f  majority %.4f  -> %s", label,
                 record["best_val_acc"], record["best_step"], record["test_acc"], record["majority_test_acc"],
                 shown_path(path))
    else:
        message = record.get("error", {}).get("message", "")
        log.error("%s: %s%s: %s -> %s", label, record["status"],
                  " (before training)" if record.get("stage") == "setup" else "", message, shown_path(path))
