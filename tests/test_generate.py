"""Language-model decoding through the backbone (issue 24): ``ArenaModel.init_states / prefill / step / generate``
against the model's own causal forward, state bytes summed over layers, the errors; and the trained model of a
record (``harness.generate.load_trained_model``) at its own and at a longer context (``with_context``).

Every causal mechanism, whatever its decoding form (recompute or its own step form), must give the tokens and
logits of re-running the whole causal forward: the comparison is with the model's own forward, never a copy.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from attentions import causal_attentions, get_attention_info, state_bytes
from harness.checkpoint import load_checkpoint, save_checkpoint
from harness.generate import best_checkpoint, load_trained_model, with_context
from harness.model import ModelConfig, build_model, decode_capacity_bytes, decode_state_bytes
from harness.train import CONF_DIR, run

from decoding_lm import MAX_LENGTH, VOCAB, assert_prefill_then_steps_match_forward, lm, lm_config, recomputed

PROMPTS = [11, 5, 1]  # right-padded to 11: each sequence continues from its own end
NEW = 14  # prompt + new crosses every test-size window, block and chunk edge (4 to 8) at least once
FORMS = [(False, "learned"), (True, "learned"), (False, "sinusoidal"), (True, "sinusoidal")]  # (token_shift, pos)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def prompts(lengths=PROMPTS, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask, VOCAB - 1), mask  # padding holds a real token id: it must not matter


@pytest.mark.parametrize("token_shift,pos_emb", FORMS)
@pytest.mark.parametrize("attention", causal_attentions())
def test_generate_equals_recomputing_the_causal_forward(attention, token_shift, pos_emb):
    model = lm(attention, token_shift, pos_emb)
    tokens, mask = prompts()
    new = model.generate(tokens, NEW, mask)
    assert new.shape == (len(PROMPTS), NEW) and new.dtype == torch.long
    for b, n in enumerate(PROMPTS):
        assert new[b].tolist() == recomputed(model, tokens[b, :n].tolist(), NEW), f"sequence {b} (prompt {n})"
    assert len(set(new.flatten().tolist())) > 2  # the comparison is not between two runs of one repeated token


@pytest.mark.parametrize("token_shift,pos_emb", FORMS)
@pytest.mark.parametrize("attention", causal_attentions())
def test_prefill_then_steps_give_the_causal_forwards_logits(attention, token_shift, pos_emb):
    """Right-padded prompts of 9, 4 and 0 real tokens, then teacher-forced steps to 24 tokens each: the logits at
    every real position equal the causal forward of the whole sequence (the empty prompt starts at position 0,
    with no previous token for token_shift)."""
    assert_prefill_then_steps_match_forward(lm(attention, token_shift, pos_emb))


@pytest.mark.parametrize("attention", causal_attentions())
def test_state_bytes_are_every_layers_sum_and_grow_as_the_info_says(attention):
    model = lm(attention)
    states = model.init_states(2, 32)
    model.prefill(torch.randint(1, VOCAB, (2, 3)), None, states)
    sizes = []
    for _ in range(20):
        model.step(torch.randint(1, VOCAB, (2,)), states)
        total = decode_state_bytes(states)
        assert total == sum(state_bytes(layer) for layer in states.layers) > 0
        assert total <= decode_capacity_bytes(states) == sum(layer.capacity_bytes() for layer in states.layers)
        sizes.append(total)
    growth = get_attention_info(attention).state_growth
    if growth == "constant":
        assert len(set(sizes)) == 1, sizes
    elif growth == "linear":
        assert sizes[-1] > sizes[0], sizes
    else:
        assert sizes[-1] == sizes[-2], sizes  # windows of 8 or less: full long before context 23


def test_state_bytes_count_the_batch_and_each_sequences_own_length():
    """A KV-like state holds what each sequence's own context fills: batch of 1 + batch of 1 = batch of 2."""
    model = lm("full")
    sizes = []
    for lengths in ([7], [3], [7, 3]):
        states = model.init_states(len(lengths), 16)
        mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
        model.prefill(torch.randint(1, VOCAB, (len(lengths), 7)), mask, states)
        sizes.append(decode_state_bytes(states))
    assert sizes[2] == sizes[0] + sizes[1] and sizes[0] > sizes[1]


def test_generate_restores_the_training_mode_and_takes_no_new_tokens():
    model = lm("performer").train()
    tokens, mask = prompts()
    assert model.generate(tokens, 0, mask).shape == (3, 0)
    out = model.generate(tokens, 3, mask)
    assert model.training and out.shape == (3, 3)


