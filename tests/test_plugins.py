"""Plug-ins: a mechanism defined outside the package is trained, benchmarked and reported like the eleven.

The plug-in is the README's own ``my_attention.py`` ("Benchmark your own attention"), written into a
temporary folder outside the package; an entry-point plug-in comes from a throwaway installed
distribution (a ``*.dist-info`` on ``sys.path``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from test_train import FAKE

from attentions import Attention, AttentionConfig, available_attentions, register_attention
from attentions import registry as attention_registry
from attentions.testing import check_mechanism
from harness import plugins
from harness.bench import run_benchmark
from harness.report import build_report
from harness.report.groups import settings as report_settings
from harness.suite import resolve_suite, train_command
from harness.train import CONF_DIR, hashed_config, run
from harness.train.config import recipe_config
from tasks import available_tasks
from tasks import base as task_base

ROOT = Path(__file__).resolve().parents[1]


def readme_plugin() -> str:
    """The ``my_attention.py`` shown in the README."""
    found = re.search(r"```python\n# my_attention.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert found, "README lost its my_attention.py example"
    return found.group(1)


def _forget(attentions=(), tasks=(), modules=()) -> None:
    repo = ConfigStore.instance().repo
    for name in attentions:
        attention_registry._REGISTRY.pop(name, None)
        repo.get("attention", {}).pop(f"{name}.yaml", None)
    for name in tasks:
        task_base._REGISTRY.pop(name, None)
        repo.get("task", {}).pop(f"{name}.yaml", None)
    for module in modules:
        for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
            del sys.modules[key]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder (not in the package) holding the README's plug-in file."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "my_attention.py").write_text(readme_plugin())
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield folder
    _forget(attentions=["my_attention"], modules=["my_attention"])


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_readme_plugin_is_about_thirty_lines():
    assert len(readme_plugin().splitlines()) <= 32


def test_readme_plugin_trains_benchmarks_and_reports(workdir):
    # What `arena-train attention=my_attention plugins=[my_attention]` does before Hydra composes.
    assert plugins.prepare(["attention=my_attention", "plugins=[my_attention]"]) == ["my_attention"]
    assert "my_attention" in available_attentions()
    assert check_mechanism("my_attention")[-1] == "memory_growth"  # the contract, memory included

    results = workdir / "results"
    cfg = compose_train(*FAKE, "attention=my_attention", "plugins=[my_attention]", f"results_dir={results}",
                        f"cache_dir={workdir / 'cache'}")
    assert OmegaConf.to_container(cfg.attention) == {"name": "my_attention", "params": {}}  # no YAML needed
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["attention"] == "my_attention" and record["plugins"] == ["my_attention"]
    assert record["config"]["plugins"] == ["my_attention"]

    cells = run_benchmark({"smoke": True, "mechanisms": ["full", "my_attention"], "plugins": ["my_attention"],
                           "results_dir": str(results), "approx": {"enabled": False},
                           "peers": {"enabled": False}, "progress": False, "print_table": False},
                          log=lambda line: None)
    mine = cells[cells["mechanism"] == "my_attention"]
    assert len(mine) == 4 and (mine["outcome"] == "ok").all()  # 2 lengths x 2 passes

    built = build_report(str(results), str(workdir / "report"))
    page = (Path(built["out"]) / "report.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| my_attention |")]
    assert len(rows) >= 3, page  # the accuracy table and the time and memory tables at least
    assert any("—" not in row for row in rows)


def test_plugins_do_not_change_the_run_hash(workdir):
    plugins.prepare(["plugins=[my_attention]"])
    base = [*FAKE, "attention=full"]
    without, with_plugin = compose_train(*base), compose_train(*base, "plugins=[my_attention]")
    assert hashed_config(without) == hashed_config(with_plugin)
    assert recipe_config(without) == recipe_config(with_plugin)  # one comparison in the report


def test_bench_cells_with_and_without_plugins_are_one_setting():
    cell = {"kind": "bench", "mechanism": "full", "pass": "fwd", "n": 64, "batch": 1, "heads": 2, "head_dim": 8,
            "dtype": "float32", "device": "cpu", "created_at": "2026-01-01T00:00:00+00:00", "status": "ok"}
    cells = pd.DataFrame([{**cell, "plugins": []}, {**cell, "mechanism": "my_attention", "plugins": ["my_attention"]}])
    assert len(report_settings(cells)) == 1


def test_unknown_attention_lists_plugins_too(workdir):
    plugins.prepare(["plugins=[my_attention]"])
    with pytest.raises(Exception, match=r"(?s)attention/no_such.*Available options.*my_attention"):
        compose_train("attention=no_such")


def test_arena_train_with_an_unloaded_plugin_says_how_to_load_it(workdir, monkeypatch, capsys):
    """attention=my_attention without plugins=[...]: exit 2, naming the unknown mechanism, the registered ones,
    and the fix (the module file is right here)."""
    from harness import train as train_app

    assert plugins.unknown_attention_message(["attention=full,performer", "seed=0"]) is None
    assert plugins.unknown_attention_message(["attention=glob(*)"]) is None  # a Hydra sweep function
    monkeypatch.setattr(sys, "argv", ["arena-train", "attention=full,my_attention", "experiment=smoke/listops"])
    with pytest.raises(SystemExit) as exit_info:
        train_app.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown attention 'my_attention'" in err and "registered are aft, bigbird" in err
    assert "plugins=[my_attention] for ./my_attention.py in this folder" in err


def test_arena_train_with_an_unknown_experiment_lists_the_recipes(monkeypatch, capsys):
    from harness import train as train_app

    assert plugins.unknown_experiment_message(["experiment=quick/mqar,smoke/listops"]) is None
    monkeypatch.setattr(sys, "argv", ["arena-train", "experiment=quick/mqr"])
    with pytest.raises(SystemExit) as exit_info:
        train_app.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'quick/mqr'" in err and "quick/mqar, quick/mqar_causal" in err


def test_plugins_override_parsing():
    parse = plugins.plugins_from_overrides
    assert parse(["attention=x", "plugins=[my_pkg.mod,other]"]) == ["my_pkg.mod", "other"]
    assert parse(["+plugins=single"]) == ["single"]
    assert parse(["plugins=[]"]) == [] and parse(["plugins=null"]) == [] and parse(["seed=1"]) == []
    with pytest.raises(ValueError, match="plugins takes a list of module names"):
        parse(["plugins=a,b"])


def test_missing_plugin_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="plug-in module 'no_such_plugin' could not be imported.*plugins="):
        plugins.load_plugins(["no_such_plugin"])


THROWAWAY_ATTENTION = '''
from attentions import Attention, AttentionConfig, register_attention


@register_attention("throwaway_attention", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                    memory_complexity="O(n^2)")
class Throwaway(Attention):
    """Returns v (enough to be discovered)."""

    def attend(self, q, k, v, key_padding_mask):
        return v
'''

THROWAWAY_TASK = '''
from dataclasses import dataclass

from tasks import Task, TaskConfig, register_task


@dataclass(frozen=True)
class ThrowawayConfig(TaskConfig):
    pass


@register_task("throwaway_task", config=ThrowawayConfig)
class ThrowawayTask(Task):
    """A task class that is only discovered here."""
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution 'throwaway-arena-plugin' on sys.path declaring one attention and one task entry point."""
    site = tmp_path / "site"
    package = site / "throwaway_arena_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "attention.py").write_text(THROWAWAY_ATTENTION)
    (package / "task.py").write_text(THROWAWAY_TASK)
    dist = site / "throwaway_arena_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-arena-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[attention_arena.attentions]\nthrowaway = throwaway_arena_plugin.attention\n\n"
        "[attention_arena.tasks]\nthrowaway = throwaway_arena_plugin.task\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    yield site
    _forget(attentions=["throwaway_attention"], tasks=["throwaway_task"], modules=["throwaway_arena_plugin"])


