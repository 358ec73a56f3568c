"""Step forms of performer, rfa, aft (every mode), memory_compressed and reformer (issue 24).

Each step form must equal its mechanism's causal forward at every position (attentions.testing.check_decoding:
prompts of 0, 1 and lengths across edges, steps, right-padded batches, state growth, a full state). Here with
budgets whose edges (chunks, blocks, windows, buckets, ring wrap-arounds) fall inside the check's 48 positions,
plus what the contract check cannot see: the performer stabiliser when key scales jump late, every AFT mode's own
state growth, constant states at contexts 1 and 40, float32 sums for half-precision inputs, the state layouts' byte
counts. No timing here (speed is in the issue's report).
"""

from __future__ import annotations

import pytest
import torch

from attentions import _lean_linear, build_attention, get_attention_info, make_config, state_bytes
from attentions.testing import ATOL, RTOL, _Subject, check_decoding, check_mechanism

from conftest import HEAD_DIM, HEADS, make_qkv, right_padding_mask

KERNEL_STEP = ("performer", "rfa", "aft", "memory_compressed", "reformer")

# Budgets whose edges fall inside the check's 48 positions: 16 features (performer, rfa: m < d + 1 is allowed
# and m < n), windows 1 to 8, compressions 1 to 5, buckets of 2 to 4 with rings that wrap (few buckets).
CASES = [
    ("performer", {"num_features": 16}),
    ("performer", {"num_features": 16, "recompute": False}),
    ("performer", {"num_features": 7, "orthogonal": False}),
    ("performer", {"num_features": 16, "kernel": "relu"}),
    ("rfa", {"num_features": 16}),
    ("rfa", {"num_features": 16, "recompute": False}),
    ("rfa", {"num_features": 8, "sigma": 0.6}),
    ("rfa", {"num_features": 16, "learn_sigma": True, "sigma": 0.7}),
    ("aft", {"mode": "local", "window": 6}),
    ("aft", {"mode": "local", "window": 8, "recompute": False, "bias_init_std": 2.0}),
    ("aft", {"mode": "local", "window": 1}),
    ("aft", {"mode": "local", "window": 5, "bias_init_std": 3.0}),
    ("aft", {"mode": "simple"}),
    ("aft", {"mode": "full", "bias_init_std": 2.0}),
    ("memory_compressed", {"compression": 3}),
    ("memory_compressed", {"compression": 4, "compression_type": "mean"}),
    ("memory_compressed", {"compression": 5}),
    ("memory_compressed", {"compression": 1}),
    ("reformer", {"bucket_size": 4, "n_hashes": 2}),
    ("reformer", {"bucket_size": 4, "n_hashes": 1}),
    ("reformer", {"bucket_size": 3, "n_hashes": 3, "recompute": False}),
    ("reformer", {"bucket_size": 2, "n_hashes": 4, "num_buckets": 4}),  # rings overflow: the last 2 kept
    ("reformer", {"bucket_size": 4, "n_hashes": 2, "dedup_pairs": False}),
]
AFT_GROWTH = {"simple": "constant", "local": "window", "full": "linear"}


def _subject(name: str, params: dict) -> _Subject:
    # check_decoding holds each aft mode to its own growth: the registry's growth of the params (state_growth_fn)
    return _Subject(name, get_attention_info(name), dict(params))


@pytest.mark.parametrize("mode", sorted(AFT_GROWTH))
def test_aft_growth_is_its_modes(mode):
    info = get_attention_info("aft")
    config = make_config("aft", mode=mode, max_seq_len=64, causal=True)
    assert info.growth(config) == AFT_GROWTH[mode] and info.growth(config, "recompute") == "linear"
    assert info.state_growth == info.growth() == "window"  # the default mode's


def _build(name: str, **params):
    base = {"num_heads": HEADS, "head_dim": HEAD_DIM, "max_seq_len": 64, "causal": True}
    return build_attention(name, **{**base, **params}).eval()


