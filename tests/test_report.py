"""harness.report: a fixture store with missing cells builds every file, shows them as missing; self-contained HTML."""

from __future__ import annotations

import base64
import re

import pandas as pd
import pytest

from harness.report import MISSING, build_report, comparison_table, comparisons, markdown_table, settings
from harness.store import load_records, now_iso, write_record

NS = [1024, 2048, 4096]


def train_record(attention, task, seed, status="ok", acc=None, speed=100.0, mem=1e8, max_steps=1000):
    record = {
        "kind": "train", "record_id": f"{attention.replace('_', '-')}.{task}.{seed}.{max_steps}", "status": status,
        "created_at": now_iso(), "attention": attention, "task": task, "seed": seed,
        "majority_test_acc": 0.2 if task == "listops" else 0.5,
        "config": {"task": {"name": task}, "train": {"max_steps": max_steps}},
    }
    if status == "ok":
        record.update(test_acc=acc, best_val_acc=acc, throughput={"examples_per_s": speed}, peak_memory_bytes=mem)
    else:
        record["error"] = {"type": "OutOfMemoryError", "message": "out of memory"}
    return record


def bench_record(mechanism, pass_, n, outcome="ok", t=None, mem=None):
    record = {
        "kind": "bench", "record_id": f"{mechanism.replace('_', '-')}.{pass_.replace('+', '')}.n{n}.x",
        "status": outcome, "created_at": now_iso(),
        "mechanism": mechanism, "pass": pass_, "n": n, "batch": 2, "heads": 4, "head_dim": 32, "dtype": "float32",
        "device": "cpu",
        "reason": None if outcome == "ok" else (
            "memory, predicted peak 9.00 GB > budget 6.00 GB" if outcome == "skipped_budget" else "because"),
        "device_info": {"device_name": "test cpu", "num_threads": 2},
    }
    if outcome == "ok":
        record["time"] = {"median_s": t, "p10_s": t * 0.9, "p90_s": t * 1.1, "times_s": [t]}
        record["memory"] = {"peak_bytes": mem, "method": "torch.profiler(cpu alloc events)"}
    return record


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "results"
    records = [
        train_record("full", "listops", 0, acc=0.36),
        train_record("full", "listops", 1, acc=0.38),
        train_record("full", "pathfinder", 0, acc=0.70),
        train_record("performer", "listops", 0, acc=0.30, speed=200.0, mem=5e7),
        train_record("performer", "pathfinder", 0, status="oom"),
    ]
    for pass_ in ("fwd", "fwd+bwd"):
        for n in NS:
            records.append(bench_record("full", pass_, n, t=1e-9 * n**2, mem=4.0 * n**2))
            records.append(bench_record("sdpa_direct", pass_, n, t=0.98e-9 * n**2, mem=4.0 * n**2))
            if n < 4096:
                records.append(bench_record("performer", pass_, n, t=4e-6 * n, mem=1000.0 * n))
        records.append(bench_record("performer", pass_, 4096, outcome="oom"))
        records.append(bench_record("linformer", pass_, 1024, t=1e-3, mem=1e6))
        records.append(bench_record("linformer", pass_, 2048, outcome="unsupported"))
        records.append(bench_record("linformer", pass_, 4096, outcome="skipped_budget"))
    for value in (16, 64, 256):
        for variant in ("iid", "smooth"):
            records.append({
                "kind": "approx", "record_id": f"performer.num_features={value}.{variant}", "status": "ok",
                "created_at": now_iso(), "mechanism": "performer", "param": "num_features", "value": value,
                "variant": variant, "error_mean": 1.0 / value**0.5, "error_std": 0.01, "errors": [1.0 / value**0.5],
                "inputs": f"{variant} inputs",
            })
    records.append({
        "kind": "approx", "record_id": "linformer.proj_dim=16.iid", "status": "error", "created_at": now_iso(),
        "mechanism": "linformer", "param": "proj_dim", "value": 16, "variant": "iid", "error_mean": None,
        "error_std": None, "reason": "boom", "inputs": "iid inputs",
    })
    records.append({
        "kind": "peer", "record_id": "performer.fwd.n1024", "status": "ok", "created_at": now_iso(),
        "pair": "performer", "peer": "performer-pytorch FastAttention", "level": "core", "n": 1024, "pass": "fwd",
        "time_ratio": 0.8, "memory_ratio": 1.1,
    })
    for record in records:
        write_record(record, root)
    # A truncated file (a killed writer) must not hide the others.
    (root / "train" / "broken.json").write_text('{"kind": "train", "stat')
    return root


def test_report_builds_every_file(store, tmp_path):
    # The unreadable file is reported in the page (see below), not raised.
    result = build_report(store, tmp_path / "report", slope_range=(1024, 4096))
    out = tmp_path / "report"
    names = {p.name for p in result["files"]}
    assert names == {"report.md", "report.html", "time_vs_n.png", "memory_vs_n.png", "accuracy_vs_speed.png",
                     "approx_error.png"}
    for path in result["files"]:
        assert path.exists() and path.stat().st_size > 0
        assert path.parent == out
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["build_s"] < 30


