"""Grouped-query attention in full, sliding_window, longformer and bigbird (issue 26): k, v with num_kv_heads heads.

What the contract's ``grouped_kv`` check (tests/test_registry_contract.py: one setting, 2 key-value heads) leaves to
this file, for the paths these mechanisms own:

- every ``full`` backend (reference, sdpa, chunked) and both blocked executors (``recompute`` True and False), over
  several chunks, with 1, 2 and 4 (= num_heads) key-value heads, bidirectional and causal, no padding, right padding
  and a gap (full's causal dense plan): grouped k, v give the output and gradients of the same module on the
  key-value heads repeated;
- training with dropout: the same seed drops the same probabilities grouped and repeated;
- no copy: a fwd+bwd with one key-value head peaks below one with four (a repeated copy would peak above);
- xformers' grouped layout, on a CPU with a stand-in for ``xformers.ops`` that checks it and computes plainly;
- decoding: right-padded prompts, steps past the window (a ring that wraps), past global positions and blocks, with
  1, 2 and 4 key-value heads; ``full``'s cache with one key-value head is exactly ``num_heads`` times smaller at every
  context; a ring's bytes stop at its slots times the key-value heads.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import attentions._blocked as blocked_module
import attentions._full_chunked as chunked_module
import attentions.full as full_module
from attentions import build_attention, get_attention_info, state_bytes
from attentions.functional import repeat_kv
from attentions.testing import cpu_peak_bytes

from conftest import right_padding_mask

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, DIM, SEQ, MAX = 4, 8, 45, 64
KV_HEADS = (1, 2, 4)

VARIANTS = [
    ("full", {"backend": "reference"}),
    ("full", {"backend": "sdpa"}),
    ("full", {"backend": "chunked"}),
    ("sliding_window", {"window": 8}),
    ("sliding_window", {"window": 8, "recompute": False}),
    ("longformer", {"window": 6, "global_positions": (0, 14, 20)}),
    ("longformer", {"window": 6, "global_positions": (0, 14, 20), "recompute": False}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2, "recompute": False}),
]
IDS = [f"{name}-{params}" for name, params in VARIANTS]

# Right padding, and a gap at the start (full's causal form takes a dense mask there); sequence 1 of each is padded.
MASKS = {
    "none": None,
    "right": right_padding_mask([SEQ, 30], SEQ),
    "gap": ~right_padding_mask([0, 12], SEQ),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks per call: full's chunked path 7 query rows per chunk, the blocked executors a few blocks."""
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 2 * HEADS * SEQ * 7)
    monkeypatch.setattr(blocked_module, "CHUNK_SCORES", 2 * HEADS * 4 * 40)


def build(name: str, params: dict, kv_heads: int | None, causal: bool = False, **extra) -> torch.nn.Module:
    return build_attention(name, num_heads=HEADS, head_dim=DIM, max_seq_len=MAX, num_kv_heads=kv_heads,
                           causal=causal, **params, **extra)


def grouped_qkv(kv_heads: int, seq: int = SEQ, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, DIM, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq, DIM, generator=gen) for _ in range(2))
    return [q, k, v]


