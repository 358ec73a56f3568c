"""The one-command suite (``arena-suite``): efficiency scan, quick training sweep, report.

    arena-suite                       # everything, sized for a 2-core CPU (GPU used when present)
    arena-suite size=smoke            # seconds-to-minutes end-to-end check (tests)
    arena-suite stages=[report]       # only rebuild the report

Stages (each reuses what the store already holds, so a re-run finishes only what is missing):

1. ``bench``: :func:`harness.bench.run_benchmark` for every registered mechanism, with a
   CPU-sized sequence range on CPU (the benchmark's full 1K..16K range on CUDA), the
   approximation errors, and the peers when the ``peers`` extra is installed.
2. ``train``: ``arena-train -m experiment=<recipes> attention=<...> seed=<seeds>`` (Hydra multirun;
   runs with an ``ok`` record are skipped by ``arena-train``). On CPU, ``train.workers`` processes
   (default 2) with ``train.threads_per_worker`` torch threads each (default 1) share the sweep: the
   mechanisms are dealt round-robin into one group per worker, each group one multirun with its own
   ``hydra.sweep.dir``; their log lines are streamed prefixed by the worker id. Small models train
   faster as two one-thread processes than as one two-thread process, and the store's one-file-per-run
   atomic writes make concurrent runs safe. On CUDA (one GPU) it is a single multirun process.
3. ``report``: :func:`harness.report.build_report`; the suite ends by printing where it is.

Owns: the order of the stages, :class:`SuiteSettings` (built once by :func:`resolve_suite`), the
training sweep's command lines and worker processes. May import ``attentions``, :mod:`harness.bench`,
:mod:`harness.report`, :mod:`harness.display`, :mod:`harness.settings`, :mod:`harness.plugins`; nothing
imports it (it is the top of the harness). Training runs in subprocesses (``python -m harness.train``), never imported.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attentions import available_attentions
from harness import bench, report
from harness.display import WORKDIR_ENV, one_line_interrupt, shown_path
from harness.plugins import conf_dir, load_plugins, prepare
from harness.settings import Settings, merge_settings

# The folder holding the harness package (the clone, or site-packages): on the training processes' path.
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = conf_dir()
STAGES = ("bench", "train", "report")

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
    "train": {"experiments": ["quick/listops", "quick/pathfinder"], "seeds": [0], "overrides": [],
              "workers": 2, "threads_per_worker": 1},
    "smoke": {
        "bench": {"smoke": True},
        "train": {"experiments": ["smoke/listops", "smoke/pathfinder"]},
        "results_dir": "results/smoke",
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
    smoke: dict
    time_budget_min: float

    @classmethod
    def of(cls, value: SuiteSettings | Mapping) -> SuiteSettings:
        """``value`` itself, or the settings with the same (already resolved) fields given as a mapping."""
        if isinstance(value, cls):
            return value
        fields = dict(value)
        return cls(**{**fields, "train": TrainSweep(**dict(fields["train"]))})


def resolve_suite(cfg: dict | None = None) -> SuiteSettings:
    """Defaults, the user's ``cfg``, then the smoke or CUDA sizes; checks the names.

    Raises ValueError naming an unknown setting, size or stage.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown suite setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    s = merge_settings(DEFAULTS, cfg)
    if s["size"] not in ("default", "smoke"):
        raise ValueError(f"size must be 'default' or 'smoke', got {s['size']!r}")
    bad = [st for st in s["stages"] if st not in STAGES]
    if bad:
        raise ValueError(f"stages must be among {STAGES}, got {bad}")
    if s["device"] == "auto":
        s["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if s["size"] == "smoke":
        s["bench"] = merge_settings(s["bench"], s["smoke"]["bench"])
        if "results_dir" not in cfg or cfg["results_dir"] == DEFAULTS["results_dir"]:
            s["results_dir"] = s["smoke"].get("results_dir") or s["results_dir"]  # a check never pollutes a benchmark
        # The smoke benchmark's own tiny sizes replace the CPU range.
        for key in ("seq_lens", "repeats", "warmup", "approx", "peers"):
            s["bench"].pop(key, None)
        s["train"] = merge_settings(s["train"], s["smoke"]["train"])
    elif s["device"].startswith("cuda"):
        s["bench"] = merge_settings(s["bench"], s["cuda_bench"])
    s["results_dir"] = str(Path(s["results_dir"]).resolve())
    s["report_dir"] = str(Path(s["report_dir"]).resolve()) if s["report_dir"] else str(Path(s["results_dir"]) /
                                                                                         "report")
    unknown_train = sorted(set(s["train"]) - set(TrainSweep.__dataclass_fields__))
    if unknown_train:
        raise ValueError(f"unknown suite setting(s) {[f'train.{k}' for k in unknown_train]}; "
                         f"allowed: {sorted(TrainSweep.__dataclass_fields__)}")
    return SuiteSettings.of(s)


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
                  workers: int) -> list[tuple[str, list[str]]]:
    """(label, command) per worker process. One worker: the whole sweep as one multirun. Several: the
    mechanisms split into ``workers`` groups, one multirun each over all recipes and seeds, with
    ``num_threads=threads_per_worker`` and quiet log lines, each in its own sweep dir. One process per
    worker (not per run) because starting Python + torch + Hydra costs seconds; the second worker takes the
    recipes in reverse order, so the two start by generating different task data, not the same twice."""
    s = SuiteSettings.of(s)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(s.results_dir) / "multirun" / stamp
    if workers <= 1:
        return [("all", train_command(s, mechanisms, experiments, sweep_dir=base))]
    threads = max(1, int(s.train.threads_per_worker or 1))
    jobs = []
    for i, group in enumerate(split_mechanisms(mechanisms, workers)):
        order = experiments if i % 2 == 0 else experiments[::-1]
        jobs.append((f"w{i + 1}", train_command(s, group, order, sweep_dir=base / f"worker{i + 1}",
                                                extra=[f"num_threads={threads}", "quiet=true"])))
    return jobs


