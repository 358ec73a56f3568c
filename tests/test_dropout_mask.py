"""attentions._dropout: a recomputing path's dropout mask is rebuilt bit for bit, and is real dropout."""

import pytest
import torch

from attentions._dropout import apply_dropout, draw_seed, keep_mask


def test_same_seed_and_part_give_the_same_mask_other_parts_differ():
    a = keep_mask(123, 4, (64, 256), 0.25, "cpu")
    assert torch.equal(a, keep_mask(123, 4, (64, 256), 0.25, "cpu"))
    assert not torch.equal(a, keep_mask(123, 5, (64, 256), 0.25, "cpu"))
    assert not torch.equal(a, keep_mask(124, 4, (64, 256), 0.25, "cpu"))


def test_keep_rate_and_scaling_are_inverted_dropout():
    probs = torch.full((200, 500), 0.5)
    out = apply_dropout(probs, 7, 0, 0.2)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01  # 100,000 draws: std of the rate ~0.0013
    assert torch.allclose(out[kept], torch.full_like(out[kept], 0.5 / 0.8))


def test_no_dropout_returns_the_input_and_bad_p_is_refused():
    probs = torch.rand(3, 4)
    assert apply_dropout(probs, 1, 0, 0.0) is probs
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        keep_mask(1, 0, (2,), 1.0, "cpu")


def test_seed_follows_the_global_rng():
    torch.manual_seed(0)
    first = draw_seed()
    torch.manual_seed(0)
    assert draw_seed() == first
