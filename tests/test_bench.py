"""harness.bench: well-formed records on tiny shapes (ok, unsupported, oom, budget skips), derived figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attentions import build_attention, get_attention_info
from harness import analysis, bench, display
from harness.bench import run as bench_run
from harness.bench.peers import installed
from harness.measure import failure_outcome, is_out_of_memory
from harness.store import REQUIRED_FIELDS, STATUSES, load_records

TINY = {
    "smoke": True,
    "seq_lens": [16, 32],
    "repeats": 2,
    "warmup": 1,
    "approx": {"enabled": False},
    "peers": {"enabled": False},
    "progress": False,
    "print_table": False,
    "include_full_reference": False,  # on by default; the tests that count rows add it where they check it
}


class VirtualClock:
    """The benchmark's clock in these tests: ``harness.measure``'s ``time.perf_counter`` reads a counter that
    only the measured steps advance, by :meth:`cost_s` each (a steady 2 ms per 16 tokens, twice that for
    fwd+bwd), so every noise judgement (rounds' spread, trends, pass inversions) is the test's decision, never
    the load of the machine running it. (A tiny cell really measured on a loaded machine can take 20 ms for
    fwd and 0.2 ms for fwd+bwd: flagged noisy, it is measured again by the next run, and
    test_rerun_reuses_ok_records failed so.) :meth:`disturb` adds time to chosen calls; :meth:`use_real`
    restores the real clock. Memory is measured for real."""

    def __init__(self):
        import types

        from harness import measure as measure_mod
        from harness.bench import cells as bench_cells
        from harness.bench import peers as bench_peers

        self.now = 0.0
        self.patch = pytest.MonkeyPatch()
        self.disturb(0)
        self.patch.setattr(measure_mod, "time", types.SimpleNamespace(perf_counter=lambda: self.now))
        real = measure_mod.make_step
        for module in (measure_mod, bench_cells, bench_peers):  # peers times ours and the peer in rounds too
            self.patch.setattr(module, "make_step", lambda f, leaves, pass_: self._steady(real, f, leaves, pass_))

    @staticmethod
    def cost_s(n: int, pass_: str) -> float:
        return 2e-3 * n / 16 * (2 if pass_ == "fwd+bwd" else 1)

    def disturb(self, measurements: int, n: int = 32, calls=(2,), extra_s: float = 0.3) -> dict:
        """The first ``measurements`` measurements of the cells at ``n`` take ``extra_s`` more in their ``calls``
        (numbered from 1, warm-up calls counted: with warmup=0, call 2 is the second timed round), as another
        process taking the core would cause. Returns the state whose ``"measurements"`` counts the
        measurements at ``n``."""
        self.plan = {"n": n, "disturbed": measurements, "calls": set(calls), "extra_s": extra_s}
        self.state = {"measurements": 0}
        return self.state

    def use_real(self) -> None:
        self.patch.undo()

    def _steady(self, real, forward, leaves, pass_):
        step, clear_grads = real(forward, leaves, pass_)
        n = leaves[0].shape[-2] if leaves else 16  # a peer's fwd step has no leaves (no gradients): cost of n=16
        disturbed = n == self.plan["n"] and self.state["measurements"] < self.plan["disturbed"]
        self.state["measurements"] += n == self.plan["n"]
        calls = {"k": 0}

        def timed():
            calls["k"] += 1
            burst = disturbed and calls["k"] in self.plan["calls"]
            self.now += self.cost_s(n, pass_) + (self.plan["extra_s"] if burst else 0.0)
            step()

        return timed, clear_grads


@pytest.fixture(autouse=True)
def clock():
    """Every test here runs on the :class:`VirtualClock`."""
    c = VirtualClock()
    yield c
    c.use_real()


def run(tmp_path: Path, **overrides) -> pd.DataFrame:
    cfg = {**TINY, "results_dir": str(tmp_path), **overrides}
    return bench.run_benchmark(cfg, log=lambda _: None)


def read_bench_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "bench").glob("*.json"))]


def test_tiny_run_writes_well_formed_records_with_an_unsupported_cell(tmp_path):
    df = run(tmp_path, mechanisms=["full", "linformer"], params={"linformer": {"max_seq_len": 16}},
             include_full_reference=True)
    records = read_bench_records(tmp_path)
    # full, full_reference, sdpa_direct, linformer x 2 n x 2 passes
    assert len(records) == len(df) == 16
    for r in records:
        for field in REQUIRED_FIELDS:
            assert field in r
        assert r["kind"] == "bench" and r["status"] in STATUSES
        assert r["status"] in bench.OUTCOMES and "outcome" not in r
        assert r["pass"] in bench.PASSES
        assert r["device_info"]["torch_version"] == torch.__version__
        if r["status"] == "ok":
            assert r["time"]["p10_s"] <= r["time"]["median_s"] <= r["time"]["p90_s"]
            assert len(r["time"]["times_s"]) == 2
            assert r["memory"]["peak_bytes"] > 0
            assert r["memory"]["method"] == "torch.profiler(cpu alloc events)"
    by = {(r["mechanism"], r["pass"], r["n"]): r for r in records}
    assert {m for m, _, _ in by} == {"full", "full_reference", "sdpa_direct", "linformer"}
    for pass_ in bench.PASSES:
        assert by[("linformer", pass_, 16)]["status"] == "ok"
        bad = by[("linformer", pass_, 32)]
        assert bad["status"] == "unsupported"
        assert "max_seq_len" in bad["reason"]
        assert "time" not in bad
        assert by[("full", pass_, 32)]["backend"] == "sdpa"
        # The second exact baseline: full on its reference backend, recorded as such (issue 23).
        reference = by[("full_reference", pass_, 32)]
        assert reference["backend"] == "reference" and reference["params"]["backend"] == "reference"
        assert reference["family"] == "exact" and reference["protocol"]["backend"] == "reference"
        assert by[("full", pass_, 32)]["protocol"]["masks"].startswith("none")
        assert {"layout", "warmup", "threads", "cpu_allocator", "dropout_policy"} <= set(reference["protocol"])
    # The store reads them back as a DataFrame with flattened columns.
    loaded = load_records(tmp_path, kind="bench")
    assert {"time.median_s", "memory.peak_bytes", "mechanism", "n", "pass"} <= set(loaded.columns)


def test_backward_peak_exceeds_forward_peak(tmp_path):
    df = run(tmp_path, mechanisms=["performer"], include_sdpa_direct=False, seq_lens=[64])
    peak = df.set_index("pass")["peak_bytes"]
    # Under no_grad nothing is saved for backward; fwd+bwd also keeps activations and gradients.
    assert peak["fwd+bwd"] > peak["fwd"] > 0


def _fail_attend(monkeypatch, mechanism: str, exc: Exception, when=lambda n: True) -> None:
    """``mechanism`` raises ``exc`` for inputs of ``n`` tokens where ``when(n)``."""
    cls = get_attention_info(mechanism).cls
    real = cls.attend

    def attend(self, q, k, v, key_padding_mask):
        if when(q.shape[-2]):
            raise exc
        return real(self, q, k, v, key_padding_mask)

    monkeypatch.setattr(cls, "attend", attend)


OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")


def test_out_of_memory_is_recorded_as_oom_and_larger_n_not_run(tmp_path, monkeypatch):
    # The probes (n = 4, 8) fit; the cell at 16 runs out of memory, so 32 is not run.
    _fail_attend(monkeypatch, "performer", OOM, when=lambda n: n >= 16)
    df = run(tmp_path, mechanisms=["performer"], include_sdpa_direct=False, seq_lens=[16, 32], passes=["fwd"])
    records = {r["n"]: r for r in read_bench_records(tmp_path)}
    assert records[16]["status"] == "oom"
    assert "out of memory" in records[16]["reason"]
    assert records[32]["status"] == "oom" and "n=16" in records[32]["reason"]
    assert list(df["outcome"]) == ["oom", "oom"]


def test_a_probe_out_of_memory_stops_the_row_before_its_first_cell(tmp_path, monkeypatch):
    _fail_attend(monkeypatch, "performer", OOM)
    measured = []
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: measured.append(a) or {})
    run(tmp_path, mechanisms=["performer"], include_sdpa_direct=False, seq_lens=[16, 32], passes=["fwd"])
    records = {r["n"]: r for r in read_bench_records(tmp_path)}
    assert measured == []  # no cell measured: the probe at n = 4 already ran out of memory
    for n in (16, 32):
        assert records[n]["status"] == "oom" and "probe n=4" in records[n]["reason"]


def test_a_failed_probe_leaves_the_cell_measured_and_says_it_was_not_guarded(tmp_path, monkeypatch):
    # A mechanism refusing short inputs (a plug-in may): no prediction, the cell is measured, the console says so.
    _fail_attend(monkeypatch, "performer", ValueError("needs at least 16 tokens"), when=lambda n: n < 16)
    lines = []
    bench.run_benchmark({**TINY, "results_dir": str(tmp_path), "mechanisms": ["performer"], "seq_lens": [16],
                         "passes": ["fwd"]}, log=lines.append)
    record = read_bench_records(tmp_path)[0]
    assert record["status"] == "ok" and "predicted_step_s" not in record["time"]
    assert lines == ["bench: performer fwd n=16: measured without a prediction "
                     "(probe n=4: unsupported: needs at least 16 tokens)"]


def test_cpu_allocator_failure_counts_as_oom_other_errors_as_error():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: "
                                               "can't allocate memory: you tried to allocate 1 bytes"))
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert failure_outcome(ValueError("n too long"))["outcome"] == "unsupported"
    assert failure_outcome(KeyError("x"))["outcome"] == "error"


def test_memory_budget_guards_the_first_length_from_two_probes(tmp_path, monkeypatch):
    # 1 KB budget: even the first length is predicted over it, from the probes at n = 4 and 8; nothing is measured.
    measured = []
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: measured.append(a) or {})
    lines = []
    bench.run_benchmark({**TINY, "results_dir": str(tmp_path), "mechanisms": ["full"], "include_sdpa_direct": False,
                         "seq_lens": [16, 32], "passes": ["fwd+bwd"], "memory_budget_gb": 1e-6}, log=lines.append)
    assert measured == []
    records = {r["n"]: r for r in read_bench_records(tmp_path)}
    first = records[16]
    # Stored with its own status (no stand-in "oom" + "outcome" field), the reason naming the budget first.
    assert first["status"] == "skipped_budget" and "outcome" not in first and first["budget"] == "memory"
    assert first["reason"].startswith("memory, predicted peak") and "n=4 (probe)" in first["reason"]
    # The prediction and the probes it came from are in the record.
    assert first["predicted_peak_bytes"] == first["memory"]["predicted_peak_bytes"] > 1000
    assert [n for n, _ in first["memory"]["probes"]] == [4, 8] and first["time"]["predicted_from_n"] == [4, 8]
    assert [n for n, _ in first["time"]["probes"]] == [4, 8] and first["time"]["predicted_cell_s"] > 0
    assert records[32]["status"] == "skipped_budget"
    assert lines[0].startswith("bench: full fwd+bwd n=16 not measured: over budget: memory, predicted peak")


def test_memory_budget_skips_a_longer_n_from_the_measured_lengths(tmp_path):
    settings = {"mechanisms": ["full"], "include_sdpa_direct": False, "seq_lens": [16, 32, 64], "passes": ["fwd+bwd"]}
    run(tmp_path / "free", **settings, memory_budget_gb=None)
    predicted = {r["n"]: r["memory"]["predicted_peak_bytes"] for r in read_bench_records(tmp_path / "free")}
    assert predicted[32] < predicted[64]
    # A budget between the predictions at 32 (from 8 and 16) and at 64 (from 16 and 32): 64 alone is skipped.
    run(tmp_path, **settings, memory_budget_gb=(predicted[32] + predicted[64]) / 2e9)
    records = {r["n"]: r for r in read_bench_records(tmp_path)}
    assert records[16]["status"] == records[32]["status"] == "ok"
    assert records[32]["time"]["predicted_from_n"] == [8, 16]  # a probe and a measured length
    assert records[64]["status"] == "skipped_budget" and records[64]["memory"]["predicted_peak_bytes"] == pytest.approx(
        predicted[64])
    assert "probes" not in records[64]["memory"] and "n=16: " in records[64]["reason"]


def test_the_issue_s_million_token_performer_is_skipped_without_being_run(tmp_path, monkeypatch):
    """`arena-bench mechanisms=[performer] seq_lens=[1048576]` grew to 21.9 GB before it was killed: the probes
    at 256 and 512 tokens predict the peak, far beyond the default 6 GB budget, and the cell is not run."""
    measured = []
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: measured.append(a) or {})
    run(tmp_path, smoke=False, mechanisms=["performer"], seq_lens=[1048576], passes=["fwd+bwd"], repeats=1)
    record = read_bench_records(tmp_path)[0]
    assert measured == [] and record["status"] == "skipped_budget" and record["budget"] == "memory"
    assert record["memory"]["predicted_peak_bytes"] > 6e9 and record["time"]["predicted_from_n"] == [256, 512]


def test_guard_prediction_is_a_power_law_through_the_two_nearest_points_below():
    from harness.bench import guard

    settings = bench.resolve_settings({**TINY, "repeats": 3, "warmup": 1})
    row = guard.Row()
    for n, t, m in ((256, 1e-3, 1e5), (1024, 0.01, 1e6), (2048, 0.04, 2e6)):
        row.add(guard.Point(n, t, m))
    pred = guard.predict(row, 8192, settings)
    assert [p.n for p in pred.basis] == [1024, 2048]
    assert pred.step_s == pytest.approx(0.04 * 16) and pred.peak_bytes == pytest.approx(8e6)  # slopes 2 and 1
    assert pred.cell_s == pytest.approx(0.04 * 16 * 5)  # warm-up + repeats + the memory step
    assert guard.predict(guard.Row([guard.Point(16, 1.0, 1.0)]), 32, settings) is None
    # Probes: 256 and 512 before a long first length, a quarter and a half of a short one, none for a tiny one.
    assert guard.probe_lengths(1048576, []) == [256, 512]
    assert guard.probe_lengths(256, []) == [64, 128]
    assert guard.probe_lengths(4096, [guard.Point(1024, 1.0, 1.0)]) == [256, 512]  # below the one point known
    assert guard.probe_lengths(2, []) == [] and guard.probe_lengths(4096, list(row.points[:2])) == []


def test_probes_run_on_one_cpu_thread_and_restore_the_thread_count(monkeypatch):
    """Tiny probe steps with two threads on a busy machine took 5-15x longer; on one they cost 0.7 s for all the
    default suite's rows. The benchmark's own thread count is restored afterwards."""
    from harness.bench import guard

    seen = []
    real = guard.measure_cells
    monkeypatch.setattr(guard, "measure_cells", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row = guard.Row()
        assert guard.probe("full", [4, 8], "fwd", bench.resolve_settings(dict(TINY)), row) is None
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert [(p.n, p.probe) for p in row.points] == [(4, True), (8, True)]
    finally:
        torch.set_num_threads(before)


def test_time_limit_skip_names_the_estimate_and_a_long_cell_is_announced(tmp_path, clock, monkeypatch):
    from harness.bench import guard

    lines = []
    base = {**TINY, "results_dir": str(tmp_path), "mechanisms": ["full", "performer"], "include_sdpa_direct": False,
            "passes": ["fwd"], "seq_lens": [16, 64], "repeats": 3, "warmup": 1}
    # The virtual clock: 2 ms per 16 tokens per step; at 64 tokens a cell of 5 steps is predicted at 40 ms.
    monkeypatch.setattr(bench_run, "LONG_CELL_S", 0.05)
    bench.run_benchmark({**base, "max_cell_s": 0.03}, log=lines.append)
    records = {(r["mechanism"], r["n"]): r for r in read_bench_records(tmp_path)}
    assert records[("full", 16)]["status"] == "ok"
    skipped = records[("full", 64)]
    assert skipped["status"] == "skipped_budget" and skipped["budget"] == "time"
    assert skipped["time"]["predicted_cell_s"] == pytest.approx(5 * clock.cost_s(64, "fwd"))
    assert skipped["reason"].startswith("time, predicted cell time 40.0 ms > max_cell_s 0.03 s (power law through "
                                        "n=8 (probe): 1.0 ms, ")
    assert " and n=16: 2.0 ms, " in skipped["reason"] and skipped["time"]["predicted_from_n"] == [8, 16]
    assert [line.split(":")[1] for line in lines] == [" full fwd n=64 not measured", " performer fwd n=64 not measured"]
    lines.clear()
    bench.run_benchmark({**base, "results_dir": str(tmp_path / "b"), "max_cell_s": None}, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        "bench: n=64 fwd: measuring 2 mechanisms in 3 interleaved rounds, about 80.0 ms in all; longest: full about "
        "40.0 ms, peak about ")
    assert "performer about 40.0 ms, peak about " in lines[0]
    lines.clear()
    monkeypatch.setattr(bench_run, "LONG_CELL_S", 0.03)
    bench.run_benchmark({**base, "results_dir": str(tmp_path / "c"), "max_cell_s": None, "mechanisms": ["full"]},
                        log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("bench: n=64 fwd: measuring full, about 40.0 ms, peak about ")
    assert guard.LONG_CELL_S == 10.0


def test_time_budget_skip_is_stored_as_skipped_budget_saying_time(tmp_path):
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16, 32, 64], passes=["fwd"],
        max_cell_s=1e-9)
    records = {r["n"]: r for r in read_bench_records(tmp_path)}
    skipped = records[64]
    assert skipped["status"] == "skipped_budget" and skipped["budget"] == "time"
    assert skipped["reason"].startswith("time") and "max_cell_s" in skipped["reason"]


def test_record_outcome_reads_new_and_legacy_budget_skips():
    assert bench.record_outcome({"status": "skipped_budget"}) == "skipped_budget"
    # Written before the store knew the status: a stand-in "oom" with the real outcome beside it.
    assert bench.record_outcome({"status": "oom", "outcome": "skipped_budget"}) == "skipped_budget"
    assert bench.record_outcome({"status": "oom"}) == "oom"


def test_rerun_reuses_ok_records(tmp_path, monkeypatch):
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16])

    def fail(*args, **kwargs):
        raise AssertionError("measured again although the store had the cell")

    monkeypatch.setattr(bench_run, "measure_cells", fail)
    df = run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16])
    assert list(df["outcome"]) == ["ok", "ok"]
    # A different setting is a different cell.
    with pytest.raises(AssertionError, match="measured again"):
        run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16], batch=3)


def test_cells_of_another_cpu_allocator_policy_are_not_reused(tmp_path, monkeypatch):
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16], passes=["fwd"])
    assert read_bench_records(tmp_path)[0]["cpu_allocator"] == "default"

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(bench_run, "measure_cells", fail)
    # mallopt is process-wide, so the test process pretends: only the recorded description matters here.
    monkeypatch.setattr(bench_run, "configure_cpu_allocator", lambda mode: "reuse:fake")
    with pytest.raises(AssertionError, match="measured again"):
        run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16], passes=["fwd"],
            cpu_allocator="reuse")
    with pytest.raises(ValueError, match="cpu_allocator must be one of"):
        run(tmp_path, cpu_allocator="tcmalloc")


def test_approximation_error_records(tmp_path):
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path), "approx": {"variants": ["iid"]}})
    df = bench.approximation_errors(settings, mechanisms=["performer", "sliding_window", "full"], log=lambda _: None)
    assert set(df["mechanism"]) == {"performer", "sliding_window"}  # full is the reference, not swept
    assert (df["status"] == "ok").all()
    sw = df[df["mechanism"] == "sliding_window"].set_index("value")["error_mean"]
    # A window covering the whole 64-token sequence is exact; a small one is not.
    assert sw[128] < 1e-5 < 0.05 < sw[8]
    perf = df[df["mechanism"] == "performer"]["error_mean"]
    assert ((perf > 0) & (perf < 2)).all()
    records = load_records(tmp_path, kind="approx")
    assert len(records) == len(df)
    assert records["inputs"].str.contains("N\\(0, 1\\)").all()


def test_approx_inputs_variants_have_the_documented_scale():
    q, k, v = bench.approx_inputs("iid", 1, 2, 512, 32, seed=0)
    assert abs(float(q.std()) - 1) < 0.05 and abs(float(v.mean())) < 0.05
    q, k, _ = bench.approx_inputs("smooth", 1, 2, 512, 32, seed=0)
    assert abs(float(q.std()) - 1) < 0.2
    # Neighbours are correlated (AR(1), rho = 0.95), distant tokens are not.
    near = float((q[..., 1:, :] * q[..., :-1, :]).mean())
    far = float((q[..., 200:, :] * q[..., :-200, :]).mean())
    assert near > 0.8 and abs(far) < 0.2
    with pytest.raises(ValueError, match="variant"):
        bench.approx_inputs("nope", 1, 1, 4, 4, 0)


# ----------------------------------------------------------------------------------------------
# Derived figures on synthetic data with known answers
# ----------------------------------------------------------------------------------------------

NS = [1024, 2048, 4096, 8192, 16384]


@pytest.mark.parametrize("exponent", [1.0, 1.5, 2.0])
def test_loglog_slope_recovers_a_known_exponent(exponent):
    values = [3e-7 * n**exponent for n in NS]
    assert analysis.loglog_slope(NS, values) == pytest.approx(exponent, abs=1e-9)


def test_loglog_slope_uses_only_the_range_and_skips_missing():
    # Quadratic above 2K, flat (overhead-dominated) below: the default range sees only the tail.
    values = [5.0, 5.0 * 4, 5.0 * 16, None, 5.0 * 256]
    assert analysis.loglog_slope(NS, values, (2048, 16384)) == pytest.approx(2.0)
    assert math.isnan(analysis.loglog_slope(NS, [1, None, None, None, None]))
    assert math.isnan(analysis.loglog_slope(NS, [1.0, 2.0, 0.0, np.nan, -1.0], (4096, 16384)))


def test_crossover_length_of_power_laws_is_exact():
    t_full = [1e-6 * n**2 for n in NS]
    t_lin = [4e-3 * n for n in NS]  # equal at n = 4000
    n_x, note = analysis.crossover_length(NS, t_lin, t_full)
    assert note == "interpolated" and n_x == pytest.approx(4000.0)
    assert analysis.crossover_length(NS, [1e-9] * 5, t_full) == (1024.0, "faster at all n")
    n_x, note = analysis.crossover_length(NS, [10 * t for t in t_full], t_full)
    assert math.isnan(n_x) and note == "never faster"


def test_crossover_takes_the_last_crossing_when_noise_dips_early():
    t_full = [1.0, 1.0, 1.0, 1.0, 1.0]
    t_mech = [0.9, 1.1, 1.2, 0.5, 0.5]  # faster at 1K by noise, slower at 2K-4K, faster from 8K
    n_x, note = analysis.crossover_length(NS, t_mech, t_full)
    assert note == "interpolated" and 4096 < n_x < 8192


def test_relative_to_full_is_the_lra_table2_ratio():
    df = pd.DataFrame({
        "mechanism": ["full", "full", "fast", "fast", "broken"],
        "pass": ["fwd"] * 5,
        "n": [1024, 2048, 1024, 2048, 1024],
        "outcome": ["ok", "ok", "ok", "ok", "oom"],
        "median_s": [1.0, 4.0, 0.5, 1.0, None],
        "peak_bytes": [100.0, 400.0, 50.0, 100.0, None],
    })
    rel = analysis.relative_to_full(df).set_index(["mechanism", "n"])
    assert rel.loc[("fast", 1024), "speedup"] == pytest.approx(2.0)
    assert rel.loc[("fast", 2048), "speedup"] == pytest.approx(4.0)
    assert rel.loc[("fast", 2048), "memory_ratio"] == pytest.approx(0.25)
    assert rel.loc[("full", 1024), "speedup"] == pytest.approx(1.0)
    assert math.isnan(rel.loc[("broken", 1024), "speedup"])  # missing, never zero


def test_longest_n_within_budget_measured_and_extrapolated():
    mem = [10.0 * n**2 for n in NS]
    fit = analysis.longest_n_within_budget(NS, mem, budget_bytes=10.0 * 5000**2)
    assert fit["measured"] == 4096
    assert fit["extrapolated"] == pytest.approx(5000.0)
    fit = analysis.longest_n_within_budget(NS, [8.0 * n for n in NS], budget_bytes=8.0 * 60_000)
    assert fit["measured"] == 16384 and fit["extrapolated"] == pytest.approx(60_000.0)
    assert math.isnan(analysis.longest_n_within_budget(NS, mem, budget_bytes=1.0)["measured"])


def test_longest_n_never_exceeds_four_times_the_largest_measured_n():
    """A linear fit to a 6 GB budget from 16K tokens would claim ~10^8 tokens: past 4 x 16384 it says so."""
    fit = analysis.longest_n_within_budget(NS, [8.0 * n for n in NS], budget_bytes=6e9)
    assert math.isnan(fit["extrapolated"]) and fit["beyond"] == 4 * 16384
    for budget in (1e5, 1e6, 1e7, 1e9, 1e12):
        fit = analysis.longest_n_within_budget(NS, [8.0 * n for n in NS], budget_bytes=budget)
        assert not fit["extrapolated"] > 4 * max(NS)
    cells = pd.DataFrame({"mechanism": "lin", "pass": "fwd", "n": NS, "outcome": "ok",
                          "median_s": [1e-3 * n for n in NS], "peak_bytes": [8.0 * n for n in NS]})
    shown = display.derived_display(cells, None, 6e9)
    assert list(shown["longest n extrapolated"]) == [f"> {4 * 16384}, not measured"]


def test_slope_range_is_derived_from_the_measured_lengths_when_not_given():
    assert analysis.slope_range_for([256, 512, 1024, 2048, 4096]) == (1024, 4096)
    assert analysis.slope_range_for([1024, 4096]) == (1024, 4096)  # the README's small example has a slope
    assert analysis.slope_range_for([1024]) is None
    assert analysis.slope_range_for([1024, 4096], (2048, 16384)) == (2048, 16384)


def test_predict_at_extrapolates_and_clamps():
    assert analysis.predict_at([1, 2], [10.0, 40.0], 4) == pytest.approx(160.0)  # quadratic
    assert analysis.predict_at([1, 2], [10.0, 10.0], 4) == pytest.approx(20.0)  # never below linear
    assert analysis.predict_at([1], [10.0], 4) is None


def test_derived_table_on_synthetic_cells():
    rows = []
    for n in NS:
        rows.append({"mechanism": "full", "pass": "fwd", "n": n, "outcome": "ok",
                     "median_s": 1e-6 * n**2, "peak_bytes": 4.0 * n**2})
        rows.append({"mechanism": "lin", "pass": "fwd", "n": n, "outcome": "ok",
                     "median_s": 4e-3 * n, "peak_bytes": 64.0 * n})
    derived = analysis.derived_table(pd.DataFrame(rows), budget_bytes=4.0 * 8192**2).set_index("mechanism")
    assert derived.loc["full", "time_slope"] == pytest.approx(2.0)
    assert derived.loc["lin", "memory_slope"] == pytest.approx(1.0)
    assert derived.loc["lin", "crossover_n"] == pytest.approx(4000.0)
    assert derived.loc["full", "max_n_measured"] == 8192


# ----------------------------------------------------------------------------------------------
# Settings and the Hydra config
# ----------------------------------------------------------------------------------------------


def test_unknown_setting_and_mechanism_are_rejected():
    with pytest.raises(ValueError, match="unknown benchmark setting"):
        bench.resolve_settings({"seq_len": [1]})
    with pytest.raises(ValueError, match="unknown mechanism"):
        bench.select_mechanisms(["fulll"])
    with pytest.raises(ValueError, match="passes"):
        bench.resolve_settings({"passes": ["bwd"]})
    for bad in ([-5], [0, 256], []):
        with pytest.raises(ValueError, match="seq_lens must be a non-empty list of positive lengths"):
            bench.resolve_settings({"seq_lens": bad})


# Every numeric setting (and every flag, list and name): the value, the exact one-line message.
BAD_SETTINGS = [
    ({"batch": 0}, "batch must be an integer >= 1, got 0"),
    ({"batch": 2.5}, "batch must be an integer >= 1, got 2.5"),
    ({"batch": "two"}, "batch must be an integer >= 1, got 'two'"),
    ({"batch": True}, "batch must be an integer >= 1, got True"),
    ({"heads": 0}, "heads must be an integer >= 1, got 0"),
    ({"head_dim": -4}, "head_dim must be an integer >= 1, got -4"),
    ({"repeats": 0}, "repeats must be an integer >= 1 (timed calls per cell), got 0"),
    ({"warmup": -1}, "warmup must be an integer >= 0 (untimed calls per cell), got -1"),
    ({"remeasure": -1}, "remeasure must be an integer >= 0 (extra measurements of a disturbed cell), got -1"),
    ({"max_spread": 0.5}, "max_spread must be a number >= 1 (p90/p10 ratio), got 0.5"),
    ({"max_spread": None}, "max_spread must be a number >= 1 (p90/p10 ratio), got None"),
    ({"memory_budget_gb": 0}, "memory_budget_gb must be a number > 0 (GB), or null for no limit, got 0"),
    ({"memory_budget_gb": -6}, "memory_budget_gb must be a number > 0 (GB), or null for no limit, got -6"),
    ({"max_cell_s": 0}, "max_cell_s must be a number > 0 (seconds), or null for no limit, got 0"),
    ({"max_cell_s": float("inf")}, "max_cell_s must be a number > 0 (seconds), or null for no limit, got inf"),
    ({"max_cell_s": "1m"}, "max_cell_s must be a number > 0 (seconds), or null for no limit, got '1m'"),
    ({"approx": {"n": 0}}, "approx.n must be an integer >= 1 (tokens), got 0"),
    ({"approx": {"seeds": 0}}, "approx.seeds must be an integer >= 1, got 0"),
    ({"approx": {"batch": -1}}, "approx.batch must be an integer >= 1, got -1"),
    ({"seq_lens": [0, 256]}, "seq_lens must be a non-empty list of positive lengths, got [0, 256]"),
    ({"seq_lens": [1024.5]}, "seq_lens must be a non-empty list of positive lengths, got [1024.5]"),
    ({"seq_lens": 1024}, "seq_lens must be a non-empty list of positive lengths, got 1024"),
    ({"peers": {"seq_lens": [-1]}}, "peers.seq_lens must be a list of positive lengths, got [-1]"),
    ({"slope_range": [4096, 1024]}, "slope_range must be null or [low, high] with 0 < low < high, got [4096, 1024]"),
    ({"slope_range": [1024]}, "slope_range must be null or [low, high] with 0 < low < high, got [1024]"),
    ({"causal": "yes"}, "causal must be true or false, got 'yes'"),
    ({"progress": 1}, "progress must be true or false, got 1"),
    ({"reuse": "true"}, "reuse must be true or false, got 'true'"),
    ({"include_sdpa_direct": 0}, "include_sdpa_direct must be true or false, got 0"),
    ({"include_full_reference": "yes"}, "include_full_reference must be true or false, got 'yes'"),
    ({"smoke": "yes"}, "smoke must be true or false, got 'yes'"),
    ({"force": None}, "force must be true or false, got None"),
    ({"print_table": "off"}, "print_table must be true or false, got 'off'"),
    ({"approx": {"enabled": "no"}}, "approx.enabled must be true or false, got 'no'"),
    ({"peers": {"enabled": None}}, "peers.enabled must be true or false, got None"),
    ({"dtype": "float8"}, "dtype must be one of float32, float16, bfloat16, float64, got 'float8'"),
    ({"passes": []}, "passes must be a non-empty list among fwd, fwd+bwd, got []"),
    ({"approx": {"variants": ["gauss"]}}, "approx.variants must be a non-empty list among iid, smooth, got ['gauss']"),
    ({"approx": {"budgets": "tiny"}}, "approx.budgets must be one of default, smoke, got 'tiny'"),
    ({"decode": {"tokens": 16}}, "decode.tokens must be an integer >= 32 (timed tokens per decode cell), got 16"),
    ({"mode": "decoding"}, "mode must be one of efficiency, decode, got 'decoding'"),
    ({"decode": {"contexts": []}}, "decode.contexts must be a non-empty list of positive lengths, got []"),
    ({"decode": {"batches": [0]}}, "decode.batches must be a non-empty list of batch sizes >= 1, got [0]"),
    ({"decode": {"scopes": ["layer"]}}, "decode.scopes must be a non-empty list among mechanism, model, got ['layer']"),
    ({"decode": {"model_sizes": ["huge"]}},
     "decode.model_sizes must be a non-empty list among mqar_causal, large, mqar_causal_mqa, got ['huge']"),
    ({"decode": {"recompute_contexts": [-1]}},
     "decode.recompute_contexts must be a list of positive lengths, got [-1]"),
    ({"approx": 3}, "approx must be a mapping of ['batch', 'budgets', 'enabled', 'n', 'seeds', 'variants'], got 3"),
]


@pytest.mark.parametrize(("given", "message"), BAD_SETTINGS)
def test_every_bad_setting_is_one_error_naming_it_and_what_is_allowed(given, message):
    import re

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        bench.resolve_settings(given)


def test_the_bad_settings_table_covers_every_numeric_setting_and_flag():
    """A numeric field or flag added to BenchSettings (or a section) must get a rule, and a bad-value row."""
    from dataclasses import fields

    from harness.bench import settings as bench_settings

    def names(cls, prefix, types):
        return {prefix + f.name for f in fields(cls) if str(f.type).replace(" | None", "") in types}

    numeric = names(bench.BenchSettings, "", {"int", "float"}) | names(bench_settings.ApproxSettings, "approx.",
                                                                      {"int", "float"})
    numeric |= names(bench_settings.PeerSettings, "peers.", {"int", "float"})
    numeric |= names(bench_settings.DecodeSettings, "decode.", {"int", "float"})
    assert numeric == set(bench_settings.NUMBERS)
    flags = (names(bench.BenchSettings, "", {"bool"}) | names(bench_settings.ApproxSettings, "approx.", {"bool"})
             | names(bench_settings.PeerSettings, "peers.", {"bool"}))
    assert flags == set(bench_settings.FLAGS)
    tested = {next(f"{k}.{kk}" if isinstance(v, dict) else k for kk in (v if isinstance(v, dict) else [None]))
              for given, _ in BAD_SETTINGS for k, v in given.items()}
    assert numeric | flags | {"seq_lens", "peers.seq_lens", "slope_range"} <= tested


def test_good_numbers_are_normalised_and_null_means_no_limit():
    s = bench.resolve_settings({"batch": 2.0, "seq_lens": [2048, 1024.0], "memory_budget_gb": None,
                                "max_cell_s": None, "max_spread": 1, "slope_range": [1024, 4096]})
    assert s.batch == 2 and isinstance(s.batch, int) and s.seq_lens == [1024, 2048]
    assert s.budget_bytes is None and s.max_cell_s is None and s.max_spread == 1.0
    assert bench.resolve_settings({}).max_cell_s == 120.0  # the default time limit


@pytest.mark.parametrize(("args", "message"), [
    (["batch=0"], "batch must be an integer >= 1, got 0"),
    (["repeats=0"], "repeats must be an integer >= 1 (timed calls per cell), got 0"),
    (["head_dim=-4"], "head_dim must be an integer >= 1, got -4"),
    (["mechanisms=[my_attentoin]"], "unknown mechanism(s) ['my_attentoin']; registered: aft, bigbird, "),
])
def test_arena_bench_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["arena-bench", f"results_dir={tmp_path}/r", *args])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"arena-bench: {message}") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_unknown_mechanism_says_how_to_load_a_plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"add plugins=\[<module>\], or install it as a package"):
        bench.select_mechanisms(["my_attentoin"])
    (tmp_path / "my_attention.py").write_text("")
    with pytest.raises(ValueError, match=r"unknown mechanism\(s\) \['my_attention'\]; registered: .*full.*"
                                         r"\(plugins=\[my_attention\] for ./my_attention.py in this folder\)"):
        bench.select_mechanisms(["full", "my_attention"])
    with pytest.raises(ValueError, match=r"params: unknown mechanism\(s\) \['my_attention'\].*"
                                         r"plugins=\[my_attention\]"):
        bench.prepare_benchmark({**TINY, "mechanisms": ["full"], "params": {"my_attention": {}}})


def test_smoke_replaces_defaults_but_keeps_user_values():
    s = bench.resolve_settings({**bench.DEFAULTS, "smoke": True, "batch": 3})
    assert s["seq_lens"] == bench.SMOKE_OVERRIDES["seq_lens"]
    assert s["batch"] == 3
    assert s["approx"]["n"] == 64 and s["approx"]["enabled"] is True


def test_linformer_gets_max_seq_len_n_and_documented_settings():
    s = bench.resolve_settings({})
    assert bench.mechanism_params("linformer", 4096, s)["max_seq_len"] == 4096
    assert bench.mechanism_params("linformer", 4096, s)["proj_dim"] == 256
    assert bench.mechanism_params("longformer", 1024, s)["window"] == 256


def test_conf_bench_yaml_matches_the_code_defaults():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="bench"), resolve=True)
    assert set(cfg) == set(bench.DEFAULTS)
    resolved = bench.resolve_settings(cfg)
    assert resolved["seq_lens"] == [1024, 2048, 4096, 8192, 16384]
    assert resolved["batch"] == 2 and resolved["heads"] == 4 and resolved["head_dim"] == 32
    assert resolved == bench.resolve_settings({})  # every value of the file is the code's default


def test_format_cell_never_shows_zero_for_a_missing_cell():
    assert display.format_cell(pd.Series({"outcome": "oom", "median_s": None, "peak_bytes": None})) == "oom"
    assert "budget" in display.format_cell(pd.Series({"outcome": "skipped_budget"}))


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------


def test_peers_without_the_extra_give_cells_that_say_not_installed(tmp_path, monkeypatch):
    # Issue 23: a peer that is not installed gives its cells, saying so, per pair (never a silent skip).
    from harness.bench import peers
    from harness.report.tables import peer_table

    monkeypatch.setattr(peers, "installed", lambda package: False)
    lines = []
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path)})
    df = peers.run_peers(settings, log=lines.append)
    assert set(df["status"]) == {"unsupported"}
    assert all(r.startswith("not installed: pip install ") for r in df["reason"])
    assert "not installed" in lines[0] and "performer-pytorch" in lines[0]
    records = [json.loads(f.read_text()) for f in (tmp_path / "peer").glob("*.json")]
    assert len(records) == len(df) and all(r["peer_installed"] is False for r in records)
    assert set(peer_table(pd.DataFrame(records)).iloc[:, -1]) == {"— (not installed)"}
    # Installed later: the same command measures them (a not-installed record is never reused).
    monkeypatch.setattr(peers, "installed", lambda package: True)
    calls = []
    monkeypatch.setattr(peers, "measure_pair", lambda *a: calls.append(a) or {"time_ratio": 1.0, "memory_ratio": 1.0})
    assert set(peers.run_peers(settings, log=lines.append)["status"]) == {"ok"}
    assert len(calls) == len(df)


def test_peers_with_no_peer_for_the_selection_say_so_not_missing_extra(tmp_path, monkeypatch):
    from harness.bench import peers

    monkeypatch.setattr(peers, "installed", lambda package: True)
    lines = []
    settings = bench.resolve_settings({**TINY, "mechanisms": ["full"], "results_dir": str(tmp_path)})
    assert peers.run_peers(settings, log=lines.append).empty
    assert lines == ["peers: none of the selected mechanisms has a public bidirectional peer"]


def test_projected_attention_wraps_ours_in_qkv_and_output_projections():
    from harness.bench.peers import ProjectedAttention

    inner = get_attention_info("full").cls
    wrapped = ProjectedAttention(build_attention("full", num_heads=2, head_dim=4), heads=2, head_dim=4)
    assert isinstance(wrapped.attention, inner)
    x = torch.randn(3, 10, 8)
    out = wrapped(x)
    assert out.shape == (3, 10, 8)
    # Reference: the same projections around plain softmax attention.
    def split(t):
        return t.view(3, 10, 2, 4).transpose(1, 2)
    q, k, v = split(wrapped.to_q(x)), split(wrapped.to_k(x)), split(wrapped.to_v(x))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    ref = wrapped.to_out(ref.transpose(1, 2).reshape(3, 10, 8))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not installed("performer_pytorch"), reason="peers extra not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_performer_peer_runs_at_equal_settings(tmp_path):
    from harness.bench import peers

    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path), "mechanisms": ["performer"],
                                       "peers": {"seq_lens": [32]}, "passes": ["fwd"]})
    df = peers.run_peers(settings, log=lambda _: None)
    assert list(df["status"]) == ["ok"], list(df["reason"])
    assert df["time_ratio"].iloc[0] > 0 and df["memory_ratio"].iloc[0] > 0
    record = load_records(tmp_path, kind="peer").iloc[0]
    assert record["level"] == "core" and record["params.num_features"] == 16
    assert record["peer_result.memory.peak_bytes"] > 0


def test_exact_reference_of_shared_qk_mechanism_excludes_self_and_normalises_keys():
    q, _, _ = bench.approx_inputs("iid", 1, 1, 16, 8, seed=0)
    v = torch.eye(16)[None, None]  # output row i = attention weights of query i
    probs = bench.exact_reference("reformer", q, q, v[..., :16])
    assert torch.diagonal(probs[0, 0]).abs().max() < 1e-6
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 1, 16))
    keys = q / q.norm(dim=-1, keepdim=True)
    expected = torch.softmax((q @ keys.transpose(-1, -2) / 8**0.5).masked_fill(torch.eye(16, dtype=torch.bool),
                                                                               -1e5), -1)
    torch.testing.assert_close(probs, expected.float(), atol=1e-5, rtol=1e-5)
    # Every other mechanism is compared with plain softmax attention.
    softmax = bench.exact_reference("performer", q, q, v)
    assert torch.diagonal(softmax[0, 0]).min() > 0


def test_disturbed_cell_is_measured_again_and_kept_clean(tmp_path, clock):
    state = clock.disturb(measurements=1, n=32)
    df = run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, passes=["fwd"], seq_lens=[16, 32, 64],
             repeats=3, warmup=0, max_spread=3.0, remeasure=2)
    assert state["measurements"] >= 2  # the disturbed n = 32 cell was measured again
    cell = df.set_index("n").loc[32]
    assert not cell["noisy"] and cell["median_s"] == pytest.approx(clock.cost_s(32, "fwd"))
    record = next(r for r in read_bench_records(tmp_path) if r["n"] == 32)
    assert not record["noise"]["noisy"] and record["noise"]["spread"] <= 3.0 and "load_before" in record["noise"]
    assert record["noise"]["attempts"] == 2 and record["noise"]["rounds"] == 3
    # The cell alone: the disturbed first attempt is followed by a quiet one, which is kept.
    state = clock.disturb(measurements=1, n=32)
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path), "repeats": 3, "warmup": 0,
                                       "max_spread": 3.0, "remeasure": 2})
    cell = bench_run.measure_quietly("full", 32, "fwd", settings)
    assert cell["noise"]["attempts"] == 2 and not cell["noise"]["noisy"]
    assert cell["time"]["p90_s"] == pytest.approx(clock.cost_s(32, "fwd"))


def test_cell_still_noisy_is_flagged_shown_and_left_out_of_slopes(tmp_path, clock, monkeypatch):
    clock.disturb(measurements=100, n=32)
    df = run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, passes=["fwd"], seq_lens=[16, 32, 64],
             repeats=3, warmup=0, max_spread=3.0, remeasure=1)
    cell = df.set_index("n").loc[32]
    assert cell["noisy"]
    record = next(r for r in read_bench_records(tmp_path) if r["n"] == 32)
    assert record["noise"]["noisy"] and record["noise"]["attempts"] == 2 and "spread" in record["noise"]["why"]
    assert "noisy" in display.format_cell(cell) and "(noisy)" in display.format_time_spread(cell)
    # The slope uses the clean cells only: 16 and 64, not the disturbed 32.
    clean = df[~df["noisy"]]
    expected = analysis.loglog_slope(clean["n"], clean["median_s"])
    derived = analysis.derived_table(df).iloc[0]
    assert derived["time_slope"] == pytest.approx(expected)
    # A re-run measures the noisy cell again (the machine may be quiet now); the clean ones are reused.
    clock.disturb(measurements=0)
    measured = []
    real = bench_run.measure_cells
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: measured.append(a[1]) or real(*a, **k))
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, passes=["fwd"], seq_lens=[16, 32, 64],
        repeats=3, warmup=0, max_spread=3.0, remeasure=1)
    assert set(measured) == {32}


def test_a_burst_hits_the_same_round_of_every_mechanism_and_they_are_measured_again(tmp_path, clock):
    """Round-robin: each round times every mechanism once, so a burst of load slows one round of each (here round 2
    of the three at n = 32), every cell's rounds disagree, and the three are measured again together."""
    state = clock.disturb(measurements=3, n=32, calls=(2,), extra_s=0.3)
    mechanisms = ["full", "performer", "linformer"]
    run(tmp_path, mechanisms=mechanisms, include_sdpa_direct=False, passes=["fwd"], seq_lens=[16, 32], repeats=3,
        warmup=0, max_spread=1.5, remeasure=2)
    assert state["measurements"] == 6  # three cells, measured twice
    cells = {r["mechanism"]: r for r in read_bench_records(tmp_path) if r["n"] == 32}
    for m in mechanisms:
        noise = cells[m]["noise"]
        assert not noise["noisy"] and noise["attempts"] == 2 and noise["interleaved"] == 3 and noise["rounds"] == 3
        assert cells[m]["time"]["times_s"] == pytest.approx([clock.cost_s(32, "fwd")] * 3)


def test_cells_measured_together_have_the_peaks_and_outcomes_they_have_alone():
    """Interleaving changes when each step runs, not what it allocates: each peak is its own step's."""
    settings = bench.resolve_settings(dict(TINY))
    names = ["full", "sdpa_direct", "performer", "linformer"]
    together = bench.measure_cells(names, 32, "fwd+bwd", settings)
    assert list(together) == names
    for name in names:
        alone = bench.measure_cell(name, 32, "fwd+bwd", settings)
        assert together[name]["outcome"] == alone["outcome"] == "ok"
        assert together[name]["memory"]["peak_bytes"] == alone["memory"]["peak_bytes"] > 0
        assert len(together[name]["time"]["times_s"]) == settings.repeats
    assert together["full"]["backend"] == "sdpa" and together["sdpa_direct"]["backend"] == "sdpa"


def test_a_median_slowed_in_most_rounds_is_caught_though_the_spread_looks_fine(tmp_path, clock):
    """linformer's 4K cell: 102 ms recorded and marked clean, 61-64 ms straight after. Two of three rounds slowed
    by 65% give a p90/p10 spread of 1.46 (under 1.5) but a median 1.65 x the fastest round."""
    c = clock.cost_s(32, "fwd")
    clock.disturb(measurements=1, n=32, calls=(2, 3), extra_s=0.65 * c)
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path), "repeats": 3, "warmup": 0,
                                       "max_spread": 1.5, "remeasure": 0})
    cell = bench_run.measure_quietly("full", 32, "fwd", settings)
    spread, over_fastest, why = bench_run.disturbance(cell["time"], 1.5)
    assert spread == pytest.approx(1.65 / 1.13) and spread < 1.5 and over_fastest == pytest.approx(1.65)
    assert cell["noise"]["noisy"] and why.startswith("median 1.65 x the fastest round > 1.5")
    assert cell["noise"]["why"] == "median 1.65 x the fastest round > 1.5 in every attempt"
    # Under the noise floor nothing is judged: fixed overheads dominate.
    tiny = {"median_s": 1e-4, "p10_s": 1e-5, "p90_s": 1e-3, "times_s": [1e-5, 1e-4, 1e-3]}
    assert bench_run.disturbance(tiny, 1.5)[2] is None


