"""harness.report.average: accuracy, speed and memory of each mechanism averaged over the recipes in the store."""

from __future__ import annotations

import math

import pytest

from harness.report import build_report, comparisons
from harness.report import plots as plots_module
from harness.report.average import AVERAGE_PNG, average_caption, average_table, recipe_average
from harness.store import load_records, now_iso, write_record


def _run(experiment, attention, seed, acc, speed, mem, status="ok", majority=0.2):
    task = experiment.split("/")[1]
    record = {"kind": "train", "record_id": f"{experiment.replace('/', '-')}.{attention}.{seed}", "status": status,
              "created_at": now_iso(), "attention": attention, "task": task, "seed": seed, "experiment": experiment,
              "majority_test_acc": majority,
              # Recipes differ in their config (as real ones do), not only in the experiment's name.
              "config": {"task": {"name": task}, "attention": {"name": attention, "params": {}}, "seed": seed,
                         "train": {"max_steps": 10 if experiment.startswith("smoke/") else 1000}}}
    if status == "ok":
        record.update(test_acc=acc, best_val_acc=acc, throughput={"examples_per_s": speed}, peak_memory_bytes=mem)
    return record


@pytest.fixture()
def store(tmp_path):
    """Two recipes with full and performer; linformer only in the first (oom in the second); a smoke recipe
    with full alone (nothing to compare: not averaged)."""
    root = tmp_path / "results"
    records = [
        _run("quick/listops", "full", 0, 0.30, 100.0, 1e8), _run("quick/listops", "full", 1, 0.32, 100.0, 1e8),
        _run("quick/listops", "performer", 0, 0.20, 200.0, 5e7),
        _run("quick/listops", "linformer", 0, 0.25, 400.0, 2.5e7),
        _run("quick/mqar", "full", 0, 0.90, 50.0, 2e8, majority=0.5),
        _run("quick/mqar", "performer", 0, 0.50, 25.0, 4e8, majority=0.5),
        _run("quick/mqar", "performer", 1, 0.70, 25.0, 4e8, majority=0.5),
        _run("quick/mqar", "linformer", 0, None, None, None, status="oom", majority=0.5),
        _run("smoke/listops", "full", 0, 0.10, 10.0, 1e6),
    ]
    for r in records:
        write_record(r, root)
    return root


def test_values_are_means_over_recipes_of_seed_means_and_geometric_means_of_ratios(store):
    avg = recipe_average(comparisons(load_records(store, kind="train")), ["full", "linformer", "performer"])
    assert avg.recipes == ["listops (quick/listops)", "mqar (quick/mqar)"]  # smoke: full alone, not averaged
    assert avg.left_out == {"linformer": ["mqar (quick/mqar)"]}
    assert list(avg.points.index) == ["full", "performer"]
    full, performer = avg.points.loc["full"], avg.points.loc["performer"]
    assert full["accuracy"] == pytest.approx((31.0 + 90.0) / 2)  # listops' two seeds first: 31
    assert performer["accuracy"] == pytest.approx((20.0 + 60.0) / 2)  # mqar's two seeds first: 60
    assert performer["speed"] == pytest.approx(math.sqrt(2.0 * 0.5))  # 2x and 0.5x full: 1x
    assert performer["memory_vs_full"] == pytest.approx(math.sqrt(0.5 * 2.0))
    assert full["speed"] == pytest.approx(1.0) and full["memory_vs_full"] == pytest.approx(1.0)
    assert performer["majority"] == pytest.approx((20.0 + 50.0) / 2)
    assert (performer["recipes"], performer["seeds_min"], performer["seeds_max"]) == (2, 1, 2)
    caption = average_caption(avg)
    assert "Mean over 2 recipes" in caption and "listops (quick/listops); mqar (quick/mqar)" in caption
    assert "1-2 seeds per mechanism and recipe" in caption
    assert "linformer (none in mqar (quick/mqar))" in caption and "smoke" not in caption
    table = average_table(avg)
    assert table.loc["performer"].tolist() == ["40.00", "1.00x", "1.00x", "2", "1-2"]
    assert table.loc["full", "mean test acc % over recipes"] == "60.50"
    assert table.loc["linformer", "mean test acc % over recipes"] == "— (missing 1 of 2 recipes)"


