"""``arena-bench mode=decode`` (issue 24): the decode scan's records, reuse, guard, settings and derived figures.

Tiny sizes throughout (contexts 16 and 32, 2 heads of 8); no test asserts a time. A step-form mechanism is
registered for the module's tests (``kv_cache_test``: a plain KV cache over exact softmax attention), since the
built-in step forms arrive with issue 24's other parts; the model scope runs on a tiny stand-in of the
backbone's decoding API (``init_states``, ``prefill``, ``step``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from attentions import Attention, AttentionConfig, build_attention, register_attention
from attentions.decoding import DecodeState, RecomputeState, write_positions
from attentions.registry import _REGISTRY
from harness import analysis
from harness.bench import decode, decode_models
from harness.bench import run as bench_run
from harness.store import STATUSES, load_records

SCHEMA_FIELDS = (
    "kind", "record_id", "status", "reason", "created_at", "mechanism", "scope", "model_size", "model_config",
    "attention_params", "config_changes", "context", "batch", "heads", "head_dim", "dtype", "device", "threads",
    "decode_form", "state_growth", "state_filled", "prefill_ms", "tokens", "ms_per_token", "ms_per_token_p10",
    "ms_per_token_p90", "tokens_per_s", "state_bytes_per_seq", "state_capacity_bytes_per_seq", "peak_bytes",
    "peak_method", "timing_policy", "matmul_flops_per_s", "device_info", "command", "state_note",
)
TINY = {"mode": "decode", "heads": 2, "head_dim": 8, "progress": False, "print_table": False, "warmup": 2,
        "decode": {"contexts": [16, 32], "batches": [1, 2], "tokens": 32, "scopes": ["mechanism"],
                   "model_sizes": ["mqar_causal"], "recompute_contexts": [32]}}


# ----------------------------------------------------------------------------- a step-form mechanism for the tests


class KVState(DecodeState):
    """Keys and values of every position so far, (batch, heads, max_len, head_dim)."""

    positional = ("k", "v")

    def __init__(self, batch, max_len, heads, head_dim, dtype, device):
        super().__init__(batch, max_len, device)
        self.k, self.v = (torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(2))


class KVCacheTest(Attention):
    """Exact causal softmax attention with a KV cache: a step attends to the cache's first lengths + 1 slots."""

    def attend(self, q, k, v, key_padding_mask):
        n = q.shape[2]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    def new_state(self, batch, max_len, dtype, device):
        return KVState(batch, max_len, self.config.num_heads, self.config.head_dim, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state):
        n = q.shape[2]
        state.k[:, :, :n], state.v[:, :, :n] = k, v
        return self.attend(q, k, v, key_padding_mask) if n else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        write_positions((state.k, state.v), (k, v), state.lengths)
        n = int(state.lengths.max()) + 1
        allowed = torch.arange(n, device=q.device)[None, :] <= state.lengths[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, state.k[:, :, :n], state.v[:, :, :n],
                                                                attn_mask=allowed[:, None, None, :])


@pytest.fixture
def kv_cache_test():
    """``kv_cache_test`` registered for one test, then removed (other tests iterate over the registry)."""
    register_attention("kv_cache_test", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                       memory_complexity="O(n)", supports_causal=True, supports_decoding=True,
                       decoding_note="KV cache", state_growth="linear")(KVCacheTest)
    yield "kv_cache_test"
    _REGISTRY.pop("kv_cache_test", None)


class RecomputeOnlyTest(KVCacheTest):
    """The same causal attention without a step form of its own (a plug-in that declares none)."""

    new_state, prefill_state, step_state = Attention.new_state, Attention.prefill_state, Attention.step_state


@pytest.fixture
def recompute_test():
    """``recompute_test`` (no step form: decoded by recomputing the prefix) registered for one test, then removed."""
    register_attention("recompute_test", config=AttentionConfig, family="exact", time_complexity="O(n^2)",
                       memory_complexity="O(n)", supports_causal=True)(RecomputeOnlyTest)
    yield "recompute_test"
    _REGISTRY.pop("recompute_test", None)


# ----------------------------------------------------------------------------- a stand-in backbone


@dataclass
class TinyStates:
    layers: list

    def fill_random(self, context, generator):
        for state in self.layers:
            state.fill_random(context, generator)
        return self


