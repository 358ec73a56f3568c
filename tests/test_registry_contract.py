"""Contract tests run for every registered mechanism: a new mechanism is tested the day it lands."""

from __future__ import annotations

import pytest
import torch

from attentions import FAMILIES, available_attentions, build_attention, get_attention_info

from conftest import HEAD_DIM, HEADS, MAX_LEN, build_small, make_qkv, right_padding_mask

MECHANISMS = available_attentions()
EXPECTED = {
    "full", "sliding_window", "longformer", "bigbird", "reformer", "linformer",
    "performer", "rfa", "aft", "clustered", "memory_compressed",
}


def _real_rows(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [out[b, :, mask[b]] for b in range(out.shape[0])]


def test_registry_lists_known_mechanisms_only():
    assert set(MECHANISMS) <= EXPECTED
    assert "full" in MECHANISMS
    assert MECHANISMS == sorted(MECHANISMS)


def test_wildcard_listing():
    listed = available_attentions("*former")
    assert all(name.endswith("former") for name in listed)
    assert set(listed) == {n for n in MECHANISMS if n.endswith("former")}
    assert available_attentions("full") == ["full"]
    assert available_attentions("no_such_*") == []


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown attention 'fulll'.*full"):
        build_attention("fulll")


@pytest.mark.parametrize("name", MECHANISMS)
class TestContract:
    def test_metadata(self, name):
        info = get_attention_info(name)
        assert info.family in FAMILIES
        assert info.time_complexity and info.memory_complexity
        assert info.supports_padding_mask
        defaults = info.defaults()
        assert {"num_heads", "head_dim", "max_seq_len", "seed"} <= set(defaults)

    def test_unknown_parameter_is_named(self, name):
        with pytest.raises(ValueError, match="'no_such_param'.*allowed: num_heads"):
            build_small(name, no_such_param=3)

    @pytest.mark.parametrize("param,value", [("num_heads", 0), ("head_dim", -1), ("num_heads", "4"),
                                             ("num_heads", 2.5), ("dropout", 1.5)])
    def test_invalid_common_parameter_is_named(self, name, param, value):
        with pytest.raises(ValueError, match=f"'{param}'"):
            build_small(name, **{param: value})

    @pytest.mark.parametrize("seq", [1, 7, 33, 50])
    @pytest.mark.parametrize("batch", [1, 3])
    def test_output_shape_any_length(self, name, batch, seq):
        attn = build_small(name).eval()
        q, k, v = make_qkv(batch=batch, seq=seq)
        out = attn(q, k, v)
        assert out.shape == q.shape
        assert torch.isfinite(out).all()

    def test_appended_padding_does_not_change_real_rows(self, name):
        attn = build_small(name).eval()
        n, extra = 29, 11
        q, k, v = make_qkv(batch=2, seq=n + extra, seed=1)
        mask = right_padding_mask([n, n], n + extra)
        padded = attn(q, k, v, key_padding_mask=mask)
        unpadded = attn(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        torch.testing.assert_close(padded[:, :, :n], unpadded, atol=1e-5, rtol=1e-4)

    def test_padded_contents_do_not_leak(self, name):
        attn = build_small(name).eval()
        seq = 41
        mask = right_padding_mask([41, 23, 6], seq)
        q, k, v = make_qkv(batch=3, seq=seq, seed=2)
        out1 = attn(q, k, v, key_padding_mask=mask)
        noise = make_qkv(batch=3, seq=seq, seed=3)
        pad = ~mask[:, None, :, None]
        q2, k2, v2 = (torch.where(pad, 50.0 * n_, t) for t, n_ in zip((q, k, v), noise))
        out2 = attn(q2, k2, v2, key_padding_mask=mask)
        assert torch.isfinite(out1).all() and torch.isfinite(out2).all()
        for a, b in zip(_real_rows(out1, mask), _real_rows(out2, mask)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    def test_gradients_finite_and_zero_at_padding(self, name):
        attn = build_small(name).train()
        seq = 30
        mask = right_padding_mask([30, 17], seq)
        q, k, v = make_qkv(batch=2, seq=seq, seed=4, requires_grad=True)
        out = attn(q, k, v, key_padding_mask=mask)
        loss = (out * mask[:, None, :, None]).square().sum()
        loss.backward()
        for t in (q, k, v):
            assert t.grad is not None and torch.isfinite(t.grad).all()
            # Real outputs must not depend on padded inputs at all.
            assert t.grad[1, :, 17:].abs().max() == 0
        assert t.grad[:, :, :17].abs().sum() > 0
        for p in attn.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()

    def test_same_seed_same_output(self, name):
        q, k, v = make_qkv(seq=26, seed=5)
        torch.manual_seed(123)
        a = build_small(name, seed=7).eval()
        torch.manual_seed(456)  # global RNG must not matter: state comes from `seed`
        b = build_small(name, seed=7).eval()
        torch.testing.assert_close(a(q, k, v), b(q, k, v), atol=0, rtol=0)
        # eval() is deterministic call to call
        torch.testing.assert_close(a(q, k, v), a(q, k, v), atol=0, rtol=0)

    def test_dropout_metadata_matches_behaviour(self, name):
        # `applies_dropout` is what the report prints; it must say what the mechanism really does.
        q, k, v = make_qkv(seq=26, seed=2)
        attn = build_small(name, dropout=0.5)
        expected = attn.eval()(q, k, v)
        attn.train()
        torch.manual_seed(0)
        trained = attn(q, k, v)
        if get_attention_info(name).applies_dropout:
            assert not torch.allclose(trained, expected)
        else:
            torch.testing.assert_close(trained, expected, atol=0, rtol=0)

    def test_bad_shapes_name_layout(self, name):
        attn = build_small(name)
        q, k, v = make_qkv(seq=10)
        with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
            attn(q[0], k[0], v[0])
        with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
            attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
            attn(q, k[:, :, :5], v)
        with pytest.raises(ValueError, match="float"):
            attn(q.long(), k.long(), v.long())
        with pytest.raises(ValueError, match="key_padding_mask"):
            attn(q, k, v, key_padding_mask=torch.ones(2, 10))
        with pytest.raises(ValueError, match="key_padding_mask"):
            attn(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))

    def test_longer_than_max_seq_len_rejected_when_needed(self, name):
        info = get_attention_info(name)
        if not info.needs_max_seq_len:
            pytest.skip("mechanism does not depend on max_seq_len")
        attn = build_attention(name, num_heads=HEADS, head_dim=HEAD_DIM, max_seq_len=16)
        q, k, v = make_qkv(seq=17)
        with pytest.raises(ValueError, match="max_seq_len"):
            attn(q, k, v)

    def test_needs_max_seq_len_enforced_at_build(self, name):
        info = get_attention_info(name)
        if not info.needs_max_seq_len:
            pytest.skip("mechanism does not depend on max_seq_len")
        with pytest.raises(ValueError, match="max_seq_len"):
            build_attention(name, num_heads=HEADS, head_dim=HEAD_DIM, max_seq_len=None)


def test_max_len_constant_matches_budgets():
    assert MAX_LEN >= 41 + 11


@pytest.mark.parametrize("name", available_attentions())
def test_printed_info_shows_every_default(name):
    """The README's print(get_attention_info(name)) shows the family, complexity, capabilities and defaults."""
    info = get_attention_info(name)
    text = repr(info)
    assert f"family={info.family!r}" in text and "supports_padding_mask=" in text and "defaults={" in text
    for param, default in info.defaults().items():
        assert f"{param!r}: {default!r}" in text