def test_fwd_bwd_faster_than_fwd_flags_both_cells(tmp_path):
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path)})

    def cell(pass_, n, median):
        return {"kind": "bench", "record_id": f"performer-{n}-{pass_.replace('+', '')}", "status": "ok",
                "created_at": "2026-11-30T00:00:00Z", "mechanism": "performer", "n": n, "pass": pass_,
                "time": {"median_s": median}, "noise": {"noisy": False}}

    records = [cell("fwd", 32, 0.0436), cell("fwd+bwd", 32, 0.0009), cell("fwd", 64, 0.002),
               cell("fwd+bwd", 64, 0.005)]
    out = bench_run.flag_pass_inversions(records, settings)
    assert [r["noise"]["noisy"] for r in out] == [True, True, False, False]
    assert "fwd+bwd measured faster than fwd" in out[0]["noise"]["why"]
    assert {r["record_id"] for r in read_bench_records(tmp_path) if r["noise"]["noisy"]} == {
        "performer-32-fwd", "performer-32-fwdbwd"}  # the flags are stored, so a re-run measures them again


def test_trend_suspects_name_the_cell_out_of_line():
    ns = [256, 512, 1024, 2048]
    assert analysis.trend_suspects(ns, [1.0, 2.0, 4.0, 8.0]) == []
    assert analysis.trend_suspects(ns, [7e-4, 2e-4, 4e-4, 8e-4]) == []  # sub-millisecond: overheads
    assert analysis.trend_suspects(ns, [70.0, 2.0, 4.0, 8.0]) == [0]  # aft at 256 under load
    assert analysis.trend_suspects(ns, [1.0, 2.0, 400.0, 8.0]) == [2]
    # A slow last cell has no longer neighbour: its slope jumps (linformer fwd+bwd, measured, in seconds).
    assert analysis.trend_suspects([512, 1024, 2048, 4096], [6.7e-3, 13.4e-3, 27.4e-3, 167.2e-3]) == [3]
    assert analysis.trend_suspects([512, 1024, 2048, 4096], [6.7e-3, 13.2e-3, 25.9e-3, 53.1e-3]) == []
    # Real slope changes are gradual: linear to quadratic (full), and a quadratic term taking over.
    assert analysis.trend_suspects([512, 1024, 2048, 4096], [8.1e-3, 30.1e-3, 114.8e-3, 456.0e-3]) == []
    assert analysis.trend_suspects([1024, 2048, 4096, 8192], [0.02 * n / 1024 + 0.01 * (n / 1024) ** 2
                                                             for n in (1024, 2048, 4096, 8192)]) == []
    # A slow earlier cell flattens one segment; the normal segment after it is no jump (reformer, measured).
    assert analysis.trend_suspects([256, 512, 1024, 2048, 4096], [26.0e-3, 47.2e-3, 51.9e-3, 134.8e-3, 364.5e-3]) == []
    # Overhead-dominated steps (under 10 ms) swing without a disturbance: aft fwd 2.2, 2.2, 5.8 ms.
    assert analysis.trend_suspects([256, 512, 1024], [2.2e-3, 2.2e-3, 5.8e-3]) == []