class TinyModel(nn.Module):
    """Embedding -> one causal attention layer -> next-token head: the backbone's decoding API in miniature."""

    def __init__(self, config):
        super().__init__()
        heads, head_dim = config["num_heads"], config["qkv_dim"] // config["num_heads"]
        self.heads, self.head_dim = heads, head_dim
        self.emb = nn.Embedding(config["vocab_size"], 3 * config["qkv_dim"])
        self.attn = build_attention(config["attention"], num_heads=heads, head_dim=head_dim, causal=True,
                                    max_seq_len=config["max_length"], **config["attention_params"])
        self.head = nn.Linear(config["qkv_dim"], config["vocab_size"])

    def _qkv(self, tokens):
        b, n = tokens.shape
        x = self.emb(tokens).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return x[0], x[1], x[2]

    def init_states(self, batch, max_len, dtype, device):
        return TinyStates([self.attn.init_state(batch, max_len, dtype, device)])

    def prefill(self, tokens, mask, states):
        out, _ = self.attn.prefill(*self._qkv(tokens), states.layers[0], key_padding_mask=mask)
        return self.head(out.transpose(1, 2).flatten(2))

    def step(self, tokens_t, states):
        out, _ = self.attn.step(*self._qkv(tokens_t[:, None]), states.layers[0])
        return self.head(out.transpose(1, 2).flatten(2))[:, 0]

    def attention_backend(self):
        return self.attn.backend


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setattr(decode_models, "build", TinyModel)
    monkeypatch.setattr(decode_models, "state_bytes",
                        lambda states: (sum(s.nbytes() for s in states.layers),
                                        sum(s.capacity_bytes() for s in states.layers)))


def settings_for(tmp_path, **changes):
    cfg = {**TINY, "results_dir": str(tmp_path / "r"), **changes}
    cfg["decode"] = {**TINY["decode"], **changes.get("decode", {})}
    return cfg


def records(tmp_path) -> list[dict]:
    df = load_records(tmp_path / "r", kind="decode")
    import json

    return [json.load(open(p)) for p in df["_path"]]


# ----------------------------------------------------------------------------- the scan


def test_a_tiny_scan_writes_valid_records_for_a_step_and_a_recompute_form(tmp_path, kv_cache_test, recompute_test):
    df = bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test, recompute_test, "performer"]))
    got = records(tmp_path)
    # 3 mechanisms x 2 batches x 2 contexts, plus the two step-form mechanisms recomputing at 32 for each batch
    assert len(df) == len(got) == 3 * 2 * 2 + 2 * 2
    for r in got:
        assert set(SCHEMA_FIELDS) <= set(r), set(SCHEMA_FIELDS) - set(r)
        assert r["kind"] == "decode" and r["status"] == "ok" and r["status"] in STATUSES, r["reason"]
        assert r["scope"] == "mechanism" and r["model_size"] is None and r["model_config"] is None
        assert r["tokens"] == 32 and len(r["times_ms"]) == 32 and r["state_filled"] == "prefill"
        assert r["ms_per_token_p10"] <= r["ms_per_token"] <= r["ms_per_token_p90"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_token"])
        assert r["prefill_ms"] > 0 and r["peak_bytes"] >= 0 and r["timing_policy"] == "plain"
        assert r["timing_note"].startswith("plain: ")
        assert r["prompt_tokens"] + r["warmup_steps"] == r["context"]
        assert r["device"] == "cpu" and r["threads"] == torch.get_num_threads() and r["matmul_flops_per_s"] > 0
    by = {(r["mechanism"], r["forced_recompute"], r["context"], r["batch"]): r for r in got}
    step = by[(kv_cache_test, False, 32, 2)]
    assert step["decode_form"] == "step" and step["state_growth"] == "linear"
    assert by[("performer", False, 32, 1)]["attention_params"]["num_features"] == 256  # the bench's budget
    assert "kernel" in by[("performer", False, 32, 1)]["attention_params"]  # a default, resolved
    # K and V of 2 heads x 8 floats per position, read at the cell's context (before the timed steps)
    assert step["state_bytes_per_seq"] == 2 * 2 * 8 * 4 * 32
    assert step["state_capacity_bytes_per_seq"] == 2 * 2 * 8 * 4 * (32 + 32 + 1)
    forced = by[(kv_cache_test, True, 32, 2)]
    assert forced["decode_form"] == "recompute" and forced["state_bytes_per_seq"] == 3 * 2 * 8 * 4 * 32
    assert by[("performer", False, 16, 1)]["decode_form"] == "step"
    assert by[(recompute_test, False, 16, 1)]["decode_form"] == "recompute"  # no step form of its own
    assert (recompute_test, True, 32, 1) not in by  # nothing to force: it has only the recompute form
    assert (kv_cache_test, True, 16, 1) not in by  # recompute rows only at decode.recompute_contexts


def test_a_rerun_reuses_the_records(tmp_path, kv_cache_test, monkeypatch):
    cfg = settings_for(tmp_path, mechanisms=[kv_cache_test], decode={"batches": [1], "recompute_contexts": []})
    bench_run.run_benchmark(cfg)
    before = {r["record_id"]: r["created_at"] for r in records(tmp_path)}

    def no_measuring(*args, **kwargs):
        raise AssertionError("a stored cell was measured again")

    monkeypatch.setattr(decode, "_measure", no_measuring)
    df = bench_run.run_benchmark(cfg)
    assert sorted(df["record_id"]) == sorted(before)
    assert {r["record_id"]: r["created_at"] for r in records(tmp_path)} == before
    with pytest.raises(AssertionError, match="measured again"):
        bench_run.run_benchmark({**cfg, "force": True})


def test_a_mechanism_without_a_causal_form_gets_unsupported_cells(tmp_path):
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=["linformer"], decode={"batches": [1]}))
    got = records(tmp_path)
    assert len(got) == 2 and all(r["status"] == "unsupported" for r in got)
    assert all("linformer" in r["reason"] and "causal" in r["reason"] for r in got)
    assert all(r["decode_form"] is None for r in got)  # not decodable: not a recompute form either