@torch.no_grad()
def _decode(attn, q, k, v, prompt: int) -> tuple[torch.Tensor, list[int]]:
    """The prompt's prefill output then one step per later position, concatenated; and the bytes after each."""
    state = attn.init_state(q.shape[0], q.shape[2], q.dtype, q.device)
    out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], state)
    outs, sizes = [out], [state_bytes(state)]
    for t in range(prompt, q.shape[2]):
        out_t, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(out_t)
        sizes.append(state_bytes(state))
    return torch.cat(outs, dim=2), sizes


def test_the_kernel_mechanisms_have_step_forms():
    for name in KERNEL_STEP:
        info = get_attention_info(name)
        assert info.supports_decoding and info.decoding_note
        assert _build(name, **_build_params(name)).decode_form == "step"
    growth = {name: get_attention_info(name).state_growth for name in KERNEL_STEP}
    assert growth == {"performer": "constant", "rfa": "constant", "aft": "window", "memory_compressed": "linear",
                      "reformer": "linear"}
    assert "simple" in get_attention_info("aft").decoding_note and "full" in get_attention_info("aft").decoding_note


def _build_params(name: str) -> dict:
    return next(params for n, params in CASES if n == name)


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_step_form_equals_causal_forward(name, params):
    check_decoding(_subject(name, params))


def test_contract_passes_with_the_default_aft_mode():
    assert check_mechanism("aft", {"window": 6}, checks=["decoding"]) == ["decoding"]


@pytest.mark.parametrize("name,params", [("performer", {"num_features": 16}), ("rfa", {"num_features": 16}),
                                         ("aft", {"mode": "simple"})])
def test_constant_state_bytes_at_contexts_1_and_40(name, params):
    attn = _build(name, **params)
    q, k, v = make_qkv(batch=2, seq=40, seed=3)
    sizes = []
    for n in (1, 40):
        state = attn.init_state(2, 64, q.dtype)
        _, state = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n], state)
        sizes.append(state_bytes(state))
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("chunk", [8, 5, 128])
def test_performer_stabiliser_with_keys_whose_scale_jumps_late(monkeypatch, chunk):
    """Keys of norm 30 first (log-features w.y - |y|^2/2 <= 4 |y| - |y|^2/2 ~ -87 for y = k d^-1/4), then the
    ordinary keys from position 29 on (log-features near 0): the running maximum jumps by more than 60 nats late,
    inside a chunk of the causal form (which then runs in float64), and the step form rescales its sums by
    exp(T - T') < 1e-26: every output still equals the causal forward."""
    monkeypatch.setattr(_lean_linear, "CAUSAL_CHUNK", chunk)  # the reference's chunk edges inside 48 positions
    attn = _build("performer", num_features=16)
    q, k, v = make_qkv(batch=2, seq=48, seed=5)
    k = k.clone()
    k[:, :, :29] = torch.nn.functional.normalize(k[:, :, :29], dim=-1) * 30.0
    k[:, :, 41] *= 0.05  # and one tiny key (log-features near 0) after the jump
    with torch.no_grad():
        fmap = attn._decode_map(torch.float32)
        log_k = fmap.project(k, "k", ())
        early, late = log_k[:, :, :29].amax(dim=(2, 3)), log_k[:, :, 29:].amax(dim=(2, 3))
        assert bool((late - early > 60).all())  # the jump the float32 rule cannot hold in one chunk
        ref = attn(q, k, v)
    for prompt in (0, 20, 29, 30, 44):
        out, _ = _decode(attn, q, k, v, prompt)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_performer_stabiliser_when_keys_grow_late_and_queries_are_large():
    """Unit keys, then keys 5x larger from position 33 (their log-features fall, some features rise against
    others), with queries 4x larger (row maxima far above 0): the step's reference only ever sees keys j <= i."""
    attn = _build("performer", num_features=16, recompute=False)
    q, k, v = make_qkv(batch=2, seq=48, seed=6)
    q, k = q * 4.0, k.clone()
    k[:, :, 33:] *= 5.0
    with torch.no_grad():
        ref = attn(q, k, v)
    for prompt in (0, 16, 40):
        out, _ = _decode(attn, q, k, v, prompt)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_rfa_denominator_floor_counts_the_keys_so_far():
    """4 features and a narrow kernel (sigma 0.3): many rows' estimated denominators fall below the floor
    n_real exp(-2 / sigma^2) D, whose outputs are numerator / floor (~1e9). Float64 inputs, so that the
    numerators' rounding, amplified by 1 / floor, stays below the tolerance: what is checked is the floor."""
    attn = _build("rfa", num_features=4, sigma=0.3)
    q, k, v = (t.double() for t in make_qkv(batch=2, seq=48, seed=14))
    with torch.no_grad():
        ref = attn(q, k, v)
        fmap, params = attn._decode_map(torch.float64)
        scores = fmap.project(q, "q", params) @ fmap.project(k, "k", params).transpose(-1, -2)
        den = scores.tril().sum(-1)
        floor = attn.denominator_floor(None, 48, torch.float64, causal=True)[..., 0] * 4
        assert int((den < floor).sum()) > 20
    for prompt in (0, 13):
        out, _ = _decode(attn, q, k, v, prompt)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_performer_and_rfa_beyond_one_chunk_of_the_causal_form():
    """150 positions: the causal forms' default chunks (128 recomputing, 64 stored) are crossed."""
    q, k, v = make_qkv(batch=1, seq=150, seed=7)
    for name, params in (("performer", {"num_features": 16}), ("performer", {"num_features": 16, "recompute": False}),
                         ("rfa", {"num_features": 16}), ("rfa", {"num_features": 16, "recompute": False})):
        attn = _build(name, **params, max_seq_len=None)
        with torch.no_grad():
            ref = attn(q, k, v)
        out, sizes = _decode(attn, q, k, v, 61)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert len(set(sizes)) == 1


