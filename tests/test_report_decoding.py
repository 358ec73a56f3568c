"""harness.report.decoding: the decoding section (tables, derived figures, log-log plots) and MQAR recall against
decoding cost, from hand-made decode records of docs/DECODING.md's schema (the benchmark writes the real ones)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report import build_report
from harness.report.decoding import (
    RECALL_COST_CONTEXT,
    RECOMPUTE_TEXT,
    changes_text,
    decode_frame,
    decode_table,
    derived_text,
    recall_cost_points,
)
from harness.store import load_records, now_iso, write_record

HEADS, HEAD_DIM, LAYERS = 4, 32, 2
CONTEXTS = (1024, 4096, 16384)
# (form, growth, state bytes per sequence for one layer at context n, ms/token at batch 1 and context n)
MECHANISMS = {
    "full": ("step", "linear", lambda n: 2 * n * HEADS * HEAD_DIM * 4, lambda n: 0.05 + 2e-5 * n),
    "sliding_window": ("step", "window", lambda n: 2 * 9 * HEADS * HEAD_DIM * 4, lambda n: 0.06),
    "performer": ("step", "constant", lambda n: 64 * (HEAD_DIM + 1) * HEADS * 4, lambda n: 0.08),
    "aft": ("step", "constant", lambda n: 2 * HEAD_DIM * HEADS * 4, lambda n: 0.04),
    "reformer": ("recompute", "linear", lambda n: 3 * n * HEADS * HEAD_DIM * 4, lambda n: 1e-3 * n),
}


def decode_record(mechanism, context, batch=1, scope="mechanism", status="ok", form=None, reason=None,
                  state_filled="prefill"):
    """A decode record of the schema: ``MECHANISMS``'s numbers, a model scope cell counting both layers."""
    default_form, growth, state, ms = MECHANISMS[mechanism]
    form = form or default_form
    layers = LAYERS if scope == "model" else 1
    record = {
        "kind": "decode", "record_id": f"{mechanism.replace('_', '-')}.{scope}.{form}.c{context}.b{batch}",
        "status": status, "reason": reason, "created_at": now_iso(), "mechanism": mechanism, "scope": scope,
        "model_size": "mqar_causal" if scope == "model" else None,
        "model_config": {"embed_dim": 64, "num_heads": 4, "num_layers": LAYERS} if scope == "model" else None,
        "attention_params": {"head_dim": HEAD_DIM}, "context": context, "batch": batch, "heads": HEADS,
        "head_dim": HEAD_DIM, "dtype": "float32", "device": "cpu", "threads": 1, "decode_form": form,
        "state_growth": growth, "state_filled": state_filled,
        "state_note": "prefill over the cell time limit" if state_filled == "random" else None,
        "config_changes": ["max_length 64 -> 4096", "learned position table re-initialised at 4096",
                           *(["reformer num_buckets 8 -> 512"] if mechanism == "reformer" else [])]
        if scope == "model" else [],
        "timing_policy": "plain", "matmul_flops_per_s": 8.8e10, "peak_method": "torch.profiler(cpu alloc events)",
    }
    if status == "ok":
        t = ms(context) * (1 + 0.3 * (batch - 1)) * layers * (1 if form == default_form else 20)
        record.update(prefill_ms=None if state_filled == "random" else 10.0, tokens=32, ms_per_token=t,
                      ms_per_token_p10=0.9 * t, ms_per_token_p90=1.2 * t, tokens_per_s=batch * 1000 / t,
                      state_bytes_per_seq=state(context) * layers, state_capacity_bytes_per_seq=state(context) * layers,
                      peak_bytes=1e6)
    else:
        record.update(prefill_ms=None, tokens=None, ms_per_token=None, ms_per_token_p10=None, ms_per_token_p90=None,
                      tokens_per_s=None, state_bytes_per_seq=None, state_capacity_bytes_per_seq=None,
                      peak_bytes=None)
    return record


