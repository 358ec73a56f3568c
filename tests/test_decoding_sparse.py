"""The step forms of full, sliding_window, longformer and bigbird (issue 24): KV caches and ring buffers.

- ``check_decoding`` (prefill + steps equal the causal forward, padded batches, state growth) with budgets whose
  windows, blocks and global positions fall inside its 48 positions;
- the keys each step reads are exactly the keys its causal row reads (autograd: the non-zero key gradients);
- the byte accounting: full's cache is ``2 * lengths * heads * head_dim * 4`` per sequence, the ring stops growing
  once the context passes the window and does not depend on ``max_len``;
- bf16 inputs: the cache holds bf16 and the outputs stay close to the float32 forward;
- a state from another mechanism, or from the same mechanism with another window, is a ValueError.
"""

from __future__ import annotations

import pytest
import torch

from attentions import build_attention, get_attention_info, state_bytes
from attentions.testing import check_mechanism

from conftest import HEAD_DIM, HEADS, MAX_LEN, make_qkv, right_padding_mask

STEP_FORMS = ("full", "sliding_window", "longformer", "bigbird")

# Budgets that put window, block and global edges inside the decoding check's 48 positions.
BUDGETS = [  # the contract test already runs conftest.SMALL_PARAMS (window 8; block 4, 1 global, 2 random)
    ("full", {"backend": "reference"}),
    ("sliding_window", {"window": 1}),
    ("sliding_window", {"window": 4}),
    ("sliding_window", {"window": 5}),
    ("sliding_window", {"window": 6}),
    ("longformer", {"window": 4, "global_positions": ()}),
    ("longformer", {"window": 6, "global_positions": (0, 14, 20)}),
    ("longformer", {"window": 6, "global_positions": (7, 40, 100)}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 0, "num_random_blocks": 2}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 2, "num_random_blocks": 1}),
    ("bigbird", {"block_size": 3, "num_global_blocks": 1, "num_random_blocks": 3}),
]


def build(name: str, max_seq_len: int = MAX_LEN, **params) -> torch.nn.Module:
    return build_attention(name, num_heads=HEADS, head_dim=HEAD_DIM, max_seq_len=max_seq_len, causal=True,
                           **params).eval()


@pytest.mark.parametrize("name", STEP_FORMS)
def test_info_declares_a_step_form(name):
    info = get_attention_info(name)
    assert info.supports_decoding and info.decoding_note
    assert info.state_growth == {"full": "linear", "sliding_window": "window", "longformer": "window",
                                 "bigbird": "linear"}[name]
    assert build(name, **({"window": 8} if name in ("sliding_window", "longformer") else {})).decode_form == "step"


@pytest.mark.parametrize("name,params", BUDGETS, ids=[f"{n}-{p}" for n, p in BUDGETS])
def test_decoding_check_across_edges(name, params):
    assert check_mechanism(name, params, checks=["decoding"]) == ["decoding"]


# With one-hot values (v_j = e_j, head_dim >= seq) an output row is its attention weights: positive on the keys the
# row reads, exactly zero on masked ones (a -inf score's exp is 0).
READ_LEN, READ_DIM = 30, 32


def _reads(row: torch.Tensor) -> set[int]:
    """Key positions with a non-zero weight in ``row`` ``(heads, READ_DIM)`` (any head)."""
    return set(torch.nonzero(row[:, :READ_LEN].abs().sum(dim=0)).flatten().tolist())


@pytest.mark.parametrize("name,params", [
    ("sliding_window", {"window": 6}),
    ("longformer", {"window": 4, "global_positions": (0, 9, 21)}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2}),
    ("bigbird", {"block_size": 3, "num_global_blocks": 2, "num_random_blocks": 3}),
])
def test_each_step_reads_exactly_its_causal_row(name, params):
    """Not just close numbers: the set of keys a step reads equals the set its causal row reads, position by
    position, after a prompt of that many tokens (the prefill's fill is checked too). A far key with a tiny weight
    could pass a tolerance, not this; a key read twice is caught by the numbers."""
    attn = build_attention(name, num_heads=HEADS, head_dim=READ_DIM, max_seq_len=MAX_LEN, causal=True,
                           **params).eval()
    q, k, _ = make_qkv(batch=1, seq=READ_LEN, dim=READ_DIM, seed=3)
    v = torch.eye(READ_LEN, READ_DIM).expand(1, HEADS, -1, -1).contiguous()
    with torch.no_grad():
        ref = attn(q, k, v)
        for p in range(READ_LEN):
            state = attn.init_state(1, READ_LEN)
            _, state = attn.prefill(q[:, :, :p], k[:, :, :p], v[:, :, :p], state)
            out, _ = attn.step(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], state)
            assert _reads(out[0, :, 0]) == _reads(ref[0, :, p]), f"position {p}"


def test_full_cache_bytes_are_two_keys_per_token():
    attn = build("full")
    lengths, steps, max_len = [13, 5, 1], 7, 40
    q, k, v = make_qkv(batch=3, seq=13, seed=1)
    state = attn.init_state(3, max_len)
    per_token = 2 * HEADS * HEAD_DIM * 4
    assert state.capacity_bytes() == 3 * max_len * per_token
    _, state = attn.prefill(q, k, v, state, key_padding_mask=right_padding_mask(lengths, 13))
    assert state_bytes(state) == sum(lengths) * per_token
    for t in range(steps):
        _, state = attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
        assert state_bytes(state) == (sum(lengths) + 3 * (t + 1)) * per_token