def test_missing_cells_show_as_missing_never_zero(store, tmp_path):
    build_report(store, tmp_path / "r", slope_range=(1024, 4096))
    md = (tmp_path / "r" / "report.md").read_text()
    # Accuracy: one table per recipe; performer's pathfinder run failed (oom), linformer never trained.
    assert f"| performer | {MISSING} (1 oom) |" in md
    assert not [line for line in md.splitlines() if line.startswith("| linformer |") and "seed" in line]
    assert "37.00 ± 1.41 (2 seeds)" in md  # full on listops: 36 and 38
    assert "| majority class | 20.00 |" in md
    # Efficiency: oom / unsupported / over budget cells say so.
    assert f"{MISSING} (oom)" in md and f"{MISSING} (unsupported)" in md
    assert f"{MISSING} (over budget: memory, predicted peak 9.00 GB > budget 6.00 GB)" in md
    lin_eff = [line for line in md.splitlines() if line.startswith("| linformer |") and "over budget" in line]
    assert lin_eff and all(f"{MISSING} (oom)" not in line for line in lin_eff)
    assert "unreadable record file(s)" in md and "train/broken.json" in md
    # Peers and approximation tables.
    assert "0.80 / 1.10" in md
    assert f"{MISSING} (error)" in md
    # No fabricated zeros anywhere in the tables.
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert "0" not in cells and "0.00" not in cells and "nan" not in " ".join(cells).lower(), line


def test_page_starts_with_a_summary_and_shows_figures_before_tables(store, tmp_path):
    build_report(store, tmp_path / "r", slope_range=(1024, 4096))
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("## Summary") < md.index("## Figures") < md.index("## Detailed tables")
    assert md.index("![") < md.index("| mechanism |")
    assert "### Findings" in md and "listops: 2 of 2 mechanisms beat the majority class" in md
    assert "machine (benchmark): test cpu" in md
    page = (tmp_path / "r" / "report.html").read_text()
    # One header row per table (no index-name row), and every cell aligned by its column's class.
    for table in re.findall(r"<table>.*?</table>", page, flags=re.S):
        assert table.count("<thead><tr>") == 1 and table.count("</tr></thead>") == 1
        assert "<td>" not in table and "<th>" not in table
    for line in md.splitlines():
        if line.startswith("|:") or line.startswith("|-"):
            assert set(line.split("|")[1:-1]) <= {":---", "---:"}


def test_html_is_self_contained(store, tmp_path):
    result = build_report(store, tmp_path / "r", slope_range=(1024, 4096))
    page = (tmp_path / "r" / "report.html").read_text()
    assert "<link" not in page and "<script" not in page
    assert not re.search(r"src=['\"](?!data:)", page)
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    pngs = [p for p in result["files"] if p.suffix == ".png"]
    assert len(embedded) == len(pngs) == 4
    assert {base64.b64decode(e) for e in embedded} == {p.read_bytes() for p in pngs}
    assert "<table" in page and "majority class" in page


def _arena_report(monkeypatch, cwd, *overrides):
    """Run ``arena-report`` (its Hydra main) in ``cwd``; returns its exit code (0 when it returned)."""
    import sys

    from harness.report import build

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["arena-report", *overrides, "hydra.run.dir=.", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    try:
        build.main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_an_empty_results_folder_is_nothing_to_report_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from harness.report import NothingToReport

    (tmp_path / "nothing").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NothingToReport, match="nothing to report: 'nothing' holds no readable records"):
        build_report("nothing", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert _arena_report(monkeypatch, tmp_path, "results_dir=nothing") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arena-report: nothing to report: 'nothing' holds no readable records")
    assert len(err.splitlines()) == 1 and "Run arena-suite, arena-bench or arena-train first" in err
    assert not (tmp_path / "nothing" / "report").exists()


def test_the_reference_folder_holds_a_report_not_records_and_says_so(monkeypatch, tmp_path, capsys):
    """``arena-report results_dir=results/reference`` (the committed report, no records): exit 2, no report."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert (repo / "results" / "reference" / "report.md").is_file()
    code = _arena_report(monkeypatch, repo, "results_dir=results/reference", f"out={tmp_path / 'r'}")
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "r").exists()
    assert "nothing to report: 'results/reference' holds no readable records" in err
    assert "it holds a built report (report.md), not the records it was built from" in err


def test_nothing_to_report_names_unreadable_files_and_nested_stores(tmp_path):
    from harness.report import NothingToReport

    root = tmp_path / "results"
    (root / "train").mkdir(parents=True)
    (root / "train" / "cut.json").write_text('{"kind": "train", "stat')
    write_record(train_record("full", "listops", 0, acc=0.3), root / "smoke")
    with pytest.raises(NothingToReport) as info:
        build_report(root, tmp_path / "r")
    message = str(info.value)
    assert "1 unreadable record file(s) skipped:" in message and "cut.json (truncated JSON" in message
    assert "stores inside it: arena-report results_dir=" in message and message.count("smoke") == 1


def test_a_truncated_record_is_named_on_the_console_and_in_the_summary(monkeypatch, store, capsys):
    """The fixture store holds train/broken.json, cut short: the report is built (exit 0), the console names
    the file and why, and the page's summary says it was skipped."""
    assert _arena_report(monkeypatch, store.parent, "results_dir=results", "slope_range=[1024,4096]") == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "broken.json" in line]
    assert skipped == ["arena-report: skipped unreadable record file results/train/broken.json: truncated JSON "
                       "(ends after 23 characters); its record is left out of the report"]
    summary = (store / "report" / "report.md").read_text().split("## Figures")[0]
    assert ("SKIPPED 1 unreadable record file(s) in results, left out of every table and plot (a mechanism may "
            "show fewer seeds than were run): train/broken.json (truncated JSON (ends after 23 characters))"
            in summary)