def test_forced_recompute_cells_only_at_contexts_the_scan_measures(tmp_path, kv_cache_test):
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test],
                                         decode={"batches": [1], "contexts": [16], "recompute_contexts": [32]}))
    assert [(r["forced_recompute"], r["context"]) for r in records(tmp_path)] == [(False, 16)]


def test_decoding_refuses_training_mode_with_dropout():
    attn = build_attention("full", num_heads=2, head_dim=8, causal=True, dropout=0.5)  # a fresh module trains
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="eval"):
        attn.prefill(q, q, q, attn.init_state(1, 8))
    state = attn.eval().init_state(1, 8)
    _, state = attn.prefill(q, q, q, state)
    with pytest.raises(ValueError, match="eval"):
        attn.train().step(q[:, :, :1], q[:, :, :1], q[:, :, :1], state)


def test_a_cell_whose_prefill_is_over_the_limit_is_filled_at_random_and_says_so(tmp_path, kv_cache_test,
                                                                                 monkeypatch):
    def slow_prefill(learnt, context, settings, probes=()):
        return decode.Prediction(prefill_s=1e4, step_s=1e-4, cell_s=1e4, memory_bytes=1e3, from_contexts=(4, 8))

    monkeypatch.setattr(decode, "predict", slow_prefill)
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test], max_cell_s=10,
                                         decode={"batches": [2], "contexts": [32], "recompute_contexts": []}))
    (r,) = records(tmp_path)
    assert r["status"] == "ok" and r["state_filled"] == "random" and r["prefill_ms"] is None
    assert "random" in r["state_note"] and "max_cell_s 10" in r["state_note"]
    assert r["prediction"]["predicted_prefill_s"] == 1e4
    assert r["state_bytes_per_seq"] == 2 * 2 * 8 * 4 * 32  # the state holds the context as if prefilled
    assert math.isfinite(r["ms_per_token"])


def test_steps_over_the_limit_are_skipped_with_their_prediction(tmp_path, kv_cache_test, monkeypatch):
    def slow_steps(learnt, context, settings, probes=()):
        return decode.Prediction(prefill_s=0.1, step_s=5.0, cell_s=200.0, memory_bytes=1e3, from_contexts=(4, 8))

    monkeypatch.setattr(decode, "predict", slow_steps)
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test], max_cell_s=10,
                                         decode={"batches": [1], "contexts": [32], "recompute_contexts": [32]}))
    got = records(tmp_path)
    assert len(got) == 2 and all(r["status"] == "skipped_budget" and r["budget"] == "time" for r in got)
    assert all(r["reason"].startswith("time, predicted 35 steps x 5 s") for r in got)  # 2 warm-up + 32 + 1
    assert all(r["prediction"]["predicted_step_s"] == 5.0 and r["ms_per_token"] is None for r in got)


