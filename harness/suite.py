"""The one-command suite (``arena-suite``): efficiency scan, quick training sweep, decoding scan, report.

    arena-suite                       # everything, sized for a 2-core CPU (GPU used when present)
    arena-suite size=extended         # the default plus quick ListOps, second seeds, an MQAR ladder rung and the
                                      # multi-query decoder MQAR with its decode cells (~43 min)
    arena-suite size=smoke            # seconds-to-minutes end-to-end check (tests)
    arena-suite size=lra              # official LRA recipes x 3 seeds (GPU-sized; on a CPU it only estimates)
    arena-suite stages=[report]       # only rebuild the report

Stages (each reuses what the store already holds, so a re-run finishes only what is missing):

1. ``bench``: :func:`harness.bench.run_benchmark` for every registered mechanism, with a
   CPU-sized sequence range on CPU (the benchmark's full 1K..16K range on CUDA), the
   approximation errors, and the peers when the ``peers`` extra is installed.
2. ``train``: ``arena-train -m experiment=<recipes> attention=<...> seed=<seeds>`` (Hydra multirun;
   runs with an ``ok`` record are skipped by ``arena-train``). Causal recipes (``model.causal: true``)
   run only the mechanisms with a causal form; the recall ladder (``train.ladder``) adds MQAR runs at
   other ``(seq_len, num_kv_pairs)`` points. On CPU, ``train.workers`` processes
   (default 2) with ``train.threads_per_worker`` torch threads each (default 1) share the sweep: the
   mechanisms are dealt round-robin into one group per worker, each group one multirun with its own
   ``hydra.sweep.dir``. Small models train faster as two one-thread processes than as one two-thread
   process, and the store's one-file-per-run atomic writes make concurrent runs safe. On CUDA (one GPU) it
   is a single multirun process. The suite shows a line per finished run (count, result, an estimate of the
   time left: :class:`RunProgress`, from the line each run ends with) and the workers' warnings and errors;
   ``train.verbose=true`` streams everything they log. Its exit status comes from the workers' (each
   ``arena-train`` process exits 1 when one of its runs failed, whether it wrote a record or not).
3. ``decode``: ``arena-bench mode=decode`` (:func:`harness.bench.run_benchmark`), one run per scan of the ``decode``
   block (by default the mechanisms alone at contexts 1K, 4K and 16K, batches 1 and 8, the same with one key-value
   head at 4K, batch 1 (multi-query), and the whole model at the ``quick/mqar_causal`` size at 4K, batch 1: the cost
   side of the report's recall-vs-cost plot; ``size=extended`` adds the ``quick/mqar_causal_mqa`` models); the
   causal mechanisms only.
4. ``report``: :func:`harness.report.build_report`; the suite ends by printing where it is.

Owns: the order of the stages, :class:`SuiteSettings` (built once by :func:`resolve_suite`), the
training sweep's command lines and worker processes. May import ``attentions``, :mod:`harness.bench`,
:mod:`harness.report`, :mod:`harness.display`, :mod:`harness.settings`, :mod:`harness.plugins`; nothing
imports it (it is the top of the harness). Training runs in subprocesses (``python -m harness.train``), never imported.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attentions import available_attentions, get_attention_info
from harness import bench, report
from harness.display import WORKDIR_ENV, format_duration, one_line_interrupt, parse_run_done, shown_path
from harness.measure import matmul_flops_per_s, transformer_step_flops
from harness.plugins import (
    add_absent_keys,
    available_experiments,
    conf_dir,
    exit_on_settings_error,
    load_plugins,
    prepare,
    recipe_file,
)
from harness.settings import Settings, as_float, as_int, check_known, merge_settings

# The folder holding the harness package (the clone, or site-packages): on the training processes' path.
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = conf_dir()
STAGES = ("bench", "train", "decode", "report")
SIZES = ("default", "extended", "smoke", "lra")

DEFAULTS: dict[str, Any] = {
    "size": "default",
    "stages": list(STAGES),
    "results_dir": "results",
    "report_dir": None,
    "plugins": [],
    "mechanisms": "all",
    "device": "auto",
    "bench": {
        "seq_lens": [256, 512, 1024, 2048, 4096],
        "repeats": 3,
        "warmup": 1,
        "max_cell_s": 20,
        "force": False,
        "approx": {"seeds": 2},
        "peers": {"seq_lens": [1024, 4096]},
    },
    "cuda_bench": {"seq_lens": [1024, 2048, 4096, 8192, 16384], "repeats": 5, "warmup": 2, "max_cell_s": 60},
    # quick/pathfinder (chance on a CPU) is left out of the default CPU suite; name it in train.experiments to run
    # it. quick/mqar_causal (the decoder form, the nine causal mechanisms) gives the recall of the recall-vs-cost plot;
    # quick/listops (its 64 tokens hardly separate the mechanisms) runs in size=extended.
    "train": {"experiments": ["quick/mqar", "quick/mqar_causal"], "seeds": [0, 1],
              "overrides": [], "workers": 2, "threads_per_worker": 1, "verbose": False,
              # Per-recipe overrides: quick ListOps shortened to fit the budget.
              "recipe_overrides": {"quick/listops": ["train.max_steps=500"]},
              # One seed of the encoder MQAR (and of ListOps, when asked for): what lets the decoder MQAR's two seeds
              # and the decode stage fit the 20-minute budget (size=extended runs their second seeds).
              "recipe_seeds": {"quick/listops": [0], "quick/mqar": [0]},
              # Recall ladder (Zoology Figure 2 layout): the recipe again at each [seq_len, num_kv_pairs]; its rungs
              # run in size=extended.
              "ladder": {"experiment": "quick/mqar", "points": [], "seeds": [0]}},
    # The decode stage: arena-bench mode=decode, one run per scan (a scan: the benchmark's decode.* settings); the
    # other keys are arena-bench settings of every scan. The model scan's cells give the recall-vs-cost plot its cost.
    "decode": {
        "max_cell_s": 20,
        "scans": {
            "mechanism": {"scopes": ["mechanism"], "contexts": [1024, 4096, 16384], "batches": [1, 8],
                          "recompute_contexts": []},
            "model": {"scopes": ["model"], "model_sizes": ["mqar_causal"], "contexts": [4096], "batches": [1],
                      "recompute_contexts": []},
            # Multi-query attention (one key-value head) at 4K, batch 1, beside the mechanism scan's own cells there:
            # the decode state it saves, for the report's multi-query table (measured: about 5 s in all).
            "mechanism_mqa": {"scopes": ["mechanism"], "num_kv_heads": [1], "contexts": [4096], "batches": [1],
                              "recompute_contexts": []},
        },
    },
    "smoke": {
        "bench": {"smoke": True},
        "decode": {"smoke": True,
                   "scans": {"mechanism": {"contexts": [16, 32], "batches": [1]},
                             "model": {"contexts": [32]}, "mechanism_mqa": {"contexts": [32]}}},
        "train": {"experiments": ["smoke/listops", "smoke/mqar"], "seeds": [0],
                  "ladder": {"experiment": "smoke/mqar", "points": [[16, 2]], "seeds": [0]}},
        "results_dir": "results/smoke",
    },
    # size=extended: the default plus quick ListOps (two seeds), the encoder MQAR's second seed, the 16-pair rung
    # of the recall ladder, and the decoder MQAR with multi-query attention (quick/mqar_causal_mqa, two seeds; the
    # causal mechanisms that take grouped keys and values) with its models' decode cells at 4K: the report's
    # multi-query table (issue 26; about 43 minutes on 2 cores).
    "extended": {
        "train": {"experiments": ["quick/listops", "quick/mqar", "quick/mqar_causal", "quick/mqar_causal_mqa"],
                  "recipe_seeds": {"quick/listops": [0, 1], "quick/mqar": [0, 1], "quick/mqar_causal_mqa": [0, 1]},
                  "ladder": {"points": [[64, 16]]}},
        "decode": {"scans": {"model_mqa": {"scopes": ["model"], "model_sizes": ["mqar_causal_mqa"],
                                           "contexts": [4096], "batches": [1], "recompute_contexts": []}}},
    },
    "lra": {
        "train": {"experiments": [f"lra/{t}" for t in ("listops", "text", "retrieval", "image", "pathfinder",
                                                        "pathx")],
                  "seeds": [0, 1, 2], "ladder": {"points": []}},
    },
    "time_budget_min": 20,
}


@dataclass(frozen=True)
class TrainSweep(Settings):
    """The training stage: recipes (``conf/experiment/<name>.yaml``), seeds, extra overrides, CPU workers."""

    experiments: list
    seeds: list
    overrides: list
    workers: int
    threads_per_worker: int
    verbose: bool  # the worker commands and every run's own log lines (per-step lines), not only a line per run
    recipe_overrides: dict
    recipe_seeds: dict  # per-recipe seeds in place of ``seeds`` (quick ListOps: one seed in the default suite)
    ladder: dict


@dataclass(frozen=True)
class SuiteSettings(Settings):
    """Every setting of one suite run, resolved: device chosen, sizes applied, folders absolute.

    ``bench`` is the configuration handed to ``arena-bench`` (:func:`harness.bench.resolve_settings`
    validates it when the stage runs); ``cuda_bench`` and ``smoke`` are already merged into it.
    """

    size: str
    stages: list
    results_dir: str
    report_dir: str
    plugins: list
    mechanisms: Any
    device: str
    bench: dict
    cuda_bench: dict
    train: TrainSweep
    decode: dict
    smoke: dict
    lra: dict
    extended: dict
    time_budget_min: float

    @classmethod
    def of(cls, value: SuiteSettings | Mapping) -> SuiteSettings:
        """``value`` itself, or the settings with the same (already resolved) fields given as a mapping."""
        if isinstance(value, cls):
            return value
        fields = dict(value)
        return cls(**{**fields, "train": TrainSweep(**dict(fields["train"]))})


def resolve_suite(cfg: dict | None = None) -> SuiteSettings:
    """Defaults, the size's preset (smoke, lra, and the CUDA benchmark range), then the user's ``cfg``: a value
    the user set wins over the preset. Checks the names.

    Raises ValueError naming an unknown setting, size, stage or recipe (listing the allowed ones), or a device
    that is not available here.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown suite setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    s = merge_settings(DEFAULTS, cfg)
    if s["size"] not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {s['size']!r}")
    bad = [st for st in s["stages"] if st not in STAGES]
    if bad:
        raise ValueError(f"stages must be among {STAGES}, got {bad}")
    s["device"] = _suite_device(str(s["device"]), s["stages"])
    s = _apply_size(s, cfg)
    s["results_dir"] = str(Path(s["results_dir"]).resolve())
    s["report_dir"] = str(Path(s["report_dir"]).resolve()) if s["report_dir"] else str(Path(s["results_dir"]) /
                                                                                         "report")
    unknown_train = sorted(set(s["train"]) - set(TrainSweep.__dataclass_fields__))
    if unknown_train:
        raise ValueError(f"unknown suite setting(s) {[f'train.{k}' for k in unknown_train]}; "
                         f"allowed: {sorted(TrainSweep.__dataclass_fields__)}")
    check_sections(s)
    check_experiments(s["train"])
    return SuiteSettings.of(s)