def test_entry_point_plugins_are_discovered(installed_plugin):
    assert "throwaway_attention" not in available_attentions()
    loaded = plugins.prepare([])  # what every app does: no plugins= needed for an installed package
    assert loaded == []
    assert "throwaway_attention" in available_attentions() and "throwaway_task" in available_tasks()
    cfg = compose_train("attention=throwaway_attention", "task=throwaway_task")
    assert cfg.attention.name == "throwaway_attention" and cfg.task.name == "throwaway_task"


def test_broken_entry_point_names_itself(installed_plugin):
    (installed_plugin / "throwaway_arena_plugin" / "attention.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"entry point 'throwaway'.*throwaway-arena-plugin.*boom"):
        plugins.load_entry_points()


def test_reregistering_the_same_class_replaces_it_another_class_is_an_error():
    def define(doc: str):
        @register_attention("test_twice", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                            memory_complexity="O(n^2)")
        class Twice(Attention):
            __doc__ = doc

        return Twice

    try:
        define("first")
        define("second")  # a reloaded module: same module and qualified name
        assert attention_registry._REGISTRY["test_twice"].description == "second"
        with pytest.raises(ValueError, match="'full' is registered twice: by attentions.full.FullAttention"):
            register_attention("full", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                               memory_complexity="O(n^2)")(type("Other", (Attention,), {}))
    finally:
        attention_registry._REGISTRY.pop("test_twice", None)


def test_suite_hands_plugins_to_every_training_run(tmp_path):
    s = resolve_suite({"results_dir": str(tmp_path), "device": "cpu", "plugins": ["my_attention"]})
    cmd = train_command(s, ["full", "my_attention"], ["smoke/listops"])
    assert "plugins=[my_attention]" in cmd and "attention=full,my_attention" in cmd
    assert not any(c.startswith("plugins=") for c in train_command(resolve_suite({"device": "cpu"}), ["full"],
                                                                        ["smoke/listops"]))


def test_conf_dir_is_the_clone_conf():
    assert plugins.conf_dir() == ROOT / "conf" and Path(CONF_DIR) == ROOT / "conf"


@pytest.mark.slow
def test_arena_suite_with_a_plugin_from_an_empty_folder(workdir):
    # The command of the README (and of CI's wheel check), from a folder outside the clone.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "harness.suite", "size=smoke",
                          "mechanisms=[full,performer,my_attention]", "plugins=[my_attention]"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    page = (workdir / "results" / "smoke" / "report" / "report.md").read_text()
    assert page.count("| my_attention |") >= 5
    assert (workdir / ".arena_cache").is_dir()  # caches in the working folder, not in the clone
