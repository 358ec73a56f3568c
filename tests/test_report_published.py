"""harness.report.published and harness.report.lra: the published LRA numbers (theirs) and the table that shows
them beside our runs of the official lra/ recipes only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attentions import available_attentions
from harness.report import build_report, comparisons
from harness.report.lra import lra_comparisons, published_table, recipe_file_values
from harness.report.published import (
    FAIL,
    LRA_TABLE_1,
    NYSTROMFORMER_REPRO,
    PUBLISHED,
    SKYFORMER_REPRO,
    XFORMERS_REPRO,
    PublishedSet,
    unmatched,
)
from harness.store import load_records, now_iso, write_record

# ---------------------------------------------------------------------------------------------- the numbers

def test_every_printed_average_is_the_mean_of_its_five_tasks():
    """The printed average is the rounded mean of the five numbers: a mistyped first decimal in any of them
    (a change of 0.1 or more) moves the mean by 0.02 or more and fails here."""
    # The paper's own slip: Sinkhorn's printed Avg is 51.39, its five numbers average 51.476.
    paper_slips = {("lra_table1", "Sinkhorn Trans."): 51.476}
    checked = 0
    for pub in PUBLISHED:
        for model, printed in pub.averages.items():
            values = pub.task_values(model)
            assert set(values) == {"listops", "text", "retrieval", "image", "pathfinder"}, pub.key
            mean = sum(values.values()) / 5
            assert mean == pytest.approx(paper_slips.get((pub.key, model), printed), abs=0.01), (pub.key, model)
            checked += 1
    assert checked == 11 + 1 + 1  # LRA Table 1's eleven rows, Nystromformer's and xformers' Standard
    assert LRA_TABLE_1.averages["Sinkhorn Trans."] == 51.39  # kept as printed


def test_numbers_equal_the_tables_in_docs_lra_md():
    """docs/LRA.md keeps the same tables in LRA's column order (Skyformer's included): every number of the
    data module, after its own column order is undone, equals the page's."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "LRA.md").read_text(encoding="utf-8")
    order = ("listops", "text", "retrieval", "image", "pathfinder")
    table = text[text.index("## Published numbers"):text.index("Speed and memory on the Text task")]
    rows = [line.split("|")[2:8] for line in table.splitlines() if re.match(r"\| [A-Z][^|]*\| \d", line)]
    assert len(rows) == len(LRA_TABLE_1.rows) == 11
    for model, row in zip(LRA_TABLE_1.rows, rows):
        printed = [float(x) for x in row]
        assert [LRA_TABLE_1.task_values(model)[t] for t in order] == printed[:5], model
        assert LRA_TABLE_1.averages[model] == printed[5], model
    repro = text[text.index("### PyTorch reproductions"):text.index("## Known pitfalls")]
    lines = [[float(x) for x in m.split(" / ")] for m in re.findall(r"\d+(?:\.\d+)?(?: / \d+(?:\.\d+)?){4}", repro)]
    expected = [(NYSTROMFORMER_REPRO, m) for m in ("Standard", "Reformer", "Linformer", "Performer")] + \
        [(SKYFORMER_REPRO, m) for m in ("Self-attention", "Performer", "Linformer", "Reformer", "BigBird")] + \
        [(XFORMERS_REPRO, m) for m in ("Standard", "Favor-256", "Linformer")]
    assert len(lines) >= len(expected)  # and S4's line after them
    for (pub, model), printed in zip(expected, lines):
        assert [pub.task_values(model)[t] for t in order] == printed, (pub.key, model)


def test_known_values_are_where_they_belong():
    assert LRA_TABLE_1.value("full", "listops") == 36.37
    assert LRA_TABLE_1.value("sliding_window", "text") == 52.98  # "Local Attention"
    assert LRA_TABLE_1.value("performer", "pathfinder") == 77.05
    assert LRA_TABLE_1.value("bigbird", "retrieval") == 59.29
    assert LRA_TABLE_1.value("full", "pathx") == FAIL and LRA_TABLE_1.value("linformer", "pathx") == FAIL
    assert NYSTROMFORMER_REPRO.value("reformer", "listops") == 19.05
    assert NYSTROMFORMER_REPRO.value("full", "pathx") is None  # no Path-X number in the reproductions
    assert XFORMERS_REPRO.value("performer", "retrieval") == 81.1  # Favor-256


