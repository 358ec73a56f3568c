"""One training run, as named steps: set up, resume, one epoch, evaluation, checkpoint, the results.

:func:`train` is the sequence; each step is a function of a :class:`Run` (what was built) and the
typed :class:`~harness.train.settings.TrainSettings`.

Owns: the training loop, its resumable state and its measurements (throughput, a step's peak memory).
Imports: :mod:`harness.model`, :mod:`harness.schedules`, :mod:`harness.checkpoint`,
:mod:`harness.measure`, :mod:`harness.display` (paths in log lines), :mod:`harness.train.config`,
:mod:`harness.train.settings`, ``tasks.base`` (the ignore index of unlabelled positions).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from harness.allocator import configure_cpu_allocator
from harness.checkpoint import load_checkpoint, resume_point, rng_state, save_checkpoint, set_rng_state
from harness.display import shown_path
from harness.measure import device_info, measure_peak_memory, synchronize
from harness.model import ArenaModel, build_model
from harness.schedules import build_scheduler
from harness.train.config import log_time_estimate, make_task, model_config_for, schedule_lengths
from harness.train.settings import TrainSettings, autocast_context
from tasks.base import IGNORE_INDEX

log = logging.getLogger("arena-train")


class SimulatedCrash(RuntimeError):
    """Raised by the ``fault`` testing aid to simulate a run killed mid-training."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- small pieces


def measure_step_memory(fn, device: torch.device) -> dict[str, Any]:
    """Peak memory of one training step through :func:`harness.measure.measure_peak_memory` (allocator-level)."""
    _, reading = measure_peak_memory(fn, device)
    return {"peak_bytes": int(reading.peak_bytes), "method": str(reading.method)}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Token positions processed (padding included: the model computes on them)."""
    return sum(int(batch[k].numel()) for k in ("tokens", "tokens2") if k in batch)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled targets: logits (B, C) with labels (B,), or per position (B, L, C)
    with labels (B, L); targets equal to ``IGNORE_INDEX`` are left out."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_metrics(model: ArenaModel, task, split: str, settings: TrainSettings | DictConfig,
                     device: torch.device, precision: str, max_batches: int | None = None) -> dict[str, float | None]:
    """``acc``: accuracy over the labelled targets of ``split`` (every example, or only the first ``max_batches``
    batches), in batches of the settings' evaluation batch size (``settings`` may also be the run's Hydra
    config); ``sequence_acc``: for token-level tasks the share of examples with every labelled position right,
    else None."""
    if isinstance(settings, TrainSettings):
        batch_size = settings.eval_batch_size
    else:
        batch_size = int(settings.train.eval_batch_size or settings.train.batch_size)
    was_training = model.training
    model.eval()
    correct = total = sequences_right = sequences = 0
    for i, batch in enumerate(task.batches(split, batch_size, shuffle=False)):
        if max_batches is not None and i >= int(max_batches):
            break
        batch = _to_device(batch, device)
        with autocast_context(device.type, precision):
            logits = model.forward_batch(batch)
        labels = batch["labels"]
        labelled = labels != IGNORE_INDEX
        right = (logits.argmax(dim=-1) == labels) & labelled
        correct, total = correct + int(right.sum()), total + int(labelled.sum())
        if labels.dim() == 2:  # token-level: a sequence counts when all its answers are right
            sequences_right += int((right | ~labelled).all(dim=1).sum())
            sequences += labels.shape[0]
    model.train(was_training)
    if total == 0:
        raise ValueError(f"split '{split}' gave no labelled targets to evaluate")
    return {"acc": correct / total, "sequence_acc": sequences_right / sequences if sequences else None}


def evaluate(model: ArenaModel, task, split: str, settings: TrainSettings | DictConfig, device: torch.device,
             precision: str, max_batches: int | None = None) -> float:
    """Accuracy over the labelled targets of ``split`` (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, task, split, settings, device, precision, max_batches)["acc"]


