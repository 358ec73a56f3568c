"""Grouped-query attention in the mechanisms that share key-value summaries (issue 26): performer, rfa, aft,
memory_compressed, linformer, clustered.

check_mechanism's ``grouped_kv`` check covers grouped == repeated at 37 tokens with 2 key-value heads for 4 query
heads and a 5-token unpadded prefill. Here: references written out (the consecutive-heads convention), the causal
chunk edges, multi-query attention (one key-value head), right-padded prefill, every aft mode and its recomputing
groups, performer's stabiliser and redraw, rfa's per-key-value-head bandwidth, dropout, and the state sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from attentions import aft as aft_module
from attentions import build_attention, get_attention_info, state_bytes
from attentions._lean_linear import group_heads, ungroup_heads

from conftest import right_padding_mask

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, DIM = 4, 8
SHARED = ["performer", "rfa", "aft", "memory_compressed", "linformer", "clustered"]
SMALL = {
    "performer": {"num_features": 16},
    "rfa": {"num_features": 16},
    "aft": {"mode": "local", "window": 6},
    "memory_compressed": {"compression": 3},
    "linformer": {"proj_dim": 8, "max_seq_len": 400},
    "clustered": {"num_clusters": 4},
}
CAUSAL = ["performer", "rfa", "aft", "memory_compressed"]


def _qkv(kv_heads: int, n: int, seed: int = 0, batch: int = 2, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, n, DIM, generator=gen) * scale
    k, v = (torch.randn(batch, kv_heads, n, DIM, generator=gen) * scale for _ in range(2))
    return q, k, v


def _pair(name: str, kv_heads: int, **params):
    """A grouped module and the same module without groups, its per-head tensors repeated for the query heads."""
    params = {**SMALL[name], **params, "num_heads": HEADS, "head_dim": DIM}
    grouped = build_attention(name, num_kv_heads=kv_heads, **params).eval()
    plain = build_attention(name, **params).eval()
    groups = HEADS // kv_heads
    own = dict(grouped.named_parameters()) | dict(grouped.named_buffers())
    with torch.no_grad():
        for key, t in list(plain.named_parameters()) + list(plain.named_buffers()):
            g = own[key]
            t.copy_(g if g.shape == t.shape else g.repeat_interleave(groups, dim=0))
    return grouped, plain


def _grouped_equals_repeated(grouped, plain, q, k, v, mask, atol=1e-5, rtol=1e-4):
    """Outputs (real rows) and gradients of q, k, v: grouped k, v against the same heads repeated."""
    groups = q.shape[1] // k.shape[1]
    mine = [t.clone().requires_grad_(True) for t in (q, k, v)]
    theirs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = grouped(*mine, key_padding_mask=mask)
    ref = plain(theirs[0], *(t.repeat_interleave(groups, dim=1) for t in theirs[1:]), key_padding_mask=mask)
    real = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, atol=atol, rtol=rtol)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * real * weight).sum().backward()
    (ref * real * weight).sum().backward()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol)
    return out


# ----------------------------------------------------------------------------- registry facts


@pytest.mark.parametrize("name", SHARED)
def test_the_six_mechanisms_share_key_value_heads_and_say_how(name):
    info = get_attention_info(name)
    assert info.grouped_kv == "shared"
    assert info.grouped_kv_note and "\n" not in info.grouped_kv_note


def test_per_head_parameters_lead_with_the_key_value_heads():
    rfa = build_attention("rfa", num_heads=8, num_kv_heads=2, head_dim=DIM, learn_sigma=True)
    assert tuple(rfa.log_sigma.shape) == (2, DIM)
    mc = build_attention("memory_compressed", num_heads=8, num_kv_heads=2, head_dim=DIM, compression=3)
    assert tuple(mc.key_kernel.shape) == tuple(mc.value_kernel.shape) == (2, 3 * DIM, DIM)


# ----------------------------------------------------------------------------- references written out


def _kv_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key-value head of each query head by the contract: head i reads key-value head i // (heads / kv_heads)."""
    groups = heads // t.shape[1]
    return torch.stack([t[:, i // groups] for i in range(heads)], dim=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_performer_equals_favor_written_out(causal, kv_heads):
    """FAVOR+ in float64 without stabilisers: phi(x) = exp(W x' - |x'|^2 / 2), x' = x d^-1/4."""
    attn = build_attention("performer", num_heads=HEADS, num_kv_heads=kv_heads, head_dim=DIM, num_features=32,
                           causal=causal)
    q, k, v = _qkv(kv_heads, 150, seed=1)
    mask = right_padding_mask([150, 97], 150)
    out = attn(q, k, v, key_padding_mask=mask)
    w = attn.projection.double()
    scale = DIM ** -0.25

    def phi(x):
        x = x.double() * scale
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2)

    a = phi(q) @ phi(_kv_of(k, HEADS)).transpose(-1, -2)  # (b, h, n, n)
    a = a * mask[:, None, None, :]
    if causal:
        a = a.tril()
    ref = (a @ _kv_of(v, HEADS).double()) / a.sum(-1, keepdim=True)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out.double() * real, ref * real, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_simple_equals_its_formula_per_key_value_head(causal):
    attn = build_attention("aft", num_heads=HEADS, num_kv_heads=1, head_dim=DIM, mode="simple", causal=causal)
    q, k, v = _qkv(1, 20, seed=2)
    out = attn(q, k, v)
    e = k.double().exp()
    if causal:
        ctx = (e * v.double()).cumsum(2) / e.cumsum(2)
    else:
        ctx = (e * v.double()).sum(2, keepdim=True) / e.sum(2, keepdim=True)
    torch.testing.assert_close(out.double(), torch.sigmoid(q.double()) * ctx, atol=1e-6, rtol=1e-5)


def test_linformer_equals_its_formula_per_key_value_head():
    attn = build_attention("linformer", num_heads=HEADS, num_kv_heads=2, head_dim=DIM, proj_dim=8, max_seq_len=30)
    q, k, v = _qkv(2, 30, seed=3)
    e, f = attn.proj_k.double(), attn.proj_v.double()
    kp, vp = e.T @ _kv_of(k, HEADS).double(), f.T @ _kv_of(v, HEADS).double()
    ref = torch.softmax(q.double() @ kp.transpose(-1, -2) / math.sqrt(DIM), dim=-1) @ vp
    torch.testing.assert_close(attn(q, k, v).double(), ref, atol=1e-6, rtol=1e-5)


def test_memory_compressed_mean_equals_its_formula_per_key_value_head():
    attn = build_attention("memory_compressed", num_heads=HEADS, num_kv_heads=2, head_dim=DIM, compression=3,
                           compression_type="mean")
    q, k, v = _qkv(2, 30, seed=4)
    ks, vs = (_kv_of(t, HEADS).double().view(2, HEADS, 10, 3, DIM).mean(3) for t in (k, v))
    ref = torch.softmax(q.double() @ ks.transpose(-1, -2) / math.sqrt(DIM), dim=-1) @ vs
    torch.testing.assert_close(attn(q, k, v).double(), ref, atol=1e-6, rtol=1e-5)


def test_group_heads_puts_a_key_value_heads_queries_together():
    q, k, v = _qkv(2, 5, seed=6)
    mask = right_padding_mask([5, 3], 5)
    gq, gk, gv, gm = group_heads(q, k, v, mask)
    assert gq.shape == (4, 2, 5, DIM) and gk.shape == gv.shape == (4, 1, 5, DIM)
    torch.testing.assert_close(gq[1 * 2 + 1], q[1, 2:4])  # batch 1, key-value head 1: query heads 2 and 3
    torch.testing.assert_close(gk[1 * 2 + 1, 0], k[1, 1])
    assert torch.equal(gm[3], mask[1])
    assert torch.equal(ungroup_heads(gq, 2), q)


# ----------------------------------------------------------------------------- grouped == repeated, wider cases


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("name", SHARED)
def test_multi_query_and_grouped_equal_repeated_both_patterns(name, kv_heads):
    for causal in (False, True) if name in CAUSAL else (False,):
        grouped, plain = _pair(name, kv_heads, causal=causal)
        q, k, v = _qkv(kv_heads, 41, seed=7)
        _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([41, 23], 41))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("name", ["performer", "rfa"])
def test_causal_sums_across_chunk_edges_with_groups(name, kv_heads, recompute):
    """300 tokens: several chunks of the recomputing (128) and stored (64) causal forms, the carried chunk states
    per key-value head; padding that ends inside a chunk."""
    grouped, plain = _pair(name, kv_heads, causal=True, recompute=recompute)
    q, k, v = _qkv(kv_heads, 300, seed=8)
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([300, 190], 300))