def check_sections(s: Mapping) -> None:
    """ValueError (one line) for a nested key nothing reads (``smoke.trian``, ``train.ladder.pointz``,
    ``bench.seq_lenz`` even when the benchmark is not a stage) or a count that is no integer
    (``train.seeds=[abc]``), naming the key and what is allowed."""
    bench_keys, train_keys = list(bench.DEFAULTS), list(TrainSweep.__dataclass_fields__)
    decode_keys = [*bench_keys, "scans"]
    for section, keys in (("bench", bench_keys), ("cuda_bench", bench_keys), ("smoke", ["results_dir", "bench",
                                                                                         "train", "decode"]),
                          ("smoke.bench", bench_keys), ("smoke.train", train_keys), ("lra", ["train"]),
                          ("extended", ["train", "decode"]), ("extended.train", train_keys),
                          ("decode", decode_keys), ("smoke.decode", decode_keys), ("extended.decode", decode_keys),
                          ("lra.train", train_keys), ("train.ladder", ["experiment", "points", "seeds"])):
        node: Any = s
        for part in section.split("."):
            node = (node or {}).get(part) if isinstance(node, Mapping) else None
        check_known(dict(node or {}), keys, section)
    check_scans(s)
    train, ladder = s["train"], dict(s["train"].get("ladder") or {})
    for i, seed in enumerate([*train["seeds"], *(ladder.get("seeds") or [])]):
        as_int(seed, "train.seeds" if i < len(train["seeds"]) else "train.ladder.seeds", minimum=0)
    for recipe, seeds in dict(train.get("recipe_seeds") or {}).items():
        if not isinstance(seeds, list | tuple) or not seeds:
            raise ValueError(f"invalid 'train.recipe_seeds.{recipe}': a non-empty list of seeds, got {seeds!r}")
        for seed in seeds:
            as_int(seed, f"train.recipe_seeds.{recipe}", minimum=0)
    for point in ladder.get("points") or []:
        if not (isinstance(point, list | tuple) and len(point) == 2):
            raise ValueError(f"invalid 'train.ladder.points': each point is [seq_len, num_kv_pairs], got {point!r}")
        for value in point:
            as_int(value, "train.ladder.points", minimum=1)
    as_int(train["workers"], "train.workers", minimum=1)
    as_int(train["threads_per_worker"], "train.threads_per_worker", minimum=1)
    as_float(s["time_budget_min"], "time_budget_min", minimum=0, strict=True)