def majority_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class among the labelled targets (a constant predictor's
    best); per-position labels count every labelled position."""
    labels = np.asarray(labels).ravel()
    labels = labels[labels != IGNORE_INDEX]
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")


def _store_result(holder: dict[str, Any], fn, *args: Any) -> None:
    holder["result"] = fn(*args)


def data_facts(task) -> dict[str, Any]:
    """What a record says about the task's data: whether validation is the test split (LRA's Text protocol,
    marked in the report) and where the data came from (docs/DATA.md)."""
    notes = getattr(task, "notes", None) or {}
    return {"validation_is_test": bool(getattr(task, "validation_is_test", False)),
            "data_notes": {"source": notes.get("source"), "validation": notes.get("validation"),
                           "skipped_files": len(notes.get("skipped") or [])}}


def skip_batches(iterator: Iterator, n: int) -> Iterator:
    """Advance ``iterator`` by ``n`` batches (resuming mid-epoch with the same order)."""
    for _ in range(n):
        next(iterator, None)
    return iterator


class Progress:
    """A tqdm bar per run, or plain log lines every ``log_every`` steps in quiet mode."""

    def __init__(self, settings: TrainSettings, total: int, initial: int) -> None:
        self.quiet, self.every, self.desc, self.total = settings.quiet, settings.log_every, settings.label, total
        self.bar = None
        if not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=self.desc, dynamic_ncols=True, leave=True)

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


# ----------------------------------------------------------------------------- the run's objects


def new_state() -> dict[str, Any]:
    """The resumable loop state: plain values only (weights_only checkpoints)."""
    return {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val_acc": None, "best_step": None,
            "recent_losses": [], "peak_memory": None, "val_history": []}


@dataclass
class Throughput:
    """Timed steps after the warm-up of this process's segment (a resumed run counts its own warm-up)."""

    segment_steps: int = 0
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0

    def per_s(self, count: float) -> float | None:
        return count / self.seconds if self.seconds > 0 else None


@dataclass
class Run:
    """Everything one run built: settings, task, model, optimizer, scheduler, state, checkpoint paths."""

    settings: TrainSettings
    task: Any
    model: ArenaModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    max_steps: int
    last_path: Path
    best_path: Path
    state: dict[str, Any] = field(default_factory=new_state)
    meter: Throughput = field(default_factory=Throughput)


# ----------------------------------------------------------------------------- the steps


def train(cfg: DictConfig, run_id: str, checkpoint_dir: Path, out: dict[str, Any]) -> None:
    """Train and evaluate one run, filling ``out`` with the result fields of its record.

    ``out`` is filled as the run goes (``stage``: setup, resume, train, test), so a failure still
    records what was known. Raises on failure: ValueError for a config that cannot work, or any other
    exception of the set-up, with ``stage`` still ``setup`` ("before training": settings, data, model and a
    preflight forward; the caller records no run for it, see :mod:`harness.train.app`); Diverged,
    SimulatedCrash, OOM errors later (the caller records them).
    """
    out["stage"] = "setup"
    settings = TrainSettings.from_cfg(cfg)
    run = set_up(cfg, settings, checkpoint_dir, out)
    out["stage"] = "resume"  # before training ends here: what follows fails a run that could start
    log.info("run %s (%s): checkpoints in %s", settings.label, run_id, shown_path(checkpoint_dir))
    resume(run, run_id, out)
    out["stage"] = "train"
    progress = Progress(settings, run.max_steps, run.state["step"])
    run.model.train()
    try:
        while run.state["step"] < run.max_steps:
            train_epoch(run, progress)
    finally:
        progress.close()
    out["stage"] = "test"
    out.update(results(run))
    out.pop("stage")


def _estimate_fields(estimate: dict[str, Any] | None) -> dict[str, Any]:
    """The record's fields of a CPU time estimate: the measured matmul rate and the least time it implies."""
    if estimate is None:
        return {}
    return {"matmul_flops_per_s": estimate["flops_per_s"], "estimated_min_train_s": estimate["seconds"]}