def test_the_guard_decides_from_the_prediction(tmp_path):
    from harness.bench.settings import resolve_settings

    s = resolve_settings(settings_for(tmp_path, max_cell_s=10, memory_budget_gb=1))

    def pred(prefill, step, memory=1e6):
        steps = 2 + 32 + 1
        return decode.Prediction(prefill, step, prefill + steps * step, memory, (4, 8))

    assert decode.decide(None, s, 32) == ("prefill", None)
    assert decode.decide(pred(1.0, 0.01), s, 32) == ("prefill", None)
    assert decode.decide(pred(20.0, 0.01), s, 32) == ("random", None)
    assert decode.decide(pred(1.0, 1.0), s, 32)[1]["budget"] == "time"
    assert decode.decide(pred(1.0, 0.01, memory=2e9), s, 32)[1]["budget"] == "memory"


def test_the_model_scope_runs_on_the_backbones_decoding_api(tmp_path, kv_cache_test, tiny_backbone):
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test, "performer"],
                                         decode={"scopes": ["model"], "batches": [2], "contexts": [16],
                                                 "recompute_contexts": [16], "model_sizes": ["mqar_causal", "large"]}))
    got = {(r["mechanism"], r["model_size"], r["forced_recompute"]): r for r in records(tmp_path)}
    # 2 mechanisms x 2 sizes, and both step forms recomputing (at 16) for each size
    assert len(got) == 8 and all(r["status"] == "ok" for r in got.values()), [r["reason"] for r in got.values()]
    r = got[(kv_cache_test, "large", False)]
    assert r["model_config"]["embed_dim"] == 256 and r["model_config"]["num_layers"] == 4
    assert r["model_config"]["max_length"] == 16 + 32 + 1 and r["heads"] == 8 and r["head_dim"] == 32
    assert "max_length 64 -> 49" in r["config_changes"] and r["decode_form"] == "step"
    # the stand-in has one layer: K and V of 8 heads x 32 floats per position
    assert r["state_bytes_per_seq"] == 2 * 8 * 32 * 4 * 16
    forced = got[(kv_cache_test, "large", True)]
    assert forced["decode_form"] == "recompute" and forced["context"] == 16
    assert forced["state_bytes_per_seq"] == 3 * 8 * 32 * 4 * 16  # q, k and v of every position
    small = got[("performer", "mqar_causal", False)]
    assert small["model_config"]["attention_params"] == {"num_features": 64}  # the recipe's budget
    resolved = small["attention_params"]  # the mechanism's config as built: every field
    assert resolved["num_features"] == 64 and resolved["num_heads"] == 4 and resolved["head_dim"] == 16
    assert resolved["causal"] is True and resolved["max_seq_len"] == 16 + 32 + 1
    assert small["decode_form"] == "step" and small["model_config"]["embed_dim"] == 64
    assert got[("performer", "mqar_causal", True)]["decode_form"] == "recompute"


def test_a_model_cell_without_the_backbones_api_says_what_is_missing(tmp_path, monkeypatch):
    import harness.model

    if hasattr(harness.model.ArenaModel, "init_states"):
        pytest.skip("the backbone has its decoding API")
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=["full"], decode={
        "scopes": ["model"], "batches": [1], "contexts": [16], "model_sizes": ["mqar_causal"]}))
    (r,) = records(tmp_path)
    assert r["status"] == "unsupported" and "init_states" in r["reason"]


@pytest.mark.parametrize(("given", "message"), [
    ("decode.tokens=8", "decode.tokens must be an integer >= 32 (timed tokens per decode cell), got 8"),
    ("mode=decoding", "mode must be one of efficiency, decode, got 'decoding'"),
    ("decode.batches=[0]", "decode.batches must be a non-empty list of batch sizes >= 1, got [0]"),
    ("decode.scopes=[layer]", "decode.scopes must be a non-empty list among mechanism, model, got ['layer']"),
    ("decode.contextz=[1]", "unknown benchmark setting(s) ['decode.contextz']"),
])
def test_bad_decode_settings_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, given, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["arena-bench", "mode=decode", given, f"results_dir={tmp_path}/r",
                                      f"hydra.run.dir={tmp_path}/out"])
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"arena-bench: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_cuda_gets_the_longer_default_contexts():
    from harness.bench.settings import DECODE_CONTEXTS_CUDA, _decode_contexts

    s = {"device": "cuda", "decode": {"contexts": [1024, 4096, 16384, 65536]}}
    assert _decode_contexts(s, {}) == DECODE_CONTEXTS_CUDA and DECODE_CONTEXTS_CUDA[-1] == 262144
    assert _decode_contexts({"device": "cuda", "decode": {"contexts": [1024]}}, {}) == [1024]
    assert _decode_contexts({"device": "cpu", "decode": {"contexts": [1024, 4096, 16384, 65536]}}, {})[-1] == 65536


