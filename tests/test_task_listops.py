"""ListOps: labels against an independent evaluator, bounds, vocabulary, LRA TSV round trip, determinism,
deduplication, and the sampling distribution against a plain port of LRA's recursive generator."""

from __future__ import annotations

import csv
import random
import statistics

import numpy as np
import pytest
from lra_replica import write_listops

from tasks import build_task
from tasks.listops import VOCAB, generate_listops, read_lra_tsv, to_lra_string, tokenize_lra_string, write_lra_tsv

SMALL = dict(num_train=400, num_val=60, num_test=60, min_length=30, max_length=300, num_workers=1)


def evaluate(tokens: list[str]) -> int:
    """Value of a parenthesis-free LRA token sequence, with an explicit stack (independent of the generator)."""
    stack: list[list] = []
    result = None
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok, []])
            continue
        if tok == "]":
            op, args = stack.pop()
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[MED":
                value = int(statistics.median(args))
            elif op == "[SM":
                value = sum(args) % 10
            else:
                raise AssertionError(op)
        else:
            value = int(tok)
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "more than one top-level expression"
            result = value
    assert not stack and result is not None
    return result


def lra_recursive_lengths(n: int, rng: random.Random, min_len: int, max_len: int) -> list[int]:
    """Token lengths of accepted trees from a direct port of LRA's depth-first generate_tree (max_depth=10)."""

    def gen(depth: int) -> int:
        r = rng.random() if depth < 10 else 1
        if r > 0.25:
            rng.choice(range(10))
            return 1
        k = rng.randint(2, 10)
        length = 2 + sum(gen(depth + 1) for _ in range(k))
        rng.choice(range(4))
        return length

    out = []
    while len(out) < n:
        length = gen(1)
        if min_len < length < max_len:
            out.append(length)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = build_task("listops", cache_dir=str(tmp_path_factory.mktemp("cache")), seed=3, **SMALL)
    t.prepare()
    return t


def test_vocabulary_is_lra(task):
    assert VOCAB == ("<pad>", "[MIN", "[MAX", "[MED", "[SM", *map(str, range(10)), "]")
    assert task.vocab_size == 16 and task.num_classes == 10 and task.pad_id == 0 and not task.two_sequence
    used = set()
    for split in ("train", "validation", "test"):
        for b in task.batches(split, 128):
            used |= set(b["tokens"][b["mask"]].unique().tolist())
            assert (b["tokens"][~b["mask"]] == 0).all()
    assert used == set(range(1, 16))  # every real token is a vocabulary entry, none is padding


def test_labels_equal_independent_evaluation_and_lengths_in_bounds(task):
    for split in ("train", "validation", "test"):
        n = 0
        for b in task.batches(split, 64):
            for row, mask, label in zip(b["tokens"], b["mask"], b["labels"]):
                length = int(mask.sum())
                assert SMALL["min_length"] < length < SMALL["max_length"]
                assert mask[:length].all() and not mask[length:].any()  # real tokens first, then padding
                assert evaluate([VOCAB[t] for t in row[:length].tolist()]) == int(label)
                n += 1
        assert n == task.num_examples(split)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [400, 60, 60]
    # All ten classes occur and the labels array matches the batches.
    assert set(task.labels("train").tolist()) == set(range(10))


def test_deduplicated_across_splits(task):
    seqs = set()
    total = 0
    for split in ("train", "validation", "test"):
        for b in task.batches(split, 256):
            for row, mask in zip(b["tokens"], b["mask"]):
                seqs.add(tuple(row[mask].tolist()))
                total += 1
    assert len(seqs) == total


def test_dedup_drops_repeats():
    # Tiny trees (lengths 4..5) repeat a lot: the generator must still return distinct ones.
    tokens, lengths, labels = generate_listops(300, seed=0, min_length=3, max_length=6, num_workers=1)
    rows = {tuple(r[:n]) for r, n in zip(tokens.tolist(), lengths)}
    assert len(rows) == 300 and set(lengths.tolist()) <= {4, 5}


def test_deterministic_per_seed_and_independent_of_workers():
    a = generate_listops(1200, seed=5, min_length=30, max_length=300, num_workers=1)
    b = generate_listops(1200, seed=5, min_length=30, max_length=300, num_workers=2)
    c = generate_listops(1200, seed=6, min_length=30, max_length=300, num_workers=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_tsv_round_trip_and_lra_string_format(task, tmp_path):
    assert to_lra_string(tokenize_lra_string("( ( ( [MAX 2 ) 9 ) ] )")) == "( ( ( [MAX 2 ) 9 ) ] )"
    assert tokenize_lra_string("( ( [SM 1 ) X )").tolist() == [4, 6, 15]  # LRA's renamed "]" is accepted
    task.write_tsv(str(tmp_path))
    with open(tmp_path / "basic_train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["Source", "Target"] and rows[1][0].startswith("( ")
    again = build_task("listops", cache_dir=str(tmp_path / "c2"), data_dir=str(tmp_path), min_length=30, max_length=300)
    for split in ("train", "validation", "test"):
        x, y = task._split(split), again._split(split)
        for key in ("tokens", "lengths", "labels"):
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


def test_tsv_reader_truncates_like_lra(tmp_path):
    tokens, lengths, labels = generate_listops(5, seed=1, min_length=30, max_length=100, num_workers=1)
    write_lra_tsv(str(tmp_path / "x.tsv"), tokens, lengths, labels)
    t, n, y = read_lra_tsv(str(tmp_path / "x.tsv"), max_length=20)
    assert t.shape == (5, 20) and (n == 20).all()
    np.testing.assert_array_equal(t, tokens[:, :20])
    np.testing.assert_array_equal(y, labels)


def test_same_length_distribution_as_lra_recursive_generator():
    n = 1500
    ours = generate_listops(n, seed=11, min_length=20, max_length=400, num_workers=1)[1].astype(float)
    ref = np.array(lra_recursive_lengths(n, random.Random(11), 20, 400), dtype=float)
    # Two-sample Kolmogorov-Smirnov statistic; critical value at alpha=0.001 is 1.95*sqrt(2/n) = 0.071.
    grid = np.union1d(ours, ref)
    ks = np.abs(np.searchsorted(np.sort(ours), grid, "right") / n - np.searchsorted(np.sort(ref), grid, "right") / n)
    assert ks.max() < 0.071, ks.max()


def test_bad_parameters_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="min_length"):
        build_task("listops", min_length=2000, max_length=2000)
    with pytest.raises(ValueError, match="data_dir"):
        build_task("listops", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_train"):
        build_task("listops", num_train="many")


def test_release_tsv_with_crlf_through_data_root(tmp_path):
    written = write_listops(str(tmp_path / "lra_release" / "listops-1000"), sizes=(6, 3, 3), max_length=40)
    assert b"\r\n" in (tmp_path / "lra_release" / "listops-1000" / "basic_train.tsv").read_bytes()  # csv.writer's
    # Only max_length applies when reading files: the generation knobs are not validated (max_length=100 alone used
    # to fail on min_length=500).
    task = build_task("listops", cache_dir=str(tmp_path / "c"), data_root=str(tmp_path / "lra_release"),
                      max_length=100)
    assert task.config.data_dir == str(tmp_path / "lra_release" / "listops-1000")
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        b = next(task.batches(split, 10))
        assert b["labels"].tolist() == [y for _, y in written[key]]
        for row, mask, (source, _) in zip(b["tokens"], b["mask"], written[key]):
            assert row[mask].tolist() == tokenize_lra_string(source).tolist()
            assert to_lra_string(row[mask].numpy()) == source  # nothing of the CRLF line end is left in a token
    with pytest.raises(ValueError, match="listops-1000.*basic_train.tsv"):
        build_task("listops", data_root=str(tmp_path))