@pytest.mark.parametrize("recompute", [True, False])
def test_bidirectional_sums_across_chunks_with_groups(recompute):
    """num_features 256: the recomputing bidirectional path sums 256-row key chunks (rescaled as the maximum grows)."""
    grouped, plain = _pair("performer", 2, num_features=256, recompute=recompute)
    q, k, v = _qkv(2, 600, seed=9)
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([600, 333], 600))


@pytest.mark.parametrize("causal", [False, True])
def test_memory_compressed_causal_pieces_with_groups(causal):
    """300 tokens: three causal pieces of 126 queries, each piece's block mask tiled over the group."""
    for kv_heads in (2, 1):
        grouped, plain = _pair("memory_compressed", kv_heads, causal=causal)
        q, k, v = _qkv(kv_heads, 300, seed=10)
        _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([300, 200], 300))


def test_clustered_improved_gathers_top_keys_from_the_key_value_head():
    for kv_heads in (2, 1):
        grouped, plain = _pair("clustered", kv_heads, improved=True, topk=5)
        q, k, v = _qkv(kv_heads, 41, seed=11)
        _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([41, 30], 41))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["simple", "local", "full"])
def test_every_aft_mode_with_groups(mode, causal, recompute):
    params = {"mode": mode, "window": 6, "recompute": recompute, "causal": causal, "max_seq_len": 64}
    grouped, plain = _pair("aft", 2, **params)
    with torch.no_grad():  # biases that matter (the default init is small)
        bias = grouped.rel_bias if mode == "local" else grouped.pos_bias if mode == "full" else None
        if bias is not None:
            bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(12))
            dict(plain.named_parameters())[next(n for n, _ in grouped.named_parameters())].copy_(bias)
    q, k, v = _qkv(2, 41, seed=13)
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([41, 17], 41))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("elements", [64, 1 << 11])
def test_aft_recomputing_groups_split_by_key_value_head(monkeypatch, causal, elements):
    """The recomputing local path's channel groups with grouped heads: by key-value head of one batch row (64
    elements), by batch rows (2048); each key-value head goes with its query heads, in forward and backward."""
    monkeypatch.setattr(aft_module, "GROUP_ELEMENTS", elements)
    monkeypatch.setattr(aft_module, "MAX_GROUPS", 64)
    grouped, plain = _pair("aft", 2, causal=causal, window=4)
    q, k, v = _qkv(2, 16, seed=14, batch=3)
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([16, 9, 12], 16))


