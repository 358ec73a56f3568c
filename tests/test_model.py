"""The shared backbone: shapes, padding invariance, the mask reaching the mechanism, tied QK, counts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attentions import Attention, AttentionConfig, available_attentions, register_attention
from attentions import registry as attention_registry
from attentions.functional import reference_attention
from harness.model import ModelConfig, build_model, sinusoidal_table

from conftest import SMALL_PARAMS

VOCAB, LENGTH, CLASSES = 11, 24, 5


def tiny(**overrides) -> ModelConfig:
    params = dict(vocab_size=VOCAB, max_length=LENGTH, num_classes=CLASSES, embed_dim=16, num_heads=2, qkv_dim=16,
                  mlp_dim=24, num_layers=2, dropout=0.0, attention_dropout=0.0)
    params.update(overrides)
    return ModelConfig(**params)


def tokens_and_mask(lengths, length=LENGTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (len(lengths), length), generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask, 0), mask


@dataclass(frozen=True)
class SpyConfig(AttentionConfig):
    pass


class _Spy(Attention):
    """Exact attention that records the mask it was given."""

    calls: list = []

    def attend(self, q, k, v, key_padding_mask):
        type(self).calls.append(None if key_padding_mask is None else key_padding_mask.clone())
        allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return reference_attention(q, k, v, allowed)


@pytest.fixture
def spy_mechanisms():
    """Register a spy mechanism and a shared_qk one for the duration of a test only."""
    register_attention("_spy", config=SpyConfig, family="exact", time_complexity="O(n^2)",
                       memory_complexity="O(n^2)", exact=True)(type("Spy", (_Spy,), {"calls": []}))
    register_attention("_spy_shared", config=SpyConfig, family="hashing", time_complexity="O(n^2)",
                       memory_complexity="O(n^2)", shared_qk=True)(type("SpyShared", (_Spy,), {"calls": []}))
    yield attention_registry._REGISTRY
    for name in ("_spy", "_spy_shared"):
        attention_registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("pos_emb", ["sinusoidal", "learned"])
def test_classifier_output_shape(pooling, pos_emb):
    model = build_model(tiny(pooling=pooling, pos_emb=pos_emb)).eval()
    tokens, mask = tokens_and_mask([LENGTH, 10, 3])
    logits = model(tokens, mask)
    assert logits.shape == (3, CLASSES) and torch.isfinite(logits).all()


def test_dual_encoder_output_shape_and_symmetry_of_inputs():
    model = build_model(tiny(two_sequence=True, num_classes=2)).eval()
    t1, m1 = tokens_and_mask([LENGTH, 7], seed=1)
    t2, m2 = tokens_and_mask([5, 20], seed=2)
    logits = model(t1, m1, t2, m2)
    assert logits.shape == (2, 2)
    # Features [x1, x2, x1*x2, x1-x2] are not symmetric: swapping the pair changes logits.
    assert not torch.allclose(logits, model(t2, m2, t1, m1))
    batch = {"tokens": t1, "mask": m1, "tokens2": t2, "mask2": m2, "labels": torch.zeros(2)}
    torch.testing.assert_close(model.forward_batch(batch), logits)
    with pytest.raises(ValueError, match="needs tokens2"):
        model(t1, m1)


def _padding_mechanisms():
    return [n for n in available_attentions() if not n.startswith("_")]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("name", _padding_mechanisms())
def test_logits_are_padding_invariant(name, pooling):
    torch.manual_seed(0)
    model = build_model(tiny(attention=name, attention_params=SMALL_PARAMS.get(name, {}), pooling=pooling,
                             max_length=40)).eval()
    tokens, mask = tokens_and_mask([17, 9], length=17)
    reference = model(tokens, mask)
    # Appending padding.
    padded = torch.cat([tokens, torch.zeros(2, 23, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 23, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(padded, padded_mask), reference, atol=1e-5, rtol=1e-4)
    # Changing what stands in padded positions.
    garbage = padded.masked_fill(~padded_mask, 7)
    torch.testing.assert_close(model(garbage, padded_mask), reference, atol=1e-5, rtol=1e-4)


def test_mask_reaches_the_mechanism(spy_mechanisms):
    for pooling in ("cls", "mean"):
        model = build_model(tiny(attention="_spy", pooling=pooling)).eval()
        spy = type(model.encoder.blocks[0].attn.attention)
        spy.calls.clear()
        tokens, mask = tokens_and_mask([LENGTH, 6])
        model(tokens, mask)
        assert len(spy.calls) == 2  # one per layer
        expected = torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1) if pooling == "cls" else mask
        for seen in spy.calls:
            assert torch.equal(seen, expected)


def test_spy_matches_full_attention(spy_mechanisms):
    """The same weights through `full` and through the spy's reference attention agree."""
    torch.manual_seed(0)
    full = build_model(tiny(attention="full")).eval()
    spy = build_model(tiny(attention="_spy")).eval()
    spy.load_state_dict(full.state_dict())
    tokens, mask = tokens_and_mask([LENGTH, 6])
    torch.testing.assert_close(spy(tokens, mask), full(tokens, mask), atol=1e-5, rtol=1e-4)


