"""The causal-self pattern: every mechanism whose info says ``supports_causal`` is checked here.

CAB's causality check (Zhang et al. 2023, "CAB: Comprehensive Attention Benchmarking"): the output at
position ``i`` of the whole input equals the output of the prefix ending at ``i``, and its gradient with
respect to every later input is exactly zero. It is defined once, as the ``causality`` check of
:func:`attentions.testing.check_mechanism` (lengths 1, 7, 37, 50: odd, and not multiples of any block,
bucket or chunk of the small test settings), which tests/test_registry_contract.py runs on every mechanism
whose info says ``supports_causal``; this file holds the rest: errors, padding, and each mechanism's
causal form against its own dense reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_aft import _banded, _dense_aft
from test_kernel_attention import _assert_real_rows_close, _performer_textbook_features, _rfa_textbook_features
from test_sparse_patterns import assert_matches_reference, bigbird_pattern, longformer_pattern, sliding_pattern

from attentions import available_attentions, build_attention, causal_attentions, get_attention_info
from attentions.full import causal_mask_plan
from attentions.functional import causal_allowed, is_right_padded, reference_attention

from conftest import HEAD_DIM, HEADS, build_small, make_qkv, right_padding_mask

CAUSAL = causal_attentions()
NOT_CAUSAL = [n for n in available_attentions() if n not in CAUSAL]


def build_causal(name: str, **overrides):
    return build_small(name, causal=True, **overrides).eval()


# ----------------------------------------------------------------------------- contract


def test_causal_listing_matches_info():
    assert CAUSAL == sorted(n for n in available_attentions() if get_attention_info(n).supports_causal)
    # Issue 13: nine mechanisms have a causal form; linformer and clustered have none that keeps their cost.
    assert set(CAUSAL) == {"full", "sliding_window", "longformer", "bigbird", "performer", "rfa", "aft",
                           "reformer", "memory_compressed"}


@pytest.mark.parametrize("name", available_attentions())
def test_causal_defaults_to_false_and_is_documented(name):
    info = get_attention_info(name)
    assert info.defaults()["causal"] is False
    assert build_small(name).causal is False
    # Supported: the note names the causal form; unsupported: it says why (the ValueError quotes it).
    assert info.causal_note


@pytest.mark.parametrize("name", NOT_CAUSAL)
def test_unsupported_causal_is_a_clear_error(name):
    info = get_attention_info(name)
    with pytest.raises(ValueError, match=rf"'causal'.*'{name}' has no causal form.*supported by: .*full"):
        build_small(name, causal=True)
    # Named first, even without the parameters the bidirectional form needs (linformer's max_seq_len).
    with pytest.raises(ValueError, match=rf"'{name}' has no causal form"):
        build_attention(name, num_heads=2, head_dim=8, causal=True)
    # Built by hand, bypassing make_config, the module refuses it too.
    with pytest.raises(ValueError, match="causal"):
        info.cls(dataclasses.replace(build_small(name).config, causal=True))


@pytest.mark.parametrize("value", ["yes", 1])
def test_causal_must_be_a_bool(value):
    with pytest.raises(ValueError, match="'causal'"):
        build_attention("full", causal=value)


# ----------------------------------------------------------------------------- CAB causality check


# The CAB check itself (output at i == output of the prefix ending at i; zero gradient to later inputs, at
# lengths 1, 7, 37, 50 and positions around block edges) is the contract's ``causality`` check,
# attentions.testing.check_mechanism, run on every causal mechanism by tests/test_registry_contract.py.


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_with_right_padding_equals_unpadded(name):
    attn = build_causal(name)
    n, extra = 29, 11
    q, k, v = make_qkv(batch=2, seq=n + extra, seed=1)
    mask = right_padding_mask([n, n], n + extra)
    padded = attn(q, k, v, key_padding_mask=mask)
    unpadded = attn(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    torch.testing.assert_close(padded[:, :, :n], unpadded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_padded_contents_do_not_leak(name):
    attn = build_causal(name)
    seq = 41
    mask = right_padding_mask([41, 23, 6, 0], seq)
    q, k, v = make_qkv(batch=4, seq=seq, seed=2, requires_grad=True)
    out1 = attn(q, k, v, key_padding_mask=mask)
    noise = make_qkv(batch=4, seq=seq, seed=3)
    pad = ~mask[:, None, :, None]
    q2, k2, v2 = (torch.where(pad, 50.0 * n_, t) for t, n_ in zip((q, k, v), noise))
    out2 = attn(q2, k2, v2, key_padding_mask=mask)
    assert torch.isfinite(out1).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out1 * ~pad, out2 * ~pad, atol=1e-5, rtol=1e-4)
    (out1 * ~pad).square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert t.grad[1, :, 23:].abs().max() == 0 and t.grad[3].abs().max() == 0


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_differs_from_bidirectional(name):
    # Not vacuous: the first position sees only itself, the bidirectional one sees everything.
    q, k, v = make_qkv(seq=20, seed=9)
    causal = build_causal(name)(q, k, v)
    both = build_small(name).eval()(q, k, v)
    assert not torch.allclose(causal[:, :, 0], both[:, :, 0], atol=1e-4)


# ----------------------------------------------------------------------------- full


def test_causal_allowed_is_lower_triangular():
    expected = torch.tensor([[j <= i for j in range(5)] for i in range(5)])
    assert torch.equal(causal_allowed(5), expected)


def test_right_padding_detection():
    assert is_right_padded(right_padding_mask([3, 5, 0], 5))
    assert not is_right_padded(torch.tensor([[False, True, True]]))  # left padding
    assert not is_right_padded(torch.tensor([[True, False, True]]))  # a gap
    assert causal_mask_plan(None) == "causal"
    assert causal_mask_plan(right_padding_mask([2, 4], 4)) == "causal"
    assert causal_mask_plan(torch.tensor([[False, True]])) == "dense"


def _dense_causal_reference(q, k, v, mask):
    allowed = causal_allowed(q.shape[-2])[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return reference_attention(q.double(), k.double(), v.double(), allowed)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "gap"])
def test_full_causal_equals_dense_reference(backend, mask_kind):
    seq = 23
    masks = {
        "none": None,
        "right": right_padding_mask([23, 11, 1], seq),
        "left": ~right_padding_mask([5, 0, 22], seq),
        "gap": torch.rand(3, seq, generator=torch.Generator().manual_seed(0)) > 0.3,
    }
    mask = masks[mask_kind]
    if mask is not None:
        mask[:, -1] |= mask_kind == "gap"  # at least one real token per sequence in the gap case
    attn = build_attention("full", num_heads=HEADS, head_dim=HEAD_DIM, backend=backend, causal=True)
    q, k, v = make_qkv(batch=3, seq=seq, seed=4, requires_grad=True)
    out = attn(q, k, v, key_padding_mask=mask)
    ref = _dense_causal_reference(q, k, v, mask)
    # Real query rows with at least one real key at or before them are defined; others are padding.
    real = torch.ones(3, seq, dtype=torch.bool) if mask is None else mask & (mask.cumsum(-1) > 0)
    rows = real[:, None, :, None]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out * rows, (ref * rows).float(), atol=1e-5, rtol=1e-5)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * rows
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v), retain_graph=True)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- sparse patterns: exact


CAUSAL_LENGTHS = [(1, None), (7, None), (37, None), (37, [37, 20, 1]), (50, [50, 0])]


@pytest.mark.parametrize("window", [1, 2, 5, 8, 16, 129])
@pytest.mark.parametrize("seq,lengths", CAUSAL_LENGTHS)
def test_sliding_window_causal_equals_dense_left_band(window, seq, lengths):
    attn = build_attention("sliding_window", num_heads=HEADS, head_dim=HEAD_DIM, window=window, causal=True).eval()
    pattern = sliding_pattern(seq, window) & causal_allowed(seq)
    assert_matches_reference(attn, pattern, lengths, seq, check_grad=True)


@pytest.mark.parametrize("window,global_positions", [(8, (0, 5)), (4, (3, 20, 36)), (2, ()), (300, (1,))])
@pytest.mark.parametrize("seq,lengths", CAUSAL_LENGTHS)
def test_longformer_causal_equals_dense_left_pattern(window, global_positions, seq, lengths):
    attn = build_attention("longformer", num_heads=HEADS, head_dim=HEAD_DIM, window=window,
                           global_positions=global_positions, causal=True).eval()
    pattern = longformer_pattern(seq, window, global_positions) & causal_allowed(seq)
    assert_matches_reference(attn, pattern, lengths, seq, check_grad=True)


@pytest.mark.parametrize("block,g,r", [(4, 1, 2), (4, 0, 3), (5, 2, 1), (3, 1, 0), (1, 1, 2), (64, 1, 1)])
@pytest.mark.parametrize("seq,lengths", CAUSAL_LENGTHS)
def test_bigbird_causal_equals_dense_left_pattern(block, g, r, seq, lengths):
    attn = build_attention("bigbird", num_heads=HEADS, head_dim=HEAD_DIM, max_seq_len=64, block_size=block,
                           num_global_blocks=g, num_random_blocks=r, seed=3, causal=True).eval()
    pattern = bigbird_pattern(seq, block, g, attn.random_blocks) & causal_allowed(seq)
    assert_matches_reference(attn, pattern, lengths, seq, check_grad=True)


def test_bigbird_causal_random_blocks_are_past_and_used():
    g, r = 1, 2
    attn = build_attention("bigbird", num_heads=HEADS, head_dim=HEAD_DIM, max_seq_len=256, block_size=4,
                           num_global_blocks=g, num_random_blocks=r, causal=True)
    blocks = attn.random_blocks
    for i, row in enumerate(blocks.tolist()):
        used = [b for b in row if b >= 0]
        assert all(g <= b <= i - 2 for b in used), (i, row)
        # Distinct, and as many as the past candidates g .. i-2 allow (global rows get none).
        expected = 0 if i < g else min(r, max(0, i - 1 - g))
        assert len(set(used)) == len(used) == expected, (i, row)
    # The draw is not vacuous: rows far from the start see random blocks outside band and globals.
    pattern = bigbird_pattern(256, 4, g, blocks) & causal_allowed(256)
    no_random = bigbird_pattern(256, 4, g, torch.full_like(blocks, -1)) & causal_allowed(256)
    assert (pattern & ~no_random)[64:].sum(dim=1).min() == r * 4


# ----------------------------------------------------------------------------- kernel mechanisms: own reference


def _causal_estimator(phi_q, phi_k, v, mask, min_denominator=None):
    """The explicit causal kernel matrix: tril(phi(Q) phi(K)^T), padded keys dropped, row-normalised, float64."""
    n = phi_q.shape[-2]
    scores = (phi_q @ phi_k.transpose(-1, -2)) * causal_allowed(n)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], 0.0)
    row_sums = scores.sum(-1, keepdim=True)
    if min_denominator is not None:
        row_sums = torch.maximum(row_sums, min_denominator)
    row_sums = torch.where(row_sums == 0, 1.0, row_sums)  # a row without real keys: zeros, not 0/0
    return (scores / row_sums) @ v.double()


def _performer_log_reference(attn, q, k, v, mask):
    """Causal FAVOR+ in float64 log space (logsumexp over features): exact where exp itself would overflow."""
    w = attn.projection.double()
    d = w.shape[1]
    logs = []
    for t in (q, k):
        x = t.double() * d ** -0.25
        logs.append(x @ w.T - x.square().sum(-1, keepdim=True) / 2)
    log_scores = torch.logsumexp(logs[0][..., :, None, :] + logs[1][..., None, :, :], dim=-1)
    allowed = causal_allowed(q.shape[-2])[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return torch.softmax(log_scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()


# 150: two full chunks of the default 64 and a partial one.
KERNEL_LENGTHS = [(1, None), (150, None), (150, [150, 70, 1]), (64, [64, 0])]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("seq,lengths", KERNEL_LENGTHS)
def test_performer_causal_equals_explicit_causal_kernel(kernel, seq, lengths):
    attn = build_small("performer", kernel=kernel, causal=True, max_seq_len=256)
    q, k, v = make_qkv(batch=len(lengths) if lengths else 2, seq=seq, seed=10, requires_grad=True)
    mask = right_padding_mask(lengths, seq) if lengths else None
    out = attn(q, k, v, key_padding_mask=mask)
    phi_q, phi_k = _performer_textbook_features(attn, q, k)
    expected = _causal_estimator(phi_q, phi_k, v, mask)
    _assert_real_rows_close(out, expected, mask)
    _assert_same_gradients(out, expected, (q, k, v), mask)


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("seq,lengths", KERNEL_LENGTHS)
def test_rfa_causal_equals_explicit_causal_kernel(learn_sigma, seq, lengths):
    attn = build_small("rfa", num_features=64, learn_sigma=learn_sigma, causal=True, max_seq_len=256)
    if learn_sigma:
        with torch.no_grad():
            attn.log_sigma.copy_(0.2 * torch.randn(attn.log_sigma.shape, generator=torch.Generator().manual_seed(0)))
    q, k, v = make_qkv(batch=len(lengths) if lengths else 2, seq=seq, seed=20, requires_grad=True)
    mask = right_padding_mask(lengths, seq) if lengths else None
    out = attn(q, k, v, key_padding_mask=mask)
    phi_q, phi_k = _rfa_textbook_features(attn, q, k)
    # The floor counts the real keys up to each row.
    counts = (torch.arange(1, seq + 1)[None] if mask is None else mask.cumsum(-1)).double().clamp_min(1)
    floor = torch.exp(-2 / attn.bandwidth().detach().double().min() ** 2) * counts[:, None, :, None]
    expected = _causal_estimator(phi_q, phi_k, v, mask, min_denominator=floor)
    _assert_real_rows_close(out, expected, mask)
    _assert_same_gradients(out, expected, (q, k, v), mask)


def test_rfa_causal_floor_is_exercised():
    attn = build_small("rfa", num_features=1, sigma=0.5, causal=True, max_seq_len=256)
    q, k, v = make_qkv(batch=2, seq=90, seed=21)
    phi_q, phi_k = _rfa_textbook_features(attn, q, k)
    raw = ((phi_q @ phi_k.transpose(-1, -2)) * causal_allowed(90)).sum(-1)
    assert (raw < 0).any()  # impossible denominators occur and get the floor
    assert torch.isfinite(attn(q, k, v)).all()


def _assert_same_gradients(out, expected, inputs, mask):
    real = torch.ones(out.shape[0], out.shape[2], dtype=torch.bool) if mask is None else mask
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weight = weight * real[:, None, :, None]
    got = torch.autograd.grad((out.double() * weight).sum(), inputs, retain_graph=True)
    want = torch.autograd.grad((expected * weight).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 6.0, 12.0])
def test_performer_causal_is_stable_at_large_logits(scale):
    # x12: |x|^2/2 and w.x in the hundreds; fp32 exp of the textbook features overflows/underflows.
    attn = build_small("performer", num_features=32, causal=True, max_seq_len=256)
    q, k, v = make_qkv(batch=2, seq=150, seed=11)
    mask = right_padding_mask([150, 97], 150)
    out = attn(scale * q, scale * k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    expected = _performer_log_reference(attn, scale * q, scale * k, v, mask)
    _assert_real_rows_close(out, expected, mask, atol=1e-4, rtol=1e-3)


def test_performer_causal_later_dominant_key_in_the_same_chunk(monkeypatch):
    # Early keys of large norm (log-features ~ -200) followed in the same chunk by keys of small norm
    # (~0): a shared per-chunk exponent would underflow every term of the early rows in float32; the
    # mechanism notices and sums in float64 (documented); it must still equal the log-space reference.
    attn = build_small("performer", num_features=32, causal=True, max_seq_len=256)
    q, k, v = make_qkv(batch=1, seq=40, seed=12)
    k = torch.cat([12 * k[:, :, :10], k[:, :, 10:]], dim=2)
    out = attn(q, k, v)
    assert torch.isfinite(out).all()
    expected = _performer_log_reference(attn, q, k, v, None)
    _assert_real_rows_close(out, expected, None, atol=1e-4, rtol=1e-3)
    # Not vacuous: forced to stay in float32, the early rows are lost.
    import attentions._random_features as rf

    monkeypatch.setattr(rf, "FP32_EXCESS", float("inf"))
    assert not torch.allclose(attn(q, k, v).double(), expected, atol=1e-2)


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_prefix_sums_equal_the_explicit_form(chunk):
    from attentions._random_features import causal_exp_linear_attention, causal_linear_attention

    g = torch.Generator().manual_seed(0)
    phi_q, phi_k = torch.rand(2, 2, 23, 6, generator=g).double(), torch.rand(2, 2, 23, 6, generator=g).double()
    v = torch.randn(2, 2, 23, 4, generator=g).double()
    mask = right_padding_mask([23, 9], 23)
    expected = _causal_estimator(phi_q, phi_k, v, mask)
    out = causal_linear_attention(phi_q, phi_k, v, mask, chunk=chunk)
    _assert_real_rows_close(out, expected, mask, atol=1e-10, rtol=1e-10)
    log_k = phi_k.log().masked_fill(~mask[:, None, :, None], float("-inf"))
    out = causal_exp_linear_attention(phi_q.log(), log_k, v, mask, chunk=chunk)
    _assert_real_rows_close(out, expected, mask, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- aft: exact


def _aft_causal_bias(attn, n):
    cfg = attn.config
    if cfg.mode == "simple":
        w = torch.zeros(n, n, dtype=torch.float64)
    elif cfg.mode == "local":
        w = _banded(attn.rel_bias.detach().double(), n)
    else:
        w = attn.pos_bias.detach().double()[:n, :n]
    return w.masked_fill(~causal_allowed(n), float("-inf"))


AFT_CASES = [("simple", {}), ("local", {"window": 1}), ("local", {"window": 3}), ("local", {"window": 6}),
             ("local", {"window": 40}), ("full", {})]


@pytest.mark.parametrize("mode,params", AFT_CASES)
@pytest.mark.parametrize("seq,lengths", CAUSAL_LENGTHS[:-1] + [(50, [50, 3])])  # the dense formula has no empty rows
def test_aft_causal_equals_dense_formula(mode, params, seq, lengths):
    attn = build_small("aft", mode=mode, causal=True, bias_init_std=0.5, **params)
    q, k, v = make_qkv(batch=len(lengths) if lengths else 2, seq=seq, seed=30, requires_grad=True)
    mask = right_padding_mask(lengths, seq) if lengths else None
    out = attn(q, k, v, key_padding_mask=mask)
    expected = _dense_aft(q, k, v, _aft_causal_bias(attn, seq), mask)
    _assert_real_rows_close(out, expected, mask)
    _assert_same_gradients(out, expected, (q, k, v), mask)


@pytest.mark.parametrize("mode,params", [("simple", {}), ("local", {"window": 4}), ("full", {})])
def test_aft_causal_later_dominant_key_is_exact(mode, params, monkeypatch):
    # A later key 150 nats above every earlier one of its channel: shifting by the overall maximum in
    # float32 would underflow every earlier row; the documented float64 path keeps them exact.
    attn = build_small("aft", mode=mode, causal=True, **params)
    q, k, v = make_qkv(batch=1, seq=30, seed=31)
    k = k.clone()
    k[:, :, 20] += 150.0
    out = attn(q, k, v)
    assert torch.isfinite(out).all()
    expected = _dense_aft(q, k, v, _aft_causal_bias(attn, 30))
    _assert_real_rows_close(out, expected, None)
    # Not vacuous: forced to stay in float32, the rows before the large key are lost.
    import attentions.aft as aft

    monkeypatch.setattr(aft, "FP32_EXCESS", float("inf"))
    assert not torch.allclose(attn(q, k, v).double(), expected, atol=1e-2)


# ----------------------------------------------------------------------------- reformer: its own algorithm


def _dense_lsh_causal(q, k, v, attn, mask=None):
    """Causal LSH attention written out with loops: per round, query i sees key j when they share a
    bucket and ``0 <= rank(i) - rank(j) <= bucket_size`` (ranks in the (bucket, position) order of the
    real tokens), so never a later position; itself only when alone; rounds combined as one softmax
    over the pairs seen, each once (dedup_pairs) or once per round that saw it."""
    cfg = attn.config
    batch, heads, n, d = q.shape
    q, k, v = (t.double() for t in (q, k, v))
    real = torch.ones(batch, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            count = torch.zeros(n, n, dtype=torch.float64)
            for r in range(cfg.n_hashes):
                proj = q[b, h] @ attn.rotations[h, r].double()
                bucket = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
                order = sorted((i for i in range(n) if real[b, i]), key=lambda i: (int(bucket[i]), i))
                rank = torch.full((n,), -10**6, dtype=torch.long)
                for slot, token in enumerate(order):
                    rank[token] = slot
                behind = rank[:, None] - rank[None, :]
                seen = (bucket[:, None] == bucket[None, :]) & (behind >= 0) & (behind <= cfg.bucket_size)
                count += seen.double()
            count[:, ~real[b]] = 0
            weight = (count > 0).double() if cfg.dedup_pairs else count
            weight[~real[b]] = 1.0  # padded query rows: anything finite (not compared)
            scores = q[b, h] @ (k[b, h] / k[b, h].norm(dim=-1, keepdim=True).clamp_min(1e-6)).T / d**0.5
            scores.fill_diagonal_(-1e5)
            out[b, h] = torch.softmax(scores + weight.log(), dim=-1) @ v[b, h]
    return out


@pytest.mark.parametrize("dedup_pairs", [True, False])
@pytest.mark.parametrize("bucket_size,n_hashes,num_buckets", [(4, 1, 4), (4, 3, 4), (3, 2, 8), (8, 2, 2)])
@pytest.mark.parametrize("seq,lengths", [(1, None), (23, None), (37, [37, 20, 1])])
def test_reformer_causal_equals_its_dense_algorithm(dedup_pairs, bucket_size, n_hashes, num_buckets, seq, lengths):
    attn = build_small("reformer", bucket_size=bucket_size, n_hashes=n_hashes, num_buckets=num_buckets,
                       dedup_pairs=dedup_pairs, causal=True)
    q, _, v = make_qkv(batch=len(lengths) if lengths else 2, seq=seq, seed=40, requires_grad=True)
    mask = right_padding_mask(lengths, seq) if lengths else None
    out = attn(q, q, v, key_padding_mask=mask)  # shared QK, as the backbone ties them
    expected = _dense_lsh_causal(q, q, v, attn, mask)
    _assert_real_rows_close(out, expected, mask)
    _assert_same_gradients(out, expected, (q, v), mask)


def test_reformer_causal_windows_are_not_vacuous():
    # Many tokens per bucket: each query sees up to bucket_size earlier same-bucket keys, not just itself.
    attn = build_small("reformer", bucket_size=4, n_hashes=1, num_buckets=2, causal=True)
    q, _, v = make_qkv(batch=1, seq=40, seed=41)
    out = attn(q, q, v)
    alone = torch.isclose(out, v, atol=1e-6).all(-1)  # a token that sees only itself outputs v_i
    assert alone.float().mean() < 0.2


# ----------------------------------------------------------------------------- memory_compressed: exact


def _dense_memory_compressed_causal(attn, q, k, v, mask):
    """Slots written out block by block in float64; query i sees slots s < i // c and its block's j <= i."""
    cfg = attn.config
    c = cfg.compression
    batch, heads, n, d = q.shape
    q, k, v = (t.double() for t in (q, k, v))
    real = torch.ones(batch, n, dtype=torch.bool) if mask is None else mask
    k, v = (t * real[:, None, :, None] for t in (k, v))
    n_slots = n // c  # only complete blocks can be fully past
    k_slots, v_slots = [], []
    for s in range(n_slots):
        kb, vb = k[:, :, s * c:(s + 1) * c], v[:, :, s * c:(s + 1) * c]
        if cfg.compression_type == "conv":
            k_slots.append(torch.einsum("bhf,hfe->bhe", kb.reshape(batch, heads, c * d), attn.key_kernel.double()))
            v_slots.append(torch.einsum("bhf,hfe->bhe", vb.reshape(batch, heads, c * d), attn.value_kernel.double()))
        else:
            count = real[:, s * c:(s + 1) * c].sum(-1).clamp_min(1)[:, None, None].double()
            k_slots.append(kb.sum(2) / count)
            v_slots.append(vb.sum(2) / count)
    keys = torch.cat([torch.stack(k_slots, 2) if k_slots else k[:, :, :0], k], dim=2)
    values = torch.cat([torch.stack(v_slots, 2) if v_slots else v[:, :, :0], v], dim=2)
    i = torch.arange(n)[:, None]
    slot_ok = torch.arange(n_slots)[None, :] < i // c
    token_ok = (torch.arange(n)[None, :] // c == i // c) & (torch.arange(n)[None, :] <= i)
    slot_real = real[:, : n_slots * c].reshape(batch, n_slots, c).any(-1)
    allowed = torch.cat([slot_ok, token_ok], dim=1)[None, None] & torch.cat([slot_real, real], dim=1)[:, None, None, :]
    return reference_attention(q, keys, values, allowed)


MC_CASES = [(t, c, seq, lengths) for t in ("conv", "mean") for c in (1, 3, 4) for seq, lengths in CAUSAL_LENGTHS]
# Several checkpointed query pieces (CAUSAL_PIECE = 256 tokens).
MC_CASES += [("conv", 3, 600, [600, 301]), ("mean", 4, 600, None)]


@pytest.mark.parametrize("compression_type,compression,seq,lengths", MC_CASES)
def test_memory_compressed_causal_equals_dense_formula(compression_type, compression, seq, lengths):
    attn = build_small("memory_compressed", compression=compression, compression_type=compression_type,
                       causal=True, max_seq_len=None)
    q, k, v = make_qkv(batch=len(lengths) if lengths else 2, seq=seq, seed=50, requires_grad=True)
    mask = right_padding_mask(lengths, seq) if lengths else None
    out = attn(q, k, v, key_padding_mask=mask)
    expected = _dense_memory_compressed_causal(attn, q, k, v, mask)
    _assert_real_rows_close(out, expected, mask)
    _assert_same_gradients(out, expected, (q, k, v), mask)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_on_cuda_equals_cpu(name):
    attn = build_causal(name)
    q, k, v = make_qkv(batch=2, seq=45, seed=60)
    mask = right_padding_mask([45, 30], 45)
    expected = attn(q, k, v, key_padding_mask=mask)
    got = attn.to("cuda")(q.cuda(), k.cuda(), v.cuda(), key_padding_mask=mask.cuda()).cpu()
    _assert_real_rows_close(got, expected.double(), mask, atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
def test_full_causal_cuda_backends_equal_reference(backend, mask_kind):
    from attentions.full import xformers_available

    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers not installed")
    seq = 40
    masks = {"none": None, "right": right_padding_mask([40, 13], seq), "left": ~right_padding_mask([3, 0], seq)}
    mask = masks[mask_kind]
    q, k, v = make_qkv(batch=2, seq=seq, seed=61)
    attn = build_attention("full", num_heads=HEADS, head_dim=HEAD_DIM, backend=backend, causal=True)
    out = attn(q.cuda(), k.cuda(), v.cuda(), key_padding_mask=None if mask is None else mask.cuda()).cpu()
    assert attn.backend == backend
    real = torch.ones(2, seq, dtype=torch.bool) if mask is None else mask
    _assert_real_rows_close(out, _dense_causal_reference(q, k, v, mask), real, atol=2e-3, rtol=2e-3)