@pytest.mark.parametrize("name,params,slots", [
    ("sliding_window", {"window": 8}, 5),
    ("sliding_window", {"window": 7}, 4),
    ("longformer", {"window": 8, "global_positions": (0, 11)}, 5 + 12),
    ("longformer", {"window": 8, "global_positions": ()}, 5),
])
def test_ring_bytes_stop_growing_past_the_window(name, params, slots):
    """Bytes ``2 * min(context, slots) * heads * head_dim * 4`` per sequence, then constant; the allocation does not
    depend on max_len (longformer: the ring plus the prefix cache up to its last global position)."""
    attn = build(name, max_seq_len=512, **params)
    per_slot = 2 * HEADS * HEAD_DIM * 4
    assert attn.init_state(2, 512).capacity_bytes() == attn.init_state(2, 64).capacity_bytes() == 2 * slots * per_slot
    q, k, v = make_qkv(batch=2, seq=1, seed=2)
    state = attn.init_state(2, 512)
    _, state = attn.prefill(q[:, :, :0], k[:, :, :0], v[:, :, :0], state)
    for t in range(40):
        _, state = attn.step(q, k, v, state)
        if name == "sliding_window" or not params["global_positions"]:
            assert state_bytes(state) == 2 * min(t + 1, slots) * per_slot
    assert state_bytes(state) == 2 * slots * per_slot


def test_ring_holds_the_latest_keys_at_their_slots():
    """After a right-padded prompt, slot ``s`` holds the latest real position ``p`` with ``p % slots == s``."""
    attn = build("sliding_window", window=6)  # 4 slots
    lengths = [9, 6, 2, 0]
    q, k, v = make_qkv(batch=4, seq=9, seed=4)
    state = attn.init_state(4, 20)
    _, state = attn.prefill(q, k, v, state, key_padding_mask=right_padding_mask(lengths, 9))
    for b, n in enumerate(lengths):
        for s in range(4):
            held = [p for p in range(n) if p % 4 == s]
            expected = k[b, :, held[-1]] if held else torch.zeros(HEADS, HEAD_DIM)
            assert torch.equal(state.k[b, :, s], expected), (b, s)


@pytest.mark.parametrize("name,params", [
    ("full", {}),
    ("sliding_window", {"window": 6}),
    ("longformer", {"window": 6, "global_positions": (0, 14)}),
    ("bigbird", {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2}),
])
def test_bf16_cache_runs_and_stays_close_to_float32(name, params):
    attn = build(name, **params)
    q, k, v = (t.to(torch.bfloat16) for t in make_qkv(batch=2, seq=32, seed=5))
    ref = attn(q.float(), k.float(), v.float())  # the same (bf16-rounded) inputs in float32
    state = attn.init_state(2, 32, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.tensors().values())
    out, state = attn.prefill(q[:, :, :12], k[:, :, :12], v[:, :, :12], state)
    outs = [out]
    for t in range(12, 32):
        out_t, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(out_t)
    out = torch.cat(outs, dim=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", STEP_FORMS)
def test_a_foreign_state_is_refused(name):
    params = {"window": 8} if name in ("sliding_window", "longformer") else {}
    attn = build(name, **params)
    other = build("performer" if name != "full" else "sliding_window", **({"window": 8} if name == "full" else {}))
    q, k, v = make_qkv(batch=1, seq=1, seed=6)
    foreign = other.init_state(1, 8)
    with pytest.raises(ValueError, match="init_state"):
        attn.step(q, k, v, foreign)
    with pytest.raises(ValueError, match="init_state"):
        attn.prefill(q, k, v, other.init_state(1, 8))


@pytest.mark.parametrize("name", ["sliding_window", "longformer"])
def test_a_state_of_another_window_is_refused(name):
    """Same mechanism, other window: the ring has another size, and reading it would silently be wrong."""
    q, k, v = make_qkv(batch=1, seq=1, seed=7)
    state = build(name, window=8).init_state(1, 32)
    with pytest.raises(ValueError, match="another configuration"):
        build(name, window=4).step(q, k, v, state)


@pytest.mark.parametrize("name", STEP_FORMS)
def test_default_budgets_decode_past_their_windows_and_blocks(name):
    """The default configs (window 256; blocks of 64, 2 global, 3 random), a padded prompt, then steps across a
    window's reach and several blocks: equal to the causal forward."""
    attn = build(name, max_seq_len=700)
    lengths, total = [300, 150], 420
    q, k, v = make_qkv(batch=2, seq=total, seed=8)
    with torch.no_grad():
        ref = attn(q, k, v)
        state = attn.init_state(2, total)
        _, state = attn.prefill(q[:, :, :300], k[:, :, :300], v[:, :, :300], state,
                                key_padding_mask=right_padding_mask(lengths, 300))
        rows = torch.arange(2)
        for t in range(total - 300):
            pos = torch.tensor(lengths) + t
            out, state = attn.step(*(x[rows, :, pos][:, :, None] for x in (q, k, v)), state)
            torch.testing.assert_close(out[:, :, 0], ref[rows, :, pos], atol=1e-5, rtol=1e-4)
