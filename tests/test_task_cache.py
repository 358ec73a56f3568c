"""Cache: hits without regenerating, misses on a changed setting, detects truncation/corruption and rebuilds,
writes atomically."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import numpy as np
import pytest

from tasks import build_task
from tasks.cache import cache_key, entry_dir, file_identity, load_entry
from tasks.listops import ListOps

SMALL = dict(num_train=50, num_val=10, num_test=10, min_length=10, max_length=60, num_workers=1)


@pytest.fixture
def builds(monkeypatch):
    """Count calls of ListOps.build (the generator) while keeping its behaviour."""
    calls = []
    original = ListOps.build

    def counting(self):
        calls.append(self.config)
        return original(self)

    monkeypatch.setattr(ListOps, "build", counting)
    return calls


def _entry(tmp_path, **params):
    task = build_task("listops", cache_dir=str(tmp_path), **{**SMALL, **params})
    return task, entry_dir(str(tmp_path), "listops", task.cache_settings())


def test_second_load_hits_cache(tmp_path, builds):
    a, directory = _entry(tmp_path)
    a.prepare()
    a.prepare()  # idempotent
    b, _ = _entry(tmp_path, num_workers=2)  # num_workers does not change the data
    b.prepare()
    assert len(builds) == 1
    np.testing.assert_array_equal(a.labels("train"), b.labels("train"))
    assert isinstance(b._split("train")["tokens"], np.memmap)  # loaded by memory map, not regenerated
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    assert manifest["settings"]["config"]["seed"] == 0 and "train.tokens.npy" in manifest["files"]


@pytest.mark.parametrize("change", [{"seed": 1}, {"num_train": 51}, {"max_length": 61}, {"max_depth": 9}])
def test_changed_setting_misses(tmp_path, builds, change):
    _entry(tmp_path)[0].prepare()
    task, _ = _entry(tmp_path, **change)
    task.prepare()
    assert len(builds) == 2


def test_key_depends_on_source_file_identity(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_text("a")
    before = cache_key({"source": file_identity(str(path))})
    path.write_text("ab")
    assert cache_key({"source": file_identity(str(path))}) != before


def test_truncated_file_is_detected_and_rebuilt(tmp_path, builds):
    task, directory = _entry(tmp_path)
    task.prepare()
    expected = np.array(task._split("train")["tokens"])
    path = os.path.join(directory, "train.tokens.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    again, _ = _entry(tmp_path)
    with pytest.warns(RuntimeWarning, match="truncated"):
        again.prepare()
    assert len(builds) == 2
    np.testing.assert_array_equal(again._split("train")["tokens"], expected)


def test_corrupted_file_is_detected_and_rebuilt(tmp_path, builds):
    task, directory = _entry(tmp_path)
    task.prepare()
    expected = np.array(task.labels("test"))
    path = os.path.join(directory, "test.labels.npy")
    with open(path, "r+b") as f:  # same size, one byte flipped in the data
        f.seek(os.path.getsize(path) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(1, 1))  # a different mtime, as any rewrite gives
    again, _ = _entry(tmp_path)
    with pytest.warns(RuntimeWarning, match="checksum"):
        again.prepare()
    assert len(builds) == 2
    np.testing.assert_array_equal(again.labels("test"), expected)


def test_missing_manifest_is_rebuilt(tmp_path, builds):
    task, directory = _entry(tmp_path)
    task.prepare()
    os.remove(os.path.join(directory, "manifest.json"))
    with pytest.warns(RuntimeWarning, match="manifest"):
        _entry(tmp_path)[0].prepare()
    assert len(builds) == 2


def test_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("generator crashed")

    monkeypatch.setattr(ListOps, "build", broken)
    task, directory = _entry(tmp_path)
    with pytest.raises(RuntimeError, match="crashed"):
        task.prepare()
    assert not os.path.exists(directory)
    # No half-written temporary directory left behind either (only the empty lock file stays).
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []


def test_default_cache_dir_from_environment(tmp_path, monkeypatch, builds):
    monkeypatch.setenv("ARENA_CACHE_DIR", str(tmp_path / "env"))
    build_task("listops", **SMALL).prepare()
    assert len([n for n in os.listdir(tmp_path / "env") if not n.endswith(".lock")]) == 1


def test_crash_while_writing_leaves_no_entry(tmp_path, monkeypatch):
    def half_good(self):
        arrays = {"train": {"tokens": np.zeros((2, 60), np.uint8), "labels": np.zeros(2, np.int64)}}
        arrays["test"] = {"bad.name": np.zeros(2)}  # save_entry refuses it after writing the first files
        return arrays

    monkeypatch.setattr(ListOps, "build", half_good)
    task, directory = _entry(tmp_path)
    with pytest.raises(ValueError, match="may not contain"):
        task.prepare()
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []  # no entry, no temporary directory


def _prepare_in_child(args) -> str:
    cache_dir, start_at = args
    while time.time() < start_at:  # all children ask for the entry at the same moment
        time.sleep(0.005)
    task = build_task("listops", cache_dir=cache_dir, **SMALL)
    task.prepare()
    b = next(task.batches("train", 50))
    return f"{b['tokens'].sum().item()}-{b['labels'].tolist()}"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_concurrent_first_use_builds_once_and_never_corrupts(tmp_path, monkeypatch):
    # Processes started together (a sweep's jobs on one shared cache) build the entry once, under the file lock;
    # the others wait and load it. The build is slowed so that they really overlap.
    marker = tmp_path / "builds.log"
    original = ListOps.build

    def slow_counting_build(self):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return original(self)

    monkeypatch.setattr(ListOps, "build", slow_counting_build)  # inherited by the forked children
    cache_dir = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_prepare_in_child, [(cache_dir, time.time() + 0.5)] * 4)
    assert len(marker.read_text().split()) == 1  # built once
    assert len(set(results)) == 1  # everyone got the same data
    entries = [n for n in os.listdir(cache_dir) if not n.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith(".tmp")  # no half-written or stray entry
    load_entry(os.path.join(cache_dir, entries[0]))  # checksums verify