# quick/mqar_causal's attention_overrides (what arena-train stores in attention_config)
RECIPE_BUDGETS = {"sliding_window": {"window": 16}, "performer": {"num_features": 64}, "aft": {"window": 16},
                  "reformer": {"bucket_size": 8, "n_hashes": 2},
                  "bigbird": {"block_size": 8, "num_global_blocks": 1, "num_random_blocks": 2}}


def mqar_causal_run(attention, seed, acc, experiment="quick/mqar_causal"):
    return {"kind": "train", "record_id": f"{attention.replace('_', '-')}.mqarc.{seed}.{experiment.replace('/', '-')}",
            "status": "ok", "created_at": now_iso(), "attention": attention, "task": "mqar", "seed": seed,
            "experiment": experiment, "test_acc": acc, "best_val_acc": acc, "majority_test_acc": 0.016,
            "attention_config": {"causal": True, "head_dim": 16, "max_seq_len": 64, "num_heads": 4,
                                 **RECIPE_BUDGETS.get(attention, {})},
            "throughput": {"examples_per_s": 100.0}, "peak_memory_bytes": 1e7,
            "config": {"task": {"name": "mqar", "params": {"form": "decoder", "seq_len": 64, "num_kv_pairs": 8}},
                       "train": {"max_steps": 800}}}


ACCURACY = {"full": (0.99, 0.98), "sliding_window": (0.02, 0.015), "performer": (0.45, 0.80), "aft": (0.10, 0.12),
            "reformer": (0.92, 0.93), "bigbird": (0.70, 0.72)}


def decode_store(root, model_cells=("full", "sliding_window", "performer", "aft", "reformer")):
    """Mechanism scope at three contexts and batches 1 and 8 (full at 16K batch 8: oom; sliding_window at 16K
    random-filled), model scope at 4K for ``model_cells``; quick/mqar_causal runs of six mechanisms, two seeds
    (bigbird trained, never decoded)."""
    for name in MECHANISMS:
        for batch in (1, 8):
            for n in CONTEXTS:
                if name == "full" and n == 16384 and batch == 8:
                    write_record(decode_record(name, n, batch, status="oom", reason="out of memory"), root)
                else:
                    write_record(decode_record(name, n, batch, state_filled="random" if
                                               (name == "sliding_window" and n == 16384) else "prefill"), root)
    for name in model_cells:
        write_record(decode_record(name, RECALL_COST_CONTEXT, 1, scope="model"), root)
    for name, accs in ACCURACY.items():
        for seed, acc in enumerate(accs):
            write_record(mqar_causal_run(name, seed, acc), root)
    return root


def test_without_decode_records_the_report_has_no_decoding_section(tmp_path):
    root = tmp_path / "r"
    for name, accs in ACCURACY.items():
        for seed, acc in enumerate(accs):
            write_record(mqar_causal_run(name, seed, acc), root)
    result = build_report(root, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "ecoding" not in text and "recall_vs_cost" not in text  # no heading, no empty section
    assert not any("decode" in p.name or "cost" in p.name for p in result["files"])


def test_decode_records_alone_make_a_report(tmp_path):
    root = tmp_path / "r"
    write_record(decode_record("full", 1024), root)
    write_record(decode_record("full", 4096), root)
    text = (build_report(root, tmp_path / "out")["out"] / "report.md").read_text()
    assert "Decoding, mechanism alone, batch 1" in text and "decode_time_vs_context.png" in text


def test_the_decoding_section_has_a_table_per_scope_and_batch_and_both_plots(tmp_path):
    root = decode_store(tmp_path / "r")
    result = build_report(root, tmp_path / "out")
    names = {p.name for p in result["files"]}
    assert {"decode_time_vs_context.png", "decode_state_vs_context.png", "recall_vs_cost.png"} <= names
    for name in ("decode_time_vs_context.png", "decode_state_vs_context.png", "recall_vs_cost.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("- decoding: 35 cells (34 ran) of 5 mechanism(s), mechanism alone, model (mqar_causal), contexts 1K, 4K, "
            "16K, batch 1, 8") in text  # in the summary
    for label in ("mechanism alone, batch 1, 4 heads, head dim 32, float32, cpu, 1 thread(s), context 1K..16K",
                  "mechanism alone, batch 8,", "whole model at the mqar_causal size, batch 1, float32, cpu"):
        assert f"Decoding, {label}" in text, label
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("| full | step | 4K |"))
    # ms/token median [p10–p90], tokens/s, state bytes per sequence (2 x 4096 x 4 heads x 32 x 4 B = 4 MiB), growth
    assert "| 0.132 [0.119–0.158] | 7,580 | 4.0 MiB | linear | none |" in row
    assert any(ln.startswith("| reformer | RECOMPUTE (no step form) | 1K |") for ln in lines)
    assert "RECOMPUTE (no step form): the mechanism has no incremental form" in text
    assert any("| sliding_window | step | 16K (random state) |" in ln for ln in lines)
    assert any(ln.startswith("| full | step | 16K |") and "— (oom: out of memory)" in ln for ln in lines)
    model_row = next(ln for ln in lines if ln.startswith("| performer | step | 4K |") and "max_length" in ln)
    assert "max_length 64 -> 4096; learned position table re-initialised at 4096" in model_row
    # Derived: constant state -> slope 0; full's time per token never drops below its own; crossover stated.
    derived = next(ln for ln in lines if ln.startswith("| performer | step | ") and "slope" not in ln
                   and ln.count("|") == 6)
    assert "| 0.00 | 0.00 |" in derived
    assert "1 thread(s), context 1K..16K: log-log slopes over every measured context (1K..16K; 0 = flat" in text