def test_missing_results_dir_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="typo_results"):
        build_report(tmp_path / "typo_results", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_recipes_parameters_and_smoke_runs_are_separate_comparisons(tmp_path):
    """A smoke run, two recipes of one task and a mechanism with other parameters: four comparisons, and no
    cell averages runs of two of them."""
    root = tmp_path / "results"

    def rec(attention, seed, acc, steps=1000, experiment="quick/listops", params=None, device="cpu"):
        r = train_record(attention, "listops", seed, acc=acc, max_steps=steps)
        r["record_id"] += f".{experiment.replace('/', '-')}.{len(params or {})}.{device}"
        r["experiment"] = experiment
        r["config"].update(attention={"name": attention, "params": params or {}}, seed=seed, device=device,
                           results_dir=str(root))
        return r

    records = [rec("full", 0, 0.36), rec("full", 1, 0.38), rec("performer", 0, 0.30), rec("performer", 1, 0.32),
               rec("performer", 2, 0.20, params={"num_features": 128}),
               rec("full", 0, 0.40, steps=5000), rec("performer", 0, 0.35, steps=5000),
               rec("full", 0, 0.047, steps=10, experiment="smoke/listops"),
               # device=auto on a CPU machine (an older record): the same recipe as device=cpu.
               rec("full", 2, 0.37, device="auto")]
    records[-1]["device"] = {"device": "cpu"}
    for r in records:
        write_record(r, root)
    comps = comparisons(load_records(root, kind="train"))
    titles = [c.title for c in comps]
    assert len(comps) == 4, titles
    assert "listops (smoke/listops)" in titles
    assert any("attention.params.num_features=128" in t for t in titles)
    assert any("train.max_steps=5000" in t for t in titles) and any("train.max_steps=1000" in t for t in titles)
    default = next(c for c in comps if "train.max_steps=1000" in c.title and "num_features=128" not in c.title)
    _, numeric = comparison_table(default)
    assert numeric.loc["full", "accuracy"] == pytest.approx(37.0) and numeric.loc["full", "seeds"] == 3
    assert numeric.loc["performer", "accuracy"] == pytest.approx(31.0) and numeric.loc["performer", "seeds"] == 2
    build_report(root, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "4.70 (1 seed)" in md and "20.00 (1 seed)" in md  # each alone, never averaged in
    assert "37.00 ± 1.00 (3 seeds)" in md


def test_bench_settings_are_separate_and_a_new_setting_field_separates_by_itself(store):
    bench = load_records(store, kind="bench")
    assert len(settings(bench)) == 1
    other = bench.assign(batch=8)
    causal = bench.assign(causal=True)
    assert len(settings(pd.concat([bench, other]))) == 2
    groups = settings(pd.concat([bench.assign(causal=False), causal]))
    assert len(groups) == 2 and any("causal=True" in g.label for g in groups)
    assert "batch 2, 4 heads, head dim 32, float32, cpu (test cpu), n = 1024..4096" == settings(bench)[0].label
    # The fairness protocol written out in each cell varies with the cell's backend and pass: one setting still.
    described = bench.assign(**{"protocol.backend": [f"b{i % 3}" for i in range(len(bench))],
                                "protocol.pass": bench["pass"], "protocol.threads": 2})
    assert len(settings(described)) == 1 and "protocol" not in settings(described)[0].label


def test_markdown_table_escapes_pipes():
    text = markdown_table(pd.DataFrame({"a": ["x|y"]}), index=False)
    assert text.splitlines()[2] == "| x\\|y |"
    named = pd.DataFrame({"x": ["1.0", "a"]}, index=pd.Index(["m1", "m2"], name="mechanism"))
    named.columns.name = "n"
    assert markdown_table(named).splitlines()[:2] == ["| mechanism | x |", "|:---|:---|"]


def test_report_says_which_trained_mechanisms_ignore_attention_dropout(store, tmp_path):
    text = (build_report(store, tmp_path / "report", slope_range=(1024, 4096))["out"] / "report.md").read_text()
    # performer ran and has no probability matrix to drop; full ran and applies dropout; rfa never ran.
    line = next(ln for ln in text.splitlines() if "attention dropout has no effect" in ln)
    assert "performer" in line and "full" not in line and "rfa" not in line


def test_every_mechanism_has_one_distinct_style_in_every_plot(monkeypatch, tmp_path):
    """Twelve lines (eleven mechanisms and the SDPA reference), one artist each, no two alike; the reference
    is drawn under the mechanisms; the figure names its setting; ticks are plain numbers."""
    from attentions import available_attentions
    from harness.report import plots

    names = [*available_attentions(), "sdpa_direct"]
    styles = {n: plots.mechanism_style(n) for n in names}
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(names)
    assert len({s["color"] for s in styles.values()}) == len(names)  # distinct colours, not only markers
    assert styles["sdpa_direct"]["zorder"] < min(s["zorder"] for n, s in styles.items() if n != "sdpa_direct")
    assert plots.mechanism_style("my_plugin") == plots.mechanism_style("my_plugin")  # stable for new names

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    cells = pd.DataFrame([{"mechanism": m, "pass": p, "n": n, "outcome": "ok", "median_s": 1e-3 * n * (i + 1),
                           "p10_s": 0.9e-3 * n * (i + 1), "p90_s": 1.1e-3 * n * (i + 1), "peak_bytes": 1e3 * n,
                           "noisy": False}
                          for i, m in enumerate(names) for p in ("fwd", "fwd+bwd") for n in NS])
    plots.plot_scaling(cells, "median_s", tmp_path / "t.png", setting="batch 2, 4 heads, head dim 32, float32, cpu")
    fig = figures[-1]
    for ax in fig.axes:
        lines = {c.get_label(): c.lines[0] for c in ax.containers if not c.get_label().startswith("_")}
        assert len(lines) == len(names)  # one artist per mechanism
        assert len({(line.get_color(), line.get_marker()) for line in lines.values()}) == len(names)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1K", "2K", "4K"]
        assert not any("^" in t.get_text() or "$" in t.get_text() for t in ax.get_yticklabels())
    assert "head dim 32" in fig._suptitle.get_text()


def _lab(colour: str) -> tuple[float, float, float]:
    """CIELAB (D65) of a '#rrggbb' sRGB colour."""
    import numpy as np

    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    f = [v ** (1 / 3) if v > (6 / 29) ** 3 else v / (3 * (6 / 29) ** 2) + 4 / 29
         for v in xyz / np.array([0.95047, 1.0, 1.08883])]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def ciede2000(c1: str, c2: str) -> float:
    """The CIEDE2000 colour difference of two '#rrggbb' colours: about 2 is just noticeable."""
    return ciede2000_lab(_lab(c1), _lab(c2))


def ciede2000_lab(lab1, lab2) -> float:
    """CIEDE2000 of two CIELAB colours (Sharma, Wu and Dalal 2005, the formula as published)."""
    import math

    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_bar = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_bar**7 / (c_bar**7 + 25**7)))
    a1, a2 = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = math.hypot(a1, b1), math.hypot(a2, b2)
    h1, h2 = math.degrees(math.atan2(b1, a1)) % 360, math.degrees(math.atan2(b2, a2)) % 360
    dh = 0.0 if c1p * c2p == 0 else (h2 - h1 + 180) % 360 - 180
    d_l, d_c, d_h = l2 - l1, c2p - c1p, 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dh / 2))
    l_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    h_bar = h1 + h2 if c1p * c2p == 0 else ((h1 + h2 + (360 if abs(h1 - h2) > 180 else 0)) / 2) % 360
    t = (1 - 0.17 * math.cos(math.radians(h_bar - 30)) + 0.24 * math.cos(math.radians(2 * h_bar))
         + 0.32 * math.cos(math.radians(3 * h_bar + 6)) - 0.20 * math.cos(math.radians(4 * h_bar - 63)))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / math.sqrt(20 + (l_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_t = (-math.sin(math.radians(60 * math.exp(-(((h_bar - 275) / 25) ** 2))))
           * 2 * math.sqrt(cp_bar**7 / (cp_bar**7 + 25**7)))
    return math.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


@pytest.mark.parametrize("lab1, lab2, expected", [  # Sharma, Wu and Dalal (2005), Table 1: pairs 1, 7, 17, 25
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, 2.5, 0), (73, 25, -18), 27.1492), ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
])
def test_ciede2000_matches_the_published_test_data(lab1, lab2, expected):
    assert ciede2000_lab(lab1, lab2) == pytest.approx(expected, abs=1e-4)
    assert ciede2000("#000000", "#ffffff") == pytest.approx(100.0, abs=0.1)


