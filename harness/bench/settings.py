"""``arena-bench``'s settings: the defaults, the smoke sizes, and :class:`BenchSettings`, built once and validated.

Owns: what the benchmark can be told and its documented per-mechanism settings.
Imports: :mod:`harness.settings`, :mod:`harness.measure` (dtype names, the device check),
:mod:`harness.allocator` (policy names), :mod:`harness.analysis` (the shared memory budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from harness.allocator import CPU_ALLOCATORS
from harness.analysis import DEFAULT_MEMORY_BUDGET_GB
from harness.measure import DTYPES, check_device
from harness.settings import Settings, merge_settings

PASSES = ("fwd", "fwd+bwd")

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
    "results_dir": "results/smoke",
}

DEFAULTS: dict[str, Any] = {
    "plugins": [],
    "mechanisms": "all",
    "causal": False,
    "include_sdpa_direct": True,
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
    "max_cell_s": None,
    "params": {},
    "slope_range": None,
    "max_spread": 1.5,
    "remeasure": 2,
    "approx": {"enabled": True, "n": 1024, "seeds": 3, "batch": 1, "variants": ["iid", "smooth"],
               "budgets": "default"},
    "peers": {"enabled": True, "seq_lens": [1024, 4096]},
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
class BenchSettings(Settings):
    """Every setting of one benchmark run (see :data:`DEFAULTS` for the meaning of each)."""

    mechanisms: Any
    causal: bool
    include_sdpa_direct: bool
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

    Raises ValueError naming an unknown setting, dtype, allocator policy or pass, or a device not available
    here. The mechanisms and their ``params`` are checked by :func:`harness.bench.cells.check_params`, once the
    plug-ins are loaded.
    """
    if isinstance(cfg, BenchSettings):
        return cfg
    user = dict(cfg or {})
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown benchmark setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    s = merge_settings(DEFAULTS, user)
    if s["smoke"]:
        s = apply_preset(s, user, DEFAULTS, SMOKE_OVERRIDES)
    if s["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {s['dtype']!r}")
    if s["cpu_allocator"] not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {s['cpu_allocator']!r}")
    bad = [p for p in s["passes"] if p not in PASSES]
    if bad:
        raise ValueError(f"passes must be among {PASSES}, got {bad}")
    s["device"] = check_device(s["device"])
    s["seq_lens"] = sorted(int(n) for n in s["seq_lens"])
    if not s["seq_lens"] or s["seq_lens"][0] < 1:
        raise ValueError(f"seq_lens must be a non-empty list of positive lengths, got {s['seq_lens']}")
    if s["slope_range"] is not None and len(s["slope_range"]) != 2:
        raise ValueError(f"slope_range must be null or [low, high], got {s['slope_range']!r}")
    if float(s["max_spread"]) < 1 or int(s["remeasure"]) < 0:
        raise ValueError(f"max_spread must be >= 1 and remeasure >= 0, got {s['max_spread']}, {s['remeasure']}")
    if s["force"]:
        s["reuse"] = False  # every cell measured again, its record replaced
    s["params"] = dict(s["params"] or {})
    s["approx"] = _section(ApproxSettings, "approx", s["approx"])
    s["peers"] = _section(PeerSettings, "peers", s["peers"])
    return BenchSettings(**s)


def _section(cls, name: str, values: dict):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown benchmark setting(s) {[f'{name}.{k}' for k in unknown]}; allowed: {sorted(allowed)}")
    return cls(**{k: values.get(k, DEFAULTS[name].get(k)) for k in allowed})


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
