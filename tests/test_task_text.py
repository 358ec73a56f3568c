"""Text: byte-level IMDb through the real `datasets` loaders on small local files in the official layouts."""

from __future__ import annotations

import os
import time

import datasets
import numpy as np
import pytest

from tasks import build_task

REVIEWS = ["A fine film.", "Terrible; I left. ", "Ünïcödé — naïve café 😀 " * 3, "x" * 50, "", "ok"]
LABELS = [1, 0, 1, 0, 0, 1]


def _write(tmp_path, layout: str) -> str:
    root = tmp_path / layout
    train = datasets.Dataset.from_dict({"text": REVIEWS, "label": LABELS})
    test = datasets.Dataset.from_dict({"text": REVIEWS[::-1], "label": LABELS[::-1]})
    if layout == "hub_parquet":  # the hub's layout, including the ignored unsupervised split
        os.makedirs(root / "plain_text")
        train.to_parquet(str(root / "plain_text" / "train-00000-of-00001.parquet"))
        test.to_parquet(str(root / "plain_text" / "test-00000-of-00001.parquet"))
        train.to_parquet(str(root / "plain_text" / "unsupervised-00000-of-00001.parquet"))
    elif layout == "csv":
        os.makedirs(root)
        train.to_csv(str(root / "train.csv"), index=False)
        test.to_csv(str(root / "test.csv"), index=False)
    else:
        os.makedirs(root)
        train.to_json(str(root / "train.jsonl"))
        test.to_json(str(root / "test.jsonl"))
    return str(root)


@pytest.mark.parametrize("layout", ["hub_parquet", "csv", "jsonl"])
def test_local_files_give_bytes_shifted_by_one(tmp_path, layout):
    task = build_task("text", cache_dir=str(tmp_path / "cache"), data_dir=_write(tmp_path, layout), max_length=40)
    assert task.vocab_size == 257 and task.max_length == 40
    b = next(task.batches("train", 6))
    assert b["tokens"].shape == (6, 40)
    for row, mask, text in zip(b["tokens"], b["mask"], REVIEWS):
        raw = list(text.encode("utf-8")[:40])
        assert int(mask.sum()) == len(raw) and mask[: len(raw)].all()
        assert row[: len(raw)].tolist() == [x + 1 for x in raw]
        assert (row[len(raw):] == 0).all()
    assert b["labels"].tolist() == LABELS
    # LRA: the test set doubles as validation.
    assert task.num_examples("validation") == task.num_examples("test") == 6
    assert task.labels("validation").tolist() == LABELS[::-1]
    assert next(task.batches("test", 6))["labels"].tolist() == LABELS[::-1]


def test_subset_is_seeded(tmp_path):
    data_dir = _write(tmp_path, "csv")
    kw = dict(data_dir=data_dir, max_length=8, num_train=3)
    a = build_task("text", cache_dir=str(tmp_path / "c"), **kw)
    a2 = build_task("text", cache_dir=str(tmp_path / "c2"), **kw)
    assert a.num_examples("train") == 3 and a.num_examples("test") == 6
    rows = lambda t, seed=0: next(t.batches("train", 3))["tokens"].tolist()  # noqa: E731
    assert rows(a) == rows(a2)  # same seed, same subset
    full = [[x + 1 for x in r.encode()[:8]] + [0] * (8 - len(r.encode()[:8])) for r in REVIEWS]
    assert all(r in full for r in rows(a))
    others = {tuple(map(tuple, rows(build_task("text", cache_dir=str(tmp_path / f"s{s}"), seed=s, **kw))))
              for s in range(6)}
    assert len(others) > 1  # the subset depends on the seed


def test_source_file_change_invalidates_cache(tmp_path):
    data_dir = _write(tmp_path, "csv")
    kw = dict(cache_dir=str(tmp_path / "c"), data_dir=data_dir, max_length=8)
    assert build_task("text", **kw).labels("train").tolist() == LABELS
    datasets.Dataset.from_dict({"text": ["new"], "label": [0]}).to_csv(os.path.join(data_dir, "train.csv"), index=False)
    assert build_task("text", **kw).labels("train").tolist() == [0]


def test_no_data_dir_offline_fails_fast_naming_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as without network: the hub check must not wait
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="data_dir") as err:
        build_task("text", cache_dir=str(tmp_path), hub_name="no-such/imdb-copy").prepare()
    assert time.perf_counter() - start < 10
    assert "train" in str(err.value) and "test" in str(err.value)


def test_no_data_dir_without_network_fails_fast(tmp_path):
    # Tests run without network: the real reachability check must answer within seconds.
    start = time.perf_counter()
    with pytest.raises(ValueError, match="data_dir"):
        build_task("text", cache_dir=str(tmp_path), hub_name="no-such/imdb-copy").prepare()
    assert time.perf_counter() - start < 10


def test_missing_split_files_name_data_dir(tmp_path):
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / "train.csv").write_text("text,label\nhi,1\n")
    with pytest.raises(ValueError, match="data_dir.*test"):
        build_task("text", cache_dir=str(tmp_path), data_dir=str(tmp_path / "d")).prepare()


def test_bad_labels_rejected(tmp_path):
    os.makedirs(tmp_path / "d")
    for split in ("train", "test"):
        (tmp_path / "d" / f"{split}.csv").write_text("text,label\nhi,3\n")
    with pytest.raises(ValueError, match="labels must be 0/1"):
        build_task("text", cache_dir=str(tmp_path), data_dir=str(tmp_path / "d")).prepare()


def test_stored_compactly(tmp_path):
    task = build_task("text", cache_dir=str(tmp_path / "c"), data_dir=_write(tmp_path, "csv"), max_length=16)
    task.prepare()
    assert task._split("train")["tokens"].dtype == np.uint8