def test_skyformer_text_first_order_is_mapped_onto_lra_tasks():
    """Skyformer prints Text / ListOps / Retrieval / Pathfinder / Image; the notes' LRA-ordered copy reads
    self-attention 38.37 / 61.95 / 80.69 / 40.57 / 65.26."""
    assert [SKYFORMER_REPRO.value("full", t) for t in ("listops", "text", "retrieval", "image", "pathfinder")] == \
        [38.37, 61.95, 80.69, 40.57, 65.26]
    assert SKYFORMER_REPRO.value("bigbird", "image") == 43.16
    assert SKYFORMER_REPRO.value("reformer", "pathfinder") == 66.49


def test_only_the_same_mechanism_is_mapped_onto_ours():
    registered = set(available_attentions())
    for pub in PUBLISHED:
        assert set(pub.names.values()) <= registered, pub.key
    for theirs in ("Sparse Trans.", "Sinkhorn Trans.", "Synthesizer", "Linear Trans."):
        assert theirs in LRA_TABLE_1.rows and theirs not in LRA_TABLE_1.names
    assert "Informer" not in SKYFORMER_REPRO.names
    assert LRA_TABLE_1.value("rfa", "text") is None  # RFA is not Linear Trans.
    assert unmatched(["full", "rfa", "aft", "sliding_window", "clustered", "memory_compressed"]) == \
        ["rfa", "aft", "clustered", "memory_compressed"]


def test_a_malformed_set_is_refused():
    with pytest.raises(ValueError, match="2 numbers for 3 columns"):
        PublishedSet(key="x", column="x", source="s", setup="s", columns=("listops", "text", "image"),
                     rows={"A": (1.0, 2.0)}, names={})
    with pytest.raises(ValueError, match="unknown task"):
        PublishedSet(key="x", column="x", source="s", setup="s", columns=("lisstops",), rows={"A": (1.0,)}, names={})
    with pytest.raises(ValueError, match="not in its rows"):
        PublishedSet(key="x", column="x", source="s", setup="s", columns=("listops",), rows={"A": (1.0,)},
                     names={"B": "full"})


# ---------------------------------------------------------------------------------------------- our runs

def test_recipe_file_values_read_the_file_and_its_groups():
    values = recipe_file_values("lra/listops")
    assert values["train.max_steps"] == 5000 and values["model.num_layers"] == 4
    assert values["task.name"] == "listops" and values["scheduler.name"] == "rsqrt"
    assert values["optimizer.betas"] == [0.9, 0.98]  # from conf/optimizer/adamw.yaml
    assert recipe_file_values("lra/text")["task.params.max_length"] == 1000
    assert recipe_file_values("lra/nonexistent") is None


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _run(experiment, attention, seed, acc, status="ok", **changes):
    """A train record of ``experiment`` as its recipe file sets it (lra/), with ``changes`` (dotted keys)."""
    task = experiment.split("/")[1]
    flat = dict(recipe_file_values(experiment) or {"task.name": task, "train.max_steps": 1500})
    flat.update({k.replace("__", "."): v for k, v in changes.items()})
    config = _nested(flat)
    config.update(attention={"name": attention, "params": {}}, seed=seed, device="cpu")
    tag = "-".join(f"{k}{v}" for k, v in sorted(changes.items()))
    record = {"kind": "train", "record_id": f"{experiment.replace('/', '-')}.{attention}.{seed}.{tag}",
              "status": status, "created_at": now_iso(), "attention": attention, "task": task, "seed": seed,
              "experiment": experiment, "majority_test_acc": 0.2, "config": config,
              "data_notes": {"source": "generated (LRA's generator)"}}
    if status == "ok":
        record.update(test_acc=acc, best_val_acc=acc, throughput={"examples_per_s": 100.0}, peak_memory_bytes=1e8)
    return record


@pytest.fixture()
def lra_store(tmp_path):
    root = tmp_path / "results"
    records = [_run("lra/listops", "full", s, a) for s, a in ((0, 0.36), (1, 0.37), (2, 0.38))]
    records += [_run("lra/listops", "performer", s, a) for s, a in ((0, 0.17), (1, 0.19))]
    records += [_run("lra/listops", "sliding_window", 0, 0.16), _run("lra/listops", "rfa", 0, 0.21),
                _run("lra/listops", "linformer", 0, None, status="oom"),
                _run("lra/text", "full", 0, 0.63),
                # The same recipe file with fewer steps: another setup, never beside published numbers.
                _run("lra/listops", "full", 0, 0.111, train__max_steps=100),
                # A quick recipe: never beside published numbers.
                _run("quick/listops", "full", 0, 0.555)]
    for r in records:
        write_record(r, root)
    return root