def check_scans(s: Mapping) -> None:
    """ValueError (one line) for a decode scan that is not a mapping of the benchmark's ``decode.*`` keys
    (``decode.scans.model.contxts``), naming the key and the allowed ones."""
    decode_keys = list(bench.DEFAULTS.get("decode") or {}) if decode_supported() else None
    for section in ("decode", "smoke.decode", "extended.decode"):
        node: Any = s
        for part in section.split("."):
            node = (node or {}).get(part) if isinstance(node, Mapping) else None
        for name, scan in dict((node or {}).get("scans") or {}).items():
            if not isinstance(scan, Mapping):
                raise ValueError(f"invalid '{section}.scans.{name}': a scan is a mapping of arena-bench's decode.* "
                                 f"settings, got {scan!r}")
            if decode_keys is not None:
                check_known(dict(scan), decode_keys, f"{section}.scans.{name}")


def decode_supported() -> bool:
    """Whether this installation's ``arena-bench`` has ``mode=decode`` (issue 24's incremental-decoding scan)."""
    return "mode" in bench.DEFAULTS and isinstance(bench.DEFAULTS.get("decode"), dict)


def _suite_device(requested: str, stages: list) -> str:
    """The device: ``auto`` chosen here. A CUDA device this machine lacks is an error when a benchmark
    (which runs here: ``bench`` or ``decode``) is a stage; without one the training may be submitted elsewhere (a SLURM
    launcher)."""
    if "bench" not in stages and "decode" not in stages:
        return requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return bench.check_device(requested)
    except ValueError as exc:
        if "is_available() is False" not in str(exc):
            raise
        raise ValueError(f"{exc}; to submit only the training to a cluster from here: stages=[train,report]") from None


def _apply_size(s: dict, cfg: dict) -> dict:
    """``s`` with the size's preset applied where the user (``cfg``) left the value at its default
    (:func:`harness.bench.apply_preset`): ``size=smoke train.experiments=[smoke/listops]`` runs that recipe only."""
    user_bench, user_train = dict(cfg.get("bench") or {}), dict(cfg.get("train") or {})
    user_decode = dict(cfg.get("decode") or {})
    if s["size"] == "smoke":
        smoke = s["smoke"]
        if smoke.get("results_dir"):  # a check never pollutes a benchmark
            s = bench.apply_preset(s, cfg, DEFAULTS, {"results_dir": smoke["results_dir"]})
        s["bench"] = bench.apply_preset(s["bench"], user_bench, DEFAULTS["bench"], smoke.get("bench") or {})
        # The smoke benchmark's own tiny sizes replace the CPU range, unless the user set them.
        for key in ("seq_lens", "repeats", "warmup", "approx", "peers"):
            s["bench"] = _without_defaults(s["bench"], key, DEFAULTS["bench"][key])
        s["train"] = bench.apply_preset(s["train"], user_train, DEFAULTS["train"], smoke.get("train") or {})
        s["decode"] = bench.apply_preset(s["decode"], user_decode, DEFAULTS["decode"], smoke.get("decode") or {})
    elif s["size"] in ("lra", "extended"):
        s["train"] = bench.apply_preset(s["train"], user_train, DEFAULTS["train"], s[s["size"]].get("train") or {})
        s["decode"] = bench.apply_preset(s["decode"], user_decode, DEFAULTS["decode"], s[s["size"]].get("decode") or {})
    if s["size"] != "smoke" and s["device"].startswith("cuda"):
        s["bench"] = bench.apply_preset(s["bench"], user_bench, DEFAULTS["bench"], s["cuda_bench"])
    return s


def _without_defaults(section: dict, key: str, default: Any) -> dict:
    """``section`` without ``key`` when it holds ``default`` (a dict: without its entries equal to the default's)."""
    out = dict(section)
    value = out.get(key)
    if isinstance(value, dict) and isinstance(default, dict):
        kept = {k: v for k, v in value.items() if k not in default or v != default[k]}
        if kept:
            out[key] = kept
        else:
            out.pop(key)
    elif key in out and value == default:
        out.pop(key)
    return out


def check_experiments(train: Mapping) -> None:
    """ValueError naming every recipe of ``train`` (experiments, recipe_overrides, the ladder's) that has no
    ``conf/experiment/<name>.yaml``, with the available ones: raised before anything runs."""
    named = [*(train.get("experiments") or []), *dict(train.get("recipe_overrides") or {}),
             *dict(train.get("recipe_seeds") or {}),
             *([train["ladder"]["experiment"]] if (train.get("ladder") or {}).get("experiment") else [])]
    available = available_experiments()
    unknown = [str(e) for e in named if str(e) not in available]
    if unknown:
        raise ValueError(f"unknown experiment(s) {sorted(set(unknown))} in train (no conf/experiment/<name>.yaml); "
                         f"available: {', '.join(available)}")


def _banner(text: str, started: float) -> None:
    print(f"\n=== [arena-suite {time.time() - started:6.0f} s] {text}", flush=True)