def test_force_measures_every_cell_again(tmp_path, monkeypatch):
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16])
    calls = []
    real = bench_run.measure_cells
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: calls.append(a) or real(*a, **k))
    run(tmp_path, mechanisms=["full"], include_sdpa_direct=False, seq_lens=[16], force=True)
    assert len(calls) >= 2  # both passes measured again


def test_rfa_is_measured_against_its_own_kernel_and_converges_to_it():
    """RFA estimates softmax(q^.k^/sigma^2) on normalised q, k, not softmax(q.k/sqrt(d)): against its own
    kernel the error falls with more features; against softmax it would stay flat, whatever the budget."""
    from harness.bench.approx import approx_inputs, exact_reference, reference_name, relative_error

    q, k, v = approx_inputs("iid", 1, 2, 128, 16, seed=0)
    errors = {}
    for features in (16, 1024):
        attn = build_attention("rfa", num_heads=2, head_dim=16, num_features=features, seed=0).eval()
        with torch.no_grad():
            out = attn(q, k, v)
        errors[features] = (relative_error(out, exact_reference("rfa", q, k, v, {"sigma": 1.0})),
                            relative_error(out, exact_reference("performer", q, k, v)))
    assert errors[1024][0] < errors[16][0] / 2
    assert errors[1024][1] > 3 * errors[1024][0]  # softmax is not what it approximates
    assert "kernel" in reference_name("rfa", {}) and reference_name("performer") == "softmax"
    from harness.bench.approx import APPROX_BUDGETS, APPROX_SMOKE_BUDGETS

    assert "aft" not in APPROX_BUDGETS and "aft" not in APPROX_SMOKE_BUDGETS  # it approximates nothing