# A finished (or skipped) arena-train run's log line: "<attention>/<task>/seed<N>: <status> ...".
RUN_DONE = re.compile(r"\] - (skipping )?[\w.-]+/[\w.-]+/seed\d+: ")


class _JobPool:
    """``workers`` threads, each taking the next job, streaming its lines prefixed by its label."""

    def __init__(self, jobs: list[tuple[str, list[str]]], env: dict | None, cwd: str | None,
                 echo: Callable[[str], None], total_runs: int | None) -> None:
        self.jobs, self.env, self.cwd, self.out, self.total_runs = jobs, env, cwd, echo, total_runs
        self.lock = threading.Lock()
        self.todo: queue.Queue = queue.Queue()
        for job in jobs:
            self.todo.put(job)
        self.codes: list[int] = []
        self.finished_runs = 0
        self.running: dict[int, subprocess.Popen] = {}
        self.stop = threading.Event()

    def worker(self, wid: int) -> None:
        while not self.stop.is_set():
            try:
                label, cmd = self.todo.get_nowait()
            except queue.Empty:
                return
            self.run_one(wid, f"[{label}]", cmd)

    def run_one(self, wid: int, prefix: str, cmd: list[str]) -> None:
        t0 = time.time()
        try:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
        except OSError as exc:
            with self.lock:
                self.codes.append(1)
                self.out(f"{prefix} could not start: {exc}")
            return
        with self.lock:
            self.running[wid] = proc
        assert proc.stdout is not None
        for line in proc.stdout:
            self.echo_line(prefix, line.rstrip())
        code = proc.wait()
        with self.lock:
            self.running.pop(wid, None)
            self.codes.append(code)
            self.out(f"{prefix} finished (exit {code}, {time.time() - t0:.0f} s); "
                     f"{len(self.codes)}/{len(self.jobs)} jobs done")

    def echo_line(self, prefix: str, line: str) -> None:
        if not line:
            return
        with self.lock:
            if self.total_runs and RUN_DONE.search(line):
                self.finished_runs += 1
                line += f"  ({self.finished_runs}/{self.total_runs} runs)"
            self.out(f"{prefix} {line}")

    def terminate(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            proc.terminate()


def run_jobs(jobs: list[tuple[str, list[str]]], workers: int, env: dict | None = None, cwd: str | None = None,
             echo: Callable[[str], None] | None = None, total_runs: int | None = None) -> int:
    """Run ``jobs`` with at most ``workers`` at a time (a free worker takes the next job), streaming each
    job's output lines prefixed by ``[<label>]``; with ``total_runs``, a line that ends a run gets
    ``(k/total runs)`` appended. Returns 0 when every job exited 0, else the first non-zero exit code.
    Ctrl-C terminates the running jobs (by their pid)."""
    pool = _JobPool(jobs, env, cwd, echo or (lambda line: print(line, flush=True)), total_runs)
    threads = [threading.Thread(target=pool.worker, args=(w + 1,), daemon=True) for w in range(max(1, workers))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        pool.terminate()
        raise
    return next((c for c in pool.codes if c), 0)


def _available_experiments(s: SuiteSettings) -> list[str]:
    experiments = []
    for exp in s.train.experiments:
        if (CONF_DIR / "experiment" / f"{exp}.yaml").exists():
            experiments.append(exp)
        else:
            print(f"training: experiment '{exp}' not found in {shown_path(CONF_DIR / 'experiment')}; skipped",
                  flush=True)
    return experiments


def run_training(s: SuiteSettings, mechanisms: list[str]) -> int:
    """Run the sweep in a subprocess, its progress streamed to this terminal; returns its exit code."""
    s = SuiteSettings.of(s)
    experiments = _available_experiments(s)
    if not experiments:
        return 0
    # Every registered mechanism trains: one without a conf/attention YAML gets a generated config node.
    trainable = list(mechanisms)
    workers = min(train_workers(s), len(trainable))
    jobs = training_jobs(s, trainable, experiments, workers)
    total = len(trainable) * len(experiments) * len(s.train.seeds)
    print(f"training: {total} runs ({len(trainable)} mechanisms x {experiments} x seeds {s.train.seeds}); "
          "runs with an ok record are skipped", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env[WORKDIR_ENV] = os.getcwd()  # the runs' log lines show paths relative to where the suite was started
    # The runs start where the suite was started: caches, Hydra's outputs and plug-in files are found there.
    if workers <= 1:
        print("  $ " + " ".join(jobs[0][1]), flush=True)
        return subprocess.run(jobs[0][1], cwd=os.getcwd(), env=env, check=False).returncode
    print(f"  {workers} worker processes x {int(s.train.threads_per_worker or 1)} torch thread(s):", flush=True)
    for label, cmd in jobs:
        print(f"  [{label}] $ " + " ".join(cmd), flush=True)
    return run_jobs(jobs, workers, env=env, cwd=os.getcwd(), total_runs=total)


def run_suite(cfg: dict | None = None) -> dict[str, Any]:
    """Run the stages; returns the settings, the stage times, the training exit code and the report path."""
    s = resolve_suite(cfg)
    started = time.time()
    load_plugins(s.plugins)
    mechanisms = available_attentions() if s.mechanisms == "all" else bench.select_mechanisms(s.mechanisms)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"settings": s, "timings": timings}
    _banner(f"{len(mechanisms)} mechanisms on {s.device} ({s.size} size); results in {shown_path(s.results_dir)}",
            started)
    if "bench" in s.stages:
        _banner("stage 1/3: efficiency benchmark (time and memory vs n, approximation error, peers)", started)
        timings["bench_s"] = _bench_stage(s, mechanisms)
    if "train" in s.stages:
        _banner("stage 2/3: training sweep", started)
        t = time.time()
        result["train_returncode"] = run_training(s, mechanisms)
        timings["train_s"] = time.time() - t
        if result["train_returncode"]:
            print(f"training sweep exited with code {result['train_returncode']}; the report shows what finished",
                  flush=True)
    if "report" in s.stages:
        _banner("stage 3/3: report", started)
        result["report"], timings["report_s"] = _report_stage(s)
    _summary(s, result, started)
    return result


def _bench_settings(s: SuiteSettings, mechanisms: list[str]) -> bench.BenchSettings:
    return bench.resolve_settings({**s.bench, "mechanisms": mechanisms, "device": s.device,
                                   "results_dir": s.results_dir, "plugins": list(s.plugins)})


def _bench_stage(s: SuiteSettings, mechanisms: list[str]) -> float:
    t = time.time()
    bench.run_benchmark(_bench_settings(s, mechanisms))
    return time.time() - t


def _report_stage(s: SuiteSettings) -> tuple[str, float]:
    """(the report page's path relative to the working directory, seconds to build it).

    The slope range and memory budget come from the benchmark's records, as for ``arena-report``."""
    built = report.build_report(s.results_dir, s.report_dir)
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


def main() -> None:
    """``arena-suite``: Hydra app over conf/suite.yaml; no arguments needed."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="suite", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        run_suite(OmegaConf.to_container(cfg, resolve=True))

    prepare()  # plugins=[...] and installed plug-ins, before mechanisms=[...] is resolved
    with one_line_interrupt("arena-suite", "what was recorded is kept; the same command continues from there"):
        _app()


if __name__ == "__main__":
    main()
