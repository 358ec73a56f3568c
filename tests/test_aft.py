"""AFT: every mode against the paper's formula written out densely in float64."""

from __future__ import annotations

import math

import pytest
import torch

from attentions import build_attention

from conftest import HEAD_DIM, HEADS, build_small, make_qkv, right_padding_mask


def _dense_aft(q, k, v, w=None, mask=None):
    """Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt'), plainly, float64."""
    q, k, v = (t.double() for t in (q, k, v))
    n = q.shape[2]
    w = torch.zeros(n, n, dtype=torch.float64) if w is None else w.double()
    logits = k[:, :, None, :, :] + w[None, None, :, :, None]  # (b, h, t, t', d)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=3)
    return torch.sigmoid(q) * (weights * v[:, :, None]).sum(dim=3)


def _banded(rel_bias: torch.Tensor, n: int) -> torch.Tensor:
    """Dense (n, n) bias of the local mode: rel_bias[t' - t + s - 1] inside the window, 0 outside."""
    s = (rel_bias.numel() + 1) // 2
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # t' - t
    inside = offset.abs() < s
    return torch.where(inside, rel_bias[(offset + s - 1).clamp(0, 2 * s - 2)], torch.zeros(()))


def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def test_simple_equals_closed_form():
    q, k, v = make_qkv(batch=2, seq=23, seed=1)
    out = build_small("aft", mode="simple")(q, k, v)
    expected = torch.sigmoid(q.double()) * (torch.softmax(k.double(), dim=2) * v.double()).sum(2, keepdim=True)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,window", [(31, 5), (100, 5), (100, 17), (97, 33), (70, 40), (65, 1)])
def test_local_equals_dense_banded_formula(n, window):
    # Random, large, asymmetric biases: a flipped offset or an off-by-one in the window or at a
    # block edge would show. Lengths cover one block, several blocks and a ragged last block.
    q, k, v = make_qkv(batch=2, seq=n, seed=2)
    attn = build_small("aft", mode="local", window=window, max_seq_len=128)
    rel = torch.randn(2 * window - 1, generator=torch.Generator().manual_seed(window)) * 1.5
    _set(attn.rel_bias, rel)
    out = attn(q, k, v)
    torch.testing.assert_close(out, _dense_aft(q, k, v, _banded(rel, n)).float(), atol=1e-5, rtol=1e-5)


def test_full_equals_dense_formula_with_padding():
    q, k, v = make_qkv(batch=2, seq=20, seed=3)
    attn = build_small("aft", mode="full", max_seq_len=24)
    w = torch.randn(24, 24, generator=torch.Generator().manual_seed(0)) * 2
    _set(attn.pos_bias, w)
    mask = right_padding_mask([20, 12], 20)
    out = attn(q, k, v, key_padding_mask=mask)
    expected = _dense_aft(q, k, v, w[:20, :20], mask).float()
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, :12], expected[1, :, :12], atol=1e-5, rtol=1e-5)


def test_full_with_zero_biases_equals_simple():
    q, k, v = make_qkv(batch=2, seq=40, seed=4)
    full = build_small("aft", mode="full")
    _set(full.pos_bias, torch.zeros_like(full.pos_bias))
    torch.testing.assert_close(full(q, k, v), build_small("aft", mode="simple")(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [33, 64])
def test_local_with_window_covering_sequence_equals_full(window):
    n = 33
    q, k, v = make_qkv(batch=2, seq=n, seed=5)
    local = build_small("aft", mode="local", window=window, bias_init_std=1.0)
    full = build_small("aft", mode="full", max_seq_len=n)
    _set(full.pos_bias, _banded(local.rel_bias.detach(), n))
    mask = right_padding_mask([33, 20], n)
    a, b = local(q, k, v, key_padding_mask=mask), full(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1, :, :20], b[1, :, :20], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["simple", "local", "full"])