# ----------------------------------------------------------------------------- performer: stabiliser and redraw


@pytest.mark.parametrize("causal", [False, True])
def test_performer_stabiliser_keeps_query_heads_apart(causal):
    """Head 0's output does not depend on head 1's queries (same group): the key shift is the group's keys', the
    query shift its own row's. Head 1's queries are made huge (row shifts of hundreds of nats)."""
    attn = build_attention("performer", num_heads=HEADS, num_kv_heads=2, head_dim=DIM, num_features=32,
                           causal=causal)
    q, k, v = _qkv(2, 150, seed=15, scale=3.0)
    out = attn(q, k, v)
    q2 = q.clone()
    q2[:, 1] *= 30.0
    out2 = attn(q2, k, v)
    torch.testing.assert_close(out2[:, [0, 2, 3]], out[:, [0, 2, 3]], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out2).all()


@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_logits_grouped_equals_repeated(causal):
    """Input scale 4 (logits of tens of nats, keys whose scale jumps late): the stabilised grouped estimator equals
    the repeated one, outputs and gradients."""
    grouped, plain = _pair("performer", 1, num_features=32, causal=causal)
    q, k, v = _qkv(1, 200, seed=16, scale=4.0)
    k[:, :, 150:] *= 3.0
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([200, 170], 200), atol=1e-4, rtol=1e-3)