def test_the_head_is_a_next_token_head_only_for_causal_token_level_models_over_the_vocabulary():
    assert lm("full").is_language_model
    tokens = torch.randint(1, VOCAB, (2, 5))
    not_lm = {
        "bidirectional": lm_config("full", causal=False),
        "sequence classifier": lm_config("full", token_level=False, pooling="last", num_classes=3),
        "num_classes != vocab_size": lm_config("full", num_classes=5),
    }
    for why, config in not_lm.items():
        model = build_model(config).eval()
        assert not model.is_language_model, why
        with pytest.raises(ValueError, match="generate needs a language model"):
            model.generate(tokens, 2)
    for config in (not_lm["bidirectional"], not_lm["sequence classifier"]):
        with pytest.raises(ValueError, match="causal token-level model"):
            build_model(config).eval().init_states(2, 8)


def test_decoding_errors_name_the_limit():
    model = lm("full")
    tokens, mask = prompts()  # longest 11
    with pytest.raises(ValueError, match=r"11 real tokens\) plus max_new_tokens=30 is 41 .* max_length=40"):
        model.generate(tokens, MAX_LENGTH - 10, mask)
    model.generate(tokens, MAX_LENGTH - 11, mask)  # exactly max_length: allowed
    with pytest.raises(ValueError, match="max_length=40"):
        model.init_states(1, MAX_LENGTH + 1)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(tokens, -1, mask)
    with pytest.raises(ValueError, match="at least one real prompt token"):
        model.generate(tokens, 2, mask & torch.tensor([[True], [True], [False]]))
    with pytest.raises(ValueError, match="right-padded"):
        model.prefill(tokens, ~mask, model.init_states(3, 20))
    states = model.init_states(3, 12)
    model.prefill(tokens, mask, states)
    with pytest.raises(ValueError, match="needs empty states"):
        model.prefill(tokens, mask, states)
    model.step(torch.ones(3, dtype=torch.long), states)  # sequence 0 reaches 12
    with pytest.raises(ValueError, match="the states are full.*max_len=12"):
        model.step(torch.ones(3, dtype=torch.long), states)
    with pytest.raises(ValueError, match=r"step's tokens must be \(batch,\)"):
        model.step(torch.ones(2, dtype=torch.long), model.init_states(3, 12))
    with pytest.raises(ValueError, match="model.eval"):
        model.train().prefill(tokens, mask, model.init_states(3, 20))


# ------------------------------------------------------------------------------ trained models, longer contexts


@pytest.fixture(scope="module")
def trained_record(tmp_path_factory):
    """A 10-step smoke run of the MQAR decoder form (causal, learned positions, token_shift) with checkpoints."""
    root = tmp_path_factory.mktemp("decoder_run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke/mqar", "task.params.form=decoder", "model.causal=true",
                                          "attention=performer", "quiet=true", f"results_dir={root}/results",
                                          f"cache_dir={root}/cache"])
    try:
        record = run(cfg)
    finally:
        torch.set_num_threads(before)  # module-scoped: the rest of the session keeps its own thread count
    assert record["status"] == "ok", record.get("error")
    return record, root


def test_a_trained_record_loads_with_its_best_weights(trained_record):
    record, root = trained_record
    loaded = load_trained_model(record)
    assert loaded.checkpoint == best_checkpoint(record) and loaded.checkpoint is not None
    assert loaded.changes == [] and not loaded.model.training and loaded.model.is_language_model
    best = load_checkpoint(loaded.checkpoint)["model"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, best[key]), key
    # From the record file, and from a load_records row (which names its file), the same model
    path = root / "results" / "train" / f"{record['record_id']}.json"
    for source in (path, {"_path": str(path), "record_id": record["record_id"]}):
        again = load_trained_model(source)
        assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), best.values()))
    # The trained model generates through its states as its own forward does
    tokens = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    new = loaded.model.generate(tokens, 5)
    assert [new[b].tolist() for b in range(2)] == [recomputed(loaded.model, tokens[b].tolist(), 5) for b in range(2)]