def set_up(cfg: DictConfig, settings: TrainSettings, checkpoint_dir: Path, out: dict[str, Any]) -> Run:
    """Task, model (seeded), a preflight forward, optimizer and scheduler; the model's facts go into ``out``."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    device = settings.device
    out.update(device=dict(device_info(device)), precision=settings.precision)
    if device.type == "cpu":
        # Both change a run's times, not its numbers: recorded so throughputs from two machines or policies can
        # be told apart (the rate is this machine's, measured once per process, docs/DESIGN.md "Measuring").
        out["device"]["cpu_allocator"] = configure_cpu_allocator(settings.cpu_allocator)
    task = make_task(cfg)
    # The mechanism's parameters are checked first: a run they make impossible says so before any estimate or data.
    model_config_for(cfg, task).check_attention()
    counts_steps = cfg.train.get("epochs") is None
    if counts_steps:  # on a CPU, a word on how long it will take before the data are even made
        out.update(_estimate_fields(log_time_estimate(cfg, settings, task, int(cfg.train.max_steps))))
    task.prepare()
    steps_per_epoch, max_steps, warmup = schedule_lengths(cfg, int(task.num_examples("train")))
    if not counts_steps:  # epochs: the steps are known once the training split is
        out.update(_estimate_fields(log_time_estimate(cfg, settings, task, max_steps)))
    model_cfg = model_config_for(cfg, task)
    # Model init, dropout and anything else drawing from the global RNGs start from the seed.
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    model = build_model(model_cfg).to(device)  # invalid mechanism params raise the registry's ValueError here
    out["num_parameters"] = model.num_parameters()
    out["attention_config"] = asdict(model.encoder.blocks[0].attn.attention.config)
    out["model_config"] = model_cfg.to_dict()
    out["majority_test_acc"] = majority_accuracy(task.labels("test"))
    out.update(data_facts(task))
    preflight(model, task, settings)
    out["attention_backend"] = model.attention_backend()
    opt = settings.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    scheduler = build_scheduler(optimizer, settings.scheduler, warmup, max_steps, settings.scheduler_min_ratio)
    return Run(settings, task, model, optimizer, scheduler, steps_per_epoch, max_steps,
               last_path=checkpoint_dir / "last.pt", best_path=checkpoint_dir / "best.pt")


def preflight(model: ArenaModel, task, settings: TrainSettings) -> None:
    """One forward on real validation examples, so a config that cannot work at this length (a window or
    projection that does not fit the sequence) fails before training, with its reason. RNG untouched."""
    rng_before = torch.get_rng_state()
    model.eval()
    with torch.no_grad(), autocast_context(settings.device.type, settings.precision):
        model.forward_batch(_to_device(next(iter(task.batches("validation", 2))), settings.device))
    model.train()
    torch.set_rng_state(rng_before)


def resume(run: Run, run_id: str, out: dict[str, Any]) -> None:
    """Load the checkpoint :func:`harness.checkpoint.resume_point` picks (the last one, else the best one; an
    unreadable one is moved aside with a warning): model, optimizer, scheduler, loop state, RNG states."""
    out["resumed_from_step"] = None
    ckpt, path = resume_point(run.last_path, run.best_path, map_location=run.settings.device)
    if ckpt is None:
        return
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.state = ckpt["state"]
    set_rng_state(ckpt["rng"])
    out["resumed_from_step"] = run.state["step"]
    log.info("run %s: resuming from step %d (%s)", run_id, run.state["step"], path)


def resumable_state(run: Run) -> dict[str, Any]:
    """Everything :func:`resume` loads (last.pt, and best.pt, which is then a resume point too)."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "state": run.state, "rng": rng_state()}


def save_last(run: Run) -> None:
    """The resumable checkpoint."""
    save_checkpoint(resumable_state(run), run.last_path)


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, loss, backward, clipping, optimizer and scheduler step; returns the detached loss."""
    settings = run.settings
    with autocast_context(settings.device.type, settings.precision):
        logits = run.model.forward_batch(batch)
    loss = classification_loss(logits, batch["labels"])
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach()


def measured_or_timed_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(loss, whether the step's time counts). The first step after the warm-up is a real training step
    (so resuming changes nothing) measured for its peak memory, with the optimizer state already allocated;
    the profiler's overhead stays out of the throughput."""
    if run.state["peak_memory"] is None and run.meter.segment_steps >= run.settings.throughput_warmup:
        # Gradients are dropped first: the step allocates them inside the measurement. Left from the previous
        # step, their frees would be invisible to the CPU profiler (allocated before it started) while the new
        # ones count, inflating the CPU figure by a gradient's worth.
        run.optimizer.zero_grad(set_to_none=True)
        holder: dict[str, torch.Tensor] = {}
        run.state["peak_memory"] = measure_step_memory(functools.partial(_store_result, holder, train_step, run,
                                                                         batch), run.settings.device)
        return holder["result"], False
    return train_step(run, batch), True