def test_performer_redraws_alike_grouped_and_repeated():
    grouped, plain = _pair("performer", 2, num_features=16, redraw_interval=2)
    grouped.train()
    plain.train()
    q, k, v = _qkv(2, 20, seed=17)
    seen = set()
    for _ in range(5):
        out = grouped(q, k, v)
        ref = plain(q, *(t.repeat_interleave(2, dim=1) for t in (k, v)))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        seen.add(float(grouped.projection.sum()))
    assert len(seen) == 3 and int(grouped.num_redraws) == int(plain.num_redraws) == 2


# ----------------------------------------------------------------------------- rfa: bandwidth per key-value head


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_rfa_learned_bandwidth_is_the_key_value_heads(causal, recompute):
    """Bandwidths that differ per key-value head and dimension: grouped equals the ungrouped module with each
    bandwidth repeated for its query heads; the bandwidth's gradient is the sum over its query heads'."""
    grouped, plain = _pair("rfa", 2, learn_sigma=True, causal=causal, recompute=recompute)
    with torch.no_grad():
        grouped.log_sigma.normal_(0.3, 0.3, generator=torch.Generator().manual_seed(18))
        plain.log_sigma.copy_(grouped.log_sigma.repeat_interleave(2, dim=0))
    q, k, v = _qkv(2, 150, seed=19)
    _grouped_equals_repeated(grouped, plain, q, k, v, right_padding_mask([150, 77], 150))
    summed = plain.log_sigma.grad.view(2, 2, DIM).sum(1)
    torch.testing.assert_close(grouped.log_sigma.grad, summed, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["memory_compressed", "linformer", "clustered"])
def test_grouped_dropout_drops_and_is_unbiased(name, causal):
    """With dropout in training the grouped module drops (outputs differ from eval's), and the mean over draws is
    the eval output (inverted dropout on the probabilities); gradients reach q, k, v."""
    if causal and name not in CAUSAL:
        pytest.skip("no causal form")
    params = {**SMALL[name], "num_heads": HEADS, "head_dim": DIM, "num_kv_heads": 1, "dropout": 0.2,
              "causal": causal}
    attn = build_attention(name, **params)
    q, k, v = _qkv(1, 24, seed=20)
    reference = attn.eval()(q, k, v)
    attn.train()
    torch.manual_seed(0)
    draws = torch.stack([attn(q, k, v) for _ in range(400)])
    assert not torch.allclose(draws[0], reference, atol=1e-3)
    # Each element's mean within 5 standard errors of the eval output (1536 elements: a false alarm ~1e-3).
    error = (draws.mean(0) - reference).abs()
    assert bool((error <= 5 * draws.std(0) / math.sqrt(len(draws)) + 1e-4).all())
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attn(*leaves).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ----------------------------------------------------------------------------- decoding