# ----------------------------------------------------------------------------- causal pattern (issue 13)


def test_causal_run_measures_the_causal_mechanisms_and_records_the_pattern(tmp_path):
    df = run(tmp_path, causal=True, mechanisms=["full", "performer", "linformer"], passes=["fwd"], seq_lens=[16])
    records = {r["mechanism"]: r for r in read_bench_records(tmp_path)}
    assert set(records) == {"full", "sdpa_direct", "performer", "linformer"}
    assert all(r["pattern"] == "causal" for r in records.values())
    assert set(df["pattern"]) == {"causal"}
    assert records["full"]["params"]["causal"] is True and records["performer"]["params"]["causal"] is True
    # A mechanism without a causal form: an unsupported cell that says why and which ones have one.
    assert records["linformer"]["status"] == "unsupported"
    assert "no causal form" in records["linformer"]["reason"] and "performer" in records["linformer"]["reason"]
    assert records["performer"]["status"] == "ok" and records["sdpa_direct"]["status"] == "ok"


def test_causal_all_means_the_mechanisms_that_support_it():
    from attentions import causal_attentions

    assert bench.select_mechanisms("all", causal=True) == causal_attentions()
    assert "linformer" not in bench.select_mechanisms("all", causal=True)


def test_causal_and_bidirectional_cells_are_different_cells(tmp_path, monkeypatch):
    run(tmp_path, mechanisms=["full"], seq_lens=[16], passes=["fwd"])
    run(tmp_path, mechanisms=["full"], seq_lens=[16], passes=["fwd"], causal=True)
    patterns = sorted((r["mechanism"], r["pattern"]) for r in read_bench_records(tmp_path))
    assert patterns == [("full", "bidirectional"), ("full", "causal"),
                        ("sdpa_direct", "bidirectional"), ("sdpa_direct", "causal")]

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(bench_run, "measure_cells", fail)
    for causal in (False, True):  # each pattern reuses its own cells
        assert list(run(tmp_path, mechanisms=["full"], seq_lens=[16], passes=["fwd"], causal=causal)["outcome"]) \
            == ["ok", "ok"]


