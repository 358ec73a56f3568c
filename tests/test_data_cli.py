"""arena-data check / prepare and arena-train data_root=... on a miniature replica of the files LRA users have."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lra_replica import make_lra_release

from tasks import build_task
from tasks.cache import entry_dir
from tasks.cli import LRA_TASKS, main, recipe_params

REPO = Path(__file__).resolve().parent.parent
SMOKE_MODEL = ["model.embed_dim=16", "model.num_heads=2", "model.qkv_dim=16", "model.mlp_dim=16",
               "model.num_layers=1", "train.max_steps=2", "train.epochs=null", "train.batch_size=2",
               "train.eval_every=2", "train.throughput_warmup=1", "quiet=true"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "lra_release"
    make_lra_release(str(root))
    return root


def test_check_reports_all_six_tasks_ready(release, tmp_path, capsys):
    assert main(["check", str(release), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert out.count("   READY") == 6 and "all 6 task(s) ready" in out
    for name in LRA_TASKS:
        assert f"== {name}" in out
    assert "imgs/0/sample_3.png: empty file (0 bytes)" in out  # skipped files and why
    assert "splits: train 12 | validation 4 | test 4" in out  # ListOps 12/4/4 from the TSVs
    assert "labels train: 0: 9, 1: 9" in out  # Text: label balance after the held-out validation
    assert "held out" in out and "train[90%:]" in out
    assert "example (train[0], label" in out and any(op in out for op in ("[MAX", "[MIN", "[SM", "[MED"))


def test_check_names_what_is_missing_or_unreadable(release, tmp_path, capsys):
    broken = tmp_path / "lra_release"
    shutil.copytree(release, broken)
    os.remove(broken / "tsv_data" / "new_aan_pairs.eval.tsv")
    (broken / "pathfinder128" / "curv_contour_length_14" / "imgs" / "1" / "sample_12.png").write_bytes(b"garbage")
    rc = main(["check", str(broken), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.startswith("not ready: retrieval, pathx")
    reasons = [ln for ln in captured.out.splitlines() if "NOT READY" in ln]
    assert len(reasons) == 2 and "new_aan_pairs.eval.tsv" in reasons[0] and "sample_12.png" in reasons[1]
    assert captured.out.count("   READY") == 4


def test_check_without_root_skips_generation_and_fails_on_retrieval(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["check", "--cache-dir", str(tmp_path / "cache"), "--tasks", "listops", "retrieval"])
    captured = capsys.readouterr()
    assert rc == 1 and "built on first use" in captured.out and "retrieval" in captured.err
    assert not (tmp_path / "cache").exists() or not any(n.startswith("listops") for n in os.listdir(tmp_path / "cache"))


def test_prepare_builds_the_entries_training_loads(release, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "--data-root", str(release), "--cache-dir", str(cache), "text", "pathfinder"]) == 0
    assert "text: ready" in capsys.readouterr().out
    # The recipe's task parameters (lra/text: max_length 1000) and data seed are the ones the sweep will use.
    params, seed = recipe_params("text", "lra")
    assert params == {"max_length": 1000} and seed == 0
    for name in ("text", "pathfinder"):
        task = build_task(name, cache_dir=str(cache), data_root=str(release), seed=0, **recipe_params(name, "lra")[0])
        assert os.path.isdir(entry_dir(str(cache), name, task.cache_settings()))
    assert main(["prepare", "--cache-dir", str(cache), "no_such_task"]) == 1


def test_train_with_data_root_in_process(release, tmp_path):
    from harness.train import CONF_DIR, make_task, run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lra/text", f"data_root={release}",
                                          f"results_dir={tmp_path}/results", f"cache_dir={tmp_path}/cache",
                                          *SMOKE_MODEL])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["steps"] == 2 and record["validation_is_test"] is False
    assert "save_to_disk" in record["data_notes"]["source"]["train"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        alias = compose("train", overrides=["experiment=lra/text", f"data_root={release}",
                                            "+task.params.validation=test", f"results_dir={tmp_path}/results",
                                            f"cache_dir={tmp_path}/cache", *SMOKE_MODEL])
    assert make_task(alias).validation_is_test  # what the record's validation_is_test is read from


@pytest.mark.slow
@pytest.mark.parametrize("task", LRA_TASKS)
def test_arena_train_runs_two_steps_on_each_task(release, tmp_path, task):
    """The command a user runs: python -m harness.train experiment=lra/<task> data_root=... (smoke-sized model)."""
    # Path-X has 16,385 positions: `full` attention on a CPU took over 15 GB there, so a linear mechanism runs it.
    linear = ["attention=performer", "+attention.params.num_features=16"] if task == "pathx" else []
    cmd = [sys.executable, "-m", "harness.train", f"experiment=lra/{task}", f"data_root={release}",
           f"results_dir={tmp_path}/results", f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/out",
           *SMOKE_MODEL, *linear]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    [record_file] = (tmp_path / "results" / "train").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok" and record["steps"] == 2 and record["task"] == task
