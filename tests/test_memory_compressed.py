"""Memory-compressed attention against plain references of its two compressions."""

from __future__ import annotations

import pytest
import torch

from attentions._dropout import draw_seed
from attentions.functional import reference_attention

from conftest import HEAD_DIM, HEADS, build_small, make_qkv, right_padding_mask


def _set_kernels(attn, key_kernel: torch.Tensor, value_kernel: torch.Tensor) -> None:
    with torch.no_grad():
        attn.key_kernel.copy_(key_kernel)
        attn.value_kernel.copy_(value_kernel)


def _slots_plain(x, kernel, c, mask):
    """Strided conv written as a loop over slots: slot j = sum_i x[j*c + i] @ kernel_i (real tokens only)."""
    batch, heads, n, d = x.shape
    if mask is not None:
        x = x * mask[:, None, :, None]
    out = []
    for j in range(-(-n // c)):
        acc = torch.zeros(batch, heads, d, dtype=x.dtype)
        for i in range(c):
            if j * c + i < n:
                acc = acc + torch.einsum("bhd,hde->bhe", x[:, :, j * c + i], kernel[:, i * d:(i + 1) * d])
        out.append(acc)
    return torch.stack(out, dim=2)


def _slot_mask(mask, n, c):
    m = -(-n // c)
    return torch.stack([mask[:, j * c:(j + 1) * c].any(-1) for j in range(m)], dim=1)


def test_compression_one_with_identity_kernel_equals_full():
    q, k, v = make_qkv(batch=3, seq=30, seed=1)
    mask = right_padding_mask([30, 21, 4], 30)
    attn = build_small("memory_compressed", compression=1)
    eye = torch.eye(HEAD_DIM).expand(HEADS, HEAD_DIM, HEAD_DIM)
    _set_kernels(attn, eye, eye)
    out = attn(q, k, v, key_padding_mask=mask)
    expected = reference_attention(q, k, v, mask[:, None, None, :])
    for b, n in enumerate([30, 21, 4]):
        torch.testing.assert_close(out[b, :, :n], expected[b, :, :n], atol=1e-5, rtol=1e-5)


def test_mean_with_compression_one_equals_full():
    q, k, v = make_qkv(batch=2, seq=19, seed=2)
    out = build_small("memory_compressed", compression=1, compression_type="mean")(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_conv_equals_plain_strided_convolution(c):
    n = 23  # divisible by none of the c: the last slot is internally padded
    q, k, v = make_qkv(batch=2, seq=n, seed=3)
    mask = right_padding_mask([23, 14], n)
    attn = build_small("memory_compressed", compression=c)
    ks = _slots_plain(k, attn.key_kernel.detach(), c, mask)
    vs = _slots_plain(v, attn.value_kernel.detach(), c, mask)
    expected = reference_attention(q, ks, vs, _slot_mask(mask, n, c)[:, None, None, :])
    out = attn(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, :14], expected[1, :, :14], atol=1e-5, rtol=1e-5)


def test_mean_averages_real_tokens_of_each_slot():
    n, c = 10, 4
    q, k, v = make_qkv(batch=1, seq=n, seed=4)
    mask = right_padding_mask([9], n)
    # slots: [0..3], [4..7], [8] (+ padded 9, internal 10, 11): the last slot is token 8 alone.
    groups = [slice(0, 4), slice(4, 8), slice(8, 9)]
    ks = torch.stack([k[:, :, g].mean(2) for g in groups], dim=2)
    vs = torch.stack([v[:, :, g].mean(2) for g in groups], dim=2)
    out = build_small("memory_compressed", compression=c, compression_type="mean")(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :, :9], reference_attention(q, ks, vs)[:, :, :9], atol=1e-5, rtol=1e-5)


def test_conv_and_mean_differ_but_a_mean_kernel_makes_them_equal():
    n, c = 24, 3
    q, k, v = make_qkv(batch=2, seq=n, seed=5)
    conv = build_small("memory_compressed", compression=c)
    mean = build_small("memory_compressed", compression=c, compression_type="mean")
    assert (conv(q, k, v) - mean(q, k, v)).abs().max() > 1e-2
    mean_kernel = torch.eye(HEAD_DIM).repeat(c, 1).expand(HEADS, c * HEAD_DIM, HEAD_DIM) / c
    _set_kernels(conv, mean_kernel, mean_kernel)
    torch.testing.assert_close(conv(q, k, v), mean(q, k, v), atol=1e-5, rtol=1e-5)  # full slots only


@pytest.mark.parametrize("compression_type", ["conv", "mean"])
@pytest.mark.parametrize("n,extra", [(20, 7), (31, 2), (9, 30)])
def test_padding_invariance_when_c_does_not_divide_n(compression_type, n, extra):
    attn = build_small("memory_compressed", compression=4, compression_type=compression_type)
    q, k, v = make_qkv(batch=2, seq=n + extra, seed=6)
    noise = make_qkv(batch=2, seq=n + extra, seed=7)
    mask = right_padding_mask([n, n], n + extra)
    pad = ~mask[:, None, :, None]
    q, k, v = (torch.where(pad, 1e4 * z, t) for t, z in zip((q, k, v), noise))
    padded = attn(q, k, v, key_padding_mask=mask)[:, :, :n]
    torch.testing.assert_close(padded, attn(q[:, :, :n], k[:, :, :n], v[:, :, :n]), atol=1e-5, rtol=1e-5)


def test_kernels_from_seed_and_scale_preserving():
    a = build_small("memory_compressed", seed=1)
    b = build_small("memory_compressed", seed=1)
    assert torch.equal(a.key_kernel, b.key_kernel) and not torch.equal(a.key_kernel, a.value_kernel)
    assert a.key_kernel.shape == (HEADS, 3 * HEAD_DIM, HEAD_DIM)
    big = build_small("memory_compressed", head_dim=64, compression=4)
    std = big.key_kernel.std().item() * (4 * 64) ** 0.5
    assert 0.9 < std < 1.1
    assert list(build_small("memory_compressed", compression_type="mean").parameters()) == []


def test_dropout_only_in_training():
    q, k, v = make_qkv(seq=30, seed=8)
    attn = build_small("memory_compressed", dropout=0.5)
    torch.testing.assert_close(attn.eval()(q, k, v), build_small("memory_compressed")(q, k, v))
    torch.manual_seed(0)
    assert (attn.train()(q, k, v) - attn.eval()(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "params,name",
    [({"compression": 0}, "compression"), ({"compression": 1.5}, "compression"),
     ({"compression_type": "max"}, "compression_type")],
)
def test_bad_parameters_name_themselves(params, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        build_small("memory_compressed", **params)


def test_training_dropout_recomputes_with_the_chunked_path_masks():
    """With dropout in training on a CPU the slots are attended by the chunked recomputing path: with c = 1 and
    mean slots (slots = tokens) it equals dense softmax attention with the chunked path's own masks, outputs
    and gradients, padding included; recompute=false keeps SDPA (other masks, the same law)."""
    from test_full_chunked import dense_masked_reference

    q, k, v = (t.requires_grad_(True) for t in make_qkv(batch=3, seq=24, seed=9))
    mask = right_padding_mask([24, 13, 5], 24)
    attn = build_small("memory_compressed", compression=1, compression_type="mean", dropout=0.3).train()
    torch.manual_seed(4)
    out = attn(q, k, v, key_padding_mask=mask)
    torch.manual_seed(4)
    seed = draw_seed()
    expected = dense_masked_reference(q, k, v, mask, False, 0.3, seed)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, expected * real, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out) * real
    for got, want in zip(torch.autograd.grad((out * weight).sum(), (q, k, v)),
                         torch.autograd.grad((expected * weight).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    stored = build_small("memory_compressed", compression=1, compression_type="mean", dropout=0.3,
                         recompute=False).train()
    torch.manual_seed(4)
    assert not torch.allclose(stored(q, k, v, key_padding_mask=mask) * real, out * real)
