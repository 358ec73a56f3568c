"""Rotary position embeddings (``model.pos_emb=rope``, ``attentions.rotary``; RoFormer, Su et al. 2021).

The rotation against a plain 2x2 rotation of each pair written here in float64, its relative property, its precision
at large positions; the backbone: q and k rotated by each token's position (CLS at 0, shared-QK once, grouped keys),
prefill + steps equal to the causal forward with right-padded prompts and grouped keys, generation past the training
length through ``with_context``; aft refused, an ``own`` plug-in not rotated twice, and a training run through
``arena-train``'s ``run`` that records it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from attentions import Attention, AttentionConfig, causal_attentions, get_attention_info, register_attention
from attentions import registry as attention_registry
from attentions.functional import reference_attention
from attentions.rotary import apply_rotary, rotary_table, rotate
from harness.generate import load_trained_model, with_context
from harness.model import ModelConfig, build_model
from harness.train import CONF_DIR, run

import decoding_lm
from conftest import HEAD_DIM, SMALL_PARAMS
from decoding_lm import VOCAB, assert_prefill_then_steps_match_forward, recomputed

BUILTIN = ["aft", "bigbird", "clustered", "full", "linformer", "longformer", "memory_compressed", "performer",
           "reformer", "rfa", "sliding_window"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def plain_rotation(x: torch.Tensor, positions) -> torch.Tensor:
    """RoPE written out (RoFormer eq. 15 and 34): the vector at column t of ``x`` (..., n, d), in float64, has each
    pair (x_2i, x_2i+1) multiplied by the 2x2 rotation matrix of angle p_t * 10000^(-2i/d), p_t = positions[t]."""
    d = x.shape[-1]
    out = x.double().clone()
    for t, p in enumerate(positions):
        for i in range(d // 2):
            angle = float(p) * 10000.0 ** (-2.0 * i / d)
            rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                                    dtype=torch.float64)
            pair = x[..., t, 2 * i: 2 * i + 2].double()
            out[..., t, 2 * i: 2 * i + 2] = pair @ rotation.T
    return out


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ the rotation


@pytest.mark.parametrize("positions", [list(range(7)), [0, 3, 3, 17, 250, 4096, 10**6]])
def test_rope_equals_a_plain_rotation_of_each_pair(positions):
    x = randn(2, 3, len(positions), 8)
    got = rotate(x, torch.tensor(positions))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, plain_rotation(x, positions), atol=1e-9, rtol=0)


def test_one_position_per_sequence_broadcasts_over_heads():
    """A decoding step: (batch, 1, 1) positions, each sequence at its own."""
    x = randn(3, 2, 1, 8)
    lengths = [5, 0, 41]
    got = rotate(x, torch.tensor(lengths)[:, None, None])
    for b, p in enumerate(lengths):
        torch.testing.assert_close(got[b], plain_rotation(x[b], [p]), atol=1e-12, rtol=0)


def test_float32_and_bf16_keep_their_dtype_and_are_accurate_at_large_positions():
    """The angles are formed in float64: at position 10^6 a float32 angle could be off by hundredths of a radian;
    ours rounds only cos and sin (and x) to float32; bf16 is rotated in float32 and rounded once."""
    positions = [0, 1, 999_999, 1_000_000]
    x = randn(1, 2, 4, 16)
    ref = plain_rotation(x, positions)
    got32 = rotate(x.float(), torch.tensor(positions))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, atol=2e-6, rtol=0)
    got16 = rotate(x.bfloat16(), torch.tensor(positions))
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, plain_rotation(x.bfloat16().double(), positions).bfloat16(), atol=0.02, rtol=0.01)


def test_scores_depend_on_the_offset_only():
    """(R_m q) . (R_n k) = q . R_(n-m) k (RoFormer eq. 16): equal for every pair with one offset, not across offsets."""
    q, k = randn(1, 1, 1, 8, seed=1), randn(1, 1, 1, 8, seed=2)

    def score(m, n):
        return float((rotate(q, torch.tensor([m])) * rotate(k, torch.tensor([n]))).sum())

    for offset in (-5, 0, 1, 7, 300):
        starts = [0, 3, 12, 1000, 65_536] if offset >= 0 else [5, 9, 1000, 65_536]
        scores = [score(m, m + offset) for m in starts]
        for s in scores:
            assert s == pytest.approx(scores[0], abs=1e-9), (offset, scores)
        assert scores[0] == pytest.approx(float((q * rotate(k, torch.tensor([offset]))).sum()), abs=1e-9)
    assert len({round(score(0, n), 6) for n in range(6)}) == 6  # the offset does matter


def test_strided_views_rotate_alike_and_gradients_are_the_rotations():
    """An odd-offset, non-contiguous view (copied before the complex view) rotates as its contiguous copy; the
    gradient is the inverse rotation (gradcheck, float64)."""
    base = randn(2, 5, 3, 10)
    x = base[..., 1:9].transpose(1, 2)  # (2, 3, 5, 8), storage offset 1
    torch.testing.assert_close(rotate(x, torch.arange(5)), plain_rotation(x, range(5)), atol=1e-12, rtol=0)
    leaf = randn(1, 2, 4, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rotate(t, torch.tensor([0, 2, 9, 100])), (leaf,))


def test_norms_are_kept_and_position_zero_is_the_identity():
    x = randn(2, 2, 5, 8)
    torch.testing.assert_close(rotate(x, torch.arange(5) * 37).norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rotate(x, torch.zeros(5, dtype=torch.long)), x)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="head_dim must be an even int"):
        rotate(randn(1, 1, 3, 7), torch.arange(3))
    with pytest.raises(ValueError, match="integer tensor"):
        rotate(randn(1, 1, 3, 8), torch.arange(3).float())
    with pytest.raises(ValueError, match="complex table of d / 2 columns"):
        apply_rotary(randn(1, 1, 3, 8), rotary_table(torch.arange(3), 6))
    with pytest.raises(ValueError, match="complex table"):
        apply_rotary(randn(1, 1, 3, 8), randn(3, 4))
    with pytest.raises(ValueError, match="'qkv_dim'.*rope.*even.*12 / 4 = 3"):
        lm_config("full", num_heads=4, qkv_dim=12)


# ------------------------------------------------------------------------------- the backbone's positions


@dataclass(frozen=True)
class RecorderConfig(AttentionConfig):
    pass


class _Recorder(Attention):
    """Exact attention that records the q, k it receives (before any grouping or padding is applied)."""

    seen: list = []

    def forward(self, q, k, v, key_padding_mask=None):
        type(self).seen.append((q, k))
        return super().forward(q, k, v, key_padding_mask)

    def attend(self, q, k, v, key_padding_mask):
        allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return reference_attention(q, k, v, allowed)


class _OwnRotation(_Recorder):
    """A mechanism that carries its own rotation (info ``rotary='own'``): RoPE on q and k inside, positions 0..n-1."""

    def attend(self, q, k, v, key_padding_mask):
        positions = torch.arange(q.shape[2])
        return super().attend(rotate(q, positions), rotate(k, positions), v, key_padding_mask)


@pytest.fixture
def plugins():
    """Plug-ins for one test, then removed (other tests iterate over the registry): a recorder (rotated by the
    backbone), a shared-QK recorder, one with its own rotation, and the same rotation not declared (twice)."""
    common = dict(config=RecorderConfig, time_complexity="O(n^2)", memory_complexity="O(n^2)")
    made = {
        "_rope_rec": register_attention("_rope_rec", family="exact", **common)(
            type("RopeRec", (_Recorder,), {"seen": []})),
        "_rope_rec_shared": register_attention("_rope_rec_shared", family="hashing", shared_qk=True,
                                               grouped_kv="refused", **common)(
            type("RopeRecShared", (_Recorder,), {"seen": []})),
        "_rope_own": register_attention("_rope_own", family="exact", rotary="own", **common)(
            type("RopeOwn", (_OwnRotation,), {"seen": []})),
        # The same rotation declared 'rotated': the backbone rotates too, so it is rotated twice
        "_rope_twice": register_attention("_rope_twice", family="exact", **common)(
            type("RopeTwice", (_OwnRotation,), {"seen": []})),
    }
    yield made
    for name in made:
        attention_registry._REGISTRY.pop(name, None)


def projections(model, tokens, mask=None):
    """Every layer's fused in_proj output (batch, seq, columns), captured by hooks during a forward."""
    outs = []
    hooks = [block.attn.in_proj.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
             for block in model.encoder.blocks]
    try:
        with torch.no_grad():
            model(tokens, mask)
    finally:
        for h in hooks:
            h.remove()
    return outs


def heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(batch, seq, n_heads * head_dim) -> (batch, n_heads, seq, head_dim)."""
    return t.view(t.shape[0], t.shape[1], n_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("name,pooling,kv", [
    ("_rope_rec", "cls", None),  # CLS in front: position 0, the tokens 1..n
    ("_rope_rec", "mean", None),
    ("_rope_rec", "mean", 1),  # multi-query: k has one head, rotated as every query head
    ("_rope_rec_shared", "cls", None),  # one query-key tensor, rotated once: k is still q
])
def test_the_backbone_rotates_q_and_k_by_each_tokens_position(plugins, name, pooling, kv):
    config = ModelConfig(vocab_size=VOCAB, max_length=12, num_classes=3, embed_dim=16, num_heads=2, qkv_dim=16,
                         mlp_dim=16, num_layers=2, dropout=0.0, attention_dropout=0.0, pooling=pooling, pos_emb="rope",
                         attention=name, num_kv_heads=kv)
    torch.manual_seed(0)
    model = build_model(config).eval()
    tokens = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(12)[None, :] < torch.tensor([[12], [7]])
    cls = plugins[name]
    cls.seen.clear()
    projected = projections(model, tokens, mask)
    assert len(cls.seen) == config.num_layers  # one forward, each layer once
    seq = 12 + (pooling == "cls")
    positions = list(range(seq))
    for layer, proj in enumerate(projected):
        q_seen, k_seen = cls.seen[layer]
        assert q_seen.shape[2] == seq
        parts = proj.split(model.encoder.blocks[layer].attn.split, dim=-1)
        q = heads(parts[0], 2)
        torch.testing.assert_close(q_seen.double(), plain_rotation(q, positions), atol=1e-5, rtol=1e-5)
        if name == "_rope_rec_shared":
            assert k_seen is q_seen
        else:
            k = heads(parts[1], kv or 2)
            assert k_seen.shape == k.shape
            torch.testing.assert_close(k_seen.double(), plain_rotation(k, positions), atol=1e-5, rtol=1e-5)


def test_a_mechanism_with_its_own_rotation_is_not_rotated_twice(plugins):
    """rotary='own': the backbone hands over the plain projections; the plug-in rotates them itself, so its model
    equals the rope model with `full` (the same weights), which it would not with a second rotation."""
    def rope_model(attention):
        torch.manual_seed(0)
        return build_model(ModelConfig(vocab_size=VOCAB, max_length=12, num_classes=3, embed_dim=16, num_heads=2,
                                       qkv_dim=16, mlp_dim=16, num_layers=2, dropout=0.0, attention_dropout=0.0,
                                       pos_emb="rope", attention=attention)).eval()

    own, full = rope_model("_rope_own"), rope_model("full")
    full.load_state_dict(own.state_dict())
    tokens = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    plugins["_rope_own"].seen.clear()
    projected = projections(own, tokens)
    q_seen, _ = plugins["_rope_own"].seen[0]
    torch.testing.assert_close(q_seen, heads(projected[0].split(16, dim=-1)[0], 2))  # unrotated
    with torch.no_grad():
        torch.testing.assert_close(own(tokens), full(tokens), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(own(tokens), rope_model("_rope_twice")(tokens), atol=1e-3)  # what it would be


@pytest.mark.parametrize("attention", [n for n in BUILTIN if n != "aft"])
def test_every_mechanism_trains_with_rope_and_padding_reaches_nothing(attention):
    """An encoder (CLS pooling) with rope: finite gradients into every projection, and the real rows' output does not
    depend on what stands in the padded positions (they are rotated too, then zeroed by the contract)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB, max_length=20, num_classes=3, embed_dim=16, num_heads=2,
                                    qkv_dim=2 * HEAD_DIM, mlp_dim=16, num_layers=2, dropout=0.0, attention_dropout=0.0,
                                    pos_emb="rope", attention=attention,
                                    attention_params=dict(SMALL_PARAMS.get(attention, {})))).eval()
    tokens = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.arange(20)[None, :] < torch.tensor([[20], [13]])
    out = model(tokens, mask)
    out.square().sum().backward()
    for block in model.encoder.blocks:
        grad = block.attn.in_proj.weight.grad
        assert grad is not None and bool(grad.isfinite().all()) and bool(grad.abs().sum() > 0), attention
    with torch.no_grad():
        other = model(tokens.masked_fill(~mask, VOCAB - 1), mask)
    torch.testing.assert_close(other, out.detach(), atol=1e-5, rtol=1e-5)