def test_shared_qk_ties_query_and_key(spy_mechanisms):
    model = build_model(tiny(attention="_spy_shared")).eval()
    mha = model.encoder.blocks[0].attn
    assert mha.shared_qk and mha.in_proj.out_features == 2 * 16
    untied = build_model(tiny(attention="_spy"))
    assert untied.encoder.blocks[0].attn.in_proj.out_features == 3 * 16
    # Exactly one qkv_dim x embed_dim (+ bias) matrix less per layer.
    assert untied.num_parameters() - model.num_parameters() == 2 * (16 * 16 + 16)
    seen = {}

    def capture(module, args, kwargs):
        seen["q"], seen["k"] = args[0], args[1]

    mha.attention.register_forward_pre_hook(capture, with_kwargs=True)
    model(*tokens_and_mask([LENGTH, 4]))
    assert torch.equal(seen["q"], seen["k"])


def test_parameter_count_matches_hand_count():
    V, L, E, Q, M, N, C = VOCAB, LENGTH, 16, 16, 24, 2, CLASSES
    per_layer = 4 * E + (E * 3 * Q + 3 * Q) + (Q * E + E) + (E * M + M) + (M * E + E)
    head = (E * M + M) + (M * C + C)
    cls_sinusoidal = V * E + E + N * per_layer + 2 * E + head
    assert build_model(tiny()).num_parameters() == cls_sinusoidal
    # Mean pooling drops the CLS token; learned positions add (L, E).
    assert build_model(tiny(pooling="mean", pos_emb="learned")).num_parameters() == cls_sinusoidal - E + L * E
    dual = V * E + E + N * per_layer + 2 * E + (4 * E * M + M) + (M * (M // 2) + M // 2) + (M // 2 * C + C)
    assert build_model(tiny(two_sequence=True)).num_parameters() == dual


def test_gradient_reaches_every_parameter():
    model = build_model(tiny(dropout=0.1, attention_dropout=0.1, pos_emb="learned")).train()
    tokens, mask = tokens_and_mask([LENGTH, 6])
    loss = torch.nn.functional.cross_entropy(model(tokens, mask), torch.tensor([1, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name not in ("encoder.cls",):
            assert p.grad.abs().sum() > 0, name
    # The zero-initialised CLS token does get a gradient (it is the pooled position).
    assert model.encoder.cls.grad.abs().sum() > 0


def test_cls_and_mean_pooling_differ_and_mean_ignores_padding():
    torch.manual_seed(0)
    cls_model = build_model(tiny(pooling="cls")).eval()
    torch.manual_seed(0)
    mean_model = build_model(tiny(pooling="mean")).eval()
    tokens, mask = tokens_and_mask([LENGTH, 6])
    assert not torch.allclose(cls_model(tokens, mask), mean_model(tokens, mask))
    # Mean pooling is the masked mean of the final encoder states.
    enc = mean_model.encoder
    states = {}
    enc.norm.register_forward_hook(lambda m, i, o: states.setdefault("x", o))
    pooled = enc(tokens, mask)
    manual = torch.stack([states["x"][b, mask[b]].mean(0) for b in range(2)])
    torch.testing.assert_close(pooled, manual)


def test_cls_pooling_extends_the_mechanism_length():
    model = build_model(tiny(pooling="cls"))
    assert model.encoder.blocks[0].attn.attention.config.max_seq_len == LENGTH + 1
    assert build_model(tiny(pooling="mean")).encoder.blocks[0].attn.attention.config.max_seq_len == LENGTH


def test_layers_get_distinct_seeds():
    model = build_model(tiny(num_layers=3, seed=5))
    assert [b.attn.attention.config.seed for b in model.encoder.blocks] == [5, 6, 7]


def test_sinusoidal_table_values():
    table = sinusoidal_table(6, 4)
    torch.testing.assert_close(table[:, 0], torch.sin(torch.arange(6.0)))
    torch.testing.assert_close(table[:, 1], torch.cos(torch.arange(6.0)))
    torch.testing.assert_close(table[:, 2], torch.sin(torch.arange(6.0) / 100.0))


def test_attention_backend_is_reported():
    model = build_model(tiny()).eval()
    model(*tokens_and_mask([LENGTH, 6]))
    assert model.attention_backend() in ("sdpa", "xformers", "reference")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(qkv_dim=15), "qkv_dim"),
        (dict(pooling="max"), "pooling.*'cls', 'mean'"),
        (dict(pos_emb="alibi"), "pos_emb.*rope"),
        (dict(attention="fulll"), "unknown attention 'fulll'.*full"),
        (dict(attention_params={"num_heads": 3}), "may not set"),
        (dict(attention_params={"max_seq_len": 10}), "max_seq_len.*shorter"),
        (dict(attention_params={"no_such": 1}), "'no_such'.*allowed"),
    ],
)
def test_bad_configs_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny(**overrides))


def test_unknown_model_key_is_named():
    with pytest.raises(ValueError, match="unknown model parameter.*'embed'"):
        build_model({**tiny().to_dict(), "embed": 3})


def test_too_long_input_is_rejected():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="exceeds the model's max_length"):
        model(torch.ones(1, LENGTH + 1, dtype=torch.long))