def train_command(s: SuiteSettings, mechanisms: list[str], experiments: list[str],
                  sweep_dir: str | Path | None = None, extra: list[str] | None = None) -> list[str]:
    """The ``arena-train`` multirun command line for (part of) the sweep."""
    s = SuiteSettings.of(s)
    seeds = ",".join(str(int(x)) for x in s.train.seeds)
    if sweep_dir is None:
        sweep_dir = Path(s.results_dir) / "multirun" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return [
        sys.executable, "-m", "harness.train", "-m",
        f"experiment={','.join(experiments)}",
        f"attention={','.join(mechanisms)}",
        f"seed={seeds}",
        f"results_dir={s.results_dir}",
        f"device={s.device}",
        f"hydra.sweep.dir={sweep_dir}",
        *([f"plugins=[{','.join(s.plugins)}]"] if s.plugins else []),
        *(extra or []),
        *[str(o) for o in s.train.overrides],
    ]


def train_workers(s: SuiteSettings | Mapping) -> int:
    """Parallel training processes: 1 on CUDA (one GPU), else ``train.workers`` (at least 1)."""
    s = SuiteSettings.of(s)
    if str(s.device).startswith("cuda"):
        return 1
    return max(1, int(s.train.workers or 1))


def split_mechanisms(mechanisms: list[str], workers: int) -> list[list[str]]:
    """``mechanisms`` dealt round-robin into at most ``workers`` non-empty groups (order kept in each)."""
    groups = [mechanisms[i::max(1, workers)] for i in range(max(1, workers))]
    return [g for g in groups if g]


def training_jobs(s: SuiteSettings, mechanisms: list[str], experiments: list[str],
                  workers: int, tag: str = "", extra: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(label, command) per worker process. One worker: the whole sweep as one multirun. Several: the seeds or
    the mechanisms split into ``workers`` shares (:func:`worker_shares`), one multirun each over all recipes, with
    ``num_threads=threads_per_worker``, each in its own sweep dir; every worker logs plain lines
    (``quiet=true``). One process per worker (not per run) because starting Python + torch + Hydra costs
    seconds; the second worker takes the recipes in reverse order, so the two start by generating different
    task data, not the same twice.
    ``tag`` names this part of the sweep (labels and sweep dirs); ``extra`` are overrides for it."""
    s = SuiteSettings.of(s)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(s.results_dir) / "multirun" / stamp / tag if tag else Path(s.results_dir) / "multirun" / stamp
    prefix = f"{tag}:" if tag else ""
    # quiet: the suite reads its workers' output line by line (a progress bar would be one endless line).
    if workers <= 1:
        return [(prefix + "all", train_command(s, mechanisms, experiments, sweep_dir=base,
                                               extra=["quiet=true", *(extra or [])]))]
    threads = max(1, int(s.train.threads_per_worker or 1))
    jobs = []
    for i, (group, seeds) in enumerate(worker_shares(mechanisms, [int(x) for x in s.train.seeds], workers)):
        order = experiments if i % 2 == 0 else experiments[::-1]
        share = SuiteSettings.of({**s, "train": TrainSweep(**{**s.train, "seeds": seeds})})
        jobs.append((f"{prefix}w{i + 1}", train_command(share, group, order, sweep_dir=base / f"worker{i + 1}",
                                                         extra=[f"num_threads={threads}", "quiet=true",
                                                                *(extra or [])])))
    return jobs


def worker_shares(mechanisms: list[str], seeds: list[int], workers: int) -> list[tuple[list[str], list[int]]]:
    """(mechanisms, seeds) of each worker's job. Seeds dealt out when they divide evenly among the workers (every
    worker trains every mechanism: equal work, since a mechanism costs the same for each seed; the decoder MQAR's
    rfa runs take four times full's), else the mechanisms dealt round-robin (:func:`split_mechanisms`)."""
    if workers > 1 and len(seeds) >= workers and len(seeds) % workers == 0:
        return [(list(mechanisms), seeds[i::workers]) for i in range(workers)]
    return [(group, list(seeds)) for group in split_mechanisms(mechanisms, workers)]


def largest_first(sized: list[tuple[int, tuple[str, list[str]]]]) -> list[tuple[str, list[str]]]:
    """The jobs ordered by their number of runs, most first (ties keep their order). The pool's free worker takes
    the next job, so the stage ends when its last job does: starting the long jobs first (the two-seed decoder
    runs of 800 steps) leaves the short ones to fill the gaps, instead of one worker finishing a long job alone."""
    return [job for _, job in sorted(sized, key=lambda item: -item[0])]


def recipe_is_causal(experiment: str) -> bool:
    """Whether ``conf/experiment/<experiment>.yaml`` (with what it inherits from another recipe) sets
    ``model.causal: true`` (a decoder recipe)."""
    return bool((recipe_file(experiment, CONF_DIR).get("model") or {}).get("causal", False))


def recipe_groups_kv(experiment: str) -> bool:
    """Whether the recipe (with what it inherits) sets ``model.num_kv_heads`` below its ``num_heads`` (grouped-query
    attention; ``quick/mqar_causal_mqa``: multi-query), so the mechanisms that refuse grouped keys and values
    cannot run it."""
    from omegaconf import OmegaConf

    model = {**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "base.yaml")),
             **(recipe_file(experiment, CONF_DIR).get("model") or {})}
    kv = model.get("num_kv_heads")
    return kv is not None and int(kv) < int(model["num_heads"])


def left_out_of(mechanisms: list[str], causal: bool, grouped: bool) -> dict[str, str]:
    """The mechanisms a recipe cannot run, each with why (the registry's words): no causal form (a causal
    recipe), or grouped keys and values refused (a recipe with ``num_kv_heads < num_heads``; reformer)."""
    out = {}
    for name in mechanisms:
        info = get_attention_info(name)
        if causal and not info.supports_causal:
            out[name] = "no causal form"
        elif grouped and info.grouped_kv == "refused":
            out[name] = "refuses grouped keys and values" + (f": {info.grouped_kv_note}" if info.grouped_kv_note
                                                              else "")
    return out


