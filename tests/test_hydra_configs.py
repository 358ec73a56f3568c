"""conf/: every attention has a YAML with valid keys, every experiment x attention composes and validates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from attentions import available_attentions, get_attention_info, make_config
from harness.model import ModelConfig
from harness.schedules import SCHEDULES
from harness.train import CONF_DIR, attention_params

CONF = Path(CONF_DIR)
CONTRACT_NAMES = {"full", "sliding_window", "longformer", "bigbird", "reformer", "linformer", "performer", "rfa",
                  "aft", "clustered", "memory_compressed"}
ATTENTION_YAMLS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in
                     (CONF / "experiment").rglob("*.yaml"))
TASK_NAMES = ("image", "listops", "mqar", "pathfinder", "pathx", "retrieval", "text")
TOKEN_LEVEL_TASKS = ("mqar",)
# Sequence lengths of the official recipes (docs/LRA.md), so attention params are validated at the real length.
LRA_LENGTHS = {"listops": 2000, "text": 1000, "retrieval": 4000, "image": 1024, "pathfinder": 1024, "pathx": 16384}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {
    "vocab_size", "max_length", "num_classes", "two_sequence", "token_level", "attention", "attention_params", "seed"}


@pytest.fixture(scope="module", autouse=True)
def hydra_initialised():
    """One Hydra initialisation for the module (composition itself is cheap)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def compose_train(*overrides: str, hydra_cfg: bool = False):
    return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_every_registered_mechanism_has_a_yaml_and_every_yaml_a_contract_name():
    assert set(available_attentions()) <= set(ATTENTION_YAMLS)
    assert set(ATTENTION_YAMLS) <= CONTRACT_NAMES


@pytest.mark.parametrize("name", ATTENTION_YAMLS)
def test_attention_yaml_selects_only_valid_parameters(name):
    node = OmegaConf.load(CONF / "attention" / f"{name}.yaml")
    assert set(node) == {"name", "params"} and node.name == name
    if name not in available_attentions():
        pytest.skip(f"'{name}' is not registered yet")
    fields = {f.name for f in dataclasses.fields(get_attention_info(name).config_cls)}
    assert set(node.params) <= fields - {"num_heads", "head_dim", "dropout"}
    # Valid values too, at a typical size (the model supplies heads, head_dim and the length).
    make_config(name, **{"num_heads": 4, "head_dim": 32, "max_seq_len": 1025, **OmegaConf.to_container(node.params)})


def test_task_yamls_name_their_task():
    names = {p.stem for p in (CONF / "task").glob("*.yaml")}
    assert names == set(TASK_NAMES)
    for name in names:
        node = OmegaConf.load(CONF / "task" / f"{name}.yaml")
        assert node.name == name and set(node) == {"name", "data_seed", "params"}


def test_default_config_composes():
    cfg = compose_train()
    assert cfg.attention.name == "full" and cfg.task.name == "listops"
    assert set(cfg.model) <= MODEL_KEYS
    assert cfg.scheduler.name in SCHEDULES and cfg.optimizer.name == "adamw"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_attention(experiment):
    # quick/mqar_causal: mqar's decoder form; quick/mqar_causal_mqa: the same with one key-value head
    task_name = experiment.split("/")[-1].removesuffix("_mqa").removesuffix("_causal")
    for attention in ATTENTION_YAMLS:
        cfg = compose_train(f"experiment={experiment}", f"attention={attention}")
        assert cfg.attention.name == attention
        assert cfg.task.name == task_name
        assert set(cfg.model) <= MODEL_KEYS, set(cfg.model) - MODEL_KEYS
        assert cfg.scheduler.name in SCHEDULES
        if cfg.model.get("causal") and not get_attention_info(attention).supports_causal:
            continue  # a causal recipe runs the mechanisms that have a causal form
        if task_name in TOKEN_LEVEL_TASKS:
            length = cfg.task.params.seq_len
        elif "lra" in experiment:
            length = LRA_LENGTHS[task_name]
        else:
            length = cfg.task.params.get("max_length", LRA_LENGTHS[task_name])
        model = ModelConfig(vocab_size=300, max_length=int(length), num_classes=10, attention=attention,
                            token_level=task_name in TOKEN_LEVEL_TASKS, **OmegaConf.to_container(cfg.model))
        if attention in available_attentions():
            # The mechanism's own validation at the recipe's sizes (head_dim, length incl. CLS).
            keywords = dict(num_heads=model.num_heads, head_dim=model.head_dim, max_seq_len=model.seq_len,
                            dropout=model.attention_dropout, causal=model.causal, num_kv_heads=model.num_kv_heads,
                            **attention_params(cfg))
            if model.kv_heads < model.num_heads and get_attention_info(attention).grouped_kv == "refused":
                with pytest.raises(ValueError, match="num_kv_heads"):  # the suite leaves it out (test_suite.py)
                    make_config(attention, **keywords)
                continue
            make_config(attention, **keywords)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("smoke/")])