def test_aft_refuses_rope_naming_the_mechanisms_that_take_it():
    assert get_attention_info("aft").rotary == "refused"
    with pytest.raises(ValueError, match=r"'pos_emb': rope cannot be used with attention 'aft': AFT has no query-key "
                                         r"product.*use pos_emb=sinusoidal or learned, or one of: bigbird, .*full"):
        lm_config("aft")
    build_model(lm_config("aft", pos_emb="sinusoidal"))  # the other positions stay


def test_every_mechanism_says_what_the_rotation_does_there():
    for name in BUILTIN:
        info = get_attention_info(name)
        assert info.rotary == ("refused" if name == "aft" else "rotated"), name
        assert "R_(j-i)" in info.rotary_note or name == "aft", name
    assert "query-key product" in get_attention_info("aft").rotary_note


# ------------------------------------------------------------------------------------------ decoding


ROTATED_CAUSAL = [n for n in causal_attentions() if get_attention_info(n).rotary != "refused"]


def lm_config(attention: str, **overrides) -> ModelConfig:
    """A causal language model at test sizes with rope, fp32, no dropout (tests/decoding_lm.py)."""
    return decoding_lm.lm_config(attention, **{"pos_emb": "rope", **overrides})


def lm(attention: str, **overrides):
    return decoding_lm.lm(attention, **{"pos_emb": "rope", **overrides})