# ----------------------------------------------------------------------------- fill_random


def test_fill_random_builds_a_state_of_the_context_with_finite_values():
    state = RecomputeState(2, 40, 2, 8, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    assert state.fill_random(30, gen) is state
    assert state.lengths.tolist() == [30, 30] and state.nbytes() == 2 * 3 * 2 * 8 * 4 * 30
    for t in state.tensors().values():
        assert bool(torch.isfinite(t).all()) and float(t.min()) >= 0.5 and float(t.max()) < 1.5
    with pytest.raises(ValueError, match=r"context must be an int in \[0, max_len=40\], got 41"):
        state.fill_random(41, gen)


def test_fill_random_refuses_a_state_with_integer_bookkeeping():
    state = RecomputeState(1, 8, 1, 4, torch.float32, torch.device("cpu"))
    state.counts = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"integer tensors \['counts'\] that must agree with its lengths"):
        state.fill_random(4, torch.Generator().manual_seed(0))


def test_a_step_after_fill_random_continues_at_the_context():
    attn = build_attention("performer", num_heads=2, head_dim=8, causal=True, num_features=16)
    state = attn.init_state(1, 20, torch.float32, "cpu").fill_random(12, torch.Generator().manual_seed(1))
    q = torch.randn(1, 2, 1, 8)
    out, state = attn.step(q, q, q, state)
    assert state.lengths.tolist() == [13] and bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- derived figures


def synthetic(mechanism, ms, state_bytes, contexts=(1024, 4096, 16384, 65536), batch=1, form="step", forced=False):
    return [{"status": "ok", "scope": "mechanism", "model_size": None, "batch": batch, "mechanism": mechanism,
             "forced_recompute": forced, "decode_form": form, "context": c, "ms_per_token": ms(c),
             "state_bytes_per_seq": state_bytes(c)} for c in contexts]


def test_slopes_of_constant_and_linear_rows_are_0_and_1():
    df = pd.DataFrame(synthetic("full", lambda c: 1e-3 * c, lambda c: 256 * c)
                      + synthetic("performer", lambda c: 0.5, lambda c: 4096.0)
                      + synthetic("quadratic", lambda c: 1e-6 * c * c, lambda c: 256 * c))
    slopes = analysis.decode_slopes(df).set_index("mechanism")
    assert slopes.loc["full", "ms_slope"] == pytest.approx(1.0)
    assert slopes.loc["full", "bytes_slope"] == pytest.approx(1.0)
    assert slopes.loc["performer", "ms_slope"] == pytest.approx(0.0, abs=1e-12)
    assert slopes.loc["performer", "bytes_slope"] == pytest.approx(0.0, abs=1e-12)
    assert slopes.loc["quadratic", "ms_slope_top3"] == pytest.approx(2.0)
    assert slopes.loc["full", "contexts"] == 4
    ranged = analysis.decode_slopes(df, context_range=(4096, 65536)).set_index("mechanism")
    assert ranged.loc["quadratic", "ms_slope"] == pytest.approx(2.0)


def test_crossover_and_speedup():
    df = pd.DataFrame(synthetic("full", lambda c: 1e-3 * c, lambda c: 256 * c)            # 1, 4, 16, 64 ms
                      + synthetic("performer", lambda c: 8.192, lambda c: 4096.0)         # below full from 8K
                      + synthetic("slow", lambda c: 100.0, lambda c: 4096.0)              # never below
                      + synthetic("fast", lambda c: 0.5, lambda c: 4096.0)                # always below
                      + synthetic("performer", lambda c: 81.92, lambda c: 1.0, contexts=(4096,), form="recompute",
                                  forced=True))
    derived = analysis.decode_derived(df)
    own = derived[~derived["forced_recompute"]].set_index("mechanism")
    assert own.loc["performer", "crossover_context"] == pytest.approx(8192)
    assert pd.isna(own.loc["slow", "crossover_context"]) and own.loc["slow", "crossover_note"] == "never faster"
    assert own.loc["fast", "crossover_context"] == 1024
    assert own.loc["full", "crossover_note"] == "reference"
    assert own.loc["performer", "speedup_vs_recompute"] == pytest.approx(10.0)
    assert pd.isna(own.loc["slow", "speedup_vs_recompute"])  # no recompute measured for it
    assert len(derived) == 4 and not derived["forced_recompute"].any()  # the forced row feeds the speed-up only


