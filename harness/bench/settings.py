"""``arena-bench``'s settings: the defaults, the smoke sizes, and :class:`BenchSettings`, built once and validated.

Owns: what the benchmark can be told and its documented per-mechanism settings.
Imports: :mod:`harness.settings`, :mod:`harness.measure` (dtype names, the device check),
:mod:`harness.allocator` (policy names), :mod:`harness.analysis` (the shared memory budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from harness.allocator import CPU_ALLOCATORS
from harness.analysis import DEFAULT_MEMORY_BUDGET_GB
from harness.measure import DTYPES, check_device
from harness.settings import Settings, merge_settings

PASSES = ("fwd", "fwd+bwd")
MODES = ("efficiency", "decode")  # arena-bench mode=...: the forward/backward scan, or incremental decoding
DECODE_SCOPES = ("mechanism", "model")  # the mechanism alone, or the whole ArenaModel (harness.bench.decode)
DECODE_MODEL_SIZES = ("mqar_causal", "large", "mqar_causal_mqa")  # harness.bench.decode_models.MODEL_SIZES
# The decode scan's contexts: 1K to 64K on a CPU; on CUDA, when left at this default, to 256K (issue 24).
DECODE_CONTEXTS_CPU = [1024, 4096, 16384, 65536]
DECODE_CONTEXTS_CUDA = [1024, 4096, 16384, 65536, 262144]
MIN_DECODE_TOKENS = 32  # at least this many timed tokens per decode cell (median, p10, p90 over them)
APPROX_VARIANTS = ("iid", "smooth")  # the approximation study's inputs (harness.bench.approx.approx_inputs)
APPROX_BUDGET_TABLES = ("default", "smoke")

# The benchmark's documented settings (issue 2): every other parameter keeps its registry default.
# Linformer's projection is sized to the sequence: max_seq_len = n for each cell.
BENCH_SETTINGS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 256},
    "longformer": {"window": 256, "global_positions": (0,)},
    "bigbird": {"block_size": 64, "num_global_blocks": 2, "num_random_blocks": 3},
    "performer": {"num_features": 256},
    "linformer": {"proj_dim": 256},
}

# Smoke size (tests, seconds): budgets smaller than the tiny sequences so every real path runs.
SMOKE_SETTINGS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 8},
    "longformer": {"window": 8, "global_positions": (0,)},
    "bigbird": {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2},
    "linformer": {"proj_dim": 8},
    "performer": {"num_features": 16},
    "rfa": {"num_features": 16},
    "reformer": {"bucket_size": 4, "n_hashes": 2},
    "aft": {"mode": "local", "window": 6},
    "clustered": {"num_clusters": 4},
    "memory_compressed": {"compression": 2},
}
SMOKE_OVERRIDES: dict[str, Any] = {
    "seq_lens": [32, 64],
    "batch": 1,
    "heads": 2,
    "head_dim": 8,
    "repeats": 1,
    "warmup": 0,
    "approx": {"n": 64, "seeds": 1, "batch": 1, "budgets": "smoke"},
    "peers": {"seq_lens": [32, 64]},
    "decode": {"contexts": [32, 64], "batches": [1, 2], "recompute_contexts": [64]},
    "results_dir": "results/smoke",
}

# A cell predicted to take longer than this (warm-up + repeats + the memory step, seconds) is skipped. Long
# enough for every default cell of `arena-bench` on a 2-core CPU (the slowest, `full` fwd+bwd at 16K, takes
# about a minute), short enough that a mistyped length does not hold the machine for hours; `arena-suite` uses
# 20 s on CPU (its lengths stop at 4K) and 60 s on CUDA. null: no limit.
DEFAULT_MAX_CELL_S = 120.0

DEFAULTS: dict[str, Any] = {
    "mode": "efficiency",
    "plugins": [],
    "mechanisms": "all",
    "causal": False,
    "include_sdpa_direct": True,
    "include_full_reference": True,
    "seq_lens": [1024, 2048, 4096, 8192, 16384],
    "passes": list(PASSES),
    "batch": 2,
    "heads": 4,
    "head_dim": 32,
    "dtype": "float32",
    "device": "auto",
    "cpu_allocator": "default",
    "repeats": 5,
    "warmup": 2,
    "memory_budget_gb": DEFAULT_MEMORY_BUDGET_GB,
    "max_cell_s": DEFAULT_MAX_CELL_S,
    "params": {},
    "slope_range": None,
    "max_spread": 1.5,
    "remeasure": 2,
    "approx": {"enabled": True, "n": 1024, "seeds": 3, "batch": 1, "variants": ["iid", "smooth"],
               "budgets": "default"},
    "peers": {"enabled": True, "seq_lens": [1024, 4096]},
    "decode": {"contexts": list(DECODE_CONTEXTS_CPU), "batches": [1, 8], "tokens": MIN_DECODE_TOKENS,
               "scopes": list(DECODE_SCOPES), "model_sizes": ["mqar_causal", "large"], "recompute_contexts": [4096],
               "num_kv_heads": [None]},
    "results_dir": "results",
    "reuse": True,
    "force": False,
    "smoke": False,
    "progress": True,
    "print_table": True,
}


@dataclass(frozen=True)
class ApproxSettings(Settings):
    """The approximation-error study: on/off, tokens ``n``, seeds, batch, input variants, budget table."""

    enabled: bool
    n: int
    seeds: int
    batch: int
    variants: list
    budgets: str


@dataclass(frozen=True)
class PeerSettings(Settings):
    """The side-by-side comparison with public implementations: on/off and its sequence lengths."""

    enabled: bool
    seq_lens: list


@dataclass(frozen=True)
class DecodeSettings(Settings):
    """``mode=decode``: the contexts (tokens in the state when the timed steps start), batches, timed tokens per
    cell, scopes, model sizes, and the contexts at which a mechanism with its own step form is also measured in
    the recompute form (its speed-up over recomputation); ``num_kv_heads``: the mechanism scope's key-value heads,
    one row per entry (None = ``heads``; 1 = multi-query attention; a model's come from its recipe)."""

    contexts: list
    batches: list
    tokens: int
    scopes: list
    model_sizes: list
    recompute_contexts: list
    num_kv_heads: list = field(default_factory=lambda: [None])


@dataclass(frozen=True)
class BenchSettings(Settings):
    """Every setting of one benchmark run (see :data:`DEFAULTS` for the meaning of each)."""

    mode: str
    mechanisms: Any
    causal: bool
    include_sdpa_direct: bool
    include_full_reference: bool
    seq_lens: list
    passes: list
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    cpu_allocator: str
    repeats: int
    warmup: int
    memory_budget_gb: float | None
    max_cell_s: float | None
    params: dict
    slope_range: list | None
    max_spread: float
    remeasure: int
    approx: ApproxSettings
    peers: PeerSettings
    decode: DecodeSettings
    results_dir: str
    reuse: bool
    force: bool
    smoke: bool
    progress: bool
    print_table: bool
    plugins: list = field(default_factory=list)  # plug-in modules imported before the mechanisms are resolved
    # The allocator policy actually in force (set by the run once configured; part of the cell key).
    cpu_allocator_used: str = "default"

    @property
    def pattern(self) -> str:
        """The attention pattern measured: ``"causal"`` (causal self-attention) or ``"bidirectional"``."""
        return "causal" if self.causal else "bidirectional"

    @property
    def budget_bytes(self) -> float | None:
        """The memory budget in bytes, None without one."""
        return float(self.memory_budget_gb) * 1e9 if self.memory_budget_gb else None


def resolve_settings(cfg: dict | BenchSettings | None = None) -> BenchSettings:
    """Defaults, then the user's ``cfg``; with ``smoke`` set, tiny sizes replace every value left at its default.

    Raises ValueError naming an unknown setting, a value out of range (:func:`check_values`: every number,
    flag and list), or a device not available here. The mechanisms and their ``params`` are checked by
    :func:`harness.bench.cells.check_params`, once the plug-ins are loaded.
    """
    if isinstance(cfg, BenchSettings):
        return cfg
    user = dict(cfg or {})
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown benchmark setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    s = merge_settings(DEFAULTS, user)
    if s.get("smoke") is True:
        s = apply_preset(s, user, DEFAULTS, SMOKE_OVERRIDES)
    s["approx"] = _section(ApproxSettings, "approx", s["approx"])
    s["peers"] = _section(PeerSettings, "peers", s["peers"])
    s["decode"] = _section(DecodeSettings, "decode", s["decode"])
    s = check_values(s)
    s["device"] = check_device(s["device"])
    s["decode"]["contexts"] = _decode_contexts(s, user)
    if s["force"]:
        s["reuse"] = False  # every cell measured again, its record replaced
    s["params"] = dict(s["params"] or {})
    s["approx"] = ApproxSettings(**s["approx"])
    s["peers"] = PeerSettings(**s["peers"])
    s["decode"] = DecodeSettings(**s["decode"])
    return BenchSettings(**s)


def _decode_contexts(s: dict[str, Any], user: dict) -> list[int]:
    """The decode contexts: as given, except that on CUDA the CPU default (given or not) becomes
    :data:`DECODE_CONTEXTS_CUDA` (a value set to exactly the default reads as unset, as for the presets)."""
    contexts = s["decode"]["contexts"]
    if contexts == DECODE_CONTEXTS_CPU and str(s["device"]).startswith("cuda"):
        return list(DECODE_CONTEXTS_CUDA)
    return contexts


# ----------------------------------------------------------------------------------------------
# Every value checked in one place: a bad one is a ValueError "<setting> must be <what is allowed>, got <value>"
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A numeric setting: an integer or a (finite) number, at least ``low`` (above it when ``strict``), and
    null (None) when ``nullable`` (``null_means`` says what null does)."""

    integer: bool
    low: float
    strict: bool = False
    nullable: bool = False
    unit: str = ""
    null_means: str = "no limit"

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        text = f"{kind} {'>' if self.strict else '>='} {self.low:g}{f' ({self.unit})' if self.unit else ''}"
        return text + (f", or null for {self.null_means}" if self.nullable else "")

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        number = _number(value)
        ok = number is not None and (number > self.low if self.strict else number >= self.low)
        if not ok or (self.integer and not float(number).is_integer()):
            raise ValueError(f"{name} must be {self.allowed()}, got {value!r}")
        return int(number) if self.integer else float(number)


# The numeric settings (dotted: a section's field). tests/test_bench.py checks that every int or float field of
# BenchSettings and its sections is here.
NUMBERS: dict[str, Number] = {
    "batch": Number(True, 1),
    "heads": Number(True, 1),
    "head_dim": Number(True, 1),
    "repeats": Number(True, 1, unit="timed calls per cell"),
    "warmup": Number(True, 0, unit="untimed calls per cell"),
    "remeasure": Number(True, 0, unit="extra measurements of a disturbed cell"),
    "max_spread": Number(False, 1, unit="p90/p10 ratio"),
    "memory_budget_gb": Number(False, 0, strict=True, nullable=True, unit="GB"),
    "max_cell_s": Number(False, 0, strict=True, nullable=True, unit="seconds"),
    "approx.n": Number(True, 1, unit="tokens"),
    "approx.seeds": Number(True, 1),
    "approx.batch": Number(True, 1),
    "decode.tokens": Number(True, MIN_DECODE_TOKENS, unit="timed tokens per decode cell"),
}
FLAGS = ("causal", "include_sdpa_direct", "include_full_reference", "reuse", "force", "smoke", "progress",
         "print_table", "approx.enabled", "peers.enabled")


def check_values(s: dict[str, Any]) -> dict[str, Any]:
    """``s`` (the merged settings, sections as dicts) with every value checked and numbers normalised (an
    integral ``2.0`` becomes ``2``, lengths are sorted). Raises ValueError ``<setting> must be <what is
    allowed>, got <value>`` for the first bad one: a number out of range or of the wrong type
    (:data:`NUMBERS`), a flag that is not true/false, a bad length list, slope range, name or pass."""
    for name, rule in NUMBERS.items():
        _set(s, name, rule.check(name, _get(s, name)))
    for name in FLAGS:
        if not isinstance(_get(s, name), bool):
            raise ValueError(f"{name} must be true or false, got {_get(s, name)!r}")
    s["seq_lens"] = _lengths("seq_lens", s["seq_lens"], empty_ok=False)
    s["peers"]["seq_lens"] = _lengths("peers.seq_lens", s["peers"]["seq_lens"], empty_ok=True)
    s["decode"]["contexts"] = _lengths("decode.contexts", s["decode"]["contexts"], empty_ok=False)
    s["decode"]["batches"] = _lengths("decode.batches", s["decode"]["batches"], empty_ok=False,
                                      items="batch sizes >= 1")
    s["decode"]["recompute_contexts"] = _lengths("decode.recompute_contexts", s["decode"]["recompute_contexts"],
                                                 empty_ok=True)
    s["decode"]["num_kv_heads"] = _kv_heads(s["decode"].get("num_kv_heads", [None]), s["heads"])
    s["slope_range"] = _slope_range(s["slope_range"])
    _choices(s, "mode", MODES, one=True)
    _choices(s, "decode.scopes", DECODE_SCOPES, one=False)
    _choices(s, "decode.model_sizes", DECODE_MODEL_SIZES, one=False)
    _choices(s, "dtype", DTYPES, one=True)
    _choices(s, "cpu_allocator", CPU_ALLOCATORS, one=True)
    _choices(s, "approx.budgets", APPROX_BUDGET_TABLES, one=True)
    _choices(s, "passes", PASSES, one=False)
    _choices(s, "approx.variants", APPROX_VARIANTS, one=False)
    return s


def _kv_heads(values: Any, heads: int) -> list:
    """``decode.num_kv_heads``: a non-empty list of null (= ``heads``) or integers dividing ``heads``; ``heads``
    itself becomes null (the same cells), duplicates dropped, order kept. Raises ValueError naming the setting and
    what is allowed."""
    allowed = f"a non-empty list of null (= heads) or integers dividing heads={heads} (1 = multi-query attention)"
    if not isinstance(values, list | tuple) or not values:
        raise ValueError(f"decode.num_kv_heads must be {allowed}, got {values!r}")
    out: list = []
    for value in values:
        number = None if value is None else _number(value)
        if value is not None and (number is None or not float(number).is_integer() or number < 1
                                  or heads % int(number)):
            raise ValueError(f"decode.num_kv_heads must be {allowed}, got {values!r}")
        kv = None if value is None or int(number) == heads else int(number)  # = heads: plain multi-head, one row
        if kv not in out:
            out.append(kv)
    return out


def _number(value: Any) -> float | None:
    """``value`` as a finite number, None for anything else (a bool, a string, NaN, infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _get(s: dict, name: str) -> Any:
    section, _, key = name.rpartition(".")
    return (s[section] if section else s)[key]


def _set(s: dict, name: str, value: Any) -> None:
    section, _, key = name.rpartition(".")
    (s[section] if section else s)[key] = value


def _lengths(name: str, values: Any, empty_ok: bool, items: str = "positive lengths") -> list[int]:
    """Sorted sequence lengths (or other counts, ``items``): integers >= 1 (an integral float is taken)."""
    rule = Number(True, 1)
    what = "a list" if empty_ok else "a non-empty list"
    try:
        if not isinstance(values, (list, tuple)) or (not values and not empty_ok):
            raise ValueError
        return sorted(rule.check(name, n) for n in values)
    except ValueError:
        raise ValueError(f"{name} must be {what} of {items}, got {values!r}") from None


def _slope_range(value: Any) -> list[float] | None:
    """null, or [low, high] with 0 < low < high."""
    if value is None:
        return None
    pair = list(value) if isinstance(value, (list, tuple)) else []
    numbers = [_number(v) for v in pair]
    if len(pair) != 2 or None in numbers or not 0 < numbers[0] < numbers[1]:
        raise ValueError(f"slope_range must be null or [low, high] with 0 < low < high, got {value!r}")
    return [float(v) for v in numbers]


def _choices(s: dict, name: str, allowed, one: bool) -> None:
    """One of ``allowed`` (``one``), or a non-empty list of them."""
    value = _get(s, name)
    allowed = tuple(allowed)
    if one and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if not one and (not isinstance(value, (list, tuple)) or not value or any(v not in allowed for v in value)):
        raise ValueError(f"{name} must be a non-empty list among {', '.join(allowed)}, got {value!r}")


def _section(cls, name: str, values: Any) -> dict[str, Any]:
    """A section's values (a mapping of ``cls``'s fields, the defaults filling the ones not given)."""
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be a mapping of {sorted(f.name for f in fields(cls))}, got {values!r}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown benchmark setting(s) {[f'{name}.{k}' for k in unknown]}; allowed: {sorted(allowed)}")
    return {k: values.get(k, DEFAULTS[name].get(k)) for k in allowed}


def apply_preset(settings: dict, user: dict, defaults: dict, preset: dict) -> dict:
    """``settings`` with ``preset``'s values (nested dicts key by key) for every key the user left at its
    default: what the user set wins over a size preset. A Hydra config hands over every key, so "left at its
    default" means "not given, or equal to the default" (a value set to the default itself reads as unset)."""
    out = dict(settings)
    for key, value in preset.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        given = user.get(key, default)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_preset(out[key], given if isinstance(given, dict) else {},
                                    default if isinstance(default, dict) else {}, value)
        elif key not in user or given == default:
            out[key] = value
    return out
