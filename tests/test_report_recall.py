"""harness.report.recall: seed spreads, ties with the best, MQAR variant names, the recall plot."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.page import Page
from harness.report.recall import is_tie, recall_points, recall_section, seed_stats, spread_table


def _runs(rows):
    """Training-record rows: (attention, task, form, seq_len, pairs, seed, test_acc)."""
    out = []
    for attention, task, form, length, pairs, seed, acc in rows:
        out.append({"attention": attention, "task": task, "seed": seed, "status": "ok", "test_acc": acc,
                    "config.task.params.form": form, "config.task.params.seq_len": length,
                    "config.task.params.num_kv_pairs": pairs})
    return pd.DataFrame(out)


def test_ties_are_differences_smaller_than_the_seed_spread():
    assert is_tie(90.0, 2.0, 88.5, 0.5)  # 1.5 < 2.0
    assert not is_tie(90.0, 0.5, 88.5, 1.0)  # 1.5 > 1.0
    assert is_tie(90.0, float("nan"), 89.0, 1.5)  # one seed for the best: the other's spread decides
    assert not is_tie(90.0, float("nan"), 89.9, float("nan"))  # no spread known at all: no tie claimed


def test_spread_table_names_variants_and_marks_best_and_ties():
    train = _runs([
        ("full", "mqar", "decoder", 64, 8, 0, 0.99), ("full", "mqar", "decoder", 64, 8, 1, 0.97),
        ("rfa", "mqar", "decoder", 64, 8, 0, 0.975), ("rfa", "mqar", "decoder", 64, 8, 1, 0.965),
        ("aft", "mqar", "decoder", 64, 8, 0, 0.20), ("aft", "mqar", "decoder", 64, 8, 1, 0.22),
        ("full", "mqar", "decoder", 64, 16, 0, 0.90),
    ])
    stats = seed_stats(train)
    full = stats[(stats.attention == "full") & (stats.variant == "mqar decoder L64 k8")].iloc[0]
    assert full["n"] == 2 and math.isclose(full["mean"], 98.0)
    table = spread_table(stats)
    assert list(table.columns) == ["mqar decoder L64 k16", "mqar decoder L64 k8"]
    assert table.loc["full", "mqar decoder L64 k8"] == "98.0 ± 1.4 (2) best"
    assert table.loc["rfa", "mqar decoder L64 k8"] == "97.0 ± 0.7 (2) ≈"  # 1.0 below the best, spread 1.4
    assert not table.loc["aft", "mqar decoder L64 k8"].endswith("≈")
    assert table.loc["rfa", "mqar decoder L64 k16"] == "—"
    points = recall_points(stats)
    assert set(points["num_kv_pairs"]) == {8, 16} and set(points["form"]) == {"decoder"}


def test_equal_means_are_ties_not_a_best_and_the_index_is_named():
    train = _runs([(name, "mqar", "decoder", 64, 8, 0, 0.031) for name in ("full", "rfa", "aft")])
    table = spread_table(seed_stats(train))
    assert table.index.name == "mechanism"
    assert set(table["mqar decoder L64 k8"]) == {"3.1 (1) ≈"}


def test_different_recipes_are_never_pooled():
    train = _runs([("full", "listops", None, None, None, 0, 0.3), ("full", "listops", None, None, None, 1, 0.4)])
    train["config.train.max_steps"] = [500, 1500]
    assert len(set(seed_stats(train)["variant"])) == 2
    assert all(v.startswith("listops (") for v in seed_stats(train)["variant"])
    train["config.train.max_steps"] = 500
    train["config.attention.params.window"] = [8, 16]  # mechanism parameters never split a column
    assert list(seed_stats(train)["variant"]) == ["listops"]


def test_recall_section_writes_the_plot(tmp_path):
    train = _runs([(m, "mqar", "decoder", 64, k, s, 0.5 + 0.01 * k) for m in ("full", "rfa") for k in (4, 8, 16)
                   for s in (0, 1)])
    page, files = Page("t"), []
    recall_section(page, train, tmp_path, files)
    assert files == [tmp_path / "recall_vs_pairs.png"] and files[0].stat().st_size > 1000
    assert "recall_vs_pairs.png" in page.markdown() and "| full |" in page.markdown()