def sweep_parts(s: SuiteSettings, mechanisms: list[str],
                experiments: list[str]) -> list[tuple[str, list[str], list[str], list[str], list[int]]]:
    """(tag, mechanisms, experiments, extra overrides, seeds) per part of the sweep: the bidirectional recipes
    with every mechanism, the causal ones with the mechanisms that have a causal form, a recipe with grouped keys
    and values (``quick/mqar_causal_mqa``) without the mechanisms that refuse them (:func:`left_out_of`; a recipe
    with its own ``train.recipe_overrides`` or seeds in a part of its own), and one part per point of the recall
    ladder."""
    s = SuiteSettings.of(s)
    seeds = [int(x) for x in s.train.seeds]
    per_recipe = {str(k): [str(o) for o in v] for k, v in dict(s.train.recipe_overrides or {}).items()}
    own_seeds = {str(k): tuple(int(x) for x in v) for k, v in dict(s.train.recipe_seeds or {}).items()}
    groups: dict[tuple[bool, bool, tuple[str, ...], tuple[int, ...]], list[str]] = {}
    for exp in experiments:  # one part per (causal?, grouped?, the recipe's own overrides, its seeds)
        key = (recipe_is_causal(exp), recipe_groups_kv(exp), tuple(per_recipe.get(exp, [])),
               own_seeds.get(exp, tuple(seeds)))
        groups.setdefault(key, []).append(exp)
    parts = []
    for i, ((is_causal, grouped, extra, part_seeds), exps) in enumerate(groups.items()):
        skipped = left_out_of(mechanisms, is_causal, grouped)
        mechs = [m for m in mechanisms if m not in skipped]
        if mechs:
            own = bool(extra) or list(part_seeds) != seeds
            parts.append((("causal" if is_causal else "bidir") + ("-gqa" if grouped else "") + (f"{i}" if own else ""),
                          mechs, exps, list(extra), list(part_seeds)))
    ladder = dict(s.train.ladder or {})
    exp = ladder.get("experiment")
    if exp and exp in experiments:  # a rung of a recipe the sweep runs (resolve_suite checked that it exists)
        skipped = left_out_of(mechanisms, recipe_is_causal(exp), recipe_groups_kv(exp))  # its recipe's rule
        mechs = [m for m in mechanisms if m not in skipped]
        for seq_len, pairs in ladder.get("points") or []:
            parts.append((f"ladder-L{int(seq_len)}-k{int(pairs)}", mechs, [exp],
                          [f"task.params.seq_len={int(seq_len)}", f"task.params.num_kv_pairs={int(pairs)}"],
                          [int(x) for x in ladder.get("seeds") or seeds]))
    return parts


# An INFO line of a training process: Hydra's own ("[<time>][HYDRA] ...") or a logger's at INFO/DEBUG
# ("[<time>][<logger>][INFO] - ..."). Shown with train.verbose=true only; every other line (warnings, errors,
# tracebacks, a process's own messages) always shows.
INFO_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+\]\[(?:HYDRA\]|[^\]]+\]\[(?:INFO|DEBUG)\] - )")
# On Ctrl-C: seconds the training processes get to stop on the terminal's own SIGINT, then on one sent to
# them (the suite alone may have been interrupted), before they are killed.
STOP_GRACE_S = (2.0, 5.0)


@dataclass
class RunProgress:
    """The training stage's progress, read from the line each run ends with
    (:func:`harness.display.parse_run_done`): a line per finished run with the count, failures, and an
    estimate of the time left from the finished runs' wall times (per recipe, divided among the workers).

    ``planned``: runs per (recipe, part tag), the sweep's plan."""

    planned: dict[tuple[str, str], int]
    workers: int = 1
    widths: tuple[int, int] = (0, 0)
    done: int = 0
    done_by: dict[tuple[str, str], int] = field(default_factory=dict)
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.planned.values())

    def finished(self, run: dict, tag: str) -> str:
        """Count one finished run (:func:`parse_run_done`'s fields) of the part ``tag``; its line."""
        key = (run["recipe"], tag)
        self.done += 1
        self.done_by[key] = self.done_by.get(key, 0) + 1
        outcome = run["outcome"]
        if outcome == "ok":  # the estimate counts whole runs only (a failed one stopped early)
            self.times.setdefault(key, []).append(run["wall_s"])
        recipe = run["recipe"] + (f" ({tag})" if tag.startswith("ladder") else "")
        name = f"{run['attention']} {recipe} seed {run['seed']}"
        if outcome not in ("ok", "skipped"):
            self.failed.append(f"{name}: {outcome}")
        line = (f"run {self.done:>{len(str(self.total))}}/{self.total}  {run['attention']:<{self.widths[0]}}  "
                f"{recipe:<{self.widths[1]}}  seed {run['seed']}  {self._result(run)}")
        left = self.time_left()
        if left is not None and self.done < self.total:
            line += f"; training left: about {format_duration(left)} (estimate)"
        return line

    @staticmethod
    def _result(run: dict) -> str:
        test = "" if run["test_acc"] is None else f"test {100 * run['test_acc']:.1f}%"
        if run["outcome"] == "skipped":
            return f"already recorded{', ' + test if test else ''}"
        if run["outcome"] == "ok":
            return f"{test} ({format_duration(run['wall_s'])})"
        why = (run.get("details") or "").strip()
        return f"{run['outcome']} ({format_duration(run['wall_s'])})" + (f": {why}" if why else "")

    def time_left(self) -> float | None:
        """Seconds the runs not finished yet would take: each recipe's mean run time so far (a recipe with
        none finished: the mean of all), divided among the workers. None before a run was timed."""
        timed = [t for ts in self.times.values() for t in ts]
        if not timed:
            return None
        overall = sum(timed) / len(timed)
        left = 0.0
        for key, count in self.planned.items():
            mine = self.times.get(key)
            left += max(0, count - self.done_by.get(key, 0)) * (sum(mine) / len(mine) if mine else overall)
        return left / max(1, self.workers)


