"""harness.report.recall: seed spreads, ties with the best, MQAR variant names, the recall plots (pairs, state size)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from attentions import Attention, AttentionConfig, register_attention
from attentions import registry as attention_registry
from harness.report.page import Page
from harness.report.recall import is_tie, recall_points, recall_section, seed_stats, spread_table, state_points
from harness.store import load_records


def _runs(rows):
    """Training-record rows: (attention, task, form, seq_len, pairs, seed, test_acc)."""
    out = []
    for attention, task, form, length, pairs, seed, acc in rows:
        out.append({"attention": attention, "task": task, "seed": seed, "status": "ok", "test_acc": acc,
                    "config.task.params.form": form, "config.task.params.seq_len": length,
                    "config.task.params.num_kv_pairs": pairs})
    return pd.DataFrame(out)


def test_with_few_seeds_ties_are_overlapping_seed_ranges():
    assert is_tie([91.0, 89.0], [89.5, 87.5])  # 89.5 >= 89.0: the seeds overlap
    assert not is_tie([90.0, 89.6], [89.0, 88.0])  # every seed of the best above every other seed
    assert is_tie([90.0], [91.0, 88.0])  # one seed for the best: inside the other's range
    assert not is_tie([90.0], [89.9])  # no spread known at all: no tie claimed
    # The reference's MQAR case: performer's seeds 12.5 and 87.3 (mean 49.9 ± 52.9) do not tie linformer's 99.8.
    assert not is_tie([99.77, 99.89], [12.47, 87.35])


def test_from_five_seeds_ties_are_differences_within_the_larger_std():
    best, close, far = [90, 91, 89, 90.5, 89.5], [89.5, 90.5, 88.5, 90, 89], [85, 86, 84, 85.5, 84.5]  # std 0.79
    assert is_tie(best, close) and not is_tie(best, far)


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
    assert list(table.columns) == ["mqar decoder L64 k8", "mqar decoder L64 k16"]  # by number, not as text
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


# ------------------------------------------------------------------------------- recall vs state size

D, L = 16, 64
CONFIGS = {  # what arena-train stores as attention_config (layer 0's resolved parameters)
    "full": {"backend": "auto", "causal": True, "dropout": 0.0, "head_dim": D, "max_seq_len": L, "num_heads": 4},
    "sliding_window": {"causal": True, "head_dim": D, "max_seq_len": L, "num_heads": 4, "window": 16},
    "longformer": {"causal": True, "global_positions": [0], "head_dim": D, "max_seq_len": L, "num_heads": 4,
                   "window": 16},
    "performer": {"causal": True, "head_dim": D, "max_seq_len": L, "num_features": 64, "num_heads": 4},
    "reformer": {"bucket_size": 8, "causal": True, "head_dim": D, "max_seq_len": L, "n_hashes": 2,
                 "num_buckets": None, "num_heads": 4},
    "_stateless_plugin": {"causal": True, "head_dim": D, "max_seq_len": L, "num_heads": 4},
}
# 2 n d; the band i-8..i (9 keys); the band plus global 0; m (d + 1); 2 rounds x 8 predecessors.
EXPECTED_STATE = {"full": 2 * L * D, "sliding_window": 2 * D * 9, "longformer": 2 * D * 10,
                  "performer": 64 * (D + 1), "reformer": 2 * D * 16}


@pytest.fixture
def stateless_plugin():
    """A registered mechanism that declares no state size (as a plug-in that does not say)."""
    class Stateless(Attention):
        def attend(self, q, k, v, key_padding_mask):
            return v

    register_attention("_stateless_plugin", config=AttentionConfig, family="exact", time_complexity="O(n)",
                       memory_complexity="O(n)", supports_causal=True)(Stateless)
    yield
    attention_registry._REGISTRY.pop("_stateless_plugin", None)


def _store(tmp_path, pairs=(8, 16), seeds=(0, 1)):
    """Training records on disk, read back as the report reads them (flattened; NaN in other mechanisms'
    columns, so ints come back as floats and lists as JSON text)."""
    folder = tmp_path / "store" / "train"
    folder.mkdir(parents=True)
    for i, (name, k, seed) in enumerate((n, k, s) for n in CONFIGS for k in pairs for s in seeds):
        record = {"kind": "train", "attention": name, "task": "mqar", "seed": seed, "status": "ok",
                  "test_acc": 0.5 + 0.1 * seed + 0.01 * k,
                  "config": {"task": {"params": {"form": "decoder", "seq_len": L, "num_kv_pairs": k}}},
                  "attention_config": {**CONFIGS[name], "seed": seed}}
        (folder / f"{i}.json").write_text(json.dumps(record))
    return load_records(tmp_path / "store", kind="train")


def test_state_points_hold_each_mechanisms_declared_state_and_the_seed_statistics(tmp_path, stateless_plugin):
    train = _store(tmp_path)
    assert train["attention_config.window"].dtype == float  # the report must turn 16.0 back into an int
    points, missing = state_points(seed_stats(train), train)
    assert dict(zip(points["attention"], points["state"])) == EXPECTED_STATE
    assert missing == {"_stateless_plugin": "declares none"}
    row = points[(points["attention"] == "full") & (points["num_kv_pairs"] == 16)].iloc[0]
    assert row["variant"] == "mqar decoder L64 k16" and row["n"] == 2
    assert math.isclose(row["mean"], 100 * (0.5 + 0.05 + 0.16)) and math.isclose(row["std"], 100 * 0.1 / math.sqrt(2))


def test_records_without_a_usable_config_are_named_not_plotted(tmp_path):
    train = _store(tmp_path, pairs=(8,))
    cols = [c for c in train if c.startswith("attention_config.")]
    train[cols] = train[cols].astype(object)
    train.loc[train["attention"] == "reformer", cols] = np.nan  # as an older record without attention_config
    train.loc[train["attention"] == "longformer", "attention_config.window"] = 0.0
    points, missing = state_points(seed_stats(train), train)
    assert set(points["attention"]) == {"full", "sliding_window", "performer"}
    assert missing["reformer"] == "record without attention_config"
    assert missing["longformer"].startswith("not computed: invalid parameter 'window'")
    # A plug-in whose module the report did not load: named, with the registry's reason.
    assert missing["_stateless_plugin"] == "not registered when the report ran (plug-in not loaded)"


def test_recall_section_writes_the_state_plot_and_names_mechanisms_without_a_state(tmp_path, stateless_plugin):
    train = _store(tmp_path)
    page, files = Page("t"), []
    recall_section(page, train, tmp_path, files)
    assert files == [tmp_path / "recall_vs_pairs.png", tmp_path / "recall_vs_state.png"]
    assert files[1].stat().st_size > 1000
    text = page.markdown()
    assert "recall_vs_state.png" in text and "floats, per head and per layer" in text
    assert "no fixed state: _stateless_plugin (declares none)" in text


def test_state_points_keep_recipes_apart_and_a_state_from_any_seed_suffices(tmp_path):
    train = _store(tmp_path, pairs=(8,), seeds=(0, 1, 2, 3))
    train = train[train["attention"].isin(["full", "performer"])].copy()
    train["config.train.max_steps"] = np.where(train["seed"] < 2, 500, 900)  # two recipes, two seeds each
    cols = [c for c in train if c.startswith("attention_config.")]
    train[cols] = train[cols].astype(object)
    first_full = train.index[train["attention"] == "full"][0]
    train.loc[first_full, cols] = np.nan  # one seed's record without attention_config: the other one's counts
    points, missing = state_points(seed_stats(train), train)
    assert missing == {}
    assert len(set(points["variant"])) == 2 and all(v.startswith("mqar decoder L64 k8 (") for v in points["variant"])
    assert sorted(points["state"]) == sorted([2 * L * D] * 2 + [64 * (D + 1)] * 2)


# ------------------------------------------------------------------------------- recall plot panels, not learned

def _ladder(steps, pairs, names=("full", "sliding_window"), majority=0.031):
    """MQAR encoder L64 runs of one recipe (train.max_steps=steps), two seeds per (mechanism, pairs)."""
    rows = _runs([(m, "mqar", "encoder", 64, k, s, 0.9 - 0.01 * k + 0.001 * steps / 100) for m in names
                  for k in pairs for s in (0, 1)])
    rows["config.train.max_steps"] = steps
    rows["majority_test_acc"] = majority
    return rows


def test_recall_panels_are_recipe_families_and_a_ladder_stays_one_panel(tmp_path, monkeypatch):
    from harness.report import recall

    train = pd.concat([_ladder(500, (4, 8, 16)), _ladder(100, (8,), names=("full", "performer"))],
                      ignore_index=True)
    titles = recall.family_titles(train)
    families = dict(zip(zip(train["config.train.max_steps"]), recall.recipe_families(train)))
    assert len(set(families.values())) == 2  # the rungs 4, 8, 16 of the 500-step recipe share one family
    assert titles == {("encoder", 64, families[(500,)]): "train.max_steps=500",
                      ("encoder", 64, families[(100,)]): "train.max_steps=100"}
    drawn, original = [], recall._recall_panel
    monkeypatch.setattr(recall, "_recall_panel",
                        lambda ax, panel, seeds: drawn.append(panel) or original(ax, panel, seeds))
    page, files = Page("t"), []
    recall_section(page, train, tmp_path, files)
    assert len(drawn) == 2
    by_steps = {p["num_kv_pairs"].nunique(): p for p in drawn}
    assert set(by_steps[3]["attention"]) == {"full", "sliding_window"}  # the ladder: one panel, lines
    assert set(by_steps[1]["attention"]) == {"full", "performer"}  # the 100-step variant: its own panel
    # No panel has two points of one mechanism at one x.
    assert all(not p.duplicated(["attention", "num_kv_pairs"]).any() for p in drawn)


def test_recall_legend_names_every_panels_mechanisms_and_the_majority_class(tmp_path, monkeypatch):
    import matplotlib.figure

    from harness.report.recall import plot_recall

    train = pd.concat([_ladder(500, (4, 8)), _ladder(100, (8,), names=("full", "performer"))], ignore_index=True)
    legends = []
    original = matplotlib.figure.Figure.legend
    monkeypatch.setattr(matplotlib.figure.Figure, "legend",
                        lambda self, *a, **k: legends.append(a[1]) or original(self, *a, **k))
    plot_recall(recall_points(seed_stats(train)), tmp_path / "r.png")
    assert legends == [["full", "performer", "sliding_window", "majority class"]]


def test_a_column_at_the_majority_class_gets_no_best_and_says_not_learned():
    train = _runs([("full", "mqar", "decoder", 64, 8, 0, 0.013), ("sliding_window", "mqar", "decoder", 64, 8, 0, 0.020),
                   ("full", "mqar", "decoder", 64, 4, 0, 0.95), ("sliding_window", "mqar", "decoder", 64, 4, 0, 0.30)])
    train["majority_test_acc"] = 0.012
    table = spread_table(seed_stats(train))
    assert list(table.columns) == ["mqar decoder L64 k4", "mqar decoder L64 k8 (not learned)"]
    assert table.loc["sliding_window", "mqar decoder L64 k8 (not learned)"] == "2.0 (1)"  # 0.8 points above
    assert table.loc["full", "mqar decoder L64 k4"] == "95.0 (1) best"
    train.loc[train["attention"] == "sliding_window", "test_acc"] = [0.023, 0.30]  # 1.1 points above: learned
    assert spread_table(seed_stats(train)).loc["sliding_window", "mqar decoder L64 k8"] == "2.3 (1) best"


# ------------------------------------------------------------------------------- seeds in the plots

def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved from now on (still written to its file)."""
    import matplotlib.figure

    figures, original = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: figures.append(self) or original(self, *a, **k))
    return figures