def train_epoch(run: Run, progress: Progress) -> None:
    """Steps through the rest of the current epoch (in the seed's order), stopping at ``max_steps``."""
    settings, state, meter = run.settings, run.state, run.meter
    batches = run.task.batches("train", settings.batch_size, shuffle=True, seed=settings.seed,
                               epoch=state["epoch"], drop_last=True)
    batches = skip_batches(iter(batches), state["step_in_epoch"])
    while True:
        synchronize(settings.device)
        t0 = time.perf_counter()  # the step's time includes fetching its batch
        batch = next(batches, None)
        if batch is None:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            return
        batch = _to_device(batch, settings.device)
        loss, timed = measured_or_timed_step(run, batch)
        loss_value = float(loss)
        synchronize(settings.device)
        elapsed = time.perf_counter() - t0
        state["step"] += 1
        state["step_in_epoch"] += 1
        meter.segment_steps += 1
        if not math.isfinite(loss_value):
            raise Diverged(f"training loss is {loss_value} at step {state['step']}")
        state["recent_losses"] = (state["recent_losses"] + [loss_value])[-settings.loss_window:]
        if timed and meter.segment_steps > settings.throughput_warmup:
            meter.steps += 1
            meter.seconds += elapsed
            meter.examples += int(batch["labels"].shape[0])
            meter.tokens += _tokens_in(batch)
        after_step(run, progress, loss_value)
        if state["step"] >= run.max_steps:
            return


def after_step(run: Run, progress: Progress, loss_value: float) -> None:
    """Validation and the best checkpoint, the resumable checkpoint, progress, the fault injection."""
    settings, state = run.settings, run.state
    step = state["step"]
    if step % settings.eval_every == 0 or step == run.max_steps:
        validate(run)
    if step % settings.checkpoint_every == 0 or step == run.max_steps:
        save_last(run)
    progress.update(step, loss_value, state["best_val_acc"], run.meter.per_s(run.meter.steps))
    if settings.fault_step is not None and step == settings.fault_step:
        raise SimulatedCrash(f"fault injection: simulated crash after step {step}")


def validate(run: Run) -> None:
    """Validation accuracy into the history; a new best is saved as the best checkpoint."""
    state, step = run.state, run.state["step"]
    settings = run.settings
    val_acc = evaluate(run.model, run.task, "validation", settings, settings.device, settings.precision,
                       settings.eval_max_batches)
    state["val_history"].append([step, val_acc])
    if state["best_val_acc"] is None or val_acc > state["best_val_acc"]:
        state["best_val_acc"], state["best_step"] = val_acc, step
        # The whole resumable state (evaluation draws no random numbers, so it equals the state saved after
        # this step): a run whose last.pt is lost resumes from here to the same result.
        save_checkpoint({**resumable_state(run), "step": step, "val_acc": val_acc}, run.best_path)


def results(run: Run) -> dict[str, Any]:
    """The record's result fields: test accuracy AT THE BEST validation checkpoint (not the last weights),
    losses, history, peak memory and throughput."""
    state, meter = run.state, run.meter
    best = load_checkpoint(run.best_path, map_location=run.settings.device)
    run.model.load_state_dict(best["model"])
    test = evaluate_metrics(run.model, run.task, "test", run.settings, run.settings.device, run.settings.precision)
    # Token-level tasks: the share of test sequences with every answer right.
    extra = {} if test["sequence_acc"] is None else {"test_sequence_acc": test["sequence_acc"]}
    return dict(
        **extra,
        steps=state["step"],
        max_steps=run.max_steps,
        steps_per_epoch=run.steps_per_epoch,
        epochs_completed=state["step"] / run.steps_per_epoch,
        best_step=state["best_step"],
        best_val_acc=state["best_val_acc"],
        test_acc=test["acc"],
        final_train_loss=float(np.mean(state["recent_losses"])) if state["recent_losses"] else None,
        val_history=state["val_history"],
        peak_memory=state["peak_memory"],
        peak_memory_bytes=(state["peak_memory"] or {}).get("peak_bytes"),
        throughput={
            "steps_per_s": meter.per_s(meter.steps),
            "examples_per_s": meter.per_s(meter.examples),
            "tokens_per_s": meter.per_s(meter.tokens),
            "measured_steps": meter.steps,
            "warmup_steps": run.settings.throughput_warmup,
        },
    )