class _JobPool:
    """``workers`` threads, each taking the next job and streaming its lines: prefixed by its label, a run's
    last line replaced by the ``progress`` line, INFO lines only when ``verbose``."""

    def __init__(self, jobs: list[tuple[str, list[str]]], env: dict | None, cwd: str | None,
                 echo: Callable[[str], None], progress: RunProgress | None, verbose: bool) -> None:
        self.jobs, self.env, self.cwd, self.out = jobs, env, cwd, echo
        self.progress, self.verbose = progress, verbose
        self.lock = threading.Lock()
        self.todo: queue.Queue = queue.Queue()
        for job in jobs:
            self.todo.put(job)
        self.codes: list[int] = []
        self.running: dict[int, subprocess.Popen] = {}
        self.stop = threading.Event()  # Ctrl-C: no new job, and the jobs' output is dropped

    def worker(self, wid: int) -> None:
        while not self.stop.is_set():
            try:
                label, cmd = self.todo.get_nowait()
            except queue.Empty:
                return
            self.run_one(wid, label, cmd)

    def run_one(self, wid: int, label: str, cmd: list[str]) -> None:
        t0, prefix = time.time(), f"[{label}]"
        with self.lock:  # started under the lock: a Ctrl-C (stop_all) sees every process that runs
            if self.stop.is_set():
                return
            try:
                proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
            except OSError as exc:
                self.codes.append(1)
                self.out(f"{prefix} could not start: {exc}")
                return
            self.running[wid] = proc
        assert proc.stdout is not None
        for line in proc.stdout:
            self.echo_line(label, line.rstrip())
        code = proc.wait()
        with self.lock:
            self.running.pop(wid, None)
            self.codes.append(code)
            if self.stop.is_set():
                return
            if code or self.verbose:
                self.out(f"{prefix} arena-train exited with code {code} after {format_duration(time.time() - t0)}"
                         f"; {len(self.codes)}/{len(self.jobs)} training processes done")

    def echo_line(self, label: str, line: str) -> None:
        run = parse_run_done(line)
        with self.lock:
            if self.stop.is_set() or not line:
                return
            if run is not None and self.progress is not None:
                if self.verbose:
                    self.out(f"[{label}] {line}")
                self.out(self.progress.finished(run, label.rsplit(":", 1)[0] if ":" in label else ""))
            elif self.verbose or not INFO_LINE.match(line):
                self.out(f"[{label}] {line}")

    def stop_all(self) -> None:
        """Ctrl-C: no new job; the jobs' output dropped (each prints its own interrupt line); the running
        processes stopped by the SIGINT the terminal sent them, else by one sent now, else killed, so that
        none outlives the suite. A second Ctrl-C meanwhile kills them at once."""
        self.stop.set()
        with self.lock:
            procs = list(self.running.values())
        try:
            alive = _wait_for(procs, STOP_GRACE_S[0])
            for proc in alive:
                proc.send_signal(signal.SIGINT)
            alive = _wait_for(alive, STOP_GRACE_S[1])
        except KeyboardInterrupt:
            alive = procs
        for proc in alive:
            proc.kill()
            proc.wait()


def _wait_for(procs: list[subprocess.Popen], seconds: float) -> list[subprocess.Popen]:
    """The processes of ``procs`` still running after waiting up to ``seconds`` for them all."""
    deadline = time.monotonic() + seconds
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    return [proc for proc in procs if proc.poll() is None]


