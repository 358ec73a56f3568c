"""One decode cell measured: a state of ``context`` tokens, then ``tokens`` generated one at a time, each timed.

    runner = mechanism_runner("performer", params, settings)          # or model_runner(config, settings)
    cell = measure_decode(runner, context=4096, batch=8, tokens=32, warmup=2, device="cpu", fill="prefill")

The cell (issue 24, "Benchmark"): ``init_state(batch, context + tokens + 1)``; a random prompt of
``context - warmup`` tokens prefilled (timed: ``prefill_s``) or, when the prefill would exceed the time limit,
the state built directly (:meth:`attentions.decoding.DecodeState.fill_random`: a step's time depends on the
state's shapes and lengths, not on its values); ``warmup`` untimed steps bring it to ``context`` tokens; then
``tokens`` steps, each timed alone (the device synchronised around each); the state's bytes after them; and
one more step under the allocator peak (:func:`harness.measure.measure_peak_memory`, the method bench cells use).

A runner holds one cell's module and state behind five calls (``start``, ``prefill``, ``fill_random``,
``step``, ``state_bytes``), so the mechanism alone (projected q, k, v of ``heads`` x ``head_dim``, random each
step) and the whole model (token ids in, greedy next token out, every layer's state) are measured the same way.
``force_recompute`` times a mechanism that has its own step form in the recompute form every causal mechanism
has (:class:`attentions.decoding.RecomputeState`), for its speed-up over recomputation.

Owns: a decode cell's measurement. Imports: torch, ``attentions``, :mod:`harness.measure`,
:mod:`harness.bench.decode_models`.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from typing import Any

import torch

from attentions import build_attention, get_attention_info, state_bytes
from attentions.base import Attention
from harness.bench import decode_models
from harness.measure import DTYPES, failure_outcome, measure_peak_memory, synchronize, timing_stats

# Distinct random step inputs drawn per cell and cycled: the values do not change a step's time.
STEP_POOL = 8


def force_recompute_form(module: torch.nn.Module) -> None:
    """Every mechanism in ``module`` (itself included) decodes in the recompute form: its instance gets the base
    class's hooks (:class:`attentions.decoding.RecomputeState`), whatever its class overrides."""
    for m in module.modules():
        if isinstance(m, Attention):
            for hook in ("new_state", "prefill_state", "step_state"):
                setattr(m, hook, types.MethodType(getattr(Attention, hook), m))


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