def run_both(grouped, plain, kv_heads: int, mask, seed: int | None = None):
    """Outputs and q, k, v gradients of ``grouped`` on grouped k, v and of ``plain`` on them repeated for their query
    heads (a weighted loss over the real rows); ``seed``: the global RNG seed before each call (dropout)."""
    base = grouped_qkv(kv_heads)
    results = []
    for module, expand in ((grouped, False), (plain, True)):
        leaves = [t.clone().requires_grad_(True) for t in base]
        q, k, v = leaves
        if expand:
            k, v = repeat_kv(k, HEADS // kv_heads), repeat_kv(v, HEADS // kv_heads)
        if seed is not None:
            torch.manual_seed(seed)
        out = module(q, k, v, key_padding_mask=mask)
        real = torch.ones(2, SEQ, dtype=torch.bool) if mask is None else mask
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real[:, None, :, None]
        grads = torch.autograd.grad((out * weight).sum(), leaves)
        results.append((out, real, grads))
    return results


@pytest.mark.parametrize("name", ["full", "sliding_window", "longformer", "bigbird"])
def test_info_says_shared_in_training_and_decoding(name):
    info = get_attention_info(name)
    assert info.grouped_kv == "shared"
    assert "training" in info.grouped_kv_note and "decoding" in info.grouped_kv_note


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_grouped_equals_repeated(name, params, kv_heads, mask_name, causal):
    grouped = build(name, params, kv_heads, causal)
    plain = build(name, params, None, causal)
    mask = MASKS[mask_name]
    (out, real, grads), (ref, _, ref_grads) = run_both(grouped, plain, kv_heads, mask)
    for b in range(2):
        torch.testing.assert_close(out[b][:, real[b]], ref[b][:, real[b]], atol=1e-5, rtol=1e-5)
    for label, got, want in zip("qkv", grads, ref_grads):
        assert got.shape == want.shape[:1] + (HEADS if label == "q" else kv_heads,) + want.shape[2:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"gradient of {label}")


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("name,params", [v for v in VARIANTS if v[1].get("backend") not in ("reference", "sdpa")],
                         ids=[i for i, v in zip(IDS, VARIANTS) if v[1].get("backend") not in ("reference", "sdpa")])
def test_dropout_drops_the_same_probabilities_grouped_and_repeated(name, params, kv_heads, causal):
    """Training mode, dropout 0.3, the same global seed: the recomputing paths draw their masks per chunk from one
    seed in the ungrouped layout, so grouped and repeated agree (a different mask would differ by O(1))."""
    params = {key: value for key, value in params.items() if key != "backend"}  # full: auto picks chunked here
    grouped = build(name, params, kv_heads, causal, dropout=0.3).train()
    plain = build(name, params, None, causal, dropout=0.3).train()
    (out, real, grads), (ref, _, ref_grads) = run_both(grouped, plain, kv_heads, MASKS["right"], seed=7)
    if name == "full":
        assert grouped.backend == plain.backend == "chunked"
    for b in range(2):
        torch.testing.assert_close(out[b][:, real[b]], ref[b][:, real[b]], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(8)
    other = grouped(*grouped_qkv(kv_heads), key_padding_mask=MASKS["right"])
    assert not torch.allclose(other, out)  # another seed, other masks: the dropout is real


PEAK_CASES = [("full", {"backend": "sdpa"}, False), ("full", {"backend": "sdpa"}, True),
              ("full", {"backend": "chunked"}, True), ("sliding_window", {"window": 64}, False),
              ("longformer", {"window": 64}, True), ("bigbird", {"block_size": 32}, False)]


@pytest.mark.parametrize("name,params,causal", PEAK_CASES, ids=[f"{n}-{p}-{'causal' if c else 'bidir'}"
                                                                 for n, p, c in PEAK_CASES])
def test_one_key_value_head_peaks_below_four(name, params, causal):
    """The CPU allocator peak of fwd+bwd (n = 1024, 4 heads of 32; full's chunked path in training with dropout, as
    the dispatch runs it): with one key-value head below that with four, and that below one key-value head repeated
    for the query heads (a copy of k, v and of their gradients per query head), the cost the sharing avoids."""
    n, d = 1024, 32
    peaks = {}
    for kv_heads in (1, 4, "repeated"):
        dropout = 0.1 if params.get("backend") == "chunked" else 0.0
        attn = build_attention(name, num_heads=HEADS, head_dim=d, max_seq_len=n, causal=causal, dropout=dropout,
                               num_kv_heads=None if kv_heads == "repeated" else kv_heads, **params).train()
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, HEADS, n, d, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, 1 if kv_heads == "repeated" else kv_heads, n, d, generator=gen, requires_grad=True)
                for _ in range(2))

        def step(attn=attn, q=q, k=k, v=v, repeat=kv_heads == "repeated"):
            kk, vv = (repeat_kv(k, HEADS), repeat_kv(v, HEADS)) if repeat else (k, v)
            attn(q, kk, vv).sum().backward()

        with torch.random.fork_rng(devices=[]):
            step()
            peaks[kv_heads] = cpu_peak_bytes(step)
    assert peaks[1] < peaks[4] < peaks["repeated"], peaks


# ------------------------------------------------------------------------------------- xformers' grouped layout


