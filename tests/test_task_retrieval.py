"""Retrieval: byte-level AAN pairs through the real `datasets` csv loader on small files in the LRA TSV format."""

from __future__ import annotations

import os
import time

import pytest
from lra_replica import write_aan

from tasks import build_task

ROWS = {
    "train": [("1", "a1", "b1", 'He said "hi" (quoted)', "NA"),
              ("0.0", "a2", "b2", "short", "null and 'quotes'"),
              ("1.0", "a3", "b3", "é" * 20, "x" * 30)],
    "eval": [("0", "c1", "d1", "val doc", "other")],
    "test": [("1", "e1", "e2", "t1", "t2"), ("0", "e3", "e4", "", "u")],
}


def _write(tmp_path) -> str:
    for split, rows in ROWS.items():
        with open(tmp_path / f"new_aan_pairs.{split}.tsv", "w", encoding="utf-8") as f:
            for row in rows:
                f.write("\t".join(row) + "\n")
    return str(tmp_path)


def _expect(text: str, length: int) -> tuple[list[int], int]:
    raw = list(text.encode("utf-8")[:length])
    return [x + 1 for x in raw] + [0] * (length - len(raw)), len(raw)


def test_pairs_tokens_masks_labels(tmp_path):
    task = build_task("retrieval", cache_dir=str(tmp_path / "c"), data_dir=_write(tmp_path), max_length=24)
    assert task.two_sequence and task.vocab_size == 257 and task.num_classes == 2
    for split, key in (("train", "train"), ("validation", "eval"), ("test", "test")):
        assert task.num_examples(split) == len(ROWS[key])
        b = next(task.batches(split, 8))
        assert set(b) == {"tokens", "mask", "tokens2", "mask2", "labels"}
        assert b["tokens"].shape == b["tokens2"].shape == (len(ROWS[key]), 24)
        assert b["labels"].tolist() == [int(float(r[0])) for r in ROWS[key]]
        for i, row in enumerate(ROWS[key]):
            for tok, mask, text in ((b["tokens"], b["mask"], row[3]), (b["tokens2"], b["mask2"], row[4])):
                ids, n = _expect(text, 24)
                assert tok[i].tolist() == ids  # raw text: quotes kept, "NA"/"null" not turned into missing values
                assert int(mask[i].sum()) == n and mask[i, :n].all()


def test_default_max_length_is_lra(tmp_path):
    task = build_task("retrieval", cache_dir=str(tmp_path / "c"), data_dir=_write(tmp_path))
    assert task.max_length == 4000
    assert next(task.batches("train", 3))["tokens"].shape == (3, 4000)


def test_subset_sizes(tmp_path):
    task = build_task("retrieval", cache_dir=str(tmp_path / "c"), data_dir=_write(tmp_path), max_length=8,
                      num_train=2, num_test=1)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [2, 1, 1]


def test_without_data_dir_fails_fast_naming_it(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="data_dir.*new_aan_pairs.train.tsv"):
        build_task("retrieval", cache_dir=str(tmp_path)).prepare()
    assert time.perf_counter() - start < 5


def test_missing_file_and_bad_label(tmp_path):
    data_dir = _write(tmp_path)
    os.remove(os.path.join(data_dir, "new_aan_pairs.eval.tsv"))
    with pytest.raises(ValueError, match="data_dir.*new_aan_pairs.eval.tsv"):
        build_task("retrieval", cache_dir=str(tmp_path / "c"), data_dir=data_dir).prepare()
    with open(os.path.join(data_dir, "new_aan_pairs.eval.tsv"), "w") as f:
        f.write("2\ta\tb\tx\ty\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        build_task("retrieval", cache_dir=str(tmp_path / "c"), data_dir=data_dir).prepare()


def test_release_rows_with_quotes_and_bytes_reprs_read_verbatim(tmp_path):
    # LRA reads the TSV with use_quote_delim=False: quotes and b'...' wrappers are part of the text's bytes.
    written = write_aan(str(tmp_path / "lra_release" / "tsv_data"), sizes=(6, 2, 2))
    task = build_task("retrieval", cache_dir=str(tmp_path / "c"), data_root=str(tmp_path / "lra_release"),
                      max_length=64)
    assert task.config.data_dir == str(tmp_path / "lra_release" / "tsv_data")
    for split, key in (("train", "train"), ("validation", "eval"), ("test", "test")):
        b = next(task.batches(split, 10))
        assert b["labels"].tolist() == [int(float(r[0])) for r in written[key]]
        for i, row in enumerate(written[key]):
            for tok, mask, text in (("tokens", "mask", row[3]), ("tokens2", "mask2", row[4])):
                got = bytes((b[tok][i][b[mask][i]] - 1).tolist()).decode("utf-8")
                assert got == text[:64]
    assert any(r[3].startswith("b'") for r in written["train"]) and any('"' in r[3] for r in written["train"])