def test_every_mechanism_colour_is_distinct_from_every_other_and_from_the_reference():
    """Eleven mechanisms and the SDPA reference: every pair at least 15 CIEDE2000 apart, and no mechanism but
    full grey (a grey one read as the dotted grey reference); the two pairs a new user confused (aft vs
    sdpa_direct, clustered vs bigbird) now far apart."""
    import itertools
    import math

    from attentions import available_attentions
    from harness.report import plots

    colours = {n: plots.mechanism_style(n)["color"] for n in [*available_attentions(), "sdpa_direct"]}
    closest = min((ciede2000(colours[a], colours[b]), a, b) for a, b in itertools.combinations(colours, 2))
    assert closest[0] >= 15, closest
    grey = [n for n, c in colours.items() if n not in ("full", "sdpa_direct") and math.hypot(*_lab(c)[1:]) < 25]
    assert grey == []
    assert ciede2000(colours["aft"], colours["sdpa_direct"]) > 28  # was 9 (grey on grey)
    assert ciede2000(colours["clustered"], colours["bigbird"]) > 28  # was 23 (olive by green)


def test_arena_report_on_a_missing_store_exits_non_zero_naming_it(monkeypatch, tmp_path, capsys):
    assert _arena_report(monkeypatch, tmp_path, "results_dir=no_such_results") == 2
    assert "no_such_results" in capsys.readouterr().err
    assert not (tmp_path / "no_such_results").exists()


