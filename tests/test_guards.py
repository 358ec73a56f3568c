"""Guards on what a user types and on what a run left behind (issue 22, "first contact"):

- a key that no mechanism, task or setting reads is one line naming the valid keys, exit 2, before anything runs
  (with or without Hydra's ``+``), in arena-train, arena-bench, arena-suite and arena-report;
- a value of the wrong type (``seed=abc``) and a plug-in that cannot be imported are one line, exit 2;
- a truncated checkpoint is moved aside with a warning naming it, and the run resumes from the other one or
  starts again, ending with the result of an uninterrupted run;
- a plug-in mechanism that returns the wrong shape is refused as it is loaded, naming the plug-in and the mechanism;
- arena-train says on a CPU how long the run will take at least, from the measured matmul rate.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_plugins import _forget, readme_plugin
from test_train import FAKE, make_cfg

import harness.train as train_mod
import harness.train.config as train_config
from attentions import available_attentions
from attentions.testing import ContractViolation, check_output
from harness import plugins, suite
from harness.bench import run as bench_run
from harness.checkpoint import load_checkpoint, load_or_set_aside, save_checkpoint
from harness.measure import matmul_flops_per_s, transformer_step_flops
from harness.plugins import conf_dir
from harness.report import build as report_build
from harness.settings import as_int, check_known
from harness.train import CONF_DIR, run
from harness.train.app import RunNotStarted
from harness.train.config import check_keys, time_estimate
from harness.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py, as test_train


def run_app(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of an app's ``main()`` run in-process with ``argv``."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. keys nothing reads


@pytest.mark.parametrize("bad, expected", [
    ("attention.nb_features=-3", "(did you mean +attention.params.num_features=-3?)"),  # what Hydra hinted at
    ("+attention.nb_features=-3", "(did you mean +attention.params.num_features=-3?)"),  # following the hint
    ("+attention.params.nb_features=-3", "(did you mean +attention.params.num_features=-3?)"),
    ("+trian.steps=5", "(did you mean train?)"),
    ("+train.steps=5", "(did you mean train.max_steps=5?)"),
    ("train.steps=5", "(did you mean train.max_steps=5?)"),
    ("+model.embed_dimm=8", "(did you mean model.embed_dim=8?)"),
    ("+task.factory_x=1", "task takes name, data_seed, params, factory"),
])
def test_arena_train_key_nothing_reads_is_one_line_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                                              bad, expected):
    argv = ["arena-train", *FAKE, "attention=performer", f"results_dir={tmp_path}/results",
            f"hydra.run.dir={tmp_path}/out", bad]
    code, err = run_app(train_mod.main, argv, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("arena-train: unknown key"), err
    assert expected in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_attention_key_names_the_mechanisms_config_fields(tmp_path):
    cfg = OmegaConf.to_container(make_cfg(tmp_path, "attention=performer"))
    cfg["attention"]["nb_features"] = -3
    with pytest.raises(ValueError) as err:
        check_keys(cfg)
    message = str(err.value)
    assert "PerformerConfig" in message and "num_features, orthogonal, kernel, redraw_interval" in message
    assert "num_heads" not in message.split("attention.params:")[1]  # set by the model, not a parameter to set


def test_a_sweep_with_a_key_nothing_reads_trains_nothing(tmp_path, monkeypatch, capsys):
    argv = ["arena-train", "-m", *FAKE, f"results_dir={tmp_path}/results", f"hydra.sweep.dir={tmp_path}/multirun",
            "seed=0,1", "+trian.steps=5"]
    code, err = run_app(train_mod.main, argv, monkeypatch, capsys)
    assert code == 2 and "unknown key 'trian'" in err
    assert not (tmp_path / "results").exists()


def test_each_job_is_checked_where_it_runs(tmp_path, monkeypatch, capsys):
    """A launcher may run jobs in fresh processes: the Hydra task function checks its own config too."""
    monkeypatch.setattr(train_mod, "check_command_line", lambda argv: None)  # as if only the job saw it
    argv = ["arena-train", *FAKE, f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/out",
            "+attention.params.no_such=1"]
    code, err = run_app(train_mod.main, argv, monkeypatch, capsys)
    assert code == 2 and "unknown key 'attention.params.no_such'" in err
    assert not (tmp_path / "results").exists()  # refused before a record


def test_every_recipe_and_mechanism_passes_the_key_check():
    """The check accepts everything the project's own configs hold: every recipe, every mechanism's preset."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for experiment in plugins.available_experiments():
            cfg = OmegaConf.to_container(compose("train", overrides=[f"experiment={experiment}"]))
            for name in available_attentions():
                cfg["attention"]["name"] = name
                check_keys(cfg)


