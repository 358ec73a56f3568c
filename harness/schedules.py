"""Learning-rate schedules as multipliers of the base learning rate (for ``LambdaLR``).

- ``rsqrt`` (LRA's ``constant * linear_warmup * rsqrt_decay``):
  ``factor(s) = min(1, s / warmup) / sqrt(max(s, warmup))``, so the peak learning rate is
  ``base / sqrt(warmup)`` (LRA's base 0.05 with warm-up 1000 peaks at 1.6e-3).
- ``cosine`` (LRA's ``constant * linear_warmup * cosine_decay``): linear warm-up to
  ``base``, then half a cosine down to ``min_ratio * base`` at ``total_steps``.
- ``constant``: linear warm-up then ``base``.

``s`` counts optimizer steps from 1: LambdaLR asks for step 0 before the first update,
and LRA's 0-based count would spend that first update at learning rate 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("rsqrt", "cosine", "constant")


def rsqrt_factor(step: int, warmup_steps: int) -> float:
    """LRA: ``min(1, step / warmup) / sqrt(max(step, warmup))``; warm-up 0 means none."""
    warmup = max(warmup_steps, 1)
    return min(1.0, step / warmup) / math.sqrt(max(step, warmup))


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


def schedule_factor(name: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """The multiplier ``f(s)`` of schedule ``name`` (``s`` = 1-based optimizer step)."""
    if warmup_steps < 0:
        raise ValueError(f"invalid scheduler parameter 'warmup_steps': must be >= 0, got {warmup_steps}")
    if name == "rsqrt":
        return lambda s: rsqrt_factor(s, warmup_steps)
    if name == "cosine":
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"invalid scheduler parameter 'min_ratio': must be in [0, 1], got {min_ratio}")
        return lambda s: cosine_factor(s, warmup_steps, total_steps, min_ratio)
    if name == "constant":
        return lambda s: constant_factor(s, warmup_steps)
    raise ValueError(f"unknown scheduler '{name}'; allowed: {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at LambdaLR step ``t`` is ``schedule(t + 1)``."""
    factor = schedule_factor(name, warmup_steps, total_steps, min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: factor(t + 1))