def test_derived_slopes_and_crossover_as_the_page_shows_them():
    cells = decode_frame(pd.DataFrame([decode_record(m, n) for m in MECHANISMS for n in CONTEXTS]))
    derived = derived_text(cells).set_index("mechanism")
    assert list(derived.columns) == ["form", "ms/token slope", "state bytes slope",
                                     "faster per token than full from context"]  # no speed-up measured: no column
    assert derived.loc["performer", "ms/token slope"] == derived.loc["performer", "state bytes slope"] == "0.00"
    assert derived.loc["full", "state bytes slope"] == "1.00" and derived.loc["reformer", "ms/token slope"] == "1.00"
    assert derived.loc["full", "faster per token than full from context"] == "— (reference)"
    # aft (0.04 ms) is below full (0.05 + 2e-5 n) everywhere; performer (0.08 ms) from n = 1500 on.
    assert derived.loc["aft", "faster per token than full from context"] == "<= 1024 (faster at every context)"
    assert 1024 < int(derived.loc["performer", "faster per token than full from context"]) < 4096
    assert derived.loc["reformer", "faster per token than full from context"] == "— (never faster here)"
    assert derived.loc["reformer", "form"] == RECOMPUTE_TEXT


def test_a_forced_recompute_cell_gives_the_speedup_and_stays_out_of_the_plots(tmp_path):
    rows = [decode_record(m, n) for m in ("full", "performer") for n in CONTEXTS]
    rows += [{**decode_record("performer", 4096, form="recompute"), "forced_recompute": True}]
    cells = decode_frame(pd.DataFrame(rows))
    derived = derived_text(cells).set_index("mechanism")
    assert derived.loc["performer", "step vs recompute at 4K"] == "20.0x"
    assert derived.loc["performer", "form"] == "step" and len(derived) == 2
    assert "recompute (forced, for the speed-up)" in set(decode_table(cells)["form"])
    root = tmp_path / "r"
    for r in rows:
        write_record({**r, "record_id": r["record_id"] + (".forced" if r.get("forced_recompute") else "")}, root)
    text = (build_report(root, tmp_path / "out")["out"] / "report.md").read_text()
    assert "performer (recompute)" not in text and "RECOMPUTE (no step form)" not in text


