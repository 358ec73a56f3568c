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
sweep goes on; a failing single run exits non-zero after recording.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from harness.model import ArenaModel, ModelConfig, build_model
from harness.schedules import build_scheduler
from harness.store import config_hash, find_record, now_iso, write_record

log = logging.getLogger("arena-train")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Keys that say where things go or how to report them, not what is computed: left out of the hash,
# so moving the results or rerunning without the fault injection still finds the same run.
NON_SEMANTIC_KEYS = ("results_dir", "cache_dir", "checkpoint_dir", "keep_checkpoints", "force", "quiet",
                     "log_every", "fault", "num_threads")
PRECISIONS = ("auto", "fp32", "bf16")


class SimulatedCrash(RuntimeError):
    """Raised by the ``fault`` testing aid to simulate a run killed mid-training."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- device and precision


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must be a valid, available device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"invalid 'device': {requested!r} ({exc}); allowed: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid 'device': cuda requested but torch.cuda.is_available() is False; use device=cpu")
    return device


def resolve_precision(requested: str, device_type: str) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 elsewhere; explicit ``fp32``/``bf16`` are kept."""
    if requested not in PRECISIONS:
        raise ValueError(f"invalid 'precision': {requested!r}; allowed: {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return requested


def autocast_context(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, a no-op for fp32. Parameters and the loss stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_oom(exc: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator failing."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # pragma: no cover - CUDA only
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- configuration helpers


def _abs_path(path: str) -> Path:
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


def hashed_config(cfg: DictConfig) -> dict[str, Any]:
    """What the config hash covers: the resolved config minus the non-semantic keys, with the
    attention's effective params (other mechanisms' presets do not change this run's hash)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    hashed = {k: v for k, v in resolved.items() if k not in NON_SEMANTIC_KEYS and k not in ("hydra",
                                                                                          "attention_overrides")}
    hashed["attention"] = {**hashed["attention"], "params": attention_params(cfg)}
    return hashed


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
        params["data_root"] = str(_abs_path(cfg.data_root))
    return factory(cfg.task.name, cache_dir=str(_abs_path(cfg.cache_dir)), seed=int(cfg.task.data_seed), **params)


def model_config_for(cfg: DictConfig, task) -> ModelConfig:
    """The backbone config: sizes from ``cfg.model``, shapes from the task, the mechanism from ``cfg.attention``."""
    model_params = OmegaConf.to_container(cfg.model, resolve=True)
    return ModelConfig(
        vocab_size=int(task.vocab_size),
        max_length=int(task.max_length),
        num_classes=int(task.num_classes),
        two_sequence=bool(task.two_sequence),
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


# ----------------------------------------------------------------------------- environment for the record


def git_sha(cwd: str | Path) -> str | None:
    """HEAD of the checkout at ``cwd``, or None when it is not a git checkout / git is missing."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("hydra", "omegaconf", "pandas"):
        with contextlib.suppress(Exception):
            versions[name] = importlib.import_module(name).__version__
    return versions


def describe_device(device: torch.device) -> dict[str, Any]:
    """Device facts for the record (harness.measure.device_info when available)."""
    with contextlib.suppress(ImportError):
        from harness.measure import device_info

        return dict(device_info(device))
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":  # pragma: no cover - CUDA only
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def measure_step_memory(fn, device: torch.device) -> dict[str, Any]:
    """Peak memory of one training step through harness.measure (allocator-level, never RSS)."""
    try:
        from harness.measure import measure_peak_memory
    except ImportError:
        fn()
        return {"peak_bytes": None, "method": "unavailable (harness.measure not installed)"}
    _, reading = measure_peak_memory(fn, device)
    return {"peak_bytes": int(reading.peak_bytes), "method": str(reading.method)}


# ----------------------------------------------------------------------------- training pieces


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Token positions processed (padding included: the model computes on them)."""
    return sum(int(batch[k].numel()) for k in ("tokens", "tokens2") if k in batch)


@torch.no_grad()
def evaluate(model: ArenaModel, task, split: str, cfg: DictConfig, device: torch.device, precision: str,
             max_batches: int | None = None) -> float:
    """Accuracy over ``split`` (every example, or only the first ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    batch_size = int(cfg.train.eval_batch_size or cfg.train.batch_size)
    correct = total = 0
    for i, batch in enumerate(task.batches(split, batch_size, shuffle=False)):
        if max_batches is not None and i >= int(max_batches):
            break
        batch = _to_device(batch, device)
        with autocast_context(device.type, precision):
            logits = model.forward_batch(batch)
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    model.train(was_training)
    if total == 0:
        raise ValueError(f"split '{split}' gave no examples to evaluate")
    return correct / total


def majority_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always predicting the split's most frequent class (a constant predictor's best)."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")


def _store_result(holder: dict[str, Any], fn, *args: Any) -> None:
    holder["result"] = fn(*args)


def skip_batches(iterator: Iterator, n: int) -> Iterator:
    """Advance ``iterator`` by ``n`` batches (resuming mid-epoch with the same order)."""
    for _ in range(n):
        next(iterator, None)
    return iterator


class Progress:
    """A tqdm bar per run, or plain log lines every ``log_every`` steps in quiet mode."""

    def __init__(self, cfg: DictConfig, total: int, initial: int, desc: str) -> None:
        self.quiet, self.every, self.desc, self.total = bool(cfg.quiet), int(cfg.log_every), desc, total
        self.bar = None
        if not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, val_acc: float | None, steps_per_s: float | None) -> None:
        post = {"loss": f"{loss:.4f}", "val": "-" if val_acc is None else f"{val_acc:.4f}",
                "it/s": "-" if steps_per_s is None else f"{steps_per_s:.2f}"}
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0 or step == self.total:
                self.bar.set_postfix(post, refresh=False)
        elif step % self.every == 0 or step == self.total:
            log.info("%s step %d/%d loss %s val_acc %s steps/s %s", self.desc, step, self.total,
                     post["loss"], post["val"], post["it/s"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: DictConfig, run_id: str, checkpoint_dir: Path, out: dict[str, Any]) -> None:
    """Train and evaluate one run, filling ``out`` with the result fields of its record.

    ``out`` is filled as the run goes (``stage``: setup, train, test), so a failure still
    records what was known. Raises on failure (the caller records it): ValueError for a config
    that cannot work (before any training step), Diverged, SimulatedCrash, OOM errors.
    """
    out["stage"] = "setup"
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(str(cfg.device))
    precision = resolve_precision(str(cfg.precision), device.type)
    out.update(device=describe_device(device), precision=precision)

    task = make_task(cfg)
    task.prepare()
    num_train = int(task.num_examples("train"))
    steps_per_epoch, max_steps, warmup = schedule_lengths(cfg, num_train)
    model_cfg = model_config_for(cfg, task)

    # Model init, dropout and anything else drawing from the global RNGs start from the seed.
    torch.manual_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    model = build_model(model_cfg).to(device)  # invalid mechanism params raise the registry's ValueError here
    out["num_parameters"] = model.num_parameters()
    out["attention_config"] = asdict(model.encoder.blocks[0].attn.attention.config)
    out["model_config"] = model_cfg.to_dict()
    out["majority_test_acc"] = majority_accuracy(task.labels("test"))
    # LRA's Text protocol validates on the test split; the report marks runs that did (docs/DATA.md).
    out["validation_is_test"] = bool(getattr(task, "validation_is_test", False))
    notes = getattr(task, "notes", None) or {}
    out["data_notes"] = {"source": notes.get("source"), "validation": notes.get("validation"),
                         "skipped_files": len(notes.get("skipped") or [])}

    # Preflight: one forward on real validation examples so a config that cannot work at this length
    # (a window or projection that does not fit the sequence) fails before training, with its reason.
    rng_before = torch.get_rng_state()
    model.eval()
    with torch.no_grad(), autocast_context(device.type, precision):
        model.forward_batch(_to_device(next(iter(task.batches("validation", 2))), device))
    model.train()
    torch.set_rng_state(rng_before)
    out["attention_backend"] = model.attention_backend()

    opt = cfg.optimizer
    if opt.name != "adamw":
        raise ValueError(f"invalid 'optimizer.name': {opt.name!r}; allowed: adamw")
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(opt.lr), betas=tuple(opt.betas), eps=float(opt.eps),
                                  weight_decay=float(opt.weight_decay))
    scheduler = build_scheduler(optimizer, str(cfg.scheduler.name), warmup, max_steps,
                                float(cfg.scheduler.get("min_ratio") or 0.0))

    # Resumable state: plain values only (weights_only checkpoints).
    state: dict[str, Any] = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val_acc": None, "best_step": None,
                             "recent_losses": [], "peak_memory": None, "val_history": []}
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    out["resumed_from_step"] = None
    if last_path.exists():
        ckpt = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        out["resumed_from_step"] = state["step"]
        log.info("run %s: resuming from step %d (%s)", run_id, state["step"], last_path)

    def save_last() -> None:
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "state": state, "rng": rng_state()}, last_path)

    def train_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_context(device.type, precision):
            logits = model.forward_batch(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
        optimizer.step()
        scheduler.step()
        return loss.detach()

    out["stage"] = "train"
    fault_step = cfg.fault.get("raise_at_step")
    fault_seeds = cfg.fault.get("seeds")
    fault_active = fault_step is not None and (fault_seeds is None or int(cfg.seed) in list(fault_seeds))
    eval_every = int(cfg.train.eval_every)
    ckpt_every = int(cfg.train.checkpoint_every or eval_every)
    warm = int(cfg.train.throughput_warmup)
    loss_window = int(cfg.train.loss_window)
    timed_steps, timed_s, timed_examples, timed_tokens = 0, 0.0, 0, 0
    segment_steps = 0
    progress = Progress(cfg, max_steps, state["step"], f"{cfg.attention.name}/{cfg.task.name}/seed{cfg.seed}")
    model.train()
    try:
        while state["step"] < max_steps:
            batches = task.batches("train", int(cfg.train.batch_size), shuffle=True, seed=int(cfg.seed),
                                   epoch=state["epoch"], drop_last=True)
            batches = skip_batches(iter(batches), state["step_in_epoch"])
            while True:
                _sync(device)
                t0 = time.perf_counter()  # the step's time includes fetching its batch
                batch = next(batches, None)
                if batch is None:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                    break
                batch = _to_device(batch, device)
                if state["peak_memory"] is None and segment_steps >= warm:
                    # A real training step (forward, backward, optimizer and scheduler step; so resuming
                    # changes nothing), measured after warm-up so the optimizer state is already allocated.
                    # Gradients are dropped first: the step allocates them inside the measurement. Left from
                    # the previous step, their frees would be invisible to the CPU profiler (allocated before
                    # it started) while the new ones count, inflating the CPU figure by a gradient's worth.
                    optimizer.zero_grad(set_to_none=True)
                    holder: dict[str, torch.Tensor] = {}
                    step_fn = functools.partial(_store_result, holder, train_step, batch)
                    state["peak_memory"] = measure_step_memory(step_fn, device)
                    loss = holder["result"]
                    measured = False  # the profiler's overhead stays out of the throughput
                else:
                    loss = train_step(batch)
                    measured = True
                loss_value = float(loss)
                _sync(device)
                elapsed = time.perf_counter() - t0
                state["step"] += 1
                state["step_in_epoch"] += 1
                segment_steps += 1
                if not math.isfinite(loss_value):
                    raise Diverged(f"training loss is {loss_value} at step {state['step']}")
                state["recent_losses"] = (state["recent_losses"] + [loss_value])[-loss_window:]
                if measured and segment_steps > warm:
                    timed_steps += 1
                    timed_s += elapsed
                    timed_examples += int(batch["labels"].numel())
                    timed_tokens += _tokens_in(batch)
                step = state["step"]
                if step % eval_every == 0 or step == max_steps:
                    val_acc = evaluate(model, task, "validation", cfg, device, precision,
                                       cfg.train.get("eval_max_batches"))
                    state["val_history"].append([step, val_acc])
                    if state["best_val_acc"] is None or val_acc > state["best_val_acc"]:
                        state["best_val_acc"], state["best_step"] = val_acc, step
                        save_checkpoint({"model": model.state_dict(), "step": step, "val_acc": val_acc}, best_path)
                if step % ckpt_every == 0 or step == max_steps:
                    save_last()
                progress.update(step, loss_value, state["best_val_acc"],
                                timed_steps / timed_s if timed_s > 0 else None)
                if fault_active and step == int(fault_step):
                    raise SimulatedCrash(f"fault injection: simulated crash after step {step}")
                if step >= max_steps:
                    break
    finally:
        progress.close()

    # Test accuracy at the BEST validation checkpoint, not the last weights.
    out["stage"] = "test"
    best = load_checkpoint(best_path, map_location=device)
    model.load_state_dict(best["model"])
    out.update(
        steps=state["step"],
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        epochs_completed=state["step"] / steps_per_epoch,
        best_step=state["best_step"],
        best_val_acc=state["best_val_acc"],
        test_acc=evaluate(model, task, "test", cfg, device, precision),
        final_train_loss=float(np.mean(state["recent_losses"])) if state["recent_losses"] else None,
        val_history=state["val_history"],
        peak_memory=state["peak_memory"],
        peak_memory_bytes=(state["peak_memory"] or {}).get("peak_bytes"),
        throughput={
            "steps_per_s": timed_steps / timed_s if timed_s > 0 else None,
            "examples_per_s": timed_examples / timed_s if timed_s > 0 else None,
            "tokens_per_s": timed_tokens / timed_s if timed_s > 0 else None,
            "measured_steps": timed_steps,
            "warmup_steps": warm,
        },
    )
    out.pop("stage")


# ----------------------------------------------------------------------------- one run = one record


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
    cfg_hashed = hashed_config(cfg)
    run_id = config_hash(cfg_hashed)
    results_dir = _abs_path(cfg.results_dir)
    checkpoint_root = _abs_path(cfg.checkpoint_dir) if cfg.get("checkpoint_dir") else results_dir / "checkpoints"
    checkpoint_dir = checkpoint_root / run_id
    label = f"{cfg.attention.name}/{cfg.task.name}/seed{cfg.seed}"

    existing = find_record(results_dir, "train", run_id)
    if existing is not None and existing.get("status") == "ok" and not cfg.force:
        log.info("skipping %s: config %s already has an ok record (%s); force=true reruns it",
                 label, run_id, results_dir / "train" / f"{run_id}.json")
        return {**existing, "skipped": True}
    if cfg.force and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)

    record: dict[str, Any] = {
        "kind": "train",
        "record_id": run_id,
        "config_hash": run_id,
        "status": "error",
        "attention": str(cfg.attention.name),
        "task": str(cfg.task.name),
        "seed": int(cfg.seed),
        "config": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"},
        "versions": library_versions(),
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "hostname": platform.node(),
        "output_dir": _hydra_output_dir(),
        "checkpoint_dir": str(checkpoint_dir),
    }
    log.info("run %s (%s): checkpoints in %s", label, run_id, checkpoint_dir)
    results: dict[str, Any] = {}
    try:
        train(cfg, run_id, checkpoint_dir, results)
        record.update(results)
        record["status"] = "ok"
    except Diverged as exc:
        record.update(results)
        record.update(status="diverged", error={"type": "Diverged", "message": str(exc)})
    except Exception as exc:  # recorded, never re-raised: a sweep goes on
        record.update(results)
        record["status"] = "oom" if is_oom(exc) else "error"
        record["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": "".join(traceback.format_exc()).splitlines()[-25:]}
        if torch.cuda.is_available():  # pragma: no cover - CUDA only
            torch.cuda.empty_cache()
    record["wall_time_s"] = time.time() - started
    record["created_at"] = now_iso()
    path = write_record(record, results_dir)
    if record["status"] == "ok":
        log.info("%s: ok  best val %.4f (step %s)  test@best %.4f  majority %.4f  -> %s", label,
                 record["best_val_acc"], record["best_step"], record["test_acc"], record["majority_test_acc"], path)
        if not cfg.keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    else:
        message = record.get("error", {}).get("message", "")
        log.error("%s: %s%s: %s -> %s", label, record["status"],
                  " (before training)" if record.get("stage") == "setup" else "", message, path)
    return record


def _is_multirun() -> bool:
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    return False


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    record = run(cfg)
    if record["status"] != "ok" and not _is_multirun():
        sys.exit(1)
    return record


def main() -> None:
    """Console entry point ``arena-train``."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


if __name__ == "__main__":
    main()