class MechanismRunner:
    """The mechanism alone: ``(batch, heads, n, head_dim)`` random q and ``(batch, kv_heads, n, head_dim)`` k, v
    (the config's key-value heads: fewer under grouped-query attention; k = q for a shared-QK mechanism, as the
    backbone feeds it)."""

    scope = "mechanism"

    def __init__(self, name: str, params: dict[str, Any], device: str, dtype: str,
                 force_recompute: bool = False) -> None:
        self.name, self.device, self.dtype = name, device, DTYPES[dtype]
        self.module = build_attention(name, **params).to(device=device, dtype=self.dtype).eval()
        if force_recompute:
            force_recompute_form(self.module)
        self.decode_form = "recompute" if force_recompute else self.module.decode_form
        self.heads, self.head_dim = self.module.config.num_heads, self.module.config.head_dim
        self.kv_heads = self.module.config.kv_heads
        self.shared_qk = get_attention_info(name).shared_qk
        self.state = None
        self._pool: list[tuple[torch.Tensor, ...]] = []
        self._i = 0

    def _qkv(self, batch: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        q, k, v = (torch.randn((batch, heads, n, self.head_dim), generator=gen, device=self.device).to(self.dtype)
                   for heads in (self.heads, self.kv_heads, self.kv_heads))
        return (q, q, v) if self.shared_qk else (q, k, v)

    def start(self, batch: int, max_len: int, seed: int) -> None:
        self.state = self.module.init_state(batch, max_len, self.dtype, self.device)
        gen = _generator(self.device, seed)
        self._pool = [self._qkv(batch, 1, gen) for _ in range(STEP_POOL)]
        self._prompt_gen = gen

    def prefill(self, n: int) -> float:
        q, k, v = self._qkv(self.state.batch, n, self._prompt_gen)
        synchronize(self.device)
        start = time.perf_counter()
        self.module.prefill(q, k, v, self.state)
        synchronize(self.device)
        return time.perf_counter() - start

    def fill_random(self, n: int, gen: torch.Generator) -> None:
        self.state.fill_random(n, gen)

    def step(self) -> None:
        q, k, v = self._pool[self._i % len(self._pool)]
        self._i += 1
        self.module.step(q, k, v, self.state)

    def state_bytes(self) -> tuple[int, int]:
        return int(state_bytes(self.state)), int(self.state.capacity_bytes())

    @property
    def backend(self) -> str:
        return str(self.module.backend)


class ModelRunner:
    """The whole ArenaModel: a random prompt of token ids, then greedy decoding (each step feeds the argmax of
    the previous step's next-token logits), through the backbone's ``init_states``/``prefill``/``step``."""

    scope = "model"

    def __init__(self, config: dict[str, Any], device: str, dtype: str, force_recompute: bool = False) -> None:
        self.config, self.device, self.dtype = config, device, DTYPES[dtype]
        self.model = decode_models.build(config).to(device=device, dtype=self.dtype).eval()
        if force_recompute:
            force_recompute_form(self.model)
        info = get_attention_info(config["attention"])
        own = "step" if getattr(info, "supports_decoding", False) else "recompute"
        self.decode_form = "recompute" if force_recompute else own
        self.heads, self.head_dim = config["num_heads"], config["qkv_dim"] // config["num_heads"]
        self.states = None
        self.next_tokens = None

    def start(self, batch: int, max_len: int, seed: int) -> None:
        self.states = self.model.init_states(batch, max_len, self.dtype, self.device)
        self._gen = _generator(self.device, seed)
        self.next_tokens = torch.randint(0, self.config["vocab_size"], (batch,), generator=self._gen,
                                         device=self.device)

    def prefill(self, n: int) -> float:
        batch = self.next_tokens.shape[0]
        prompt = torch.randint(0, self.config["vocab_size"], (batch, n), generator=self._gen, device=self.device)
        synchronize(self.device)
        start = time.perf_counter()
        logits = self.model.prefill(prompt, None, self.states)
        self.next_tokens = logits[:, -1].argmax(-1)
        synchronize(self.device)
        return time.perf_counter() - start

    def fill_random(self, n: int, gen: torch.Generator) -> None:
        if not hasattr(self.states, "fill_random"):
            raise TypeError("the model's decoding states have no fill_random(context, generator)")
        self.states.fill_random(n, gen)

    def step(self) -> None:
        self.next_tokens = self.model.step(self.next_tokens, self.states).argmax(-1)

    def state_bytes(self) -> tuple[int, int | None]:
        return decode_models.state_bytes(self.states)

    @property
    def backend(self) -> str:
        return str(self.model.attention_backend())  # the first layer's mechanism's, as training records say


@dataclass(frozen=True)
class DecodeRun:
    """How one cell is run: its batch, the context when the timed steps start, the timed tokens, the untimed
    warm-up steps before them, how the state is built (``"prefill"`` or ``"random"``), the device, a seed."""

    batch: int
    context: int
    tokens: int
    warmup: int
    fill: str
    device: str
    seed: int = 0

    @property
    def warmup_steps(self) -> int:
        """Warm-up steps, at most the context (they are its last positions)."""
        return min(self.warmup, self.context)

    @property
    def prompt(self) -> int:
        """Tokens prefilled (or filled at random): the context less the warm-up steps that follow."""
        return self.context - self.warmup_steps

    @property
    def max_len(self) -> int:
        """The state's capacity: context, timed tokens, and the memory step."""
        return self.context + self.tokens + 1


def measure_decode(runner, run: DecodeRun) -> dict[str, Any]:
    """Measure one decode cell (see the module docstring). Returns ``{"outcome": "ok", "prefill_s" (None for a
    random state), "times_s" (one per timed token), "median_s", "p10_s", "p90_s", "state_bytes",
    "state_capacity_bytes", "peak_bytes", "peak_method"}``, or a failure outcome (``oom``, ``unsupported`` for a
    ValueError, ``error``) with its reason, or ``skipped_budget`` for a random fill the state refuses (TypeError
    from ``fill_random``). Never raises for the mechanism's failure."""
    try:
        with torch.no_grad():
            runner.start(run.batch, run.max_len, seed=1234 + run.context + run.seed)
            prefill_s = None
            if run.fill == "random":
                try:
                    runner.fill_random(run.prompt, _generator(run.device, run.seed))
                except TypeError as exc:  # this state cannot be built directly: the cell is over the time limit
                    return {"outcome": "skipped_budget", "budget": "time",
                            "reason": "time, the prefill would take the cell over max_cell_s and the state cannot "
                                      f"be built directly: {exc}"}
            elif run.prompt > 0:
                prefill_s = runner.prefill(run.prompt)
            else:
                prefill_s = 0.0
            for _ in range(run.warmup_steps):
                runner.step()
            filled, capacity = runner.state_bytes()  # at exactly `context` tokens, the cell's x value
            times = []
            for _ in range(run.tokens):
                synchronize(run.device)
                start = time.perf_counter()
                runner.step()
                synchronize(run.device)
                times.append(time.perf_counter() - start)
            _, reading = measure_peak_memory(runner.step, run.device)
    except Exception as exc:  # noqa: BLE001 - a cell's failure is its result
        return failure_outcome(exc)
    finally:
        _release(runner, run.device)
    stats = timing_stats(times)
    return {"outcome": "ok", "reason": None, "prefill_s": prefill_s, "times_s": times,
            "median_s": stats["median_s"], "p10_s": stats["p10_s"], "p90_s": stats["p90_s"],
            "state_bytes": filled, "state_capacity_bytes": capacity,
            "peak_bytes": reading.peak_bytes, "peak_method": reading.method}


def _release(runner, device: str) -> None:
    """Drop the cell's state (it may hold gigabytes) and, on CUDA, the allocator's cache."""
    for attr in ("state", "states", "_pool"):
        if hasattr(runner, attr):
            setattr(runner, attr, None)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
