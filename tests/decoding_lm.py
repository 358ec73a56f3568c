"""The random-init causal language model the decoding tests share (test_generate, test_rotary), and the check they
both make: a right-padded prefill, then teacher-forced steps, equal the model's own causal forward."""

from __future__ import annotations

import torch

from harness.model import ModelConfig, build_model

from conftest import HEAD_DIM, SMALL_PARAMS

VOCAB, MAX_LENGTH = 24, 40


def lm_config(attention: str, token_shift: bool = False, pos_emb: str = "learned", **overrides) -> ModelConfig:
    """A random-init causal language model (num_classes == vocab_size) at test sizes, fp32, no dropout."""
    params = dict(vocab_size=VOCAB, max_length=MAX_LENGTH, num_classes=VOCAB, embed_dim=16, num_heads=2,
                  qkv_dim=2 * HEAD_DIM, mlp_dim=32, num_layers=2, dropout=0.0, attention_dropout=0.0,
                  causal=True, token_level=True, token_shift=token_shift, pos_emb=pos_emb, attention=attention,
                  attention_params=dict(SMALL_PARAMS.get(attention, {})), seed=3)
    params.update(overrides)
    return ModelConfig(**params)


def lm(attention: str, token_shift: bool = False, pos_emb: str = "learned", **overrides):
    torch.manual_seed(0)
    model = build_model(lm_config(attention, token_shift, pos_emb, **overrides)).eval()
    with torch.no_grad():  # a wider head than N(0, 1/fan_in): random models then stop repeating one token at once
        model.head[-1].weight.mul_(8.0)
    return model


def assert_prefill_then_steps_match_forward(model, lengths=(9, 4, 0), total: int = 24) -> None:
    """Prompts of ``lengths`` real tokens right-padded to the longest, then teacher-forced steps to ``total`` tokens
    each: the logits at every real position equal the causal forward of the whole sequence, and each sequence
    continues from its own end (the empty prompt starts at position 0)."""
    lengths = list(lengths)
    seqs = torch.randint(1, VOCAB, (len(lengths), total), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(seqs)
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    states = model.init_states(len(lengths), total)
    logits = model.prefill(seqs[:, :width].masked_fill(~mask, 0), mask, states)
    assert logits.shape == (len(lengths), width, VOCAB)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(logits[b, :n], ref[b, :n], atol=1e-4, rtol=1e-4)
    assert states.lengths.tolist() == lengths
    rows = torch.arange(len(lengths))
    for t in range(total - width):
        pos = torch.tensor(lengths) + t
        out = model.step(seqs[rows, pos], states)
        torch.testing.assert_close(out, ref[rows, pos], atol=1e-4, rtol=1e-4, msg=f"step {t} (positions {pos})")
    assert states.lengths.tolist() == [n + total - width for n in lengths]


def recomputed(model, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by re-running the whole causal forward on the sequence so far at each step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]