def test_the_key_schema_is_the_yaml_and_the_dataclasses():
    """A backbone field without a line in conf/model/base.yaml (or the reverse) fails here, not in a user's run."""
    schema = train_config.key_schema({"attention": {"name": "full"}, "task": {"name": "listops"}})
    assert set(schema["model"]) == set(OmegaConf.load(conf_dir() / "model" / "base.yaml"))
    assert set(schema["optimizer"]) == set(OmegaConf.load(conf_dir() / "optimizer" / "adamw.yaml"))
    assert "num_train" in schema["task"]["params"] and "seed" not in schema["task"]["params"]


def test_first_job_overrides_make_plain_keys_force_adds_and_keep_groups():
    overrides = train_mod.first_job_overrides(["-m", "attention=full,performer", "seed=0,1", "train.steps=5",
                                               "+x.y=1", "~fault", "hydra.run.dir=o", "hydra/launcher=joblib"])
    assert overrides == ["attention=full", "++seed=0", "++train.steps=5", "+x.y=1", "~fault"]
    assert train_mod.first_job_overrides(["--help"]) is None
    assert train_mod.first_job_overrides(["--cfg", "job"]) is None


@pytest.mark.parametrize("main, argv, expected", [
    (bench_run.main, ["arena-bench", "seed=abc"], "unknown benchmark setting(s) ['seed']"),
    (bench_run.main, ["arena-bench", "+seq_lenz=[4]"], "unknown benchmark setting(s) ['seq_lenz']"),
    (suite.main, ["arena-suite", "seed=abc"], "unknown suite setting(s) ['seed']"),
    (suite.main, ["arena-suite", "+smoke.trian=1", "stages=[report]"], "smoke.trian: nothing reads it"),
    (suite.main, ["arena-suite", "+train.ladder.pointz=1", "stages=[report]"], "did you mean train.ladder.points?"),
    (suite.main, ["arena-suite", "bench.seq_lenz=[1]", "stages=[report]"], "did you mean bench.seq_lens?"),
    (suite.main, ["arena-suite", "train.seeds=[abc]", "stages=[report]"], "invalid 'train.seeds'"),
    (report_build.main, ["arena-report", "results_dri=x"], "did you mean results_dir?"),
])
def test_bench_suite_and_report_refuse_keys_nothing_reads(tmp_path, monkeypatch, capsys, main, argv, expected):
    monkeypatch.chdir(tmp_path)
    code, err = run_app(main, [*argv, f"hydra.run.dir={tmp_path}/out"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "results").exists()


def test_absent_plain_keys_become_force_adds_present_ones_stay():
    bench_yaml = conf_dir() / "bench.yaml"
    argv = ["-m", "seed=abc", "repeats=3", "params.performer.num_features=8", "+x=1", "hydra.run.dir=o"]
    assert plugins.add_absent_keys(argv, bench_yaml) == ["-m", "++seed=abc", "repeats=3",
                                                         "++params.performer.num_features=8", "+x=1",
                                                         "hydra.run.dir=o"]


def test_check_known_and_typed_values_name_the_key():
    check_known(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) s\.trian: .*s takes a, train \(did you mean s\.train"):
        check_known(["trian"], ["train", "a"], "s")
    assert as_int(1e3, "x") == 1000 and as_int(None, "x", optional=True) is None
    for bad in ("abc", 2.5, True, -1):
        with pytest.raises(ValueError, match=r"invalid 'x': must be an integer >= 0"):
            as_int(bad, "x", minimum=0)


# ----------------------------------------------------------------------------- 2. wrong types, missing plug-ins


@pytest.mark.parametrize("bad, expected", [
    ("seed=abc", "invalid 'seed': must be an integer >= 0, got 'abc'"),
    ("train.eval_every=0", "invalid 'train.eval_every': must be an integer >= 1, got 0"),
    ("quiet=yes", "invalid 'quiet': must be true or false, got 'yes'"),
    ("optimizer.lr=fast", "invalid 'optimizer.lr'"),
    ("cpu_allocator=jemalloc", "invalid 'cpu_allocator': 'jemalloc'; allowed: default, reuse"),
])
def test_arena_train_wrong_type_is_one_line_exit_2(tmp_path, monkeypatch, capsys, bad, expected):
    argv = ["arena-train", *FAKE, f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/out", bad]
    code, err = run_app(train_mod.main, argv, monkeypatch, capsys)
    assert code == 2 and err.startswith(f"arena-train: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists()


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """A working folder holding the README's my_attention.py."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "my_attention.py").write_text(readme_plugin())
    yield tmp_path
    _forget(attentions=["my_attention", "bad_shape"], modules=["my_attention", "bad_shape", "broken_plugin"])


@pytest.mark.parametrize("main, app", [(train_mod.main, "arena-train"), (bench_run.main, "arena-bench"),
                                       (suite.main, "arena-suite"), (report_build.main, "arena-report")])
def test_mistyped_plugin_is_one_line_exit_2_in_every_app(plugin_folder, monkeypatch, capsys, main, app):
    code, err = run_app(main, [app, "plugins=[my_attentoin]"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"{app}: plug-in module 'my_attentoin' could not be imported: there is no my_attentoin.py")
    assert str(plugin_folder) in err  # the folder searched
    assert "Did you mean plugins=[my_attention]?" in err and "plugins=[...] lists modules to import" in err


def test_a_plugin_whose_own_code_fails_names_the_file_and_line(plugin_folder):
    (plugin_folder / "broken_plugin.py").write_text("import math\n\nvalue = undefined_name\n")
    with pytest.raises(ValueError) as err:
        plugins.load_plugins(["broken_plugin"])
    assert "plug-in module 'broken_plugin' could not be imported: NameError" in str(err.value)
    assert f"{plugin_folder / 'broken_plugin.py'}:3" in str(err.value)
    (plugin_folder / "needs_pkg.py").write_text("import no_such_package_here\n")
    with pytest.raises(ValueError, match="it imports 'no_such_package_here', which is not installed"):
        plugins.load_plugins(["needs_pkg"])


# ----------------------------------------------------------------------------- 3. truncated checkpoints

RESUMABLE = ("train.checkpoint_every=4", "train.max_steps=14", "model.dropout=0.2")
SAME = ("best_val_acc", "best_step", "test_acc", "final_train_loss", "val_history", "steps")


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def crashed_run(root: Path) -> tuple[dict, Path]:
    """A run killed after step 9 (checkpoints at 4 and 8): its record and checkpoint folder."""
    crashed = run(make_cfg(root, *RESUMABLE, "fault.raise_at_step=9"))
    assert crashed["status"] == "error"
    return crashed, Path(crashed["checkpoint_dir"])


@pytest.fixture(scope="module")
def clean_result(tmp_path_factory):
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return run(make_cfg(tmp_path_factory.mktemp("clean"), *RESUMABLE))


def test_truncated_last_resumes_from_best_to_the_same_result(tmp_path, caplog, clean_result):
    _, folder = crashed_run(tmp_path)
    best_step = load_checkpoint(folder / "best.pt")["step"]
    truncate(folder / "last.pt")
    with caplog.at_level(logging.WARNING):
        resumed = run(make_cfg(tmp_path, *RESUMABLE))
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == best_step
    assert any(str(folder / "last.pt") in r.getMessage() and "moved aside to last.pt.corrupt" in r.getMessage()
               for r in caplog.records)
    assert (folder / "last.pt.corrupt").exists()
    for key in SAME:
        assert resumed[key] == clean_result[key], key


def test_both_truncated_start_again_to_the_same_result(tmp_path, caplog, clean_result):
    _, folder = crashed_run(tmp_path)
    truncate(folder / "last.pt")
    truncate(folder / "best.pt")
    with caplog.at_level(logging.WARNING):
        again = run(make_cfg(tmp_path, *RESUMABLE))
    assert again["status"] == "ok" and again["resumed_from_step"] is None
    assert (folder / "last.pt.corrupt").exists() and (folder / "best.pt.corrupt").exists()
    assert sum("unusable" in r.getMessage() for r in caplog.records) == 2
    for key in SAME:
        assert again[key] == clean_result[key], key


def test_truncated_best_behind_a_good_last_starts_again(tmp_path, clean_result):
    _, folder = crashed_run(tmp_path)
    truncate(folder / "best.pt")
    again = run(make_cfg(tmp_path, *RESUMABLE))
    assert again["status"] == "ok" and again["resumed_from_step"] is None  # the best weights were lost
    for key in SAME:
        assert again[key] == clean_result[key], key


def test_load_or_set_aside(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}}, tmp_path / "c.pt")
    assert torch.equal(load_or_set_aside(path)["model"]["w"], torch.ones(3))
    assert load_or_set_aside(path, required=("optimizer",)) is None and (tmp_path / "c.pt.corrupt").exists()
    assert load_or_set_aside(tmp_path / "none.pt") is None
    (tmp_path / "empty.pt").write_bytes(b"")
    assert load_or_set_aside(tmp_path / "empty.pt") is None and (tmp_path / "empty.pt.corrupt").exists()


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


# ----------------------------------------------------------------------------- 4. the contract on load

BAD_SHAPE = '''
from attentions import Attention, AttentionConfig, register_attention


@register_attention("bad_shape", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                    memory_complexity="O(n^2)")
class BadShape(Attention):
    """Forgets to split the heads again: (batch, seq, heads * dim)."""

    def attend(self, q, k, v, key_padding_mask):
        b, h, n, d = v.shape
        return v.transpose(1, 2).reshape(b, n, h * d)
'''


def test_a_plugin_returning_the_wrong_shape_is_refused_on_load(plugin_folder, monkeypatch, capsys):
    (plugin_folder / "bad_shape.py").write_text(BAD_SHAPE)
    code, err = run_app(bench_run.main, ["arena-bench", "plugins=[bad_shape]", "mechanisms=[bad_shape]"],
                        monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("arena-bench: plug-in module 'bad_shape': attention 'bad_shape' violates the contract "
                          "check 'shapes': batch 2, seq 33: output (2, 33, 16) torch.float32, expected "
                          "(2, 2, 33, 8) torch.float32"), err
    assert not (plugin_folder / "results").exists()


def test_a_good_plugin_loads_and_the_check_leaves_the_rng_alone(plugin_folder):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert plugins.load_plugins(["my_attention"]) == ["my_attention"]
    assert torch.equal(torch.get_rng_state(), state)
    assert check_output("my_attention") is True


def test_every_builtin_mechanism_passes_the_load_check():
    """No false alarm: the eleven are checked (True) or decline the tiny size with their own ValueError (False)."""
    results = {name: check_output(name) for name in available_attentions()}  # raises on a violation
    assert results["full"] is True and results["performer"] is True, results


def test_load_check_names_an_exception_and_a_nonfinite_output():
    from attentions import Attention, AttentionConfig, register_attention

    def define(name, attend):
        cls = type(name, (Attention,), {"attend": attend, "__doc__": name})
        register_attention(name, config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                           memory_complexity="O(n^2)")(cls)

    try:
        define("raises_inside", lambda self, q, k, v, m: q.view(q.shape[0], q.shape[2], -1, 3))
        define("gives_nan", lambda self, q, k, v, m: q * float("nan"))
        with pytest.raises(ContractViolation, match="seq 33: raised RuntimeError"):
            check_output("raises_inside")
        with pytest.raises(ContractViolation, match="non-finite output"):
            check_output("gives_nan")
    finally:
        _forget(attentions=["raises_inside", "gives_nan"])


# ----------------------------------------------------------------------------- 5. how long a run takes at least


def test_matmul_rate_is_measured_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    rate = matmul_flops_per_s()
    assert 1e6 < rate < 1e16 and torch.equal(torch.get_rng_state(), state)
    assert suite.matmul_flops_per_s is matmul_flops_per_s  # one function, shared by the suite


def test_step_flops_by_hand():
    # 2 layers, width 64, qkv 64, mlp 128, 65 positions, batch 32: per token 2 (4 64 64 + 2 64 128) + 4 65 64.
    per_token = 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert transformer_step_flops(embed_dim=64, qkv_dim=64, mlp_dim=128, num_layers=2, length=65, sequences=32,
                                  attention_scores=False) == 3.0 * 2 * per_token * 65 * 32
    assert transformer_step_flops(embed_dim=64, qkv_dim=64, mlp_dim=128, num_layers=2, length=65,
                                  sequences=32) == 3.0 * 2 * (per_token + 4 * 65 * 64) * 65 * 32


def test_time_estimate_is_steps_times_step_flops_over_the_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(train_config, "_matmul_rate", lambda dtype, device, threads: 1e9)
    cfg = make_cfg(tmp_path, "attention=performer", "train.max_steps=5000")
    settings = TrainSettings.from_cfg(cfg)
    from fake_task import build_fake_task

    model = train_config.model_config_for(cfg, build_fake_task("fake", num_train=100, num_val=40, num_test=40,
                                                               max_length=16))
    estimate = time_estimate(settings, model, 5000)
    step = transformer_step_flops(embed_dim=16, qkv_dim=16, mlp_dim=32, num_layers=1, length=17, sequences=16,
                                  attention_scores=False)  # performer: its own work is not counted
    assert estimate["step_flops"] == step and estimate["seconds"] == pytest.approx(5000 * step / 1e9)
    message = estimate["message"]
    assert message.startswith("performer/fake/seed0: 5000 steps will take at least ")
    assert "a lower bound" in message and "1 GFLOP/s float32 matmul rate measured here" in message
    assert "performer's own attention work not counted" in message


def test_arena_train_logs_the_estimate_before_training(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="arena-train"):
        record = run(make_cfg(tmp_path, "log_every=4"))
    assert record["status"] == "ok"
    lines = [r.getMessage() for r in caplog.records]
    first_step = next(i for i, line in enumerate(lines) if "step 4/12" in line)
    estimate = [i for i, line in enumerate(lines) if "12 steps will take at least" in line and "lower bound" in line]
    assert estimate and estimate[0] < first_step


def test_invalid_mechanism_parameter_is_refused_before_the_estimate(tmp_path, caplog):
    """An impossible mechanism parameter stops the run before the time estimate (and the data) are made."""
    with caplog.at_level(logging.INFO, logger="arena-train"), pytest.raises(RunNotStarted, match="num_features"):
        run(make_cfg(tmp_path, "attention=performer", "+attention.params.num_features=-3"))
    assert not [r for r in caplog.records if "will take at least" in r.getMessage()]
