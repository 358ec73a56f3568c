"""harness.report.multiquery: the table "Multi-query attention: recall and decode state" from hand-made training
and decode records (both configurations, one missing, one refused, one failed), and its figure."""

from __future__ import annotations

import pytest

from harness.report import build_report
from harness.report.multiquery import MQA_CONTEXT, multiquery_table
from harness.store import load_records, now_iso, write_record

MHA, MQA = "quick/mqar_causal", "quick/mqar_causal_mqa"
MIB = 2**20


def run(attention, experiment, seed, acc, status="ok", steps=800):
    kv = 1 if experiment == MQA else None
    return {"kind": "train", "record_id": f"{attention}.{experiment.replace('/', '-')}.{seed}.{steps}",
            "status": status, "created_at": now_iso(), "attention": attention, "task": "mqar", "seed": seed,
            "experiment": experiment, "test_acc": acc if status == "ok" else None, "best_val_acc": acc,
            "majority_test_acc": 0.019,
            "config": {"task": {"name": "mqar", "params": {"form": "decoder", "seq_len": 64, "num_kv_pairs": 8}},
                       "model": {"num_heads": 4, "num_kv_heads": kv, "causal": True},
                       "train": {"max_steps": steps}}}


def cell(mechanism, scope, kv, state_bytes, status="ok", reason=None, context=MQA_CONTEXT):
    size = {None: "mqar_causal", 1: "mqar_causal_mqa"}[kv] if scope == "model" else None
    ok = status == "ok"
    return {"kind": "decode", "record_id": f"{mechanism}.{scope}.{size}.kv{kv}.c{context}", "status": status,
            "reason": reason, "created_at": now_iso(), "mechanism": mechanism, "scope": scope, "model_size": size,
            "num_kv_heads": kv if scope == "mechanism" else (1 if kv else None), "kv_heads": kv or 4,
            "context": context, "batch": 1, "heads": 4, "head_dim": 16, "dtype": "float32", "device": "cpu",
            "threads": 1, "decode_form": "step" if ok or status != "unsupported" else "step",
            "forced_recompute": False, "state_growth": "linear", "state_filled": "prefill" if ok else None,
            "timing_policy": "plain", "config_changes": [], "tokens": 32,
            "ms_per_token": 1.0 if ok else None, "ms_per_token_p10": 0.9 if ok else None,
            "ms_per_token_p90": 1.1 if ok else None, "tokens_per_s": 1000.0 if ok else None,
            "state_bytes_per_seq": state_bytes if ok else None, "prefill_ms": 5.0 if ok else None}


REFUSED = "refuses grouped keys and values (num_kv_heads=1): its keys are its queries (one shared projection)"


def store(root):
    """full: both runs (two seeds each) and both model cells (a cache per key-value head: a quarter); performer:
    no multi-query run, its bytes from the mechanism alone; reformer: refused, its mqa model cell unsupported;
    aft: its plain run failed, one multi-query seed, no decode cell; a 300-step run of full left out."""
    for seed, (a, b) in enumerate([(0.99, 0.97), (0.98, 0.99)]):
        write_record(run("full", MHA, seed, a), root)
        write_record(run("full", MQA, seed, b), root)
        write_record(run("performer", MHA, seed, 0.30 + 0.02 * seed), root)
        write_record(run("reformer", MHA, seed, 0.07), root)
    write_record(run("full", MHA, 0, 0.20, steps=300), root)  # another setting of the recipe: left out
    write_record(run("aft", MHA, 0, None, status="error"), root)
    write_record(run("aft", MQA, 0, 0.25), root)
    write_record(cell("full", "model", None, 4 * MIB), root)
    write_record(cell("full", "model", 1, 1 * MIB), root)
    write_record(cell("performer", "mechanism", None, 136 * 1024), root)
    write_record(cell("performer", "mechanism", 1, 136 * 1024), root)
    write_record(cell("reformer", "model", None, 4.1 * MIB), root)
    write_record(cell("reformer", "model", 1, None, status="unsupported", reason=REFUSED), root)
    write_record(cell("full", "mechanism", None, 2 * MIB, context=1024), root)  # another context: not read
    return root


def table_of(root):
    return multiquery_table(load_records(root, kind="train"), load_records(root, kind="decode")).set_index(
        "mechanism")


def test_the_table_has_both_configurations_the_missing_and_the_refused(tmp_path):
    table = table_of(store(tmp_path / "r"))
    assert list(table.index) == ["full", "reformer", "performer", "aft"]  # the report's fixed order
    full = table.loc["full"]
    assert full["recall %, kv heads = heads"] == "98.5 ± 0.7 (2 seeds)"  # the 300-step run is not pooled in
    assert full["recall %, kv heads = 1"] == "98.0 ± 1.4 (2 seeds)"
    assert full["change (points)"] == "-0.5 (≈, within the seeds)"
    assert full[f"state / sequence at {MQA_CONTEXT // 1024}K, kv heads = heads"] == "4.0 MiB"
    assert full["kv heads = 1"] == "1.0 MiB" and full["ratio"] == "0.25x"
    assert full["state measured on"] == "whole model"
    performer = table.loc["performer"]
    assert performer["recall %, kv heads = heads"] == "31.0 ± 1.4 (2 seeds)"
    assert performer["recall %, kv heads = 1"].startswith("— (not trained: quick/mqar_causal_mqa")
    assert performer["change (points)"] == "—"
    assert performer["state measured on"] == "mechanism alone" and performer["ratio"] == "1.00x"
    reformer = table.loc["reformer"]
    assert reformer["recall %, kv heads = 1"].startswith("— (refused: its keys are its queries")
    assert reformer["grouped keys, values"] == "refused"
    assert reformer["kv heads = 1"] == "— (unsupported: refuses grouped keys and values)"
    assert reformer["ratio"] == "—"
    aft = table.loc["aft"]
    assert aft["recall %, kv heads = heads"] == "— (failed: 1 error)"
    assert aft["recall %, kv heads = 1"] == "25.0 (1 seed)"
    assert aft["kv heads = 1"] == f"— (no decode cell at {MQA_CONTEXT // 1024}K)"
    assert aft["state measured on"] == "—"
    assert not table.drop(columns=[c for c in table if c.startswith("_")]).isin(["", None]).any().any()
    assert any("300 steps" in t or "max_steps=300" in t for t in table.attrs["left_out"]), table.attrs


def test_the_report_shows_the_table_and_its_figure(tmp_path):
    result = build_report(store(tmp_path / "r"), tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### Multi-query attention: recall and decode state" in text
    assert "| full | 98.5 ± 0.7 (2 seeds) | 98.0 ± 1.4 (2 seeds) |" in text
    assert "left out of this table" in text
    assert any(p.name == "multiquery_recall_vs_state.png" for p in result["files"])


@pytest.mark.parametrize("mqa_records", [False, True])
def test_without_a_multi_query_record_there_is_no_section(tmp_path, mqa_records):
    root = tmp_path / "r"
    write_record(run("full", MHA, 0, 0.99), root)
    write_record(cell("full", "model", None, 4 * MIB), root)
    if mqa_records:  # a multi-query decode cell alone is enough: the recall side says what is missing
        write_record(cell("full", "mechanism", 1, 4 * MIB), root)
    text = (build_report(root, tmp_path / "out")["out"] / "report.md").read_text()
    assert ("Multi-query attention" in text) is mqa_records
    if mqa_records:
        assert "— (not trained: quick/mqar_causal_mqa (arena-suite size=extended runs it))" in text