def test_causal_sdpa_direct_is_causal(monkeypatch):
    # sdpa_direct has no params: the pattern must reach the kernel (is_causal) and the key.
    from harness.bench.cells import cell_key

    settings = bench.resolve_settings({**TINY, "causal": True})
    plain = bench.resolve_settings(dict(TINY))
    assert cell_key("sdpa_direct", 16, "fwd", settings, {}) != cell_key("sdpa_direct", 16, "fwd", plain, {})
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert bench.measure_cell("sdpa_direct", 16, "fwd", settings)["outcome"] == "ok"
    assert calls and all(calls)


@pytest.mark.skipif(not installed("local_attention"), reason="peers not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_causal_peers_run_at_equal_settings(tmp_path):
    from harness.bench import peers

    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path), "causal": True, "passes": ["fwd"],
                                       "mechanisms": ["performer", "sliding_window"], "peers": {"seq_lens": [32]}})
    df = peers.run_peers(settings, log=lambda _: None)
    assert set(df["pair"]) == {"performer", "sliding_window"} | ({"sliding_window_ft"} if installed("fast_transformers")
                                                                 else set())
    assert set(df["status"]) == {"ok"} and set(df["pattern"]) == {"causal"}
    records = load_records(tmp_path, kind="peer")
    assert set(records["pattern"]) == {"causal"} and all(records["params.causal"])


