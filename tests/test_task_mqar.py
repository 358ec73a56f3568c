"""MQAR: every label against an independent decoding of its sequence, the layout, the gap law, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks import IGNORE_INDEX, build_task
from tasks.mqar import gap_log_weights, generate_mqar, sample_without_replacement

CASES = [  # (vocab_size, seq_len, num_kv_pairs, power_a)
    (16, 16, 4, 0.01),
    (64, 33, 8, 0.01),
    (128, 64, 8, 1.0),
    (10, 12, 3, 0.5),
]


def decode(tokens: np.ndarray, vocab_size: int, k: int, decoder: bool) -> np.ndarray:
    """The labels a reader of the sequence alone would write, with plain Python: the first 2k tokens are
    key-value pairs; a later occurrence of a key is a query, answered with its pair's value."""
    half = vocab_size // 2
    pairs: dict[int, int] = {}
    for i in range(0, 2 * k, 2):
        key, value = int(tokens[i]), int(tokens[i + 1])
        assert 1 <= key < half and half <= value < vocab_size
        assert key not in pairs and value not in pairs.values()
        pairs[key] = value
    labels = [IGNORE_INDEX] * len(tokens)
    for t in range(2 * k, len(tokens)):
        tok = int(tokens[t])
        assert tok != 0  # no padding inside a sequence
        if tok in pairs:
            labels[t] = pairs[tok]
            if decoder:  # next-token form: the answer is the next input token
                assert int(tokens[t + 1]) == pairs[tok]
    return np.array(labels)


@pytest.mark.parametrize("form", ["encoder", "decoder"])
@pytest.mark.parametrize("vocab_size,seq_len,k,power_a", CASES)
def test_every_label_matches_an_independent_decoding(form, vocab_size, seq_len, k, power_a):
    data = generate_mqar({"train": 300, "test": 100}, 3, vocab_size, seq_len, k, power_a, form == "decoder")
    for split in data.values():
        tokens, labels = split["tokens"], split["labels"]
        assert tokens.shape == labels.shape == (len(tokens), seq_len)
        for row_tokens, row_labels in zip(tokens, labels):
            np.testing.assert_array_equal(row_labels, decode(row_tokens, vocab_size, k, form == "decoder"))
            # Every key is queried exactly once, on an even offset of the query region.
            positions = np.flatnonzero(row_labels != IGNORE_INDEX)
            assert len(positions) == k and ((positions - 2 * k) % 2 == 0).all()
            assert positions.min() >= 2 * k


def test_the_two_forms_differ_only_after_each_query():
    args = ({"train": 50}, 0, 32, 24, 4, 0.01)
    enc, dec = generate_mqar(*args, False)["train"], generate_mqar(*args, True)["train"]
    np.testing.assert_array_equal(enc["labels"], dec["labels"])
    after = np.zeros_like(enc["labels"], dtype=bool)
    after[:, 1:] = enc["labels"][:, :-1] != IGNORE_INDEX
    np.testing.assert_array_equal(enc["tokens"][~after], dec["tokens"][~after])
    np.testing.assert_array_equal(dec["tokens"][after], enc["labels"][np.roll(after, -1, axis=1)])


def test_generation_is_deterministic_and_seeded():
    args = (64, 32, 4, 0.01, False)
    a = generate_mqar({"train": 1500, "test": 200}, 7, *args)
    b = generate_mqar({"train": 1500, "test": 200}, 7, *args)
    c = generate_mqar({"train": 1500, "test": 200}, 8, *args)
    for split in a:
        for key in ("tokens", "labels"):
            np.testing.assert_array_equal(a[split][key], b[split][key])
    assert not np.array_equal(a["train"]["tokens"], c["train"]["tokens"])
    # A smaller request is a prefix of a larger one (fixed chunks).
    small = generate_mqar({"train": 700, "test": 200}, 7, *args)
    np.testing.assert_array_equal(small["train"]["tokens"], a["train"]["tokens"][:700])