def test_recall_against_cost_has_a_point_per_decoded_mechanism_and_names_the_missing(tmp_path):
    root = decode_store(tmp_path / "r", model_cells=("full", "sliding_window", "performer", "reformer"))
    write_record({**decode_record("aft", RECALL_COST_CONTEXT, 1, scope="model", status="error", reason="boom")}, root)
    train, decode = load_records(root, kind="train"), load_records(root, kind="decode")
    points, missing = recall_cost_points(train, decode)
    assert set(points["attention"]) == {"full", "sliding_window", "performer", "reformer"}
    full = points.set_index("attention").loc["full"]
    assert full["state_bytes"] == 2 * 2 * 4096 * HEADS * HEAD_DIM * 4  # two layers
    assert full["tokens_per_s"] == pytest.approx(1000 / (2 * (0.05 + 2e-5 * 4096)))
    assert full["n"] == 2 and full["mean"] == pytest.approx(98.5)
    assert points.set_index("attention").loc["reformer", "decode_form"] == "recompute"
    assert missing == {
        "bigbird": "no model-scope decode cell at the mqar_causal size and context 4K",
        "aft": "its mqar_causal cell at 4K did not run (error: boom)"}
    text = (build_report(root, tmp_path / "out")["out"] / "report.md").read_text()
    note = next(ln for ln in text.splitlines() if ln.startswith("Not drawn in the recall-vs-cost figure"))
    assert "bigbird (no model-scope decode cell" in note and "aft (its mqar_causal cell at 4K did not run" in note
    assert any(ln.startswith("| aft | step | 4K | — (error: boom) |") for ln in text.splitlines())  # says why
    # Beside the existing state-size plot: the figures in that order.
    assert text.index("recall_vs_state.png") < text.index("recall_vs_cost.png")


def test_recall_against_cost_reads_only_the_causal_mqar_recipe(tmp_path):
    root = decode_store(tmp_path / "r")
    write_record(mqar_causal_run("full", 5, 0.10, experiment="quick/mqar"), root)  # the encoder recipe: not counted
    points, _ = recall_cost_points(load_records(root, kind="train"), load_records(root, kind="decode"))
    assert points.set_index("attention").loc["full", "n"] == 2


def test_config_changes_read_from_the_store_as_json_text():
    assert changes_text('["max_length 64 -> 4096", "bigbird random blocks redrawn"]') == (
        "max_length 64 -> 4096; bigbird random blocks redrawn")
    assert changes_text("[]") == "none" and changes_text(None) == "—" and changes_text(np.nan) == "—"


def test_the_recompute_form_is_marked_in_the_table_and_plotted_dashed_and_hollow(tmp_path, monkeypatch):
    from harness.report import decoding

    figures = []
    monkeypatch.setattr(decoding, "_save", lambda fig, path: figures.append(fig) or path)
    cells = decode_frame(pd.DataFrame([decode_record(m, n) for m in ("full", "reformer") for n in CONTEXTS]))
    assert set(decoding.decode_table(cells)["form"]) == {"step", RECOMPUTE_TEXT}
    decoding.plot_decode_scaling(decoding.decode_groups(cells), "ms_per_token", tmp_path / "t.png")
    ax = figures[-1].axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    assert set(lines) == {"full", "reformer (recompute)"}
    assert lines["reformer (recompute)"].get_linestyle() == "--" and lines["reformer (recompute)"].get_mfc() == "white"
    assert lines["full"].get_linestyle() == "-"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1K", "4K", "16K"]


def test_config_changes_shared_by_every_cell_are_said_once_and_a_skip_says_why_briefly(tmp_path):
    root = tmp_path / "r"
    for name in ("full", "performer"):
        write_record(decode_record(name, 4096, scope="model"), root)
    reason = ("time, predicted 35 steps x 2 s = 54 s > max_cell_s 20 s (predicted prefill 2 s, 2 s per step, "
              "from contexts 512, 1024)")
    write_record(decode_record("aft", 4096, scope="model", status="skipped_budget", reason=reason), root)
    lines = (build_report(root, tmp_path / "out")["out"] / "report.md").read_text().splitlines()
    header = next(ln for ln in lines if ln.startswith("| mechanism | form | context |"))
    assert "config changes" not in header
    assert ("Config changes from the trained recipe, every cell above: max_length 64 -> 4096; learned position "
            "table re-initialised at 4096.") in lines
    skipped = next(ln for ln in lines if ln.startswith("| aft |"))
    assert "— (over budget: time, predicted 35 steps x 2 s = 54 s > max_cell_s 20 s) |" in skipped