def run_jobs(jobs: list[tuple[str, list[str]]], workers: int, env: dict | None = None, cwd: str | None = None,
             echo: Callable[[str], None] | None = None, progress: RunProgress | None = None,
             verbose: bool = True) -> int:
    """Run ``jobs`` with at most ``workers`` at a time (a free worker takes the next job), streaming each
    job's output lines prefixed by ``[<label>]``. With ``progress``, the line a run ends with becomes the
    progress line (count, result, time left); ``verbose=False`` leaves out the jobs' INFO lines (warnings,
    errors and anything else still show) and the exit of a job that succeeded. Returns 0 when every job
    exited 0, else the first non-zero exit code. Ctrl-C stops the running jobs (:meth:`_JobPool.stop_all`),
    then raises KeyboardInterrupt."""
    pool = _JobPool(jobs, env, cwd, echo or (lambda line: print(line, flush=True)), progress, verbose)
    threads = [threading.Thread(target=pool.worker, args=(w + 1,), daemon=True) for w in range(max(1, workers))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        pool.stop_all()
        for t in threads:  # their processes are gone: the pipes end, the threads return
            t.join(timeout=5)
        raise
    return next((c for c in pool.codes if c), 0)


def run_training(s: SuiteSettings, mechanisms: list[str]) -> int:
    """Run the sweep in worker processes, a line per finished run on this terminal; returns 0 when every
    worker exited 0 (each ``arena-train`` exits 1 when one of its runs failed), else the first non-zero code."""
    s = SuiteSettings.of(s)
    experiments = list(s.train.experiments)  # checked by resolve_suite: every one has a recipe
    if not experiments:
        return 0
    # Every registered mechanism trains: one without a conf/attention YAML gets a generated config node.
    trainable = list(mechanisms)
    workers = min(train_workers(s), len(trainable))
    sized, planned = [], {}
    for tag, mechs, exps, extra, seeds in sweep_parts(s, trainable, experiments):
        part = SuiteSettings.of({**s, "train": TrainSweep(**{**s.train, "seeds": seeds})})
        n = min(workers, len(mechs))
        shares = worker_shares(mechs, seeds, n)  # the shares training_jobs gives its jobs, in order
        part_jobs = training_jobs(part, mechs, exps, n, tag=tag, extra=extra)
        sized += [(len(group) * len(exps) * len(share_seeds), job)
                  for (group, share_seeds), job in zip(shares, part_jobs)]
        for exp in exps:
            planned[(exp, tag)] = len(mechs) * len(seeds)
        print(f"training [{tag}]: {len(mechs)} mechanisms x {exps}{' ' + ' '.join(extra) if extra else ''} "
              f"x seeds {seeds}" + left_out_text(trainable, mechs, exps[0]), flush=True)
    jobs = largest_first(sized)
    widths = (max(map(len, trainable)), max(len(e) + (len(t) + 3 if t.startswith("ladder") else 0)
                                            for e, t in planned))
    progress = RunProgress(planned, workers=workers, widths=widths)
    print(f"training: {progress.total} runs in all (runs with an ok record are skipped), {workers} worker "
          f"process(es) x {int(s.train.threads_per_worker or 1)} torch thread(s); a line per finished run"
          + ("" if s.train.verbose else " (train.verbose=true: the commands and every run's own log lines too)"),
          flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env[WORKDIR_ENV] = os.getcwd()  # the runs' log lines show paths relative to where the suite was started
    if s.train.verbose:
        for label, cmd in jobs:
            print(f"  [{label}] $ " + " ".join(cmd), flush=True)
    # The runs start where the suite was started: caches, Hydra's outputs and plug-in files are found there.
    code = run_jobs(jobs, workers, env=env, cwd=os.getcwd(), progress=progress, verbose=bool(s.train.verbose))
    _training_summary(progress, code)
    return code


def left_out_text(trainable: list[str], mechs: list[str], experiment: str) -> str:
    """`` (left out: linformer (no causal form), ...)``: the mechanisms a part of the sweep does not train, each with
    why (:func:`left_out_of`); ``""`` when it trains them all. The ladder's parts share their recipe's."""
    why = left_out_of(trainable, recipe_is_causal(experiment), recipe_groups_kv(experiment))
    short = {name: reason.split(":")[0] for name, reason in why.items() if name not in mechs}
    return f" (left out: {', '.join(f'{n} ({r})' for n, r in short.items())})" if short else ""


def _training_summary(progress: RunProgress, code: int) -> None:
    """The training stage's last line: how many runs finished, which failed; a worker's failure is said even
    when none of its runs said so (it failed before or between runs)."""
    failed = f"; {len(progress.failed)} failed: {'; '.join(progress.failed)}" if progress.failed else ""
    # Fewer: a worker stopped early, or a launcher (train.overrides=[hydra/launcher=...]) ran the jobs elsewhere.
    unseen = ("" if progress.done >= progress.total else
              " (the others did not report here: a worker stopped early, or a launcher ran them and has their logs)")
    print(f"training: {progress.done}/{progress.total} runs finished here{unseen}{failed}", flush=True)
    if code:
        print(f"training: a worker process exited with code {code} (its lines above say why); the report "
              "shows what finished", flush=True)


def prepare_suite(cfg: dict | None = None) -> tuple[SuiteSettings, list[str]]:
    """(settings, mechanisms): :func:`resolve_suite`, the plug-ins loaded, the mechanisms and, when the
    benchmark is a stage, its settings (``bench.params`` included) checked. Nothing runs.

    Raises ValueError naming what is unknown or unavailable and what is allowed."""
    s = resolve_suite(cfg)
    load_plugins(s.plugins)
    mechanisms = available_attentions() if s.mechanisms == "all" else bench.select_mechanisms(s.mechanisms)
    if "bench" in s.stages and not (s.size == "lra" and not s.device.startswith("cuda")):
        bench.prepare_benchmark(_bench_settings(s, mechanisms))
    if "decode" in s.stages and decode_supported() and not (s.size == "lra" and not s.device.startswith("cuda")):
        for _, scan in decode_scans(s, mechanisms):
            bench.prepare_benchmark(scan)
    return s, mechanisms


def run_suite(cfg: dict | None = None, prepared: tuple[SuiteSettings, list[str]] | None = None) -> dict[str, Any]:
    """Run the stages; returns the settings, the stage times, the training exit code and the report path.
    ``prepared``: what :func:`prepare_suite` returned for ``cfg`` (then ``cfg`` is not read again)."""
    s, mechanisms = prepared or prepare_suite(cfg)
    started = time.time()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"settings": s, "timings": timings}
    if s.size == "lra" and not s.device.startswith("cuda"):
        result["estimate"] = lra_estimate(s, mechanisms)
        print(result["estimate"]["message"], flush=True)
        return result
    _banner(f"{len(mechanisms)} mechanisms on {s.device} ({s.size} size); results in {shown_path(s.results_dir)}",
            started)
    if "bench" in s.stages:
        _banner("stage 1/4: efficiency benchmark (time and memory vs n, approximation error, peers)", started)
        timings["bench_s"] = _bench_stage(s, mechanisms)
    if "train" in s.stages:
        _banner("stage 2/4: training sweep", started)
        t = time.time()
        result["train_returncode"] = run_training(s, mechanisms)
        timings["train_s"] = time.time() - t
    if "decode" in s.stages:
        _banner("stage 3/4: decoding benchmark (time per token and state bytes vs context)", started)
        timings["decode_s"] = _decode_stage(s, mechanisms)
    if "report" in s.stages:
        _banner("stage 4/4: report", started)
        result["report"], timings["report_s"] = _report_stage(s)
    _summary(s, result, started)
    return result


# Training-split sizes of the LRA tasks (docs/LRA.md), for the recipes that count epochs.
LRA_NUM_TRAIN = {"listops": 96_000, "text": 25_000, "retrieval": 147_086, "image": 45_000, "pathfinder": 160_000,
                 "pathx": 160_000}
LRA_LENGTH = {"listops": 2000, "text": 1000, "retrieval": 4000, "image": 1024, "pathfinder": 1024, "pathx": 16384}


def recipe_step_flops(experiment: str) -> tuple[int, float]:
    """(training steps, FLOPs of one training step with ``full`` attention) of an LRA recipe: 3x the forward's
    matmuls (projections, feed-forward, scores and weighted sum; embeddings and heads left out), so a
    lower bound on the work."""
    from omegaconf import OmegaConf

    # Plain YAML merges (no Hydra compose: the suite itself runs inside a Hydra app): the model and train
    # defaults, then the recipe; an LRA recipe is named after its task.
    def load(path: Path) -> Any:
        node = OmegaConf.load(path)
        return OmegaConf.masked_copy(node, [k for k in node if k not in ("defaults", "hydra")])

    cfg = OmegaConf.merge(load(CONF_DIR / "train.yaml"), {"model": OmegaConf.load(CONF_DIR / "model" / "base.yaml")},
                          load(CONF_DIR / "experiment" / f"{experiment}.yaml"))
    task, m, t = experiment.split("/")[-1], cfg.model, cfg.train
    steps = int(t.max_steps) if t.get("epochs") is None else int(float(t.epochs) * (LRA_NUM_TRAIN[task] //
                                                                                  int(t.batch_size)))
    sequences = int(t.batch_size) * (2 if task == "retrieval" else 1)
    return steps, transformer_step_flops(embed_dim=m.embed_dim, qkv_dim=m.qkv_dim, mlp_dim=m.mlp_dim,
                                         num_layers=m.num_layers, length=LRA_LENGTH[task], sequences=sequences)


# The suite's training as SLURM jobs from a machine without a GPU (the benchmark stage needs one here). The
# override is quoted: a list of strings holding '=' and '/' must be quoted for Hydra's parser.
LRA_SLURM_COMMAND = ("arena-suite size=lra device=cuda stages=[train,report] "
                     """'train.overrides=["hydra/launcher=slurm"]'""")


def lra_estimate(s: SuiteSettings, mechanisms: list[str]) -> dict[str, Any]:
    """How long ``size=lra`` would train here, from the recipes' work and a measured matmul rate; the
    ``message`` says it plainly. Nothing is trained."""
    s = SuiteSettings.of(s)
    rate = matmul_flops_per_s()
    runs = len(mechanisms) * len(s.train.experiments) * len(s.train.seeds)
    seconds = sum(recipe_step_flops(e)[0] * recipe_step_flops(e)[1] for e in s.train.experiments) / rate
    total_s = seconds * len(mechanisms) * len(s.train.seeds)
    message = (f"size=lra: {runs} runs ({len(mechanisms)} mechanisms x {len(s.train.experiments)} LRA recipes x "
               f"seeds {list(s.train.seeds)}). On this {s.device} (measured {rate / 1e9:.0f} GFLOP/s fp32 matmul) "
               f"they would take at least {total_s / 86400:.0f} days ({total_s / 3600:.0f} h; counting the "
               "matmuls of every step with full attention at peak rate), so nothing is started. Run it on GPUs: "
               "arena-suite size=lra device=cuda, or submit the training to a SLURM cluster from here with "
               f"{LRA_SLURM_COMMAND} (every run resumes and skips finished ones).")
    return {"runs": runs, "flops_per_s": rate, "seconds": total_s, "message": message}


def _bench_settings(s: SuiteSettings, mechanisms: list[str]) -> bench.BenchSettings:
    return bench.resolve_settings({**s.bench, "mechanisms": mechanisms, "device": s.device,
                                   "results_dir": s.results_dir, "plugins": list(s.plugins)})


def _bench_stage(s: SuiteSettings, mechanisms: list[str]) -> float:
    t = time.time()
    bench.run_benchmark(_bench_settings(s, mechanisms))
    return time.time() - t


def decode_scans(s: SuiteSettings, mechanisms: list[str]) -> list[tuple[str, bench.BenchSettings]]:
    """(name, arena-bench settings) per decode scan: ``mode=decode``, the scan's ``decode.*`` settings, the
    ``decode`` block's other keys, the suite's causal mechanisms, device, store and plug-ins. Raises ValueError
    naming a bad setting (:func:`harness.bench.resolve_settings`)."""
    common = {k: v for k, v in dict(s.decode).items() if k != "scans"}
    causal = [m for m in mechanisms if get_attention_info(m).supports_causal]
    return [(str(name), bench.resolve_settings({**common, "mode": "decode", "decode": dict(scan), "mechanisms": causal,
                                                "device": s.device, "results_dir": s.results_dir,
                                                "plugins": list(s.plugins)}))
            for name, scan in dict(s.decode.get("scans") or {}).items()]


def _decode_stage(s: SuiteSettings, mechanisms: list[str]) -> float:
    """The decode scans one after the other (each reuses the cells the store already holds); seconds taken."""
    t = time.time()
    if not decode_supported():
        print("decode stage: this arena-bench has no mode=decode (issue 24's decoding benchmark): skipped", flush=True)
        return time.time() - t
    if not any(get_attention_info(m).supports_causal for m in mechanisms):
        print("decode stage: none of the mechanisms has a causal form: nothing to decode", flush=True)
        return time.time() - t
    for name, scan in decode_scans(s, mechanisms):
        print(f"decode scan '{name}': scopes {list(scan.decode.scopes)}, contexts {list(scan.decode.contexts)}, "
              f"batches {list(scan.decode.batches)}", flush=True)
        bench.run_benchmark(scan)
    return time.time() - t


def _report_stage(s: SuiteSettings) -> tuple[str, float]:
    """(the report page's path relative to the working directory, seconds to build it).

    The slope range and memory budget come from the benchmark's records, as for ``arena-report``. A store that
    is missing or holds no readable record (``stages=[report]`` on a fresh folder) ends the suite as it ends
    ``arena-report``: one line naming it, exit 2."""
    try:
        built = report.build_report(s.results_dir, s.report_dir)
    except (FileNotFoundError, report.NothingToReport) as exc:
        print(f"arena-suite: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return shown_path(Path(built["out"]) / "report.html"), built["build_s"]


def _summary(s: SuiteSettings, result: dict[str, Any], started: float) -> None:
    timings = result["timings"]
    total = time.time() - started
    timings["total_s"] = total
    _banner("done", started)
    print("  " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()), flush=True)
    if total > 60 * float(s.time_budget_min):
        print(f"  note: took {total / 60:.1f} min, over the {s.time_budget_min} min target", flush=True)
    if "report" in result:
        print(f"  report: {result['report']}\n          {Path(result['report']).with_suffix('.md')}", flush=True)
    if result.get("train_returncode"):
        print("  training runs failed (named above): exit status 1", flush=True)


def main() -> None:
    """``arena-suite``: Hydra app over conf/suite.yaml; no arguments needed."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="suite", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        with exit_on_settings_error("arena-suite"):  # a bad setting: one line, exit 2; a crash keeps its traceback
            prepared = prepare_suite(OmegaConf.to_container(cfg, resolve=True))
        result = run_suite(prepared=prepared)
        if result.get("train_returncode"):  # the report was still built; the exit status says a stage failed
            sys.exit(1)

    prepare(app="arena-suite")  # plugins=[...] and installed plug-ins, before mechanisms=[...] is resolved
    sys.argv[1:] = add_absent_keys(sys.argv[1:], CONF_DIR / "suite.yaml")  # unknown keys: our one-line error
    with one_line_interrupt("arena-suite", "what was recorded is kept; the same command continues from there"):
        _app()


if __name__ == "__main__":
    main()