def test_causal_cells_are_shown_apart_from_bidirectional_ones(store, tmp_path):
    # Issue 13: a causal run lands beside the bidirectional one; each pattern gets its own tables, derived
    # figures (crossover vs the same pattern's full) and plots, and the peers say their pattern.
    for pass_ in ("fwd", "fwd+bwd"):
        for n in NS:
            for mechanism, t, mem in (("full", 0.5e-9 * n**2, 4.0 * n**2), ("performer", 9e-6 * n, 1500.0 * n)):
                record = bench_record(mechanism, pass_, n, t=t, mem=mem)
                record.update(pattern="causal", record_id=record["record_id"] + ".causal")
                write_record(record, store)
    write_record({
        "kind": "peer", "record_id": "performer.fwd.n1024.causal", "status": "ok", "created_at": now_iso(),
        "pair": "performer", "peer": "performer-pytorch FastAttention", "level": "core", "n": 1024, "pass": "fwd",
        "time_ratio": 0.3, "memory_ratio": 0.2, "pattern": "causal",
    }, store)
    result = build_report(store, tmp_path / "r", slope_range=(1024, 4096))
    names = {p.name for p in result["files"]}
    assert {"time_vs_n.png", "memory_vs_n.png", "causal_time_vs_n.png", "causal_memory_vs_n.png"} <= names
    text = (result["out"] / "report.md").read_text()
    # The pattern is a setting like any other (harness.report.groups): its own section, bidirectional first.
    tables = text[text.index("## Detailed tables"):]
    bidirectional = tables.index("### Efficiency: bidirectional, batch 2")
    causal = tables.index("### Efficiency: causal, batch 2")
    assert bidirectional < causal
    # The causal block holds only causal cells: linformer (bidirectional only) is not in it.
    causal_block = tables[causal:tables.index("### Approximation error")]
    assert "linformer" not in causal_block and "performer" in causal_block
    assert "Relative to causal full" in causal_block
    peers = text[text.index("Peers"):]
    assert "| causal |" in peers and "| bidirectional |" in peers


def test_report_marks_runs_that_validated_on_the_test_split(tmp_path):
    root = tmp_path / "results"
    honest = {**train_record("full", "text", 0, acc=0.6), "validation_is_test": False}
    alias = {**train_record("full", "text", 1, acc=0.7), "validation_is_test": True, "record_id": "alias"}
    for record in (honest, alias, train_record("full", "listops", 0, acc=0.3)):  # old records lack the field
        write_record(record, root)
    text = (build_report(root, tmp_path / "report", slope_range=(1024, 4096))["out"] / "report.md").read_text()
    marked = [ln for ln in text.splitlines() if "validated on the test split" in ln]
    assert len(marked) == 1 and marked[0].startswith("text: 1 run(s)")
    write_record({**alias, "validation_is_test": False}, root)
    text = (build_report(root, tmp_path / "report2", slope_range=(1024, 4096))["out"] / "report.md").read_text()
    assert "validated on the test split" not in text