def test_overhead_baseline_is_the_same_network():
    """harness.overhead's torch.nn.TransformerEncoder baseline computes our backbone's function."""
    from harness.overhead import TorchEncoderBaseline

    cfg = tiny(num_heads=2, dropout=0.0, attention_dropout=0.0)
    ours, base = build_model(cfg).eval(), TorchEncoderBaseline(cfg).eval()
    assert ours.num_parameters() == sum(p.numel() for p in base.parameters())
    mapped = {"token_emb.weight": ours.encoder.token_emb.weight, "cls": ours.encoder.cls,
              "encoder.norm.weight": ours.encoder.norm.weight, "encoder.norm.bias": ours.encoder.norm.bias}
    for i, block in enumerate(ours.encoder.blocks):
        for theirs, mine in (("self_attn.in_proj_weight", block.attn.in_proj.weight),
                             ("self_attn.in_proj_bias", block.attn.in_proj.bias),
                             ("self_attn.out_proj.weight", block.attn.out_proj.weight),
                             ("self_attn.out_proj.bias", block.attn.out_proj.bias),
                             ("linear1.weight", block.ff1.weight), ("linear1.bias", block.ff1.bias),
                             ("linear2.weight", block.ff2.weight), ("linear2.bias", block.ff2.bias),
                             ("norm1.weight", block.norm1.weight), ("norm1.bias", block.norm1.bias),
                             ("norm2.weight", block.norm2.weight), ("norm2.bias", block.norm2.bias)):
            mapped[f"encoder.layers.{i}.{theirs}"] = mine
    for j in (0, 2):
        mapped[f"head.{j}.weight"], mapped[f"head.{j}.bias"] = ours.head[j].weight, ours.head[j].bias
    base.load_state_dict({k: v.detach().clone() for k, v in mapped.items()}, strict=True)
    tokens, mask = tokens_and_mask([LENGTH, 9])
    torch.testing.assert_close(base(tokens, mask), ours(tokens, mask), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- token head, causal backbone


def _causal_mechanisms():
    from attentions import causal_attentions

    return causal_attentions()


def test_token_head_gives_one_prediction_per_position_and_no_cls():
    model = build_model(tiny(token_level=True, pooling="cls")).eval()
    tokens, mask = tokens_and_mask([LENGTH, 9])
    logits = model(tokens, mask)
    assert logits.shape == (2, LENGTH, CLASSES)
    assert not hasattr(model.encoder, "cls")  # no CLS token in front of a token-level model
    assert model.encoder.blocks[0].attn.attention.config.max_seq_len == LENGTH
    # The head is the classifier applied to each position's final state.
    states, _ = model.encoder.encode(tokens, mask)
    torch.testing.assert_close(logits, model.head(states))
    torch.testing.assert_close(model.forward_batch({"tokens": tokens, "mask": mask}), logits)


def test_last_pooling_reads_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model(tiny(pooling="last")).eval()
    tokens, mask = tokens_and_mask([LENGTH, 6])
    states, _ = model.encoder.encode(tokens, mask)
    torch.testing.assert_close(model.encoder(tokens, mask), torch.stack([states[0, LENGTH - 1], states[1, 5]]))
    garbage = tokens.masked_fill(~mask, 7)
    torch.testing.assert_close(model(garbage, mask), model(tokens, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", _causal_mechanisms())
def test_causal_backbone_position_i_ignores_later_tokens(name):
    """model.causal=true: every layer is causal, so the logits at positions <= i do not move when any token
    after i changes (token head), and the last-pooled logits of a prefix equal those of the prefix alone."""
    torch.manual_seed(0)
    params = dict(SMALL_PARAMS.get(name, {}))
    params.pop("global_positions", None)  # longformer: global tokens are fine causally, keep the default
    model = build_model(tiny(attention=name, attention_params=params, causal=True, token_level=True,
                             num_layers=2)).eval()
    tokens, mask = tokens_and_mask([LENGTH, LENGTH], seed=3)
    reference = model(tokens, mask)
    g = torch.Generator().manual_seed(1)
    for i in (0, 5, 11, LENGTH - 2):
        changed = tokens.clone()
        changed[:, i + 1 :] = torch.randint(1, VOCAB, (2, LENGTH - i - 1), generator=g)
        assert not torch.equal(changed, tokens)
        torch.testing.assert_close(model(changed, mask)[:, : i + 1], reference[:, : i + 1], atol=1e-5, rtol=1e-4)
    # The later positions do depend on the changed tokens (the check is not vacuous).
    assert not torch.allclose(model(changed, mask)[:, -1], reference[:, -1], atol=1e-4)


def test_causal_sequence_classifier_with_last_pooling_equals_its_prefix():
    torch.manual_seed(0)
    model = build_model(tiny(causal=True, pooling="last")).eval()
    tokens, mask = tokens_and_mask([LENGTH, LENGTH], seed=4)
    prefix = 10
    short_mask = mask.clone()
    short_mask[:, prefix:] = False
    # Right padding after the prefix, whatever stands there, gives the prefix's own prediction.
    torch.testing.assert_close(model(tokens, short_mask), model(tokens[:, :prefix], mask[:, :prefix]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(causal=True, pooling="cls"), "pooling.*'cls' cannot be used with causal"),
        (dict(causal=True, pooling="mean", attention="linformer"), "causal.*linformer"),
        (dict(token_level=True, two_sequence=True), "token_level.*two_sequence"),
    ],
)
def test_bad_causal_and_token_configs_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny(**overrides))


def _first_block_input(model, tokens, mask):
    seen = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model(tokens, mask)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("pos_emb", ["sinusoidal", "learned"])
def test_token_shift_adds_the_left_neighbours_embedding(pos_emb):
    torch.manual_seed(0)
    model = build_model(tiny(token_level=True, token_shift=True, pos_emb=pos_emb)).eval()
    tokens, mask = tokens_and_mask([LENGTH, 9])
    emb = model.encoder.token_emb(tokens)
    expected = emb + model.encoder.pos_emb[:LENGTH]
    expected[:, 1:] += emb[:, :-1]  # position 0 has no left neighbour
    torch.testing.assert_close(_first_block_input(model, tokens, mask), expected)
    plain = build_model(tiny(token_level=True, pos_emb=pos_emb)).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(_first_block_input(plain, tokens, mask), emb + model.encoder.pos_emb[:LENGTH])


@pytest.mark.parametrize("causal", [False, True])
def test_token_shift_keeps_padding_invariance_and_causality(causal):
    torch.manual_seed(0)
    model = build_model(tiny(token_level=True, token_shift=True, causal=causal)).eval()
    tokens, mask = tokens_and_mask([LENGTH, 7], seed=5)
    reference = model(tokens, mask)
    garbage = tokens.masked_fill(~mask, 9)  # padded positions hold other tokens: real logits must not move
    torch.testing.assert_close(model(garbage, mask)[mask], reference[mask], atol=1e-5, rtol=1e-4)
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] % (VOCAB - 1)) + 1
    moved = (model(changed, mask)[0] - reference[0]).abs().amax(dim=-1) > 1e-5
    if causal:  # the shift looks left only: positions before the change stay put, the changed ones move
        assert not moved[:12].any() and moved[12:].all()
    else:
        assert moved.all()


def test_token_shift_must_be_a_bool():
    with pytest.raises(ValueError, match="token_shift.*must be a bool"):
        tiny(token_shift="yes")