def drawn_values(ax) -> dict[str, list]:
    """What an accuracy panel draws: y of every scatter point ('points'), of every line vertex ('lines') and of
    every error-bar end ('bars'); the majority line (an axhline) left out."""
    from matplotlib.collections import LineCollection, PathCollection

    points = [float(y) for c in ax.collections if isinstance(c, PathCollection) for y in c.get_offsets()[:, 1]]
    bars = [float(y) for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()
            for y in seg[:, 1]]
    lines = [float(y) for line in ax.lines if line.get_label() != "majority class" for y in line.get_ydata()]
    return {"points": points, "lines": lines, "bars": bars}


def _performer_and_full(seeds_performer, seeds_full=(0.98, 0.99)):
    return _runs([(m, "mqar", "encoder", 64, 8, s, acc) for m, accs in (("performer", seeds_performer),
                                                                        ("full", seeds_full))
                  for s, acc in enumerate(accs)])


@pytest.mark.parametrize("plot", ["pairs", "state"])
def test_two_seeds_are_drawn_as_themselves_never_as_a_bar_past_0_or_100(tmp_path, monkeypatch, plot):
    """Performer's seeds 12.5% and 87.3% (49.9 ± 52.9): the two values drawn beside the mean, no ± std bar
    (which would run from -3% to 103%), and nothing outside 0-100%."""
    from harness.report.recall import plot_recall, plot_recall_vs_state

    figures = saved_figures(monkeypatch)
    train = _performer_and_full((0.125, 0.873))
    stats = seed_stats(train)
    if plot == "pairs":
        plot_recall(recall_points(stats), tmp_path / "p.png")
    else:
        points = recall_points(stats).assign(state=[2048.0, 1088.0])
        plot_recall_vs_state(points, tmp_path / "p.png")
    ax = figures[-1].axes[0]
    drawn = drawn_values(ax)
    assert sorted(drawn["points"]) == pytest.approx([12.5, 87.3, 98.0, 99.0])  # each seed, both mechanisms
    assert drawn["bars"] == []
    assert all(0 <= y <= 100 for values in drawn.values() for y in values)
    assert "its seeds (2 to 4 seeds)" in " ".join(t.get_text() for t in figures[-1].texts)