def test_no_sequence_repeats_within_or_across_splits():
    # A tiny space (2 pairs, 4 slots, 3 values) where repeats are common: they are dropped and replaced.
    data = generate_mqar({"train": 200, "validation": 50, "test": 50}, 0, 8, 8, 2, 1.0, False)
    rows = [r.tobytes() for s in data.values() for r in s["tokens"]]
    assert len(rows) == len(set(rows)) == 300


def test_gumbel_top_k_is_successive_weighted_draws_without_replacement():
    """Against the exact probabilities of k successive draws without replacement (Plackett-Luce)."""
    weights = np.array([0.5, 0.25, 0.15, 0.1])
    k, rows = 2, 200_000
    drawn = sample_without_replacement(np.random.default_rng(0), np.log(weights), rows, k)
    assert (drawn[:, 0] != drawn[:, 1]).all()
    counts = {}
    for pair, n in zip(*np.unique(drawn, axis=0, return_counts=True)):
        counts[tuple(pair)] = n / rows
    for a, b in itertools.permutations(range(4), 2):
        exact = weights[a] * weights[b] / (1 - weights[a])
        assert abs(counts.get((a, b), 0.0) - exact) < 0.005, (a, b)


def test_gap_law_follows_zoology():
    """power_a = 0.01 puts the first query slot far ahead of uniform; power_a = 1 is uniform."""
    logw = gap_log_weights(10, 0.01)
    p = np.exp(logw) / np.exp(logw).sum()
    expected = 0.01 * np.arange(1, 11) ** (0.01 - 1)
    np.testing.assert_allclose(p, expected / expected.sum())
    np.testing.assert_allclose(np.exp(gap_log_weights(10, 1.0)), np.ones(10))
    # The first drawn slot, empirically, for the law and for the uniform case.
    first = sample_without_replacement(np.random.default_rng(1), logw, 50_000, 3)[:, 0]
    np.testing.assert_allclose(np.bincount(first, minlength=10) / 50_000, p, atol=0.01)


def test_filler_never_holds_a_key_of_its_sequence():
    data = generate_mqar({"train": 500}, 2, 12, 40, 4, 1.0, False)["train"]
    for tokens, labels in zip(data["tokens"], data["labels"]):
        keys = set(tokens[0:8:2].tolist())
        filler = [int(t) for i, t in enumerate(tokens) if i >= 8 and labels[i] == IGNORE_INDEX]
        assert not keys & set(filler)
    # ... but it covers every other token of the vocabulary.
    assert set(np.unique(data["tokens"])) == set(range(1, 12))


def test_task_interface(tmp_path):
    task = build_task("mqar", cache_dir=str(tmp_path), vocab_size=32, seq_len=24, num_kv_pairs=4,
                      num_train=64, num_val=16, num_test=16)
    assert task.token_level and not task.requires_causal
    assert task.num_classes == task.vocab_size == 32 and task.max_length == 24
    batch = next(task.batches("train", 8, shuffle=True))
    assert batch["tokens"].shape == batch["labels"].shape == batch["mask"].shape == (8, 24)
    assert batch["mask"].all() and int((batch["labels"] != IGNORE_INDEX).sum()) == 8 * 4
    assert task.labels("test").shape == (16, 24)
    decoder = build_task("mqar", cache_dir=str(tmp_path), form="decoder", vocab_size=32, seq_len=24,
                         num_kv_pairs=4, num_train=64, num_val=16, num_test=16)
    assert decoder.requires_causal
    # Cached: a second build of the same parameters reads the same arrays.
    again = build_task("mqar", cache_dir=str(tmp_path), vocab_size=32, seq_len=24, num_kv_pairs=4,
                       num_train=64, num_val=16, num_test=16)
    np.testing.assert_array_equal(again.labels("train"), task.labels("train"))


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(seq_len=15, num_kv_pairs=4), "seq_len.*>= 4 \\* num_kv_pairs = 16"),
        (dict(vocab_size=8, num_kv_pairs=4), "vocab_size.*at least num_kv_pairs=4 keys"),
        (dict(power_a=0.0), "power_a.*\\(0, 1\\]"),
        (dict(form="lm"), "form.*encoder, decoder"),
        (dict(num_kv_pairs=0), "num_kv_pairs.*>= 1"),
    ],
)
def test_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        build_task("mqar", **params)
