"""``arena-train``'s typed settings: :class:`TrainSettings`, built once from the Hydra config and validated there.

The loop reads these attributes; the task and the backbone are still built from the config
itself (:mod:`harness.train.config`), since their parameters pass straight through to ``tasks``
and :class:`harness.model.ModelConfig`.

Owns: precision resolution, the loop's settings (the device check is :func:`harness.measure.check_device`,
shared with the benchmark). Imports: torch, omegaconf, :mod:`harness.measure`, :mod:`harness.settings`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from harness.measure import check_device
from harness.settings import Settings

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw",)


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must be a valid, available device."""
    return torch.device(check_device(requested))  # one check, shared with the benchmark


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


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """AdamW's hyper-parameters (the only optimizer)."""

    name: str
    lr: float
    betas: tuple
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class TrainSettings(Settings):
    """One run's loop settings, resolved: the device chosen, the precision fixed, the fault injection decided."""

    label: str  # "<attention>/<task>/seed<N>", the run's name in log lines
    seed: int
    device: torch.device
    precision: str
    num_threads: int | None
    batch_size: int
    eval_batch_size: int
    eval_every: int
    eval_max_batches: int | None
    checkpoint_every: int
    grad_clip: float | None
    throughput_warmup: int
    loss_window: int
    quiet: bool
    log_every: int
    fault_step: int | None  # raise SimulatedCrash after this step (None: never)
    optimizer: OptimizerSettings
    scheduler: str
    scheduler_min_ratio: float

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrainSettings:
        """Validated settings of ``cfg``; ValueError names an invalid device, precision or optimizer."""
        device = resolve_device(str(cfg.device))
        opt = cfg.optimizer
        if opt.name not in OPTIMIZERS:
            raise ValueError(f"invalid 'optimizer.name': {opt.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        fault_step, fault_seeds = cfg.fault.get("raise_at_step"), cfg.fault.get("seeds")
        fault_active = fault_step is not None and (fault_seeds is None or int(cfg.seed) in list(fault_seeds))
        t = cfg.train
        eval_every = int(t.eval_every)
        return cls(
            label=f"{cfg.attention.name}/{cfg.task.name}/seed{cfg.seed}", seed=int(cfg.seed), device=device,
            precision=resolve_precision(str(cfg.precision), device.type),
            num_threads=int(cfg.num_threads) if cfg.get("num_threads") else None,
            batch_size=int(t.batch_size), eval_batch_size=int(t.eval_batch_size or t.batch_size),
            eval_every=eval_every,
            eval_max_batches=int(t.eval_max_batches) if t.get("eval_max_batches") is not None else None,
            checkpoint_every=int(t.checkpoint_every or eval_every),
            grad_clip=float(t.grad_clip) if t.grad_clip is not None else None,
            throughput_warmup=int(t.throughput_warmup), loss_window=int(t.loss_window),
            quiet=bool(cfg.quiet), log_every=int(cfg.log_every),
            fault_step=int(fault_step) if fault_active else None,
            optimizer=OptimizerSettings(name=str(opt.name), lr=float(opt.lr), betas=tuple(opt.betas),
                                        eps=float(opt.eps), weight_decay=float(opt.weight_decay)),
            scheduler=str(cfg.scheduler.name), scheduler_min_ratio=float(cfg.scheduler.get("min_ratio") or 0.0),
        )