@pytest.mark.skipif(not installed("local_attention"), reason="peers not installed")
def test_local_attention_peer_computes_our_causal_band():
    # "Equal settings" checked, not assumed: the peer's output is ours.
    from harness.bench import peers

    settings = bench.resolve_settings({**TINY, "causal": True})
    ours = build_attention("sliding_window", num_heads=2, head_dim=8, window=8, causal=True)
    peer = peers._local_attention_peer(ours.config, settings, 37)
    q, k, v = torch.randn(3, 2, 2, 37, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    torch.testing.assert_close(peer(q, k, v), ours(q, k, v), atol=1e-5, rtol=1e-5)


def test_pass_inversion_under_the_noise_floor_is_not_judged(tmp_path):
    """A fwd+bwd below its fwd at sub-millisecond steps is overhead, not disturbance (same floor as the other
    checks): `full` at n=32, 0.26 ms, was flagged noisy and lost its slopes."""
    settings = bench.resolve_settings({**TINY, "results_dir": str(tmp_path)})

    def cell(pass_, n, median):
        return {"kind": "bench", "record_id": f"full-{n}-{pass_.replace('+', '')}", "status": "ok",
                "created_at": "2026-11-30T00:00:00Z", "mechanism": "full", "n": n, "pass": pass_,
                "time": {"median_s": median}, "noise": {"noisy": False}}

    below = analysis.NOISE_FLOOR_S * 0.26
    records = [cell("fwd", 32, below), cell("fwd+bwd", 32, below * 0.9),
               cell("fwd", 64, analysis.NOISE_FLOOR_S * 1.5), cell("fwd+bwd", 64, analysis.NOISE_FLOOR_S * 1.2)]
    out = bench_run.flag_pass_inversions(records, settings)
    assert [r["noise"]["noisy"] for r in out] == [False, False, True, True]


def test_params_are_checked_before_anything_is_measured(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench_run, "measure_cells", lambda *a, **k: measured.append(a) or {})
    base = {**TINY, "results_dir": str(tmp_path), "mechanisms": ["sliding_window"]}
    with pytest.raises(ValueError, match=r"params.sliding_window .*unknown parameter\(s\) 'windw'.*allowed: .*window"):
        bench.run_benchmark({**base, "params": {"sliding_window": {"windw": 8}}})
    with pytest.raises(ValueError, match=r"unknown mechanism\(s\) \['performr'\]; registered: .*performer"):
        bench.run_benchmark({**base, "params": {"performr": {"num_features": 8}}})
    with pytest.raises(ValueError, match=r"params.performer .*num_features"):  # the config's own check
        bench.run_benchmark({**base, "params": {"performer": {"num_features": 0}}})
    with pytest.raises(ValueError, match=r"params.performer must map"):
        bench.run_benchmark({**base, "params": {"performer": 8}})
    assert measured == [] and not list(tmp_path.glob("bench/*.json"))
    settings, _ = bench.prepare_benchmark({**base, "params": {"sliding_window": {"window": 4}}})
    assert bench.mechanism_params("sliding_window", 32, settings)["window"] == 4


def test_documented_params_override_composes_and_validates():
    """conf/bench.yaml's comment shows the command-line form of `params`; it composes through Hydra."""
    import re
    import shlex

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    comment = next(line for line in (conf / "bench.yaml").read_text().splitlines() if line.startswith("params:"))
    shown = shlex.split(re.search(r"e\.g\. (.*)$", comment).group(1))
    assert len(shown) == 1 and "performer" in shown[0]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="bench", overrides=shown), resolve=True)
    settings, _ = bench.prepare_benchmark({**cfg, "smoke": True, "device": "cpu"})
    assert settings.params == {"performer": {"num_features": 128}}
    assert bench.mechanism_params("performer", 64, settings)["num_features"] == 128


def test_bench_device_not_available_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^invalid 'device': cuda requested but torch.cuda.is_available\(\) is "
                                         r"False; use device=cpu$"):
        bench.resolve_settings({"device": "cuda"})
    with pytest.raises(ValueError, match="invalid 'device': 'gpu'"):
        bench.resolve_settings({"device": "gpu"})
    assert bench.resolve_settings({"device": "auto"}).device == "cpu"


def test_installed_is_false_for_a_missing_parent_package():
    # find_spec("a.b") imports "a": a missing parent must read "not installed", not raise (it broke collection).
    assert not installed("no_such_arena_package.sub")
    assert not installed("no_such_arena_package")
    assert installed("torch.nn")