@pytest.mark.parametrize("kv", [None, 1])
@pytest.mark.parametrize("attention", ROTATED_CAUSAL)
def test_prefill_then_steps_give_the_rope_models_causal_forward(attention, kv):
    """Right-padded prompts of 9, 4 and 0 real tokens, then teacher-forced steps to 24 tokens each: each step's
    token is rotated at its own sequence's position, so every logit equals the causal forward of the whole
    sequence; with num_kv_heads=1 as well (multi-query keys rotated like the queries)."""
    if kv is not None and get_attention_info(attention).grouped_kv == "refused":
        pytest.skip(f"{attention} takes no grouped keys")
    assert_prefill_then_steps_match_forward(lm(attention, num_kv_heads=kv))


@pytest.mark.parametrize("attention", ["full", "performer", "sliding_window"])
def test_generation_past_the_training_length_through_with_context(attention):
    """A rope model at max_length 16 refuses 46 tokens, naming its limit; with_context(config, 48) changes no
    weight (no position table) and generates them, token-identical to recomputing its causal forward, and equal to
    the short model on the positions both have."""
    short = lm(attention, max_length=16)
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"is 46 positions, more than the model's limit of 16 tokens \(rope has no "
                                         r"position table.*with_context"):
        short.generate(prompt, 40)
    config, changes = with_context(short.config, 48)
    assert changes[:2] == ["max_length 16 -> 48", "rope: no position table, q and k rotated at every position as "
                           "before; positions 16 and on were not seen in training"]
    long = build_model(config).eval()
    long.load_state_dict(short.state_dict())  # strict: every trained weight fits
    assert torch.equal(long.generate(prompt, 10), short.generate(prompt, 10))
    new = long.generate(prompt, 40)
    assert [new[b].tolist() for b in range(2)] == [recomputed(long, prompt[b].tolist(), 40) for b in range(2)]


def test_a_rope_model_without_max_seq_len_has_no_length_limit():
    """attention_params.max_seq_len=None (full needs none): nothing bounds a rope model, while the same model with
    a position table stays at its max_length."""
    model = lm("full", max_length=16, attention_params={"max_seq_len": None})
    assert model.config.context_limit is None
    prompt = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    assert model.generate(prompt, 60).tolist()[0] == recomputed(model, prompt[0].tolist(), 60)
    table = lm("full", max_length=16, attention_params={"max_seq_len": None}, pos_emb="sinusoidal")
    assert table.config.context_limit == 16
    with pytest.raises(ValueError, match="max_length=16"):
        table.generate(prompt, 60)
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's limit of 16 tokens"):
        lm("performer", max_length=16)(torch.ones(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------ arena-train


def test_a_rope_run_trains_records_it_and_decodes_past_its_length(tmp_path):
    """A 10-step smoke run of the MQAR decoder form with model.pos_emb=rope through arena-train's run: ok, recorded
    (record and file), and its trained model generates past the trained length at a longer context."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke/mqar", "task.params.form=decoder", "model.causal=true",
                                          "model.pos_emb=rope", "attention=full", "quiet=true",
                                          f"results_dir={tmp_path}/results", f"cache_dir={tmp_path}/cache"])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["model_config"]["pos_emb"] == "rope"
    on_disk = json.loads((Path(tmp_path) / "results" / "train" / f"{record['record_id']}.json").read_text())
    assert on_disk["model_config"]["pos_emb"] == "rope"
    loaded = load_trained_model(record, context=96)
    assert loaded.checkpoint is not None
    assert not any("does not fit" in c or "as initialised" in c for c in loaded.changes), loaded.changes
    assert any(c.startswith("rope: no position table") for c in loaded.changes)
    tokens = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    assert loaded.model.generate(tokens, 80).shape == (2, 80)


def test_rope_refusal_offers_only_mechanisms_of_the_models_pattern():
    from harness.model import ModelConfig

    base = dict(vocab_size=16, max_length=8, num_classes=16, attention="aft", pos_emb="rope", token_level=True)
    with pytest.raises(ValueError, match="one of: .*linformer"):
        ModelConfig(**base)
    with pytest.raises(ValueError, match="rope cannot be used with attention 'aft'") as err:
        ModelConfig(**base, causal=True)
    assert "linformer" not in str(err.value) and "clustered" not in str(err.value) and "full" in str(err.value)
