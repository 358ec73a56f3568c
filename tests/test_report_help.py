"""``--help`` of arena-bench, arena-report and arena-suite: what the app does first, its main options, and none
of the training config groups (attention, task, experiment, ...) that it does not use."""

from __future__ import annotations

import sys

import pytest


def _help(monkeypatch, capsys, app: str) -> str:
    from harness import bench, report, suite, train

    main = {"arena-bench": bench.main, "arena-report": report.main, "arena-suite": suite.main,
            "arena-train": train.main}[app]
    monkeypatch.setattr(sys, "argv", [app, "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("app, first_line, options", [
    ("arena-bench", "arena-bench: the efficiency benchmark. Times (median, p10-p90) and peak memory of each "
     "attention mechanism", ["mechanisms=", "seq_lens=", "dtype=", "cpu_allocator=", "force=true", "smoke=true"]),
    ("arena-report", "arena-report: the report of a results store: report.md, a self-contained report.html and the "
     "PNG plots", ["results_dir=", "out=", "memory_budget_gb=", "slope_range=", "title="]),
    ("arena-suite", "arena-suite: the default benchmark in one command, no arguments needed: the efficiency scan "
     "of every", ["size=smoke", "stages=", "mechanisms=", "bench.force=true", "train.experiments="]),
])
def test_help_starts_with_what_the_app_does_and_its_main_options(monkeypatch, capsys, app, first_line, options):
    text = _help(monkeypatch, capsys, app)
    lines = text.splitlines()
    assert lines[0] == first_line
    assert "powered by Hydra" not in text
    assert lines.index(f"Usage: {app} [key=value ...]") < lines.index("Main options:") < lines.index(
        "== Config (defaults) ==")
    main_options = "\n".join(lines[lines.index("Main options:"):lines.index("== Config (defaults) ==")])
    assert all(f"\n  {o}" in main_options for o in options), main_options
    assert "Exit status: 0" in main_options


@pytest.mark.parametrize("app", ["arena-bench", "arena-report", "arena-suite"])
def test_help_lists_no_training_config_groups(monkeypatch, capsys, app):
    text = _help(monkeypatch, capsys, app)
    assert "Configuration groups" not in text
    for group in ("attention: aft", "experiment/lra:", "optimizer: adamw", "scheduler: constant", "task: image"):
        assert group not in text


def test_arena_train_help_says_what_it_does_then_lists_its_config_groups(monkeypatch, capsys):
    text = _help(monkeypatch, capsys, "arena-train")
    lines = text.splitlines()
    assert lines[0].startswith("arena-train: train one attention mechanism on one task with one seed")
    assert "powered by Hydra" not in text and "Exit status: 0" in text
    # Unlike the other apps it uses the training groups: they are listed, after what the app does.
    assert lines.index("== Configuration groups ==") > lines.index("Usage: arena-train [-m] [group=option ...] "
                                                                   "[key=value ...]")
    assert any(line.startswith("attention: aft, bigbird") for line in lines)