@pytest.mark.parametrize("mode,window", [("simple", 4), ("local", 4), ("local", 7), ("full", 4)])
def test_aft_state_grows_as_its_mode_says(mode, window):
    """simple: constant; local: the ring fills up to the window then stays; full: one key and value per token."""
    attn = _build("aft", mode=mode, window=window)
    q, k, v = make_qkv(batch=1, seq=20, seed=8)
    _, sizes = _decode(attn, q, k, v, 0)
    per_token = 2 * HEADS * HEAD_DIM * 4  # a key and a value, float32, every head
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    if mode == "simple":
        assert len(set(sizes)) == 1
    elif mode == "local":
        assert steps == [per_token] * window + [0] * (len(steps) - window)
    else:
        assert steps == [per_token] * len(steps)


def test_aft_local_ring_with_large_biases_and_right_padding():
    """Biases of +-30 on the window (the out-of-window weight 1 is negligible or dominant by turns) and prompts of
    11, 2 and 0 real tokens: each sequence continues from its own end."""
    attn = _build("aft", mode="local", window=5)
    with torch.no_grad():
        attn.rel_bias.copy_(torch.tensor([30.0, -30.0, 5.0, -12.0, 30.0, 0.0, 1.0, -1.0, 2.0]))
    lengths, steps = [11, 2, 0], 15
    q, k, v = make_qkv(batch=3, seq=max(lengths) + steps, seed=9)
    with torch.no_grad():
        ref = attn(q, k, v)
        mask = right_padding_mask(lengths, max(lengths))
        state = attn.init_state(3, 40, q.dtype)
        _, state = attn.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], state, key_padding_mask=mask)
        rows = torch.arange(3)
        for t in range(steps):
            pos = torch.tensor(lengths) + t
            out_t, state = attn.step(*(x[rows, :, pos][:, :, None] for x in (q, k, v)), state)
            torch.testing.assert_close(out_t[:, :, 0], ref[rows, :, pos], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,params", [("performer", {"num_features": 16}), ("rfa", {"num_features": 16}),
                                         ("aft", {"mode": "simple"}), ("aft", {"mode": "full"}),
                                         ("memory_compressed", {"compression": 3}),
                                         ("reformer", {"bucket_size": 4, "n_hashes": 2})])