def test_a_moved_store_finds_its_checkpoint_and_a_missing_one_is_said(trained_record, tmp_path):
    record, root = trained_record
    moved = {**record, "checkpoint_dir": str(tmp_path / "gone")}
    assert load_trained_model(moved, results_dir=root / "results").checkpoint == best_checkpoint(record)
    lost = load_trained_model(moved)
    assert lost.checkpoint is None and "no checkpoint found" in lost.changes[-1]
    torch.manual_seed(record["seed"])
    fresh = build_model(record["model_config"])  # the run's initialisation, as arena-train draws it
    assert all(torch.equal(a, b) for a, b in zip(lost.model.state_dict().values(), fresh.state_dict().values()))


def test_a_record_whose_mechanism_now_builds_differently_is_refused(trained_record):
    record, _ = trained_record
    changed = json.loads(json.dumps(record))
    changed["attention_config"]["num_features"] += 1
    with pytest.raises(ValueError, match="num_features recorded 17, now 16"):
        load_trained_model(changed)
    with pytest.raises(ValueError, match="no model_config"):
        load_trained_model({"record_id": "x", "status": "error"})


def test_a_trained_model_at_a_longer_context_keeps_its_weights_and_lists_the_changes(trained_record):
    record, _ = trained_record
    trained = load_trained_model(record)
    longer = load_trained_model(record, context=256)
    assert longer.config.max_length == 256 and longer.model.encoder.pos_emb.shape == (256, 16)
    assert longer.changes[0] == "max_length 24 -> 256"
    assert any(c.startswith("learned position table 24 -> 256 rows") for c in longer.changes)
    assert "layer 0: performer max_seq_len 24 -> 256" in longer.changes
    assert "encoder.pos_emb: trained rows 0..23 loaded, the others as initialised" in longer.changes
    short, long = trained.model.state_dict(), longer.model.state_dict()
    for key, value in short.items():
        assert torch.equal(long[key][: value.shape[0]] if value.dim() else long[key], value), key
    # On the positions it was trained on, it is the trained model
    tokens = torch.randint(1, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(longer.model.generate(tokens, 10), trained.model.generate(tokens, 10))
    assert longer.model.generate(tokens, 200).shape == (2, 200)


def test_with_context_changes_only_the_length_and_what_derives_from_it():
    config = lm_config("reformer", pos_emb="sinusoidal", attention_params={"bucket_size": 4, "n_hashes": 2})
    same, none = with_context(config, MAX_LENGTH)
    assert same == config and none == []
    longer, changes = with_context(config, 4096)
    assert longer == ModelConfig(**{**config.to_dict(), "max_length": 4096})
    assert changes == [
        "max_length 40 -> 4096",
        "sinusoidal position table 40 -> 4096 rows (the same values at the positions both have)",
        "layers 0, 1: reformer max_seq_len 40 -> 4096",
        "layers 0, 1: reformer num_buckets 10 -> 1024 (derived from max_seq_len)",
        "layers 0, 1: reformer buffer rotations (2, 2, 8, 5) -> (2, 2, 8, 512): drawn anew for the new length "
        "(same seed)",
    ]
    bigbird, changes = with_context(lm_config("bigbird").to_dict(), 64)
    assert "layers 0, 1: bigbird buffer random_blocks (10, 2) -> (16, 2): drawn anew for the new length " \
           "(same seed)" in changes
    explicit, changes = with_context(lm_config("full", attention_params={"max_seq_len": 40}), 100)
    assert explicit.attention_params["max_seq_len"] == 100 and "attention_params.max_seq_len 40 -> 100" in changes
    with pytest.raises(ValueError, match="context must be an int >= 1"):
        with_context(config, 0)
    with pytest.raises(ValueError, match="unknown to this version"):
        with_context({**config.to_dict(), "rotary": True}, 64)


def test_trained_weights_that_no_longer_fit_are_said(trained_record, tmp_path):
    """A length-sized parameter (aft's full-mode position biases) cannot be loaded at another length: it is left as
    initialised and named."""
    record, _ = trained_record
    config = {**record["model_config"], "attention": "aft", "attention_params": {"mode": "full"}}
    torch.manual_seed(0)
    model = build_model(config)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "ckpt" / "best.pt")
    fake = {"record_id": "aft-full", "model_config": config, "checkpoint_dir": str(tmp_path / "ckpt")}
    longer = load_trained_model(fake, context=48)
    assert "layer 0: aft parameter pos_bias (24, 24) -> (48, 48): initialised anew (the trained values do not " \
           "fit)" in longer.changes
    assert any(c.startswith("encoder.blocks.0.attn.attention.pos_bias: trained (24, 24) does not fit (48, 48)")
               for c in longer.changes)
