"""Multi-query attention in the suite (issue 26): the recipe ``quick/mqar_causal_mqa``, the decode benchmark's
``decode.num_kv_heads`` and model size ``mqar_causal_mqa``, and the suite leaving out the mechanisms that refuse
grouped keys and values. Tiny sizes; no test asserts a time."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attentions import available_attentions, causal_attentions, get_attention_info
from harness import suite
from harness.bench import decode, decode_models
from harness.bench import run as bench_run
from harness.bench.settings import resolve_settings
from harness.plugins import conf_dir, recipe_file
from harness.store import load_records

TINY = {"mode": "decode", "heads": 2, "head_dim": 8, "progress": False, "print_table": False, "warmup": 2,
        "decode": {"contexts": [16, 32], "batches": [1], "tokens": 32, "scopes": ["mechanism"],
                   "model_sizes": ["mqar_causal"], "recompute_contexts": []}}


def scan(tmp_path, mechanisms, **decode_settings):
    return {**TINY, "mechanisms": mechanisms, "results_dir": str(tmp_path / "r"),
            "decode": {**TINY["decode"], **decode_settings}}


def records(tmp_path) -> list[dict]:
    return [json.load(open(p)) for p in load_records(tmp_path / "r", kind="decode")["_path"]]


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ----------------------------------------------------------------------------- the recipe


def test_the_mqa_recipe_is_the_causal_recipe_with_one_key_value_head():
    mqa = OmegaConf.to_container(compose_train("experiment=quick/mqar_causal_mqa", "attention=full"))
    plain = OmegaConf.to_container(compose_train("experiment=quick/mqar_causal", "attention=full"))
    assert mqa["model"]["num_kv_heads"] == 1 and plain["model"]["num_kv_heads"] is None
    mqa["model"]["num_kv_heads"] = None
    assert mqa == plain  # inherited through Hydra defaults: nothing else differs
    # The plain-YAML reading (the suite and the decode sizes, which cannot compose) sees the same.
    assert recipe_file("quick/mqar_causal_mqa")["model"] == {**recipe_file("quick/mqar_causal")["model"],
                                                             "num_kv_heads": 1}
    assert suite.recipe_is_causal("quick/mqar_causal_mqa") and suite.recipe_groups_kv("quick/mqar_causal_mqa")
    assert not suite.recipe_groups_kv("quick/mqar_causal")
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        recipe_file("quick/nothing_here")


# ----------------------------------------------------------------------------- the suite


def test_the_suite_leaves_out_the_mechanisms_refusing_groups_for_the_mqa_recipe_with_why(tmp_path):
    refused = [m for m in causal_attentions() if get_attention_info(m).grouped_kv == "refused"]
    assert "reformer" in refused
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu", "size": "extended"})
    mechanisms = available_attentions()
    parts = {tag: rest for tag, *rest in suite.sweep_parts(s, mechanisms, ["quick/mqar_causal",
                                                                             "quick/mqar_causal_mqa"])}
    assert parts["causal"][0] == causal_attentions()  # the plain decoder recipe keeps reformer
    takers = [m for m in causal_attentions() if m not in refused]
    assert parts["causal-gqa"] == [takers, ["quick/mqar_causal_mqa"], [], [0, 1]]
    # The part's line names each mechanism left out, with why.
    text = suite.left_out_text(mechanisms, takers, "quick/mqar_causal_mqa")
    assert "reformer (refuses grouped keys and values)" in text and "linformer (no causal form)" in text
    why = suite.left_out_of(mechanisms, causal=True, grouped=True)
    assert why["reformer"].startswith("refuses grouped keys and values: its keys are its queries")
    assert "reformer" not in suite.left_out_text(mechanisms, causal_attentions(), "quick/mqar_causal")


def test_the_training_stage_says_which_mechanisms_the_mqa_recipe_leaves_out(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(suite, "run_jobs", lambda jobs, workers, **kw: ran.extend(jobs) or 0)
    s = suite.resolve_suite({"results_dir": str(tmp_path), "device": "cpu",
                             "train": {"experiments": ["quick/mqar_causal_mqa"]}})
    assert suite.run_training(s, ["full", "reformer", "linformer"]) == 0  # nothing failed: exit status 0
    out = capsys.readouterr().out
    assert "training [causal-gqa]: 1 mechanisms x ['quick/mqar_causal_mqa']" in out
    assert "left out: reformer (refuses grouped keys and values), linformer (no causal form)" in out
    assert ran and all("attention=full" in cmd for _, cmd in ran)


# ----------------------------------------------------------------------------- the decode benchmark


def test_decode_cells_record_their_kv_heads_and_are_not_reused_across_kv_heads(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "disturbed", lambda times: False)  # a noisy cell is measured again: not this test's
    bench_run.run_benchmark(scan(tmp_path, ["full"], num_kv_heads=[None]))
    plain = {r["context"]: r for r in records(tmp_path)}
    assert all(r["num_kv_heads"] is None and r["kv_heads"] == 2 for r in plain.values())
    # A scan of one key-value head measures its own cells: none of the plain ones is reused for it.
    bench_run.run_benchmark(scan(tmp_path, ["full"], num_kv_heads=[None, 1]))
    got = records(tmp_path)
    assert len(got) == 4
    grouped = {r["context"]: r for r in got if r["num_kv_heads"] == 1}
    assert set(grouped) == {16, 32} and all(r["status"] == "ok" for r in grouped.values())
    for context, r in grouped.items():
        assert r["kv_heads"] == 1 and r["heads"] == 2 and r["attention_params"]["num_kv_heads"] == 1
        assert r["record_id"] != plain[context]["record_id"] and ".kv1." in r["record_id"]
        # State bytes as measured: a shared mechanism keeps one cache per key-value head, an expanded one the
        # repeated copies (as many bytes as without groups).
        shared = get_attention_info("full").grouped_kv == "shared"
        expected = plain[context]["state_bytes_per_seq"] // (2 if shared else 1)
        assert r["state_bytes_per_seq"] == expected
    # The same scan again reuses all four; the plain cells' ids are those of a scan without num_kv_heads.
    monkeypatch.setattr(decode, "_measure", lambda *a, **k: pytest.fail("a stored cell was measured again"))
    df = bench_run.run_benchmark(scan(tmp_path, ["full"], num_kv_heads=[None, 1]))
    assert sorted(df["record_id"]) == sorted(r["record_id"] for r in got)


def test_a_mechanism_refusing_groups_gets_unsupported_cells_saying_why(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "_measure", lambda *a, **k: pytest.fail("a refused cell was measured"))
    bench_run.run_benchmark(scan(tmp_path, ["reformer"], num_kv_heads=[1]))
    got = records(tmp_path)
    assert len(got) == 2 and all(r["status"] == "unsupported" and r["num_kv_heads"] == 1 for r in got)
    assert all("refuses grouped keys and values" in r["reason"] and "keys are its queries" in r["reason"]
               for r in got)


def test_the_mqa_model_size_is_the_mqa_recipes_model(tmp_path):
    config = decode_models.recipe_model_config("full", "mqar_causal_mqa")
    assert config["num_kv_heads"] == 1
    assert {**config, "num_kv_heads": None} == decode_models.recipe_model_config("full", "mqar_causal")
    assert decode_models.size_kv_heads("mqar_causal_mqa") == 1 and decode_models.size_kv_heads("large") is None
    bench_run.run_benchmark(scan(tmp_path, ["full", "reformer"], scopes=["model"], model_sizes=["mqar_causal_mqa"],
                                 contexts=[16, 32]))
    got = {(r["mechanism"], r["context"]): r for r in records(tmp_path)}
    full = got[("full", 32)]
    assert full["status"] == "ok", full["reason"]
    assert full["model_config"]["num_kv_heads"] == 1 and full["num_kv_heads"] == 1 and full["kv_heads"] == 1
    assert full["attention_params"]["num_kv_heads"] == 1
    assert got[("reformer", 32)]["status"] == "unsupported"
    assert "refuses grouped keys and values" in got[("reformer", 32)]["reason"]


@pytest.mark.parametrize(("given", "message"), [
    ([3], "decode.num_kv_heads must be a non-empty list of null (= heads) or integers dividing heads=4"),
    ([], "decode.num_kv_heads must be a non-empty list"),
    ([0], "decode.num_kv_heads must be"),
    ("1", "decode.num_kv_heads must be"),
])
def test_bad_num_kv_heads_are_one_line_errors(given, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_settings({"mode": "decode", "decode": {"num_kv_heads": given}})


def test_num_kv_heads_equal_to_heads_is_the_plain_row():
    s = resolve_settings({"mode": "decode", "heads": 4, "decode": {"num_kv_heads": [None, 4, 2, 1, 2]}})
    assert s.decode.num_kv_heads == [None, 2, 1]
    rows = [r for r in decode.rows_of(s, ["full"]) if not r.forced_recompute]
    assert [r.num_kv_heads for r in rows if r.scope == "mechanism" and r.batch == 1] == [None, 2, 1]
    assert [r.num_kv_heads for r in rows if r.model_size == "mqar_causal"] == [None, None]  # batches 1 and 8