def test_smoke_recipes_evaluate_on_more_than_one_class(experiment, tmp_path):
    """A single-class validation or test split makes the smoke accuracy meaningless (and equal to majority)."""
    import numpy as np

    from harness.train import make_task

    cfg = compose_train(f"experiment={experiment}", f"cache_dir={tmp_path}")
    task = make_task(cfg)
    task.prepare()
    for split in ("validation", "test"):
        assert len(np.unique(np.asarray(task.labels(split)))) >= 2, (experiment, split)


def test_lra_recipes_match_lra_md():
    expected = {
        "listops": dict(batch_size=32, max_steps=5000, lr=0.05, embed_dim=512, mlp_dim=1024, num_heads=8,
                        num_layers=4, pooling="cls", scheduler="rsqrt"),
        "text": dict(batch_size=32, max_steps=20000, lr=0.05, embed_dim=256, mlp_dim=1024, num_heads=4,
                     num_layers=4, pooling="cls", scheduler="rsqrt", warmup=8000),
        "retrieval": dict(batch_size=32, max_steps=5000, embed_dim=128, mlp_dim=512, num_heads=4, num_layers=4),
        "image": dict(batch_size=256, lr=5e-4, epochs=200, warmup=175, scheduler="cosine", num_layers=1, num_heads=8,
                      embed_dim=128, qkv_dim=64, mlp_dim=128, dropout=0.3, attention_dropout=0.2, pooling="cls",
                      pos_emb="learned"),
        "pathfinder": dict(batch_size=512, lr=1e-3, epochs=200, num_layers=4, num_heads=4, embed_dim=32, mlp_dim=32,
                           pooling="mean", pos_emb="sinusoidal"),
        "pathx": dict(batch_size=64, num_layers=1, num_heads=2, embed_dim=32, pooling="mean", pos_emb="learned"),
    }
    for task, want in expected.items():
        cfg = compose_train(f"experiment=lra/{task}")
        got = {**cfg.model, **cfg.train, "lr": cfg.optimizer.lr, "scheduler": cfg.scheduler.name,
               "warmup": cfg.scheduler.warmup_steps}
        for key, value in want.items():
            assert got[key] == value, (task, key, got[key], value)
    assert compose_train("experiment=lra/text").task.params.max_length == 1000
    assert compose_train("experiment=lra/image").train.grad_clip is None


def test_attention_overrides_apply_to_the_selected_mechanism_only():
    cfg = compose_train("experiment=quick/listops", "attention=linformer")
    assert attention_params(cfg) == {"proj_dim": 32}
    cfg = compose_train("experiment=quick/listops", "attention=linformer", "+attention.params.proj_dim=8")
    assert attention_params(cfg) == {"proj_dim": 8}  # the command line wins
    assert attention_params(compose_train("experiment=quick/listops", "attention=full")) == {}


def test_command_line_wins_over_experiment():
    cfg = compose_train("experiment=lra/listops", "model.num_layers=6", "train.batch_size=8")
    assert cfg.model.num_layers == 6 and cfg.train.batch_size == 8 and cfg.model.embed_dim == 512


@pytest.mark.parametrize("group,bad", [("attention", "fulll"), ("task", "listopz"), ("experiment", "quick/nope")])
def test_unknown_choice_lists_the_available_ones(group, bad):
    with pytest.raises(MissingConfigException) as info:
        compose_train(f"{group}={bad}")
    message = str(info.value)
    assert bad in message
    if group == "attention":
        assert all(name in message for name in ATTENTION_YAMLS)
    if group == "task":
        assert all(name in message for name in TASK_NAMES)


def test_joblib_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_train("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launcher_composes(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train(f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu"
    if launcher == "slurm":  # our preset: one GPU per run
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min > 0


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("smoke/")])
def test_smoke_recipes_write_to_their_own_store(experiment):
    """A smoke run is a check, not a benchmark: its records never land beside a benchmark's."""
    assert compose_train(f"experiment={experiment}").results_dir == "results/smoke"
    assert compose_train(f"experiment={experiment}", "results_dir=elsewhere").results_dir == "elsewhere"


@pytest.mark.parametrize("experiment,expected", [("quick/mqar_causal", "beca3131c67086ac"),
                                                 ("quick/mqar", "22e5c81b83ba2043")])
def test_a_new_key_at_its_neutral_value_keeps_earlier_run_hashes(experiment, expected):
    # The hashes these runs had before model.num_kv_heads existed (commit 8bf5c0f): a store's records of them
    # are reused by a re-run. Setting the key makes another run.
    from harness.store import config_hash
    from harness.train import hashed_config
    from harness.train.config import recipe_config

    cfg = compose_train(f"experiment={experiment}", "attention=full", "seed=0")
    assert config_hash(hashed_config(cfg)) == expected
    assert "num_kv_heads" not in recipe_config(cfg)["model"]
    grouped = compose_train(f"experiment={experiment}", "attention=full", "seed=0", "model.num_kv_heads=1")
    assert config_hash(hashed_config(grouped)) != expected
    assert recipe_config(grouped)["model"]["num_kv_heads"] == 1