def test_speed_ratios_that_differ_average_geometrically(tmp_path):
    root = tmp_path / "results"
    for exp, ratio in (("quick/a", 4.0), ("quick/b", 1.0)):
        write_record(_run(exp, "full", 0, 0.5, 100.0, 1e8), root)
        write_record(_run(exp, "performer", 0, 0.5, 100.0 * ratio, 1e8 / ratio), root)
    avg = recipe_average(comparisons(load_records(root, kind="train")))
    assert avg.points.loc["performer", "speed"] == pytest.approx(2.0)  # sqrt(4 * 1), not the mean 2.5
    assert avg.points.loc["performer", "memory_vs_full"] == pytest.approx(0.5)


def test_report_draws_the_average_chart_with_its_caption(store, tmp_path, monkeypatch):
    figures = []
    save = plots_module._save
    monkeypatch.setattr(plots_module, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    result = build_report(store, tmp_path / "r")
    assert (tmp_path / "r" / AVERAGE_PNG) in result["files"]
    fig = figures[-1]  # the average chart is drawn after the per-recipe one
    ax = fig.axes[0]
    assert "mean over 2 recipes" in ax.get_title()
    assert "geometric mean" in ax.get_xlabel()
    points = {tuple(map(float, c.get_offsets()[0])) for c in ax.collections if len(c.get_offsets())}
    assert (pytest.approx(1.0), pytest.approx(40.0)) in [(pytest.approx(x), pytest.approx(y)) for x, y in points]
    assert any("linformer (none in mqar (quick/mqar))" in t.get_text().replace("\n", " ") for t in fig.texts)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "### Accuracy, speed and memory averaged over recipes" in md
    assert "| performer | 40.00 | 1.00x | 1.00x | 2 | 1-2 |" in md


def test_one_recipe_draws_no_average(tmp_path):
    root = tmp_path / "results"
    for name, speed in (("full", 100.0), ("performer", 200.0)):
        write_record(_run("quick/listops", name, 0, 0.3, speed, 1e8), root)
    result = build_report(root, tmp_path / "r")
    assert AVERAGE_PNG not in {p.name for p in result["files"]}
    assert "averaged over recipes" not in (tmp_path / "r" / "report.md").read_text()


def test_a_ladder_rung_of_an_averaged_recipe_file_is_not_counted_twice(store):
    """A one-seed rung of quick/mqar (other num_kv_pairs) is a comparison of its own, but the mean takes one
    comparison per recipe file: the one with the most ok runs; the rung is named in the caption."""
    for attention, acc in (("full", 0.99), ("performer", 0.10)):
        record = _run("quick/mqar", attention, 0, acc, 50.0, 2e8, majority=0.5)
        record["record_id"] += ".k16"
        record["config"]["task"]["params"] = {"num_kv_pairs": 16}
        write_record(record, store)
    comps = comparisons(load_records(store, kind="train"))
    assert len(comps) == 4  # listops, mqar, the mqar rung, smoke
    avg = recipe_average(comps, ["full", "linformer", "performer"])
    assert len(avg.recipes) == 2 and avg.recipes[0] == "listops (quick/listops)"
    assert avg.recipes[1].startswith("mqar (quick/mqar)") and "num_kv_pairs=16" not in avg.recipes[1]
    assert len(avg.variants) == 1 and "num_kv_pairs=16" in avg.variants[0]
    assert avg.points.loc["performer", "accuracy"] == pytest.approx((20.0 + 60.0) / 2)  # the rung's 10% not in it
    assert "Not averaged" in average_caption(avg) and avg.variants[0] in average_caption(avg)


def test_on_a_tie_in_runs_the_comparison_with_the_recipe_files_settings_is_averaged(tmp_path):
    """A rung with as many runs as the recipe itself (both two mechanisms x one seed) sorts first by title; the
    comparison whose settings are the recipe file's stands for it, and the caption says why the rung is not."""
    conf = tmp_path / "conf"
    (conf / "experiment" / "quick").mkdir(parents=True)
    (conf / "experiment" / "quick" / "mqar.yaml").write_text("task:\n  params:\n    num_kv_pairs: 8\n")
    (conf / "experiment" / "quick" / "listops.yaml").write_text("train:\n  max_steps: 1000\n")
    root = tmp_path / "results"
    for pairs, accs in ((4, (0.99, 0.10)), (8, (0.90, 0.60))):
        for attention, acc in zip(("full", "performer"), accs):
            record = _run("quick/mqar", attention, 0, acc, 50.0, 2e8, majority=0.5)
            record["record_id"] += f".k{pairs}"
            record["config"]["task"]["params"] = {"num_kv_pairs": pairs}
            write_record(record, root)
    for attention, acc in (("full", 0.3), ("performer", 0.2)):
        write_record(_run("quick/listops", attention, 0, acc, 100.0, 1e8), root)
    comps = comparisons(load_records(root, kind="train"))
    mqar = [c.title for c in comps if c.task == "mqar"]
    assert "num_kv_pairs=4" in mqar[0]  # the rung comes first: the first of equals no longer wins
    avg = recipe_average(comps, ["full", "performer"], conf=conf)
    assert "num_kv_pairs=8" in avg.recipes[1] and avg.variants == [mqar[0]]
    assert avg.points.loc["performer", "accuracy"] == pytest.approx((20.0 + 60.0) / 2)
    caption = average_caption(avg)
    assert f"{mqar[0]} (other settings than the file's)" in caption and "with more runs" not in caption


def test_a_variant_with_fewer_runs_is_named_as_such(store):
    record = _run("quick/mqar", "full", 0, 0.99, 50.0, 2e8, majority=0.5)
    record["record_id"] += ".k16"
    record["config"]["task"]["params"] = {"num_kv_pairs": 16}
    write_record(record, store)
    avg = recipe_average(comparisons(load_records(store, kind="train")))
    assert avg.why == {avg.variants[0]: "fewer runs"} and "(fewer runs)" in average_caption(avg)


def test_the_average_plot_draws_each_seeds_mean_over_recipes_beside_the_mean(tmp_path, monkeypatch):
    """Seeds 0 and 1 of every recipe: seed s's point is its accuracy averaged over the recipes (performer: seed 0
    (20 + 12.5) / 2, seed 1 (30 + 87.3) / 2), drawn beside the mean; no std bar from two seeds."""
    from test_report_recall import drawn_values, saved_figures

    root = tmp_path / "results"
    for experiment, accs in (("quick/listops", {"full": (0.30, 0.32), "performer": (0.20, 0.30)}),
                             ("quick/mqar", {"full": (0.98, 0.99), "performer": (0.125, 0.873)})):
        for attention, (a0, a1) in accs.items():
            for seed, acc in ((0, a0), (1, a1)):
                write_record(_run(experiment, attention, seed, acc, 100.0, 1e8), root)
    avg = recipe_average(comparisons(load_records(root, kind="train")))
    assert avg.points.loc["performer", "by_seed"] == pytest.approx({0: 16.25, 1: 58.65})
    figures = saved_figures(monkeypatch)
    build_report(root, tmp_path / "r")
    average = next(f for f in figures if "mean over 2 recipes" in f.axes[0].get_title())
    drawn = drawn_values(average.axes[0])
    assert {16.25, 58.65} <= {round(y, 2) for y in drawn["points"]} and drawn["bars"] == []
    assert all(0 <= y <= 100 for values in drawn.values() for y in values)
    per_recipe = next(f for f in figures if f.axes[0].get_title().startswith("listops"))
    mqar = next(ax for ax in per_recipe.axes if ax.get_title().startswith("mqar"))
    assert {12.5, 87.3} <= {round(y, 2) for y in drawn_values(mqar)["points"]}  # accuracy_vs_speed.png too