def test_five_seeds_are_a_std_bar_cut_at_0_and_100(tmp_path, monkeypatch):
    from harness.report.recall import plot_recall

    figures = saved_figures(monkeypatch)
    train = _performer_and_full((0.0, 0.0, 0.0, 1.0, 1.0), seeds_full=(0.99, 1.0, 1.0, 0.98, 1.0))
    plot_recall(recall_points(seed_stats(train)), tmp_path / "p.png")
    drawn = drawn_values(figures[-1].axes[0])
    assert drawn["points"] == []  # no seed markers from five seeds on
    assert min(drawn["bars"]) == 0.0 and max(drawn["bars"]) == 100.0  # 40 ± 54.8 and 99.4 ± 0.9, cut
    assert all(0 <= y <= 100 for values in drawn.values() for y in values)
    assert "Bars: ± 1 sample std over 5 or more seeds" in " ".join(t.get_text() for t in figures[-1].texts)


def test_the_recall_figures_have_their_own_headings_and_captions(tmp_path):
    train = _store(tmp_path, pairs=(8,))
    page, files = Page("t"), []
    recall_section(page, train, tmp_path, files)
    figures = page.parts["figures"]
    headings = [value for kind, value in figures if kind == "h3"]
    assert headings == ["MQAR recall vs number of key-value pairs", "MQAR recall vs state size"]
    kinds = [kind for kind, _ in figures]
    assert kinds[:6] == ["h3", "p", "img", "h3", "p", "img"]  # heading, caption, image: each plot its own
    captions = [value for kind, value in figures[:6] if kind == "p"]
    assert all("With 2 to 4 seeds each seed is a small marker beside the mean" in c for c in captions)