class _LowerTriangularMask:
    """Stands in for ``xformers.ops.LowerTriangularMask``."""


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
    """``xformers.ops.memory_efficient_attention`` written plainly on its layouts, checking what the grouped call must
    hand it: ``(B, M, H, K)``, or ``(B, M, G, H, K)`` with k and v expanded along ``H`` (stride 0: not copied); a tensor
    bias ``(B, [G,] H, M, M)`` whose storage rows are aligned to 8."""
    assert p == 0.0 and q.dim() in (4, 5) and k.shape == q.shape == v.shape
    shape = q.shape
    batch, seq, d = shape[0], shape[1], shape[-1]
    if q.dim() == 5:
        assert k.stride(3) == 0 and v.stride(3) == 0, "grouped k, v must be expanded views, not copies"
    q, k, v = (t.reshape(batch, seq, -1, d).transpose(1, 2).double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if isinstance(attn_bias, _LowerTriangularMask):
        scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    elif attn_bias is not None:
        assert attn_bias.dim() == len(shape) and attn_bias.stride(-2) % 8 == 0
        scores = scores + attn_bias.reshape(batch, -1, seq, seq).double()
    return (scores.softmax(-1) @ v).transpose(1, 2).float().reshape(shape)


@pytest.fixture
def fake_xformers(monkeypatch):
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.LowerTriangularMask = _LowerTriangularMask
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(full_module, "select_full_backend", lambda *args, **kwargs: "xformers")


@pytest.mark.usefixtures("fake_xformers")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_xformers_dispatch_hands_the_grouped_layout(kv_heads, mask_name, causal):
    """full dispatched to xformers (the CUDA path, here on a CPU stand-in) equals the reference on repeated k, v."""
    grouped = build("full", {}, kv_heads, causal)
    plain = build("full", {"backend": "reference"}, None, causal)
    mask = MASKS[mask_name]
    q, k, v = grouped_qkv(kv_heads)
    out = grouped(q, k, v, key_padding_mask=mask)
    assert grouped.backend == "xformers"
    ref = plain(q, repeat_kv(k, HEADS // kv_heads), repeat_kv(v, HEADS // kv_heads), key_padding_mask=mask)
    real = torch.ones(2, SEQ, dtype=torch.bool) if mask is None else mask
    for b in range(2):
        torch.testing.assert_close(out[b][:, real[b]], ref[b][:, real[b]], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ decoding

DECODE_VARIANTS = [
    ("full", {}),
    ("sliding_window", {"window": 8}),
    ("sliding_window", {"window": 1}),
    ("longformer", {"window": 6, "global_positions": (0, 14, 20)}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2}),
]


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("name,params", DECODE_VARIANTS, ids=[f"{n}-{p}" for n, p in DECODE_VARIANTS])
def test_grouped_decoding_of_right_padded_prompts_equals_the_forward(name, params, kv_heads):
    """Prompts of 13, 5 and 0 real tokens, then steps to 40 positions: past the window (the ring wraps), past the
    global positions 14 and 20, across blocks. Each sequence goes on from its own end; every output equals the grouped
    causal forward of the whole sequence at that position."""
    attn = build(name, params, kv_heads, causal=True).eval()
    total, lengths = 40, torch.tensor([13, 5, 0])
    q, k, v = grouped_qkv(kv_heads, seq=total, batch=3, seed=3)
    with torch.no_grad():
        ref = attn(q, k, v)
        prompt = int(lengths.max())
        mask = right_padding_mask(lengths.tolist(), prompt)
        state = attn.init_state(3, total, q.dtype)
        out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], state, key_padding_mask=mask)
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(out[b, :, :n], ref[b, :, :n], atol=1e-5, rtol=1e-4)
        rows = torch.arange(3)
        for s in range(total - prompt):
            pos = lengths + s
            out_t, state = attn.step(*(t[rows, :, pos][:, :, None] for t in (q, k, v)), state)
            torch.testing.assert_close(out_t[:, :, 0], ref[rows, :, pos], atol=1e-5, rtol=1e-4,
                                       msg=f"step {s} at positions {pos.tolist()}")
    assert state.lengths.tolist() == (lengths + total - prompt).tolist()


def test_full_cache_with_one_key_value_head_is_exactly_num_heads_times_smaller():
    """Prefilled (1, 7, 45 tokens) and filled at random (1000, 4096 tokens): 2 x context x kv_heads x head_dim x 4
    bytes per sequence, so num_kv_heads=1 holds exactly 1 / num_heads of the ungrouped cache."""
    d = 32
    for context in (1, 7, 45, 1000, 4096):
        sizes = {}
        for kv_heads in (1, 2, 4):
            attn = build_attention("full", num_heads=HEADS, head_dim=d, causal=True, num_kv_heads=kv_heads).eval()
            state = attn.init_state(2, max(context, 64))
            if context <= 45:
                q, k, v = (torch.randn(2, h, context, d) for h in (HEADS, kv_heads, kv_heads))
                with torch.no_grad():
                    _, state = attn.prefill(q, k, v, state)
            else:
                state.fill_random(context, torch.Generator().manual_seed(0))
            sizes[kv_heads] = state_bytes(state)
            assert sizes[kv_heads] == 2 * 2 * context * kv_heads * d * 4
        assert sizes[4] == HEADS * sizes[1] == 2 * sizes[2]


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("name,params,slots", [
    ("sliding_window", {"window": 8}, 5),
    ("longformer", {"window": 8, "global_positions": (0, 5)}, 5 + 6),  # the ring and the prefix cache 0..5
])
def test_ring_bytes_stop_at_its_slots_per_key_value_head(name, params, slots, kv_heads):
    attn = build(name, params, kv_heads, causal=True).eval()
    q, k, v = grouped_qkv(kv_heads, seq=30, batch=2, seed=4)
    per_slot = 2 * kv_heads * DIM * 4  # keys and values of one position, one sequence
    with torch.no_grad():
        state = attn.init_state(2, MAX, q.dtype)
        _, state = attn.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], state)
        assert state_bytes(state) == 2 * slots * per_slot
        for t in range(20, 30):
            _, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            assert state_bytes(state) == 2 * slots * per_slot