def _decode_padded(attn, q, k, v, lengths: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill a right-padded prompt (each sequence ``lengths[b]`` tokens), then ``steps`` steps; the step
    tokens of sequence b are q, k, v at positions lengths[b] + t. Returns the step outputs ``(b, h, 1, d)``."""
    prompt = max(lengths)
    batch = q.shape[0]
    with torch.no_grad():
        state = attn.init_state(batch, prompt + steps, q.dtype, q.device)
        mask = right_padding_mask(lengths, prompt)
        _, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], state, key_padding_mask=mask)
        outs = []
        for t in range(steps):
            pos = torch.tensor(lengths) + t
            pick = [t_[torch.arange(batch), :, pos][:, :, None] for t_ in (q, k, v)]
            out, state = attn.step(*pick, state)
            outs.append(out)
    return outs


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("name,params", [
    ("performer", {}), ("rfa", {}), ("aft", {"mode": "simple"}), ("aft", {"mode": "local", "window": 4}),
    ("aft", {"mode": "full", "max_seq_len": 64}), ("memory_compressed", {}),
])
def test_right_padded_prefill_and_steps_with_groups(name, params, kv_heads):
    """Each sequence goes on from its own end: step t of sequence b equals the grouped causal forward of its
    own tokens at position lengths[b] + t."""
    attn = build_attention(name, **{**SMALL[name], **params, "num_heads": HEADS, "head_dim": DIM,
                                    "num_kv_heads": kv_heads, "causal": True}).eval()
    lengths, steps = [9, 4], 7
    q, k, v = _qkv(kv_heads, max(lengths) + steps, seed=21)
    outs = _decode_padded(attn, q, k, v, lengths, steps)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            ref = attn(q[b:b + 1, :, :n + steps], k[b:b + 1, :, :n + steps], v[b:b + 1, :, :n + steps])
        for t in range(steps):
            torch.testing.assert_close(outs[t][b], ref[0, :, n + t:n + t + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", [
    ("performer", {}), ("rfa", {}), ("aft", {"mode": "simple"}), ("aft", {"mode": "local", "window": 4}),
    ("aft", {"mode": "full", "max_seq_len": 64}), ("memory_compressed", {}),
])
def test_decode_state_is_per_key_value_head(name, params):
    """State bytes after the same 40 tokens: exactly 1/2 with 2 key-value heads, 1/4 with one (4 query heads)."""
    sizes = {}
    for kv_heads in (4, 2, 1):
        attn = build_attention(name, **{**SMALL[name], **params, "num_heads": HEADS, "head_dim": DIM,
                                        "num_kv_heads": kv_heads, "causal": True}).eval()
        q, k, v = _qkv(kv_heads, 40, seed=22)
        with torch.no_grad():
            state = attn.init_state(2, 48, q.dtype, q.device)
            _, state = attn.prefill(q, k, v, state)
        sizes[kv_heads] = state_bytes(state)
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


# ----------------------------------------------------------------------------- in the backbone


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("name", CAUSAL)
def test_a_grouped_language_model_decodes_as_its_causal_forward(name, kv_heads):
    """ArenaModel with num_kv_heads (the projections give k, v kv_heads heads): right-padded prefill of 9, 4 and 0
    tokens, then teacher-forced steps, equal the causal forward's logits; the state is 4 / kv_heads times smaller
    than the ungrouped model's."""
    from harness.model import ModelConfig, build_model, decode_state_bytes

    def model_of(kv):
        config = ModelConfig(vocab_size=24, max_length=40, num_classes=24, embed_dim=16, num_heads=HEADS,
                             qkv_dim=HEADS * DIM, mlp_dim=32, num_layers=2, dropout=0.0, attention_dropout=0.0,
                             causal=True, token_level=True, attention=name, num_kv_heads=kv,
                             attention_params={k: v for k, v in SMALL[name].items() if k != "max_seq_len"}, seed=3)
        torch.manual_seed(0)
        return build_model(config).eval()

    model = model_of(kv_heads)
    lengths, total = [9, 4, 0], 24
    seqs = torch.randint(1, 24, (3, total), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(seqs)
        mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
        states = model.init_states(3, total)
        logits = model.prefill(seqs[:, :9].masked_fill(~mask, 0), mask, states)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b, :n], ref[b, :n], atol=1e-4, rtol=1e-4)
        rows = torch.arange(3)
        for t in range(total - 9):
            pos = torch.tensor(lengths) + t
            torch.testing.assert_close(model.step(seqs[rows, pos], states), ref[rows, pos], atol=1e-4, rtol=1e-4)
        other = model_of(None)
        plain = other.init_states(3, total)
        other.prefill(seqs[:, :9].masked_fill(~mask, 0), mask, plain)
        for t in range(total - 9):
            other.step(seqs[rows, torch.tensor(lengths) + t], plain)
    assert decode_state_bytes(states) * (HEADS // kv_heads) == decode_state_bytes(plain)
