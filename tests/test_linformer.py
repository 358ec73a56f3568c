"""Linformer: exact where its maths says so (identity projections = full attention), the plain
projected formula otherwise, paper-faithful parameters (sharing, initialisation, length slicing)."""

from __future__ import annotations

import math

import pytest
import torch

from attentions import build_attention
from attentions.functional import reference_attention

from conftest import build_small, make_qkv, right_padding_mask


def _dense_linformer(q, k, v, e, f, mask):
    """softmax(Q (E^T K)^T / sqrt(d)) F^T V with padded keys/values zeroed, float64, written out."""
    q, k, v, e, f = (t.double() for t in (q, k, v, e, f))
    if mask is not None:
        keep = mask[:, None, :, None].double()
        k, v = k * keep, v * keep
    k_proj = torch.einsum("nk,bhnd->bhkd", e, k)
    v_proj = torch.einsum("nk,bhnd->bhkd", f, v)
    scores = q @ k_proj.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v_proj


def test_identity_projections_equal_full_attention():
    seq = 40
    attn = build_small("linformer", max_seq_len=seq, proj_dim=seq)
    with torch.no_grad():
        attn.proj_k.copy_(torch.eye(seq))
        attn.proj_v.copy_(torch.eye(seq))
    q, k, v = make_qkv(batch=2, seq=seq, seed=30)
    full = build_small("full", backend="reference")
    torch.testing.assert_close(attn(q, k, v), full(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", ["none", "kv"])
@pytest.mark.parametrize("seq,lengths", [(64, [64, 40]), (23, [23, 5])])
def test_matches_projected_formula_with_padding_and_short_sequences(sharing, seq, lengths):
    attn = build_small("linformer", sharing=sharing)  # max_seq_len 64, proj_dim 8
    q, k, v = make_qkv(batch=2, seq=seq, seed=31)
    mask = right_padding_mask(lengths, seq)
    out = attn(q, k, v, key_padding_mask=mask)
    e = attn.proj_k[:seq].detach()  # shorter sequences use the first n rows
    f = e if sharing == "kv" else attn.proj_v[:seq].detach()
    expected = _dense_linformer(q, k, v, e, f, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :, :n].double(), expected[b, :, :n], atol=1e-5, rtol=1e-4)


def test_kv_sharing_uses_one_projection():
    shared = build_small("linformer", sharing="kv")
    separate = build_small("linformer")
    assert shared.proj_v is None and [n for n, _ in shared.named_parameters()] == ["proj_k"]
    assert sorted(n for n, _ in separate.named_parameters()) == ["proj_k", "proj_v"]
    assert not torch.equal(separate.proj_k, separate.proj_v)
    assert shared.proj_k.shape == separate.proj_k.shape == (64, 8)
    with pytest.raises(ValueError, match="'sharing'"):
        build_small("linformer", sharing="layer")


def test_initialisation_is_fairseq_xavier_from_the_seed():
    torch.manual_seed(0)
    a = build_attention("linformer", num_heads=2, head_dim=8, max_seq_len=1000, proj_dim=24, seed=5)
    torch.manual_seed(1)  # global RNG must not matter
    b = build_attention("linformer", num_heads=2, head_dim=8, max_seq_len=1000, proj_dim=24, seed=5)
    c = build_attention("linformer", num_heads=2, head_dim=8, max_seq_len=1000, proj_dim=24, seed=6)
    assert torch.equal(a.proj_k, b.proj_k) and torch.equal(a.proj_v, b.proj_v)
    assert not torch.equal(a.proj_k, c.proj_k)
    bound = math.sqrt(3.0 / (1000 + 24))  # xavier_uniform_, gain 1/sqrt(2), fan_in 1000, fan_out 24
    weights = torch.cat([a.proj_k.flatten(), a.proj_v.flatten()])
    assert weights.abs().max() <= bound
    assert weights.abs().max() > 0.99 * bound  # uniform over the whole interval, not a narrower one
    assert abs(weights.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_gradients_reach_projections_and_dropout_only_in_training():
    attn = build_small("linformer", dropout=0.5)
    q, k, v = make_qkv(seq=30, seed=32)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), attn(q, k, v), atol=0, rtol=0)
    clean = attn(q, k, v)
    attn.train()
    torch.manual_seed(0)
    noisy = attn(q, k, v)
    assert not torch.allclose(noisy, clean)
    plain = build_small("linformer").train()
    plain(q, k, v).square().sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # only the first 30 rows of E/F are used: the rest get exactly zero gradient
    for g in grads.values():
        assert g[:30].abs().sum() > 0 and g[30:].abs().max() == 0


def test_missing_max_seq_len_is_named():
    with pytest.raises(ValueError, match="'max_seq_len'"):
        build_attention("linformer", num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="'proj_dim'"):
        build_small("linformer", proj_dim=0)
