"""Resumable checkpoints that load with ``torch.load(..., weights_only=True)``.

Everything saved is a tensor or a plain container (dict, list, tuple, int, float, str,
None): model/optimizer/scheduler state dicts already are; RNG states are converted
(numpy's state array becomes a tensor). Writes are atomic (temp file, flushed to disk, then
``os.replace``), so a run killed while saving keeps its previous checkpoint.

A checkpoint that cannot be read anyway (cut short by a full disk or a copy, from another
version) is treated as the task cache treats a corrupted entry: a warning naming the file, the
file moved aside (``last.pt`` -> ``last.pt.corrupt``), never a failed run. :func:`resume_point`
picks what a run resumes from: ``last.pt``, else ``best.pt`` (a whole resumable state too), else
nothing, and the run starts again.

Owns: checkpoint files. Imports: torch, numpy, the standard library.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may touch, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():  # pragma: no cover - CUDA only
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover - CUDA only
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash cannot leave a renamed, empty file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# What a checkpoint must hold to resume a run (``harness.train.loop`` writes them into last.pt and best.pt).
RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "state", "rng")


def set_aside(path: Path, why: str) -> Path:
    """Move the file to ``<name>.corrupt`` and log a warning naming it and ``why``; returns the new path."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning("checkpoint %s is unusable (%s); moved aside to %s", path, why, aside.name)
    return aside


def load_or_set_aside(path: str | Path, map_location: str | torch.device = "cpu",
                      required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none or it is unusable: unreadable (truncated,
    corrupted) or missing one of ``required``'s keys. An unusable file is moved aside with a warning
    (:func:`set_aside`), so the next run does not trip over it again."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, map_location=map_location)
    except Exception as exc:  # torch reports a cut-short zip as RuntimeError, a bad pickle as UnpicklingError, ...
        first = (str(exc).splitlines() or ["unreadable"])[0].split(". ")[0]  # torch adds paragraphs of advice
        set_aside(path, f"{type(exc).__name__}: {first}")
        return None
    missing = [k for k in required if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        set_aside(path, f"not a resumable checkpoint: no {', '.join(missing)}")
        return None
    return ckpt


def resume_point(last: str | Path, best: str | Path,
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, Any] | None, Path | None]:
    """(checkpoint, its path) to resume a run from, or (None, None) to start it again.

    ``last`` (the latest state) when it loads, and the best weights it refers to are there too; else
    ``best`` when it loads (it holds the whole state at the best step, so resuming from it ends with the same
    result, only later); else nothing. Unusable files are moved aside with a warning; a ``last`` whose best
    checkpoint is lost is removed too (its run cannot report its test accuracy at the best step)."""
    last, best = Path(last), Path(best)
    if not last.exists() and not best.exists():
        return None, None
    latest = load_or_set_aside(last, map_location, RESUMABLE_KEYS)
    fallback = load_or_set_aside(best, map_location)
    if latest is not None and (latest["state"].get("best_step") is None or fallback is not None):
        return latest, last
    if latest is not None:
        log.warning("checkpoint %s refers to best weights that are lost (%s); removed, the run starts again",
                    last, best.name)
        last.unlink()
    if fallback is not None and all(k in fallback for k in RESUMABLE_KEYS):
        return fallback, best
    return None, None