def test_a_model_cell_over_the_limit_is_filled_at_random_only_where_the_states_can_be(tmp_path, kv_cache_test,
                                                                                      tiny_backbone, monkeypatch):
    def slow_prefill(learnt, context, settings, probes=()):
        return decode.Prediction(prefill_s=1e4, step_s=1e-4, cell_s=1e4, memory_bytes=1e3, from_contexts=(4, 8))

    monkeypatch.setattr(decode, "predict", slow_prefill)
    cfg = settings_for(tmp_path, mechanisms=[kv_cache_test], max_cell_s=10, decode={
        "scopes": ["model"], "batches": [1], "contexts": [16], "model_sizes": ["mqar_causal"],
        "recompute_contexts": []})
    bench_run.run_benchmark(cfg)
    (r,) = records(tmp_path)
    assert r["status"] == "ok" and r["state_filled"] == "random" and r["prefill_ms"] is None
    assert r["state_bytes_per_seq"] == 2 * 4 * 16 * 4 * 16
    monkeypatch.delattr(TinyStates, "fill_random")
    bench_run.run_benchmark({**cfg, "force": True})
    (r,) = records(tmp_path)
    assert r["status"] == "skipped_budget" and r["budget"] == "time" and r["prediction"]["predicted_prefill_s"] == 1e4
    assert r["reason"].endswith("the model's decoding states have no fill_random(context, generator)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m cuda)")
def test_a_tiny_scan_on_cuda_times_plain_launches_and_reads_the_cuda_peak(tmp_path, kv_cache_test):
    from harness.measure import CUDA_METHOD

    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test, "performer"], device="cuda"))
    got = records(tmp_path)
    assert len(got) == 10 and all(r["status"] == "ok" for r in got), [r["reason"] for r in got]
    assert all(r["device"] == "cuda" and r["peak_method"] == CUDA_METHOD and r["timing_policy"] == "plain"
               for r in got)


def test_a_probe_out_of_memory_stops_the_row(tmp_path, kv_cache_test, monkeypatch):
    monkeypatch.setattr(decode, "_measure", lambda *a, **k: {"outcome": "oom", "reason": "out of memory: test"})
    bench_run.run_benchmark(settings_for(tmp_path, mechanisms=[kv_cache_test],
                                         decode={"batches": [1], "recompute_contexts": []}))
    got = sorted(records(tmp_path), key=lambda r: r["context"])
    assert [r["status"] for r in got] == ["oom", "oom"]
    assert all("out of memory already at the probe context 4" in r["reason"] for r in got)


def test_a_disturbed_cell_is_measured_again_and_a_still_noisy_one_is_marked_and_not_reused(tmp_path, kv_cache_test,
                                                                                          monkeypatch):
    from harness.bench import decode as decode_module

    assert decode_module.disturbed([8e-3] * 16 + [1e-4] * 16) and not decode_module.disturbed([1e-4, 1.2e-4] * 16)
    real = decode_module._measure
    calls = []

    def slow_first_half(*args, **kwargs):  # a burst of load over the first half of every attempt
        cell = real(*args, **kwargs)
        if "tokens" in kwargs:  # a probe of the guard, not the cell
            return cell
        calls.append(1)
        if cell["outcome"] == "ok":
            half = len(cell["times_s"]) // 2
            cell["times_s"] = [t * 10 for t in cell["times_s"][:half]] + cell["times_s"][half:]
        return cell

    monkeypatch.setattr(decode_module, "_measure", slow_first_half)
    cfg = settings_for(tmp_path, mechanisms=[kv_cache_test], decode={"batches": [1], "contexts": [16],
                                                                     "recompute_contexts": []})
    bench_run.run_benchmark(cfg)
    (r,) = records(tmp_path)
    assert len(calls) == 2 and r["noisy"] is True and "noisy" in r["noise"]
    bench_run.run_benchmark(cfg)  # the noisy cell is measured again, not reused
    assert len(calls) == 4
    monkeypatch.setattr(decode_module, "_measure", real)
    bench_run.run_benchmark(cfg)
    (r,) = records(tmp_path)
    assert r["noisy"] is False and r["noise"] is None
