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
from omegaconf import DictConfig, OmegaConf

from harness.allocator import CPU_ALLOCATORS
from harness.measure import check_device
from harness.settings import Settings, as_bool, as_float, as_int

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw",)


def _cpu_allocator(value) -> str:
    if value not in CPU_ALLOCATORS:
        raise ValueError(f"invalid 'cpu_allocator': {value!r}; allowed: {', '.join(CPU_ALLOCATORS)}")
    return str(value)


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
    cpu_allocator: str  # default | reuse (harness.allocator); CPU only
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
        """Validated settings of ``cfg``. Raises ValueError (one line) naming a value of the wrong type or range
        (``seed=abc``, ``train.eval_every=0``), an invalid device, precision or optimizer."""
        device = resolve_device(str(cfg.device))
        opt = cfg.optimizer
        if opt.name not in OPTIMIZERS:
            raise ValueError(f"invalid 'optimizer.name': {opt.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        seed = as_int(cfg.seed, "seed", minimum=0)
        fault_step = as_int(cfg.fault.get("raise_at_step"), "fault.raise_at_step", minimum=1, optional=True)
        fault_seeds = cfg.fault.get("seeds")
        fault_active = fault_step is not None and (fault_seeds is None or seed in list(fault_seeds))
        t = cfg.train
        batch_size = as_int(t.batch_size, "train.batch_size", minimum=1)
        eval_every = as_int(t.eval_every, "train.eval_every", minimum=1)
        betas = list(opt.betas) if OmegaConf.is_list(opt.betas) or isinstance(opt.betas, list | tuple) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise ValueError(f"invalid 'optimizer.betas': must be two numbers in [0, 1), got {opt.betas!r}")
        return cls(
            label=f"{cfg.attention.name}/{cfg.task.name}/seed{seed}", seed=seed, device=device,
            precision=resolve_precision(str(cfg.precision), device.type),
            num_threads=as_int(cfg.get("num_threads"), "num_threads", minimum=1, optional=True),
            cpu_allocator=_cpu_allocator(cfg.get("cpu_allocator", "default")),
            batch_size=batch_size,
            eval_batch_size=as_int(t.eval_batch_size, "train.eval_batch_size", minimum=1, optional=True) or batch_size,
            eval_every=eval_every,
            eval_max_batches=as_int(t.get("eval_max_batches"), "train.eval_max_batches", minimum=1, optional=True),
            checkpoint_every=as_int(t.checkpoint_every, "train.checkpoint_every", minimum=1, optional=True)
            or eval_every,
            grad_clip=as_float(t.grad_clip, "train.grad_clip", minimum=0, strict=True, optional=True),
            throughput_warmup=as_int(t.throughput_warmup, "train.throughput_warmup", minimum=0),
            loss_window=as_int(t.loss_window, "train.loss_window", minimum=1),
            quiet=as_bool(cfg.quiet, "quiet"), log_every=as_int(cfg.log_every, "log_every", minimum=1),
            fault_step=fault_step if fault_active else None,
            optimizer=OptimizerSettings(name=str(opt.name), lr=as_float(opt.lr, "optimizer.lr", minimum=0, strict=True),
                                        betas=tuple(float(b) for b in betas),
                                        eps=as_float(opt.eps, "optimizer.eps", minimum=0, strict=True),
                                        weight_decay=as_float(opt.weight_decay, "optimizer.weight_decay", minimum=0)),
            scheduler=str(cfg.scheduler.name),
            scheduler_min_ratio=as_float(cfg.scheduler.get("min_ratio") or 0.0, "scheduler.min_ratio", minimum=0),
        )