def test_stable_at_large_inputs(mode):
    q, k, v = make_qkv(batch=2, seq=29, seed=6)
    q, k, v = 100 * q, 100 * k, 100 * v
    attn = build_small("aft", mode=mode, bias_init_std=1.0)
    w = None
    if mode == "local":
        w = _banded(attn.rel_bias.detach(), 29)
    elif mode == "full":
        w = attn.pos_bias.detach()[:29, :29]
    out = attn(q, k, v)
    assert torch.isfinite(out).all()
    expected = _dense_aft(q, k, v, w).float()
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("mode,n", [("simple", 17), ("local", 17), ("local", 70), ("full", 17)])
def test_gradients_match_dense_formula(mode, n):
    q, k, v = make_qkv(batch=1, seq=n, seed=7, dtype=torch.float64, requires_grad=True)
    attn = build_small("aft", mode=mode, window=3, bias_init_std=0.5, max_seq_len=128).double()
    w = None
    if mode == "local":
        w = _banded(attn.rel_bias, n)
    elif mode == "full":
        w = attn.pos_bias[:n, :n]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [q, k, v, *attn.parameters()]
    ours = torch.autograd.grad((attn(q, k, v) * grad_out).sum(), params)
    ref = torch.autograd.grad((_dense_aft(q, k, v, w) * grad_out).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_biases_come_from_seed_and_are_small():
    a = build_small("aft", mode="local", window=4, seed=3)
    b = build_small("aft", mode="local", window=4, seed=3)
    c = build_small("aft", mode="local", window=4, seed=4)
    assert a.rel_bias.shape == (7,)
    assert torch.equal(a.rel_bias, b.rel_bias) and not torch.equal(a.rel_bias, c.rel_bias)
    assert 0 < a.rel_bias.abs().max() < 0.2
    assert list(build_small("aft", mode="simple").parameters()) == []
    assert build_small("aft", mode="full").pos_bias.shape == (64, 64)


def test_all_padding_sequence_is_finite():
    q, k, v = make_qkv(batch=2, seq=9)
    mask = right_padding_mask([9, 0], 9)
    for mode in ("simple", "local", "full"):
        assert torch.isfinite(build_small("aft", mode=mode)(q, k, v, key_padding_mask=mask)).all()


def test_full_needs_max_seq_len():
    with pytest.raises(ValueError, match="'max_seq_len'.*mode='full'"):
        build_attention("aft", num_heads=HEADS, head_dim=HEAD_DIM, mode="full")
    build_attention("aft", num_heads=HEADS, head_dim=HEAD_DIM, mode="local")  # other modes do not
    attn = build_attention("aft", num_heads=HEADS, head_dim=HEAD_DIM, mode="full", max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        attn(*make_qkv(seq=9))


@pytest.mark.parametrize(
    "params,name",
    [({"mode": "causal"}, "mode"), ({"window": 0}, "window"), ({"window": 2.0}, "window"),
     ({"bias_init_std": -1.0}, "bias_init_std")],
)
def test_bad_parameters_name_themselves(params, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        build_small("aft", **params)


def test_dropout_is_accepted_and_does_nothing():
    q, k, v = make_qkv(seq=20, seed=8)
    attn = build_small("aft", dropout=0.5).train()
    torch.testing.assert_close(attn(q, k, v), build_small("aft").eval()(q, k, v), atol=0, rtol=0)


def test_local_far_negative_biases_do_not_cancel():
    # Issue 11's minimal input: with biases -20 the old "simple sums + (exp(w) - 1) correction"
    # subtracted two nearly equal sums in float32 and returned [0, 0, 1].
    attn = build_attention("aft", mode="local", num_heads=1, head_dim=1, window=2)
    _set(attn.rel_bias, torch.full((3,), -20.0))
    k = torch.tensor([30.0, 0.0, 0.0]).view(1, 1, 3, 1)
    v = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1)
    q = torch.full((1, 1, 3, 1), 50.0)
    expected = torch.tensor([1 / (1 + (1 + math.exp(-20)) * math.exp(-10)), 1.0, 1.0])
    torch.testing.assert_close(attn(q, k, v).flatten(), expected, atol=0, rtol=1e-6)
    assert abs(float(expected[0]) - 0.99995) < 1e-5


@pytest.mark.parametrize("bias_scale", [1.0, 4.0, 8.0, 20.0, 50.0])
def test_local_matches_dense_formula_at_large_bias_scales(bias_scale):
    # Keys x4 and biases N(0, scale^2): rows whose weight sits on strongly negative offsets are
    # common (the old correction erred by up to 1.5e-4 here); 50 exercises the range shift.
    n, window = 16, 6
    worst = 0.0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(3))
        k = 4 * k
        attn = build_attention("aft", mode="local", num_heads=2, head_dim=8, window=window)
        rel = torch.randn(2 * window - 1, generator=g) * bias_scale
        _set(attn.rel_bias, rel)
        ref = _dense_aft(q, k, v, _banded(rel, n))
        with torch.no_grad():
            err = (attn(q, k, v).double() - ref).abs() / ref.abs().amax(-1, keepdim=True)
        worst = max(worst, float(err.max()))
    assert worst <= 1e-5
