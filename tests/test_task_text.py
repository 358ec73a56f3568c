"""Text: byte-level IMDb through the real `datasets` loaders on small local files in the official layouts."""

from __future__ import annotations

import glob
import os
import shutil
import time

import datasets
import numpy as np
import pytest

from tasks import build_task

REVIEWS = ["A fine film.", "Terrible; I left. ", "Ünïcödé — naïve café 😀 " * 3, "x" * 50, "", "ok"]
LABELS = [1, 0, 1, 0, 0, 1]


LAYOUTS = ["hub_parquet", "converted_parquet", "old_converted_parquet", "csv", "jsonl", "dataset_dict",
           "dataset_folders", "arrow_cache"]


def _write(tmp_path, layout: str) -> str:
    """IMDb-shaped train/test splits in one of the layouts a `datasets` user has on disk, made by `datasets`."""
    root = tmp_path / layout
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"text": REVIEWS, "label": LABELS}, features=features)
    test = datasets.Dataset.from_dict({"text": REVIEWS[::-1], "label": LABELS[::-1]}, features=features)
    unsup = datasets.Dataset.from_dict({"text": ["u"], "label": [0]}, features=features)
    splits = {"train": train, "test": test, "unsupervised": unsup}  # unsupervised must be ignored
    if layout == "hub_parquet":  # the hub's main branch: plain_text/train-00000-of-00001.parquet
        os.makedirs(root / "plain_text")
        for name, part in splits.items():
            part.to_parquet(str(root / "plain_text" / f"{name}-00000-of-00001.parquet"))
    elif layout == "converted_parquet":  # the hub's refs/convert/parquet branch: plain_text/train/0000.parquet
        for name, part in splits.items():
            os.makedirs(root / "plain_text" / name)
            part.to_parquet(str(root / "plain_text" / name / "0000.parquet"))
    elif layout == "old_converted_parquet":  # older converted names: plain_text/imdb-train.parquet
        os.makedirs(root / "plain_text")
        for name, part in splits.items():
            part.to_parquet(str(root / "plain_text" / f"imdb-{name}.parquet"))
    elif layout == "csv":
        os.makedirs(root)
        train.to_csv(str(root / "train.csv"), index=False)
        test.to_csv(str(root / "test.csv"), index=False)
    elif layout == "jsonl":
        os.makedirs(root)
        train.to_json(str(root / "train.jsonl"))
        test.to_json(str(root / "test.jsonl"))
    elif layout == "dataset_dict":  # DatasetDict.save_to_disk
        datasets.DatasetDict(splits).save_to_disk(str(root))
    elif layout == "dataset_folders":  # one Dataset.save_to_disk folder per split
        for name, part in splits.items():
            part.save_to_disk(str(root / name))
    elif layout == "arrow_cache":  # a `datasets` Arrow cache (<cache>/<builder>/<config>/<version>/<hash>/*.arrow)
        src = tmp_path / "src"
        os.makedirs(src)
        for name, part in splits.items():
            part.to_parquet(str(src / f"{name}.parquet"))
        datasets.load_dataset("parquet", data_files={n: str(src / f"{n}.parquet") for n in splits},
                              cache_dir=str(root))
        assert glob.glob(str(root / "parquet" / "*" / "*" / "*" / "parquet-train.arrow"))
    return str(root)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_local_layout_gives_bytes_shifted_by_one(tmp_path, layout):
    task = build_task("text", cache_dir=str(tmp_path / "cache"), data_dir=_write(tmp_path, layout), max_length=40,
                      validation="test")
    assert task.vocab_size == 257 and task.max_length == 40
    b = next(task.batches("train", 6))
    assert b["tokens"].shape == (6, 40)
    for row, mask, text in zip(b["tokens"], b["mask"], REVIEWS):
        raw = list(text.encode("utf-8")[:40])
        assert int(mask.sum()) == len(raw) and mask[: len(raw)].all()
        assert row[: len(raw)].tolist() == [x + 1 for x in raw]
        assert (row[len(raw):] == 0).all()
    assert b["labels"].tolist() == LABELS
    # validation="test" is LRA's alias: the test set doubles as validation (and the task says so).
    assert task.validation_is_test
    assert task.num_examples("validation") == task.num_examples("test") == 6
    assert task.labels("validation").tolist() == LABELS[::-1]
    assert next(task.batches("test", 6))["labels"].tolist() == LABELS[::-1]
    assert set(task.notes["source"]) == {"train", "test"}