def test_a_sequence_with_an_empty_prompt_in_a_padded_batch(name, params):
    """Prompts of 11, 0 and 4 real tokens (nothing summed yet for the second: a -inf reference, no slot, empty
    rings), then 14 steps: each sequence continues from its own end."""
    attn = _build(name, **params)
    lengths, steps = [11, 0, 4], 14
    q, k, v = make_qkv(batch=3, seq=max(lengths) + steps, seed=15)
    rows = torch.arange(3)
    with torch.no_grad():
        ref = attn(q, k, v)
        state = attn.init_state(3, 30, q.dtype)
        mask = right_padding_mask(lengths, 11)
        _, state = attn.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], state, key_padding_mask=mask)
        for t in range(steps):
            pos = torch.tensor(lengths) + t
            out_t, state = attn.step(*(x[rows, :, pos][:, :, None] for x in (q, k, v)), state)
            torch.testing.assert_close(out_t[:, :, 0], ref[rows, :, pos], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,params", [("performer", {"num_features": 16}), ("rfa", {"num_features": 16}),
                                         ("aft", {"mode": "simple"}), ("aft", {"mode": "local", "window": 6})])
def test_sums_stay_float32_for_half_precision_inputs(name, params):
    attn = _build(name, **params)
    q, k, v = (t.to(torch.bfloat16) for t in make_qkv(batch=2, seq=30, seed=10))
    with torch.no_grad():
        ref = attn(q, k, v).float()
        state = attn.init_state(2, 30, torch.bfloat16)
        out, state = attn.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], state)
        outs = [out]
        for t in range(10, 30):
            out_t, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            outs.append(out_t)
    sums = [t for n, t in state.tensors().items() if n in ("sums", "reference", "num", "den")]
    assert sums and all(t.dtype == torch.float32 for t in sums)
    assert torch.cat(outs, dim=2).dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(outs, dim=2).float(), ref, atol=2e-2, rtol=2e-2)


def test_memory_compressed_state_counts_closed_slots_and_the_block():
    c = 3
    attn = _build("memory_compressed", compression=c)
    q, k, v = make_qkv(batch=1, seq=20, seed=11)
    _, sizes = _decode(attn, q, k, v, 4)
    per_slot = 2 * HEADS * HEAD_DIM * 4  # a key slot and a value slot, float32, every head
    block = per_slot * c  # the current block's raw keys and values, a fixed buffer
    assert sizes == [(n // c) * per_slot + block for n in range(4, 21)]


def test_reformer_with_shared_query_key_and_its_state_bytes():
    """The backbone ties q and k (shared_qk): the step hashes and scores them as the forward does. The state is
    the KV cache (counted as filled) plus the filled ring entries and the per-bucket counts."""
    attn = _build("reformer", bucket_size=4, n_hashes=2)
    q, _, v = make_qkv(batch=2, seq=48, seed=12)
    with torch.no_grad():
        ref = attn(q, q, v)
    out, sizes = _decode(attn, q, q, v, 17)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    state = attn.init_state(2, 48)
    with torch.no_grad():
        _, state = attn.prefill(q, q, v, state)
    kv = 2 * 2 * HEADS * 48 * HEAD_DIM * 4
    rings = int(state.counts.clamp(max=4).sum()) * 4
    assert state_bytes(state) == kv + rings + state.counts.numel() * 4 == sizes[-1]
    assert int(state.counts.sum()) == 2 * HEADS * 2 * 48  # every token in one bucket per round


def test_reformer_rings_after_prefill_equal_rings_built_by_steps():
    """Prefill builds each bucket's ring at once (sort by bucket, position); steps append one token at a time:
    the same positions in the same slots."""
    attn = _build("reformer", bucket_size=2, n_hashes=3, num_buckets=4)
    q, k, v = make_qkv(batch=2, seq=30, seed=13)
    with torch.no_grad():
        at_once = attn.init_state(2, 30)
        _, at_once = attn.prefill(q, k, v, at_once)
        stepped = attn.init_state(2, 30)
        _, stepped = attn.prefill(q[:, :, :0], k[:, :, :0], v[:, :, :0], stepped)
        for t in range(30):
            _, stepped = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], stepped)
    assert torch.equal(at_once.counts, stepped.counts)
    assert torch.equal(at_once.rings, stepped.rings)
