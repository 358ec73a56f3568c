"""harness.display: missing cells say why, and paths in reports and logs are relative to the working directory."""

from __future__ import annotations

import pandas as pd

from harness.display import MISSING, WORKDIR_ENV, format_cell, missing_cell, not_run, shown_path
from harness.report import build_report


def test_missing_cells_say_why_in_both_places():
    budget = pd.Series({"outcome": "skipped_budget", "reason": "memory, predicted peak 9 GB"})
    assert missing_cell(budget) == f"{MISSING} (over budget: memory, predicted peak 9 GB)"
    assert missing_cell(pd.Series({"outcome": "oom"})) == f"{MISSING} (oom)"
    assert format_cell(budget) == "skip(budget)" and format_cell(pd.Series({"outcome": "error"})) == "error"
    assert not_run() == f"{MISSING} (not run)"


def test_paths_are_shown_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "results" / "x.json") == "results/x.json"
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "results"))  # what arena-suite hands its training processes
    assert shown_path(tmp_path / "results" / "x.json") == "x.json"


def test_the_report_page_does_not_print_the_machine_path_of_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    from harness.store import now_iso, write_record

    # One record: a folder without any is "nothing to report" (no page at all).
    write_record({"kind": "train", "record_id": "t", "status": "ok", "created_at": now_iso(), "attention": "full",
                  "task": "listops", "seed": 0, "test_acc": 0.3, "majority_test_acc": 0.2,
                  "config": {"task": {"name": "listops"}}}, tmp_path / "results")
    built = build_report("results")
    md = (built["out"] / "report.md").read_text()
    assert "Results store: results." in md and str(tmp_path) not in md


def test_ctrl_c_in_an_app_prints_one_line_and_exits_130(monkeypatch, tmp_path, capsys):
    import sys

    import pytest

    from harness.bench import run as bench_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_run, "run_benchmark", interrupted)
    monkeypatch.setattr(sys, "argv", ["arena-bench", "hydra.run.dir=.", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["arena-bench: interrupted (Ctrl-C); the cells measured so far are kept; "
                                        "the same command measures only the missing ones"]
    assert "Traceback" not in err
