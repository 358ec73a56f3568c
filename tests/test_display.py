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
    (tmp_path / "results").mkdir()
    built = build_report("results")
    md = (built["out"] / "report.md").read_text()
    assert "Results store: results." in md and str(tmp_path) not in md