def test_accuracy_table_gives_each_mechanism_its_budget_and_state_vs_full(tmp_path):
    """The budget column: what the recipe gave the mechanism and its state size relative to full attention's
    KV cache at the recipe's length (sliding window 32 of n = 65: 2 * 16 + 1 = 33 keys -> 33/65 = 0.51x);
    the recipe note names n."""
    root = tmp_path / "results"
    for name, attention_config in [
        ("full", {"head_dim": 16, "num_heads": 4}),
        ("sliding_window", {"head_dim": 16, "num_heads": 4, "window": 32}),
        ("performer", {"head_dim": 16, "num_heads": 4, "num_features": 64}),
        ("memory_compressed", {"head_dim": 16, "num_heads": 4, "compression": 3}),  # no override: its default
        ("clustered", {"head_dim": 16, "num_heads": 4, "num_clusters": 100, "kmeans_iterations": 10, "topk": 32}),
    ]:
        record = train_record(name, "listops", 0, acc=0.3)
        # The recipe's whole table, as in a real record (the same in every run of the recipe).
        record["config"]["attention_overrides"] = {"sliding_window": {"window": 32}, "performer": {"num_features": 64}}
        record["attention_config"] = {**attention_config, "max_seq_len": 65}
        record["model_config"] = {"pooling": "cls", "token_level": False}
        write_record(record, root)
    comp = comparisons(load_records(root, kind="train"))[0]
    display, _ = comparison_table(comp)
    budget = display["budget (state vs full)"]
    assert budget["full"] == "exact"
    assert budget["sliding_window"] == "window=32; state 0.51x full"
    assert budget["performer"] == f"num_features=64; state {64 * 17 / (2 * 65 * 16):.2f}x full"
    # Budget-defining parameters the recipe left alone are named with their values: compression sets the state
    # (ceil(65 / 3) = 22 compressed keys and values: 22/65 = 0.34x); clustered's state is every key (its budget,
    # the clusters, compresses the queries), so all its integer parameters are named.
    assert budget["memory_compressed"] == "compression=3 (default); state 0.34x full"
    assert budget["clustered"] == ("num_clusters=100 (default), kmeans_iterations=10 (default), topk=32 (default); "
                                   "state 1.00x full")
    build_report(root, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "sequences of up to n = 65 positions (CLS token included)" in md
    assert "state vs full: floats one query reads relative to full attention's keys and values" in md


def test_approximation_cells_of_one_seed_show_the_value_without_a_spread(tmp_path):
    from harness.report.build import approx_section
    from harness.report.page import Page
    from harness.report.tables import approx_table

    def rec(name, seeds, errors, std):
        return {"kind": "approx", "record_id": f"{name}.{len(errors)}", "status": "ok", "created_at": now_iso(),
                "mechanism": name, "param": "num_features", "value": 16, "variant": "iid", "error_mean": 0.25,
                "error_std": std, "errors": errors, "inputs": "iid inputs", "reference": "softmax", **seeds}

    one = pd.DataFrame([rec("performer", {"seeds": 1}, [0.25], 0.0), rec("rfa", {}, [0.25], 0.0)])
    assert set(approx_table(one)["iid"]) == {"0.250"}  # no "± 0.000": one seed has no measured spread
    three = pd.DataFrame([rec("performer", {"seeds": 3}, [0.2, 0.25, 0.3], 0.05)])
    assert list(approx_table(three)["iid"]) == ["0.250 ± 0.050"]
    root = tmp_path / "results"
    write_record(rec("performer", {"seeds": 1}, [0.25], 0.0), root)
    page, files = Page("t"), []
    approx_section(page, load_records(root, kind="approx"), tmp_path, files)
    assert "(1 seed; no spread measured)" in page.markdown() and "± 0.000" not in page.markdown()


@pytest.mark.parametrize("speed, expected", [
    (0.6, "no mechanism is faster than full; the closest, performer (213.3 ms), takes 1.7x full's time; 0 of 1 "
          "mechanisms"),
    (2.0, "fastest performer (64.0 ms), 2.0x full's speed (0.50x full's time); 1 of 1 mechanisms"),
])
def test_speed_finding_says_plainly_whether_anything_beats_full(tmp_path, speed, expected):
    from harness.report import settings as report_settings
    from harness.report.summary import speed_finding
    from harness.report.tables import bench_cells

    root = tmp_path / "results"
    for n in (64, 128):
        write_record(bench_record("full", "fwd+bwd", n, t=1e-3 * n, mem=1e6), root)
        write_record(bench_record("performer", "fwd+bwd", n, t=1e-3 * n / (speed if n == 128 else 0.5), mem=1e6),
                     root)
    bench = load_records(root, kind="bench")
    setting = report_settings(bench)[0]
    finding = speed_finding(bench_cells(setting.records), setting)
    assert finding.startswith("fwd+bwd at n = 128 (") and expected in finding


def _mqar_run(root, attention, seed, status="ok", steps=500, params=None, model=None):
    r = train_record(attention, "mqar", seed, status=status, acc=0.9, max_steps=steps)
    r["record_id"] += f".{len(params or {})}.{len(model or {})}"
    r["experiment"] = "quick/mqar"
    r["config"].update(attention={"name": attention, "params": params or {}}, seed=seed,
                       model={"causal": False, **(model or {})})
    write_record(r, root)


def test_failed_comparisons_do_not_rename_good_ones_and_are_named_against_the_nearest_good_one(tmp_path):
    root = tmp_path / "results"
    for name in ("full", "performer"):
        for seed in (0, 1):
            _mqar_run(root, name, seed)
        _mqar_run(root, name, 0, steps=100)
    _mqar_run(root, "performer", 0, status="error", params={"num_featurs": 8})  # a misspelt parameter
    _mqar_run(root, "linformer", 0, status="error", model={"causal": True})
    titles = sorted(c.title for c in comparisons(load_records(root, kind="train")))
    assert titles == ["mqar (quick/mqar): attention.params.num_featurs=8",
                      "mqar (quick/mqar): model.causal=True",
                      "mqar (quick/mqar): train.max_steps=100",
                      "mqar (quick/mqar): train.max_steps=500"]


@pytest.mark.parametrize("differing, expected_tail", [(5, "k4=1"), (8, "k5=1, +2 more keys")])
def test_up_to_six_differing_keys_are_named_in_full(differing, expected_tail):
    from harness.report.groups import _differences

    mine = {f"k{i}": 1 for i in range(differing)}
    title = _differences(mine, [{}])
    assert title.endswith(expected_tail) and title.count("=1") == min(differing, 6)


def test_smoke_cells_give_no_speed_or_noise_finding(tmp_path):
    """Smoke cells are timed once at tiny n: the summary says so instead of naming a 'fastest' mechanism."""
    root = tmp_path / "results"
    for name, t in (("full", 2e-2), ("performer", 1e-4)):  # a disturbed full cell: performer looks 200x faster
        for n in (32, 64):
            record = bench_record(name, "fwd+bwd", n, t=t, mem=1e6)
            record["smoke"] = True
            write_record(record, root)
    build_report(root, tmp_path / "report")
    summary = (tmp_path / "report" / "report.md").read_text().split("## Figures")[0]
    assert "smoke settings (one repeat, tiny n)" in summary
    assert "fastest" not in summary and "cells were clean" not in summary
    detail = (tmp_path / "report" / "report.md").read_text().split("## Detailed tables")[1]
    assert "SMOKE SETTINGS (one repeat at tiny n)" in detail  # the efficiency tables say so too


def _cells_at(rows, n=4096):
    """Bench cells (the frame of harness.report.tables.bench_cells) from (mechanism, median ms, p10 ms, p90 ms,
    peak MiB, noisy) at one n, plus full's cell at n / 2 (so a length with a clean full is not the only one)."""
    cells = [{"mechanism": m, "pass": "fwd+bwd", "n": n, "outcome": "ok", "median_s": t / 1e3, "p10_s": lo / 1e3,
              "p90_s": hi / 1e3, "peak_bytes": mib * 2**20, "noisy": noisy} for m, t, lo, hi, mib, noisy in rows]
    return pd.DataFrame(cells)


def _setting():
    from harness.report.groups import Setting

    return Setting(key="k", values={}, label="batch 2, cpu, n = 4096", records=pd.DataFrame())


def test_the_fastest_headline_names_the_cells_tied_with_it():
    """sliding_window 84.9 ms leads; aft (p10-p90 overlaps) and clustered (within 5%) are ties; bigbird is
    not (its range starts above the leader's and its median is 10% slower)."""
    from harness.report.summary import speed_finding

    cells = _cells_at([("full", 456.0, 455.0, 458.0, 22, False), ("sliding_window", 84.9, 84.0, 86.0, 172, False),
                       ("aft", 85.4, 85.5, 90.0, 72, False), ("clustered", 88.9, 88.5, 89.5, 12, False),
                       ("bigbird", 93.5, 92.0, 95.0, 280, False)])
    finding = speed_finding(cells, _setting())
    assert "fastest sliding_window (84.9 ms), 5.4x full's speed" in finding
    assert ("tied with aft (85.4 ms), clustered (88.9 ms) (p10–p90 ranges overlap or medians within 5%)"
            in finding)
    assert "bigbird" not in finding


def test_a_noisy_cell_never_leads_a_headline_and_is_named():
    from harness.report.summary import memory_finding, speed_finding

    cells = _cells_at([("full", 456.0, 455.0, 458.0, 22, False), ("linformer", 40.0, 20.0, 102.0, 10, True),
                       ("sliding_window", 84.9, 84.0, 86.0, 172, False), ("clustered", 120.0, 119.0, 121.0, 12.4,
                                                                          False)])
    finding = speed_finding(cells, _setting())
    assert "fastest sliding_window (84.9 ms)" in finding and "(not ranked, cell noisy: linformer)" in finding
    memory = memory_finding(cells)
    assert "smallest clustered (12.4 MiB" in memory and "(not ranked, cell noisy: linformer)" in memory


def test_the_smallest_memory_headline_names_the_cells_tied_with_it():
    from harness.report.summary import memory_finding

    cells = _cells_at([("full", 456.0, 455.0, 458.0, 22.1, False), ("clustered", 90.0, 89.0, 91.0, 12.4, False),
                       ("linformer", 60.0, 59.0, 61.0, 12.9, False), ("aft", 70.0, 69.0, 71.0, 13.5, False)])
    memory = memory_finding(cells)
    assert "smallest clustered (12.4 MiB, 0.56x full's 22.1 MiB), tied with linformer (12.9 MiB) (within 5%)" in memory
    assert "aft" not in memory  # 8.9% above: not a tie


def test_the_accuracy_finding_names_the_mechanisms_tied_with_the_best(tmp_path):
    """The reference's ListOps: aft 33.2 leads, full 32.5 / performer 32.2 / longformer 32.0 are within the seed
    spread (as the ties table marks them); linformer 24.1 is not."""
    from harness.report.summary import accuracy_finding

    root = tmp_path / "results"
    for name, accs in (("aft", (0.326, 0.338)), ("full", (0.32, 0.33)), ("performer", (0.312, 0.332)),
                       ("longformer", (0.302, 0.338)), ("linformer", (0.228, 0.254))):
        for seed, acc in enumerate(accs):
            write_record(train_record(name, "listops", seed, acc=acc), root)
    finding = accuracy_finding(comparisons(load_records(root, kind="train"))[0])
    assert ("best aft 33.2%; tied with it (the seeds cannot tell them apart): full 32.5%, performer 32.2%, "
            "longformer 32.0%; spread 9.1 points") in finding


def test_what_was_run_shows_no_machine_paths(monkeypatch, tmp_path):
    """A worker's command recorded with absolute paths reads relative to the results folder / working folder;
    a path elsewhere (a data folder) is kept."""
    from harness.report.summary import relative_command

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    command = (f"python -m harness.train -m experiment=quick/listops results_dir={here}/results device=cpu "
               f"hydra.sweep.dir={here}/results/multirun/w1 cache_dir={here}/.arena_cache data_root=/data/lra")
    assert relative_command(command, tmp_path / "results") == (
        "python -m harness.train -m experiment=quick/listops results_dir=results device=cpu "
        "hydra.sweep.dir=results/multirun/w1 cache_dir=.arena_cache data_root=/data/lra")
    # The store moved (built elsewhere): the recorded root maps onto the folder the report reads.
    (tmp_path / "copy").mkdir()
    command = "x results_dir=/old/machine/results hydra.sweep.dir=/old/machine/results/multirun/w2"
    assert relative_command(command, tmp_path / "copy") == "x results_dir=copy hydra.sweep.dir=copy/multirun/w2"


def test_the_page_shows_the_commands_without_machine_paths(monkeypatch, store, tmp_path):
    monkeypatch.chdir(store.parent)
    record = train_record("full", "listops", 5, acc=0.37)
    record["command"] = f"python -m harness.train results_dir={store} hydra.sweep.dir={store}/multirun/w1"
    write_record(record, store)
    md = (build_report("results", tmp_path / "r", slope_range=(1024, 4096))["out"] / "report.md").read_text()
    assert "`python -m harness.train results_dir=results hydra.sweep.dir=results/multirun/w1`" in md
    assert str(store) not in md


def test_the_sdpa_overhead_table_marks_values_over_the_target():
    from harness.report.build import overhead_section
    from harness.report.page import Page

    cells = pd.DataFrame([{"mechanism": m, "pass": "fwd+bwd", "n": n, "outcome": "ok", "median_s": t, "noisy": False}
                          for n, full, direct in ((1024, 1.146, 1.0), (2048, 1.04, 1.0), (4096, 1.105, 1.0))
                          for m, t in (("full", full), ("sdpa_direct", direct))])
    page = Page("t")
    overhead_section(page, cells)
    md = page.markdown()
    assert "(target <= +5%; clean cells only; 2 of 3 over the target, marked):" in md
    assert "| fwd+bwd | 1024 | +14.6% (over target) |" in md and "| fwd+bwd | 2048 | +4.0% |" in md
    assert "| fwd+bwd | 4096 | +10.5% (over target) |" in md


def test_the_recipe_as_its_file_sets_it_is_titled_by_the_file_and_a_rung_by_what_differs(tmp_path):
    """quick/mqar run as its file sets it (8 pairs) and a ladder rung (16 pairs): the first is titled by the file
    alone, never 'num_kv_pairs=8'; the rung by its pairs."""
    from test_report_published import _nested

    from harness.report.recipe_files import recipe_file_values

    root = tmp_path / "results"
    recipe = recipe_file_values("quick/mqar")
    for pairs in (8, 16):
        for name in ("full", "performer"):
            record = train_record(name, "mqar", 0, acc=0.9)
            record["record_id"] += f".k{pairs}"
            record["experiment"] = "quick/mqar"
            record["config"] = _nested({**recipe, "task.params.num_kv_pairs": pairs, "device": "cpu",
                                       "attention.name": name, "seed": 0})
            write_record(record, root)
    titles = [c.title for c in comparisons(load_records(root, kind="train"))]
    assert recipe["task.params.num_kv_pairs"] == 8
    assert titles == ["mqar (quick/mqar)", "mqar (quick/mqar): task.params.num_kv_pairs=16"]


def _approx_frame(rows):
    """Approximation records (mechanism, param, value, error_mean) at n = 1024, head dim 32, iid inputs."""
    return pd.DataFrame([{"mechanism": m, "param": p, "value": v, "variant": "iid", "error_mean": e, "error_std": 0.01,
                          "status": "ok", "reference": "softmax", "n": 1024, "head_dim": 32, "errors": [e, e]}
                         for m, p, v, e in rows])


def test_the_approximation_plot_labels_its_log_axis_and_says_which_budget_runs_backwards(monkeypatch, tmp_path):
    """The reference's span (0.03 to 6.9): every decade and its 2 and 5 labelled, not only 0.1 and 1;
    memory_compressed's compression grows as its budget shrinks, and its panel says so."""
    from harness.report import plots
    from harness.report.tables import shrinking_budgets

    approx = _approx_frame([("bigbird", "block_size", v, e) for v, e in ((8, 3.6), (32, 1.6), (128, 0.03))]
                           + [("sliding_window", "window", v, e) for v, e in ((16, 6.9), (512, 1.2))]
                           + [("memory_compressed", "compression", v, e) for v, e in ((2, 1.8), (16, 3.9))]
                           + [("clustered", "num_clusters", v, e) for v, e in ((8, 0.8), (256, 0.6))])
    assert shrinking_budgets(approx) == {"memory_compressed"}  # clustered's state does not change: not in it
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_approx(approx, tmp_path / "a.png", shrinking=shrinking_budgets(approx))
    fig = figures[-1]
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert {"0.05", "0.1", "0.2", "0.5", "1", "2", "5"} <= set(labels)  # not only 0.1 and 1
    xlabels = {a.get_title(): a.get_xlabel() for a in fig.axes if a.get_title()}
    assert xlabels["memory_compressed vs softmax"] == "compression (larger compression = smaller budget)"
    assert xlabels["bigbird vs softmax"] == "block_size"


def test_the_approximation_caption_explains_the_backwards_budget(tmp_path):
    from harness.report.build import approx_section
    from harness.report.page import Page

    approx = _approx_frame([("memory_compressed", "compression", v, e) for v, e in ((2, 1.8), (16, 3.9))]
                           + [("linformer", "proj_dim", v, e) for v, e in ((16, 6.8), (512, 1.4))])
    page, files = Page("t"), []
    approx_section(page, approx, tmp_path, files)
    figure_notes = [value for kind, value in page.parts["figures"] if kind == "p"]
    assert any("memory_compressed (compression: larger compression = smaller budget)" in n for n in figure_notes)


def test_the_suites_report_stage_on_a_folder_without_records_is_one_line_and_exit_2(tmp_path, capsys):
    from harness import suite

    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit) as info:
        suite.run_suite({"stages": ["report"], "results_dir": str(tmp_path / "results")})
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arena-suite: nothing to report: ")
