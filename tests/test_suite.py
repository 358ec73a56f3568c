"""harness.suite: settings, the training command, and the suite end to end in smoke size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attentions import available_attentions
from harness import suite
from harness.store import load_records


def test_resolve_suite_sizes():
    default = suite.resolve_suite({"device": "cpu"})
    assert default["bench"]["seq_lens"] == [256, 512, 1024, 2048, 4096]
    assert default["train"]["experiments"] == ["quick/listops", "quick/mqar"]
    assert default["train"]["seeds"] == [0, 1]  # at least two seeds: spreads and ties in the report
    assert Path(default["report_dir"]) == Path(default["results_dir"]) / "report"
    smoke = suite.resolve_suite({"size": "smoke", "device": "cpu"})
    assert smoke["bench"]["smoke"] is True and "seq_lens" not in smoke["bench"]
    assert smoke["train"]["experiments"] == ["smoke/listops", "smoke/mqar"]
    lra = suite.resolve_suite({"size": "lra", "device": "cpu"})
    assert lra["train"]["experiments"] == [f"lra/{t}" for t in ("listops", "text", "retrieval", "image",
                                                                 "pathfinder", "pathx")]
    assert lra["train"]["seeds"] == [0, 1, 2] and lra["train"]["ladder"]["points"] == []
    # A check never pollutes a benchmark: the smoke size has its own store unless one is named.
    assert Path(smoke["results_dir"]) == Path("results/smoke").resolve() != Path(default["results_dir"])
    assert Path(smoke["report_dir"]) == Path("results/smoke/report").resolve()
    named = suite.resolve_suite({"size": "smoke", "device": "cpu", "results_dir": "/tmp/x"})
    assert named["results_dir"] == str(Path("/tmp/x").resolve())
    from harness import bench

    assert bench.resolve_settings({"smoke": True}).results_dir == "results/smoke"
    assert bench.resolve_settings({"smoke": True, "results_dir": "r"}).results_dir == "r"
    cuda = suite.resolve_suite({"device": "cuda", "stages": ["train", "report"]})  # no GPU needed to resolve
    assert cuda["bench"]["seq_lens"][-1] == 16384
    with pytest.raises(ValueError, match="unknown suite setting"):
        suite.resolve_suite({"sizes": "smoke"})
    with pytest.raises(ValueError, match="stages"):
        suite.resolve_suite({"stages": ["plot"]})


def test_suite_recipes_and_attention_configs_exist():
    # The default sweep names Hydra config files owned by the training harness: they must exist.
    for exp in (suite.DEFAULTS["train"]["experiments"] + suite.DEFAULTS["smoke"]["train"]["experiments"]
                + suite.DEFAULTS["lra"]["train"]["experiments"]
                + [suite.DEFAULTS[k]["ladder"]["experiment"] for k in ("train",)]
                + [suite.DEFAULTS["smoke"]["train"]["ladder"]["experiment"]]):
        assert (suite.CONF_DIR / "experiment" / f"{exp}.yaml").exists(), exp
    for name in available_attentions():
        assert (suite.CONF_DIR / "attention" / f"{name}.yaml").exists(), name


def test_train_command_is_one_multirun_over_recipes_and_mechanisms(tmp_path):
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu", "train": {"seeds": [0, 1]}})
    cmd = suite.train_command(s, ["full", "performer"], ["quick/listops", "quick/pathfinder"])
    assert cmd[1:4] == ["-m", "harness.train", "-m"]
    assert "experiment=quick/listops,quick/pathfinder" in cmd
    assert "attention=full,performer" in cmd and "seed=0,1" in cmd
    assert f"results_dir={tmp_path.resolve()}" in cmd and "device=cpu" in cmd


def test_cpu_sweep_splits_the_mechanisms_between_parallel_workers(tmp_path):
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu"})
    assert suite.train_workers(s) == 2 and s["train"]["threads_per_worker"] == 1
    mechanisms = available_attentions()
    exps = ["quick/listops", "quick/pathfinder"]
    groups = suite.split_mechanisms(mechanisms, 2)
    assert len(groups) == 2 and sorted(groups[0] + groups[1]) == sorted(mechanisms)
    assert abs(len(groups[0]) - len(groups[1])) <= 1
    assert suite.split_mechanisms(["full"], 2) == [["full"]]  # never an empty group
    jobs = suite.training_jobs(s, mechanisms, exps, workers=2)
    assert [label for label, _ in jobs] == ["w1", "w2"]
    sweep_dirs = set()
    for i, ((_, cmd), group) in enumerate(zip(jobs, groups)):
        assert f"attention={','.join(group)}" in cmd and "num_threads=1" in cmd and "quiet=true" in cmd
        assert "seed=0,1" in cmd and "device=cpu" in cmd
        # Both recipes in each worker; the second starts with the other one (different data first).
        assert f"experiment={','.join(exps if i == 0 else exps[::-1])}" in cmd
        sweep_dirs |= {c for c in cmd if c.startswith("hydra.sweep.dir=")}
    assert len(sweep_dirs) == 2  # no two workers share a Hydra sweep dir
    # One worker: the whole sweep as one multirun, with torch's default threads.
    (label, cmd), = suite.training_jobs(s, mechanisms, exps, workers=1)
    assert f"attention={','.join(mechanisms)}" in cmd and not any(c.startswith("num_threads") for c in cmd)
    # CUDA: one GPU, one process.
    assert suite.train_workers({**s, "device": "cuda"}) == 1
    assert suite.train_workers({**s, "train": {**s["train"], "workers": 1}}) == 1


def test_sweep_parts_give_causal_recipes_only_causal_mechanisms_and_the_ladder(tmp_path):
    from attentions import causal_attentions

    assert suite.recipe_is_causal("quick/mqar_causal") and not suite.recipe_is_causal("quick/mqar")
    assert not suite.recipe_is_causal("quick/listops")
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu"})
    mechanisms = available_attentions()
    parts = {tag: rest for tag, *rest in suite.sweep_parts(s, mechanisms, ["quick/listops", "quick/mqar"])}
    # The default: ListOps (its own overrides: a part of its own) and bidirectional MQAR with every mechanism,
    # and the ladder rung on the same MQAR recipe.
    assert list(parts) == ["bidir0", "bidir", "ladder-L64-k16"]
    assert parts["bidir0"] == [mechanisms, ["quick/listops"], ["train.max_steps=500"], [0, 1]]
    assert parts["bidir"] == [mechanisms, ["quick/mqar"], [], [0, 1]]
    assert parts["ladder-L64-k16"] == [mechanisms, ["quick/mqar"],
                                       ["task.params.seq_len=64", "task.params.num_kv_pairs=16"], [0]]
    # The ladder is a rung of a recipe the sweep runs: with MQAR left out, no rung either.
    assert [tag for tag, *_ in suite.sweep_parts(s, mechanisms, ["quick/listops"])] == ["bidir0"]
    # A causal recipe runs only the mechanisms with a causal form, and so does a ladder on it.
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu",
                             "train": {"ladder": {"experiment": "quick/mqar_causal"}}})
    parts = {tag: rest for tag, *rest in suite.sweep_parts(s, mechanisms, ["quick/listops", "quick/mqar_causal"])}
    assert parts["causal"] == [causal_attentions(), ["quick/mqar_causal"], [], [0, 1]]
    assert list(parts) == ["bidir0", "causal", "ladder-L64-k16"]
    assert "linformer" not in parts["causal"][0] and "clustered" not in parts["causal"][0]
    assert parts["ladder-L64-k16"][0] == causal_attentions()
    # Each part's jobs carry its overrides and a sweep dir of their own.
    jobs = suite.training_jobs(s, ["full", "rfa"], ["quick/mqar_causal"], 2, tag="ladder-L64-k16",
                               extra=["task.params.num_kv_pairs=16"])
    assert [label for label, _ in jobs] == ["ladder-L64-k16:w1", "ladder-L64-k16:w2"]
    assert all("task.params.num_kv_pairs=16" in cmd for _, cmd in jobs)
    assert all(any(c.startswith("hydra.sweep.dir=") and "ladder-L64-k16" in c for c in cmd) for _, cmd in jobs)


def test_lra_size_on_a_cpu_estimates_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(suite, "matmul_flops_per_s", lambda: 1e11)
    result = suite.run_suite({"size": "lra", "device": "cpu", "results_dir": str(tmp_path / "r")})
    out = capsys.readouterr().out
    assert "198 runs" in out and "nothing is started" in out and "hydra/launcher=slurm" in out
    assert result["estimate"]["runs"] == 198 and result["estimate"]["seconds"] > 86400 * 365
    assert not (tmp_path / "r").exists()  # no stage ran
    # The work of one recipe, by hand: LRA ListOps, 5000 steps of batch 32 x 2000 tokens, 4 layers.
    steps, flops = suite.recipe_step_flops("lra/listops")
    per_token = 2 * (4 * 512 * 512 + 2 * 512 * 1024) + 4 * 2000 * 512
    assert steps == 5000 and flops == 3.0 * 4 * per_token * 2000 * 32


def test_run_jobs_runs_every_job_with_at_most_n_at_once_and_prefixes_lines():
    import sys
    import time

    code = "import sys, time; print('hello', sys.argv[1]); time.sleep(0.8); sys.exit(int(sys.argv[2]))"
    jobs = [(f"j{i}", [sys.executable, "-c", code, f"j{i}", "3" if i == 2 else "0"]) for i in range(4)]
    lines: list[str] = []
    t0 = time.time()
    rc = suite.run_jobs(jobs, 2, echo=lines.append)
    wall = time.time() - t0
    assert rc == 3  # a failing job's code comes back; the others still ran
    for i in range(4):
        assert f"[j{i}] hello j{i}" in lines, lines
    assert sum("jobs done" in line for line in lines) == 4 and any("4/4 jobs done" in line for line in lines)
    assert 1.6 <= wall < 3.0  # two at a time: two rounds of 0.8 s, not four (3.2 s), not one


def test_run_done_lines_are_counted():
    ok = "[2026-01-01 00:00:00,000][arena-train][INFO] - aft/listops/seed0: ok  best val 0.1 (step 5) -> x"
    skip = "[2026-01-01 00:00:00,000][arena-train][INFO] - skipping full/pathfinder/seed1: config abc already"
    start = "[2026-01-01 00:00:00,000][arena-train][INFO] - run aft/listops/seed0 (abc): checkpoints in x"
    step = "[2026-01-01 00:00:00,000][arena-train][INFO] - aft/listops/seed0 step 50/1500 loss 2.1"
    assert suite.RUN_DONE.search(ok) and suite.RUN_DONE.search(skip)
    assert not suite.RUN_DONE.search(start) and not suite.RUN_DONE.search(step)


def test_unknown_experiment_is_an_error_before_anything_runs(tmp_path):
    """A recipe without conf/experiment/<name>.yaml is named, with the available ones, before any stage."""
    for train in ({"experiments": ["quick/mqr"]}, {"recipe_overrides": {"quick/mqr": ["train.max_steps=1"]}},
                  {"ladder": {"experiment": "quick/mqr", "points": [[64, 16]], "seeds": [0]}}):
        with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['quick/mqr'\].*available: .*quick/listops, "
                                             r"quick/mqar"):
            suite.run_suite({"results_dir": str(tmp_path / "r"), "device": "cpu", "train": train})
    with pytest.raises(ValueError, match=r"\['smoke/nope'\]"):
        suite.resolve_suite({"size": "smoke", "device": "cpu", "train": {"experiments": ["smoke/nope"]}})
    assert not (tmp_path / "r").exists()
    assert {"quick/listops", "quick/mqar", "smoke/listops", "lra/pathx"} <= set(suite.available_experiments())


def _compose_suite(*overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(suite.CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="suite", overrides=list(overrides)), resolve=True)


def test_conf_suite_yaml_matches_the_code_defaults():
    assert _compose_suite() == suite.DEFAULTS


def test_user_settings_win_over_the_size_preset():
    """`size=smoke train.experiments=[smoke/listops]` runs that recipe only, through the CLI's composed config
    (every key handed over) and through resolve_suite({...}) alike; values left alone take the preset."""
    for cfg in (_compose_suite("size=smoke", "device=cpu", "train.experiments=[smoke/listops]", "train.seeds=[3]",
                               "bench.seq_lens=[16]", "results_dir=/tmp/x"),
                {"size": "smoke", "device": "cpu", "train": {"experiments": ["smoke/listops"], "seeds": [3]},
                 "bench": {"seq_lens": [16]}, "results_dir": "/tmp/x"}):
        s = suite.resolve_suite(cfg)
        assert s.train.experiments == ["smoke/listops"] and s.train.seeds == [3]
        assert s.train.ladder["experiment"] == "smoke/mqar"  # not set: the preset's
        assert s.bench["seq_lens"] == [16] and s.bench["smoke"] is True and "repeats" not in s.bench
        assert s.results_dir == str(Path("/tmp/x").resolve())
        assert suite._bench_settings(s, ["full"]).seq_lens == [16]
    with pytest.raises(ValueError, match=r"\['quick/mqr'\]"):  # no longer replaced by the smoke recipes
        suite.resolve_suite(_compose_suite("size=smoke", "device=cpu", "train.experiments=[quick/mqr]"))
    lra = suite.resolve_suite(_compose_suite("size=lra", "device=cpu", "train.seeds=[0]"))
    assert lra.train.seeds == [0] and lra.train.experiments[0] == "lra/listops"
    cuda = suite.resolve_suite(_compose_suite("device=cuda", "stages=[train,report]", "bench.seq_lens=[512]"))
    assert cuda.bench["seq_lens"] == [512] and cuda.bench["repeats"] == 5  # the CUDA range yields to the user


def test_cuda_without_cuda_is_a_settings_error_naming_the_training_only_route(monkeypatch):
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^invalid 'device': cuda requested but torch.cuda.is_available\(\) is "
                                         r"False; use device=cpu; to submit only the training to a cluster from "
                                         r"here: stages=\[train,report\]$"):
        suite.resolve_suite({"size": "lra", "device": "cuda"})
    # Without the benchmark stage nothing runs on this machine's device: the training may go to a cluster.
    s = suite.resolve_suite({"size": "lra", "device": "cuda", "stages": ["train", "report"]})
    assert s.device == "cuda"


def test_suggested_slurm_command_parses_and_composes(monkeypatch):
    """The command the size=lra estimate suggests composes through Hydra (the unquoted list did not)."""
    import shlex

    args = shlex.split(suite.LRA_SLURM_COMMAND)
    assert args[0] == "arena-suite"
    cfg = _compose_suite(*args[1:])
    assert cfg["train"]["overrides"] == ["hydra/launcher=slurm"] and cfg["stages"] == ["train", "report"]
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: False)
    s = suite.resolve_suite(cfg)  # resolves on a machine without a GPU
    cmd = suite.train_command(s, ["full"], ["lra/listops"])
    assert cmd[-1] == "hydra/launcher=slurm" and "device=cuda" in cmd
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(cmd[4:])  # what arena-train's Hydra receives
    assert any(o.key_or_group == "hydra/launcher" and o.value() == "slurm" for o in parsed)


@pytest.mark.parametrize("args, message", [
    (["mechanisms=[nope]"], "unknown mechanism(s) ['nope']; registered: "),
    (["size=tiny"], "size must be one of default, smoke, lra, got 'tiny'"),
    (["stages=[plot]"], "stages must be among"),
    (["+bench.dtype=float8"], "dtype must be one of"),
    (["train.experiments=[quick/mqr]"], "unknown experiment(s) ['quick/mqr']"),
    (["+bench.params={sliding_window:{windw:8}}", "mechanisms=[sliding_window]"],
     "params.sliding_window {'windw': 8}: unknown parameter(s) 'windw' for attention 'sliding_window'; allowed: "),
])
def test_cli_settings_errors_are_one_line_exit_2(tmp_path, args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harness.suite", "device=cpu", f"results_dir={tmp_path}/r", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(suite.REPO))})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"arena-suite: {message}") and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "r").exists()


def test_arena_bench_settings_errors_are_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harness.bench", "smoke=true", f"results_dir={tmp_path}/r",
                           "+params={sliding_window:{windw:8}}", "mechanisms=[sliding_window]"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(suite.REPO))})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("arena-bench: params.sliding_window {'windw': 8}: unknown parameter(s) 'windw'")
    assert "allowed: " in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_bench_and_report_stages_in_smoke_size_and_rerun_reuses(tmp_path, capsys):
    cfg = {"size": "smoke", "stages": ["bench", "report"], "results_dir": str(tmp_path / "r"),
           "mechanisms": ["full", "sliding_window"], "device": "cpu",
           "smoke": {"bench": {"smoke": True, "peers": {"enabled": False}, "approx": {"enabled": False},
                               "progress": False, "print_table": False}}}
    result = suite.run_suite(cfg)
    out = capsys.readouterr().out
    report = Path(result["report"])
    assert report.exists() and report.with_suffix(".md").exists()
    assert f"report: {report}" in out and "stage 1/3" in out and "stage 3/3" in out
    records = load_records(tmp_path / "r", kind="bench")
    assert set(records["mechanism"]) == {"full", "sdpa_direct", "sliding_window"}
    stored = {p.name: json.loads(p.read_text()) for p in (tmp_path / "r" / "bench").glob("*.json")}
    first = {name: r["created_at"] for name, r in stored.items()}
    # Cells flagged noisy (a busy machine) are measured again by design; every clean one is reused.
    clean = {name for name, r in stored.items() if not (r.get("noise") or {}).get("noisy")}
    suite.run_suite({**cfg, "stages": ["bench"]})
    again = {p.name: json.loads(p.read_text())["created_at"] for p in (tmp_path / "r" / "bench").glob("*.json")}
    assert again.keys() == first.keys() and clean
    assert {k: again[k] for k in clean} == {k: first[k] for k in clean}  # nothing clean re-measured


@pytest.mark.slow
def test_suite_runs_end_to_end_in_smoke_size(tmp_path):
    # All mechanisms, both smoke recipes, the report: a few minutes on a shared 2-core CPU.
    result = suite.run_suite({"size": "smoke", "results_dir": str(tmp_path / "r"), "device": "cpu"})
    assert result["train_returncode"] == 0
    train = load_records(tmp_path / "r", kind="train")
    assert set(train["attention"]) == set(available_attentions())
    assert set(train["task"]) == {"listops", "mqar"}
    md = Path(result["report"]).with_suffix(".md").read_text()
    for name in available_attentions():
        assert f"| {name} |" in md
    assert result["timings"]["report_s"] < 30


def test_bench_force_reaches_the_benchmark():
    """`arena-suite bench.force=true` measures every cell again (a disturbed run is not reused)."""
    forced = suite.resolve_suite({"device": "cpu", "bench": {"force": True}})
    assert suite._bench_settings(forced, ["full"]).reuse is False
    assert suite._bench_settings(suite.resolve_suite({"device": "cpu"}), ["full"]).reuse is True