def test_table_holds_ours_and_theirs_for_the_right_mechanism_and_task(lra_store):
    official, left_out = lra_comparisons(comparisons(load_records(lra_store, kind="train")))
    assert sorted(c.task for c in official) == ["listops", "text"]
    assert len(left_out) == 1
    (why,) = left_out.values()
    assert "train.max_steps=100 (recipe file: 5000)" in why
    table = published_table(official)
    # LRA's task order, ours first in each task, only tasks we ran, only sets that report one of ours.
    assert list(table.columns) == [
        "ListOps: ours", "ListOps: LRA Table 1 (theirs)", "ListOps: Skyformer repro (theirs)",
        "ListOps: Nystromformer repro (theirs)", "ListOps: xformers repro (theirs)",
        "Text: ours", "Text: LRA Table 1 (theirs)", "Text: Skyformer repro (theirs)",
        "Text: Nystromformer repro (theirs)", "Text: xformers repro (theirs)"]
    assert table.loc["full", "ListOps: ours"] == "37.00 ± 1.00 (3 seeds)"
    assert table.loc["full", "ListOps: LRA Table 1 (theirs)"] == "36.37"
    assert table.loc["full", "ListOps: Skyformer repro (theirs)"] == "38.37"
    assert table.loc["full", "Text: Skyformer repro (theirs)"] == "61.95"
    assert table.loc["full", "Text: ours"] == "63.00 (1 seed)"
    assert table.loc["performer", "ListOps: ours"] == "18.00 ± 1.41 (2 seeds)"
    assert table.loc["performer", "ListOps: LRA Table 1 (theirs)"] == "18.01"
    assert table.loc["performer", "ListOps: xformers repro (theirs)"] == "19.56 †"  # Favor-256: 256 features
    assert table.loc["sliding_window", "ListOps: LRA Table 1 (theirs)"] == "15.82 †"
    assert table.loc["sliding_window", "ListOps: Skyformer repro (theirs)"] == "— (no counterpart)"
    assert table.loc["rfa", "ListOps: LRA Table 1 (theirs)"] == "— (no counterpart)"
    assert table.loc["linformer", "ListOps: ours"].startswith("— (")  # failed, never a number
    assert table.loc["linformer", "ListOps: Nystromformer repro (theirs)"] == "37.25"
    assert table.loc["performer", "Text: ours"] == "— (not run)"
    assert not table.isin(["55.50", "11.10"]).any().any()


def test_report_labels_theirs_and_leaves_other_recipes_out(lra_store, tmp_path):
    text = (build_report(lra_store, tmp_path / "r")["out"] / "report.md").read_text()
    section = text[text.index("### LRA: ours beside the published numbers (theirs)"):]
    section = section[:section.index("\n### ", 5)]
    assert "lra/listops (5 mechanism(s), seeds [0, 1, 2]); lra/text (1 mechanism(s), seeds [0])" in section
    assert "Tay et al. 2021" in section and "3 seeds, 50k steps" in section
    assert "Transformer = full" in section and "Local Attention = sliding_window" in section
    assert "† sliding_window in LRA Table 1 (theirs): LRA's Local Attention" in section
    assert "Ours with no published counterpart: rfa." in section
    assert "train.max_steps=100 (recipe file: 5000)" in section and "not compared with published" in section
    assert "55.5" not in section and "quick/listops" not in section
    assert "Our data: " in section and "generated (LRA's generator)" in section


def test_quick_recipes_get_no_published_table(tmp_path):
    root = tmp_path / "results"
    for seed in (0, 1):
        write_record(_run("quick/listops", "full", seed, 0.4), root)
        write_record(_run("quick/listops", "performer", seed, 0.3), root)
    text = (build_report(root, tmp_path / "r")["out"] / "report.md").read_text()
    assert "LRA: ours beside" not in text and "(theirs)" not in text and "36.37" not in text


@pytest.mark.parametrize("task", ["listops", "text", "retrieval", "image", "pathfinder", "pathx"])
def test_runs_composed_by_hydra_from_an_lra_recipe_count_as_official(task, tmp_path):
    """What arena-train records for ``experiment=lra/<task>`` passes the recipe check; one override fails it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.plugins import conf_dir

    root = tmp_path / "results"
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for i, extra in enumerate(([], ["optimizer.lr=0.01"])):
            cfg = compose("train", overrides=[f"experiment=lra/{task}", "attention=full", *extra])
            config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
            write_record({"kind": "train", "record_id": f"{task}.{i}", "status": "ok", "created_at": now_iso(),
                          "attention": "full", "task": task, "seed": 0, "experiment": f"lra/{task}",
                          "config": config, "test_acc": 0.5, "majority_test_acc": 0.5}, root)
    official, left_out = lra_comparisons(comparisons(load_records(root, kind="train")))
    assert [c.task for c in official] == [task]
    (why,) = left_out.values()
    assert why.startswith("changed from the recipe file: optimizer.lr=0.01 (recipe file: ")