def test_default_validation_is_held_out_of_train_and_seeded(tmp_path):
    data_dir = _write(tmp_path, "dataset_dict")
    texts = lambda t, split: [bytes((r[m] - 1).tolist()).decode() for r, m in  # noqa: E731
                              zip(*(lambda b: (b["tokens"], b["mask"]))(next(t.batches(split, 99))))]
    task = build_task("text", cache_dir=str(tmp_path / "c"), data_dir=data_dir, validation_size=2)
    assert not task.validation_is_test
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [4, 2, 6]
    train, val, test = texts(task, "train"), texts(task, "validation"), texts(task, "test")
    assert sorted(train + val) == sorted(REVIEWS)  # a partition of train: nothing lost, nothing shared
    assert test == REVIEWS[::-1]  # test untouched
    again = build_task("text", cache_dir=str(tmp_path / "c2"), data_dir=data_dir, validation_size=2)
    assert texts(again, "validation") == val  # seeded: the same hold-out
    held = {tuple(texts(build_task("text", cache_dir=str(tmp_path / f"s{s}"), data_dir=data_dir,
                                   validation_size=2, seed=s), "validation")) for s in range(6)}
    assert len(held) > 1  # another seed, another hold-out
    assert "held out" in task.notes["validation"]
    # Default size: 10% of train (rounded, at least 1).
    assert build_task("text", cache_dir=str(tmp_path / "d"), data_dir=data_dir).num_examples("validation") == 1
    with pytest.raises(ValueError, match="validation_size"):
        build_task("text", cache_dir=str(tmp_path / "e"), data_dir=data_dir, validation_size=6).prepare()
    with pytest.raises(ValueError, match="validation.*holdout, test"):
        build_task("text", validation="val")


def test_data_root_finds_imdb_folder(tmp_path):
    root = tmp_path / "lra_release"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": REVIEWS, "label": LABELS}),
                         test=datasets.Dataset.from_dict({"text": REVIEWS, "label": LABELS})).save_to_disk(
        str(root / "imdb"))
    task = build_task("text", cache_dir=str(tmp_path / "c"), data_root=str(root), validation_size=1)
    assert task.config.data_dir == str(root / "imdb")
    assert task.num_examples("test") == 6
    other = _write(tmp_path, "csv")  # data_dir wins over data_root
    assert build_task("text", data_root=str(root), data_dir=other).config.data_dir == other


def test_ambiguous_copies_are_named(tmp_path):
    data_dir = _write(tmp_path, "hub_parquet")
    datasets.Dataset.from_dict({"text": ["z"], "label": [1]}).to_csv(os.path.join(data_dir, "train.csv"), index=False)
    with pytest.raises(ValueError, match="several places"):
        build_task("text", cache_dir=str(tmp_path / "c"), data_dir=data_dir).prepare()


def _user_cache(tmp_path, monkeypatch, kind: str) -> None:
    """The user's own offline caches, as `datasets` and `huggingface_hub` lay them out, with IMDb in them."""
    import huggingface_hub.constants

    arrow_cache, hub_cache = tmp_path / "hf" / "datasets", tmp_path / "hf" / "hub"
    os.makedirs(arrow_cache)
    os.makedirs(hub_cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(arrow_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    if kind == "arrow":  # <HF_DATASETS_CACHE>/stanfordnlp___imdb/plain_text/0.0.0/<hash>/imdb-train.arrow
        made = _write(tmp_path, "arrow_cache")
        version_dir = os.path.dirname(glob.glob(os.path.join(made, "parquet", "*", "*", "*", "parquet-train.arrow"))[0])
        target = arrow_cache / "stanfordnlp___imdb" / "plain_text" / "0.0.0" / "abc123"
        shutil.copytree(version_dir, target)
        for f in os.listdir(target):
            if f.startswith("parquet-"):
                os.rename(target / f, target / f.replace("parquet-", "imdb-"))
    else:  # <HF_HUB_CACHE>/datasets--stanfordnlp--imdb/snapshots/<rev>/plain_text/train-00000-of-00001.parquet
        made = _write(tmp_path, "hub_parquet")
        shutil.copytree(made, hub_cache / "datasets--stanfordnlp--imdb" / "snapshots" / "rev1")


@pytest.mark.parametrize("kind", ["arrow", "hub"])
def test_offline_reads_the_users_own_cache(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _user_cache(tmp_path, monkeypatch, kind)
    ours = tmp_path / "ours"
    task = build_task("text", cache_dir=str(ours), max_length=40, validation="test")
    assert task.labels("train").tolist() == LABELS and task.labels("test").tolist() == LABELS[::-1]
    assert "user cache" in task.notes["source"]["train"]
    assert not (ours / "hf").exists()  # `datasets` was not pointed at our cache folder


def test_subset_is_seeded(tmp_path):
    data_dir = _write(tmp_path, "csv")
    kw = dict(data_dir=data_dir, max_length=8, num_train=3, validation="test")
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
    kw = dict(cache_dir=str(tmp_path / "c"), data_dir=data_dir, max_length=8, validation="test")
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
