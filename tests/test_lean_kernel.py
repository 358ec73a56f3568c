"""The kernel mechanisms' recomputing path (``recompute=True``, attentions/_lean_linear.py) against the stored
autograd path (``recompute=False``): equal outputs and gradients (q, k, v, RFA's learned bandwidth), bidirectional
and causal, with padding, over one and several chunks; and its memory held near full attention's."""

from __future__ import annotations

import pytest
import torch

import attentions._lean_linear as lean
from attentions import build_attention
from harness.measure import measure_peak_memory

from conftest import right_padding_mask

CASES = [
    ("performer", {"num_features": 24}),
    ("performer", {"num_features": 24, "kernel": "relu"}),
    ("rfa", {"num_features": 12}),
    ("rfa", {"num_features": 12, "learn_sigma": True}),
    ("rfa", {"num_features": 1, "sigma": 0.5}),  # two features, narrow kernel: the denominator floor is hit
]


def _run(name, params, recompute, q, k, v, mask, causal):
    """Output and gradients (q, k, v, then parameters) of a weighted sum of the real rows."""
    attn = build_attention(name, num_heads=q.shape[1], head_dim=q.shape[-1], causal=causal, recompute=recompute,
                           **params).to(q.dtype)
    if params.get("learn_sigma"):  # distinct bandwidths: the floor's minimum has no tie
        with torch.no_grad():
            attn.log_sigma.copy_(0.3 * torch.randn(attn.log_sigma.shape, generator=torch.Generator().manual_seed(2)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves, key_padding_mask=mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights * mask[:, None, :, None]).sum().backward()
    return [out.detach() * mask[:, None, :, None]] + [t.grad for t in leaves] + [p.grad for p in attn.parameters()]


def _inputs(seq, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    q, k, v = (scale * torch.randn(3, 2, seq, 8, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, right_padding_mask([seq, seq // 2, 3], seq)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("name,params", CASES)
def test_recompute_equals_stored_path(name, params, chunks, causal, monkeypatch):
    if chunks == "several":  # bidirectional chunks of 11 rows, causal chunks of 16
        monkeypatch.setattr(lean, "CHUNK_ELEMENTS", 11 * 2 * params["num_features"])
        monkeypatch.setattr(lean, "CAUSAL_CHUNK", 16)
    q, k, v, mask = _inputs(70)
    stored = _run(name, params, False, q, k, v, mask, causal)
    ours = _run(name, params, True, q, k, v, mask, causal)
    assert len(ours) == len(stored) == 4 + bool(params.get("learn_sigma"))
    # The floor case divides by clamped denominators: its gradients are the least well conditioned.
    tol = 1e-4 if params.get("sigma") else 1e-5
    for got, want in zip(ours, stored):
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_recompute_keeps_the_stabilisers_at_large_logits(causal, monkeypatch):
    # Inputs of scale 6: log-features spread over hundreds of nats, keys of one feature far apart. The
    # running maxima (bidirectional: rescaled sums; causal: decayed states) and row shifts must be
    # reproduced in backward, or gradients would be off by orders of magnitude.
    monkeypatch.setattr(lean, "CHUNK_ELEMENTS", 11 * 24)
    monkeypatch.setattr(lean, "CAUSAL_CHUNK", 16)
    q, k, v, mask = _inputs(70, scale=6.0, dtype=torch.float64)
    stored = _run("performer", {"num_features": 24}, False, q, k, v, mask, causal)
    ours = _run("performer", {"num_features": 24}, True, q, k, v, mask, causal)
    for got, want in zip(ours, stored):
        torch.testing.assert_close(got, want, atol=1e-10 * want.abs().max().item(), rtol=1e-9)


def test_performer_recompute_takes_the_float64_rule_in_causal_chunks():
    # A later key dominating a feature in the same chunk: the forward redoes the sums in float64 (the stored
    # path's rule) and the backward follows it; gradients equal the stored path's.
    q, k, v, mask = _inputs(40)
    k = torch.cat([12 * k[:, :, :10], k[:, :, 10:]], dim=2)
    stored = _run("performer", {"num_features": 32}, False, q, k, v, mask, True)
    ours = _run("performer", {"num_features": 32}, True, q, k, v, mask, True)
    for got, want in zip(ours, stored):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_recompute_is_a_validated_switch():
    with pytest.raises(ValueError, match="recompute"):
        build_attention("rfa", recompute="yes")
    assert build_attention("performer").config.recompute is True


def _peak(name, n, batch=1, **params):
    attn = build_attention(name, num_heads=4, head_dim=32, **params)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 4, n, 32, generator=gen).requires_grad_(True) for _ in range(3))
    _, reading = measure_peak_memory(lambda: attn(q, k, v).sum().backward(), "cpu")
    return reading.peak_bytes


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params", [("performer", {"num_features": 256}), ("rfa", {"num_features": 128})])
def test_recompute_peak_is_within_twice_full_attention(name, params, causal):
    # The target at the benchmark's width (256 features, 4 heads of 32), batch 1, n = 2048: full's fused
    # kernel keeps q, k, v, out and their gradients; the stored path's features alone are 4x that.
    full = _peak("full", 2048, causal=causal)
    ours = _peak(name, 2048, causal=causal, **params)
    stored = _peak(name, 2048, causal=causal, recompute=False, **params)
    assert ours <= 2 * full, (ours, full)
    assert stored > 4 * full  # not vacuous: the stored path is far above it


# ----------------------------------------------------------------------------- aft (grouped recompute)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", ["one", "several"])
def test_aft_local_recompute_equals_stored_path(groups, causal, monkeypatch):
    import attentions.aft as aft

    if groups == "several":  # one (batch row, head) per group
        monkeypatch.setattr(aft, "GROUP_ELEMENTS", 1)
        monkeypatch.setattr(aft, "MAX_GROUPS", 100)
    else:  # whole batch rows per group
        monkeypatch.setattr(aft, "GROUP_ELEMENTS", 2 * 50 * 8)
    q, k, v, mask = _inputs(50, scale=3.0)
    params = {"window": 6, "bias_init_std": 0.5}
    stored = _run("aft", params, False, q, k, v, mask, causal)
    ours = _run("aft", params, True, q, k, v, mask, causal)
    assert len(ours) == len(stored) == 5  # out, q, k, v and the relative biases
    for got, want in zip(ours, stored):
        torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_recompute_peak_is_within_twice_full_attention(causal):
    # The benchmark's setting (batch 2, 4 heads of 32, n = 4096), the default window of 32.
    full = _peak("full", 4096, batch=2, causal=causal)
    ours = _peak("aft", 4096, batch=2, causal=causal)
    stored = _peak("aft", 4096, batch=2, causal=causal, recompute=False)
    assert ours <= 2 * full < stored, (ours, full, stored)
