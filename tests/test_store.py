"""Results store: atomic one-file-per-record writes, tolerant loading, flattening, export, hashing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pandas as pd
import pytest

from harness.store import config_hash, export_records, find_record, load_records, now_iso, read_record, write_record


def _record(record_id: str, **extra) -> dict:
    return {"kind": "train", "record_id": record_id, "status": "ok", "created_at": now_iso(), **extra}


def test_write_creates_one_file_per_record(tmp_path):
    path = write_record(_record("abc", acc=0.5), root=tmp_path)
    assert path == tmp_path / "train" / "abc.json"
    assert json.loads(path.read_text())["acc"] == 0.5
    # No temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["abc.json"]


def test_rewrite_replaces_record(tmp_path):
    write_record(_record("abc", acc=0.1), root=tmp_path)
    write_record(_record("abc", acc=0.9), root=tmp_path)
    df = load_records(tmp_path)
    assert len(df) == 1 and df["acc"].iloc[0] == 0.9
    assert find_record(tmp_path, "train", "abc")["acc"] == 0.9
    assert find_record(tmp_path, "train", "missing") is None


def test_write_is_atomic_when_serialisation_fails(tmp_path):
    write_record(_record("abc", acc=0.1), root=tmp_path)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_record(_record("abc", acc=object()), root=tmp_path)
    # The previous version survives intact and no temp file is left.
    assert json.loads((tmp_path / "train" / "abc.json").read_text())["acc"] == 0.1
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["abc.json"]


def test_replace_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_record(_record("abc"), root=tmp_path)
    assert list((tmp_path / "train").iterdir()) == []


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"status": "ok", "kind": "train", "created_at": "t"}, "record_id"),
        ({"status": "great", "kind": "train", "record_id": "a", "created_at": "t"}, "status 'great'"),
        ({"status": "ok", "kind": "train", "record_id": "../x", "created_at": "t"}, "record_id"),
    ],
)
def test_invalid_records_are_rejected(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_record(bad, root=tmp_path)


def test_skipped_budget_is_a_valid_status(tmp_path):
    record = {"kind": "bench", "record_id": "b", "status": "skipped_budget", "created_at": now_iso(),
              "reason": "memory, predicted peak 9.00 GB > budget 6.00 GB"}
    path = write_record(record, root=tmp_path)
    assert read_record(path)["status"] == "skipped_budget"


def test_truncated_file_is_reported_and_does_not_hide_others(tmp_path):
    write_record(_record("good1", acc=0.1), root=tmp_path)
    write_record(_record("good2", acc=0.2), root=tmp_path)
    full = write_record(_record("bad", acc=0.3), root=tmp_path)
    full.write_text(full.read_text()[:25])  # a process killed mid-write (without our atomic path)
    (tmp_path / "train" / "garbage.json").write_bytes(b"\xff\xfe not json")
    with pytest.warns(UserWarning, match="unreadable record file") as caught:
        df = load_records(tmp_path)
    assert sorted(df["record_id"]) == ["good1", "good2"]
    assert sorted(os.path.basename(p) for p in df.attrs["unreadable"]) == ["bad.json", "garbage.json"]
    messages = " ".join(str(w.message) for w in caught)
    assert "bad.json" in messages and "garbage.json" in messages


def test_flattening_and_kind_filter(tmp_path):
    write_record(_record("a", config={"model": {"embed_dim": 64}, "seed": 1}, tags=[1, 2]), root=tmp_path)
    write_record({"kind": "bench", "record_id": "b", "status": "oom", "created_at": now_iso()}, root=tmp_path)
    df = load_records(tmp_path, kind="train")
    assert list(df["record_id"]) == ["a"]
    assert df["config.model.embed_dim"].iloc[0] == 64
    assert df["config.seed"].iloc[0] == 1
    assert json.loads(df["tags"].iloc[0]) == [1, 2]
    both = load_records(tmp_path)
    assert sorted(both["kind"]) == ["bench", "train"]


def test_empty_or_missing_root(tmp_path):
    df = load_records(tmp_path / "nothing")
    assert df.empty and df.attrs["unreadable"] == []


def test_nan_becomes_null(tmp_path):
    path = write_record(_record("n", loss=float("nan")), root=tmp_path)
    assert json.loads(path.read_text())["loss"] is None


def test_export_csv_and_parquet(tmp_path):
    write_record(_record("a", acc=0.5, config={"lr": 0.1}), root=tmp_path / "r")
    write_record(_record("b", acc=0.7, config={"lr": 0.2}), root=tmp_path / "r")
    write_record({**_record("c", time=1.0), "kind": "bench"}, root=tmp_path / "r")
    # A nested store (results/smoke inside results) is another store: never read with this one.
    write_record(_record("smoke", acc=0.1), root=tmp_path / "r" / "smoke")
    out = export_records(tmp_path / "r", tmp_path / "train.csv", kind="train")
    df = pd.read_csv(out).sort_values("record_id")
    assert list(df["record_id"]) == ["a", "b"]  # only the kind asked for
    assert list(df["acc"]) == [0.5, 0.7] and list(df["config.lr"]) == [0.1, 0.2]
    assert set(load_records(tmp_path / "r")["record_id"]) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="kind"):
        export_records(tmp_path / "r", tmp_path / "all.csv", kind=None)
    pytest.importorskip("pyarrow")
    out = export_records(tmp_path / "r", tmp_path / "out.parquet", kind="train")
    assert len(pd.read_parquet(out)) == 2
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        export_records(tmp_path / "r", tmp_path / "out.xlsx", kind="train")


def test_config_hash_is_stable_and_order_free():
    a = config_hash({"b": 1, "a": {"y": [1, 2], "x": 0.5}})
    b = config_hash({"a": {"x": 0.5, "y": [1, 2]}, "b": 1})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert config_hash({"b": 2}) != config_hash({"b": 1})
    # Pinned so the hash (which names result files) never changes silently across versions.
    assert config_hash({"a": 1}) == "015abd7f5cc57a2d"


def _writer(root: str, worker: int) -> None:
    for i in range(20):
        write_record(_record("shared", worker=worker, i=i, payload="x" * 2000), root=root)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    record = json.loads((tmp_path / "train" / "shared.json").read_text())
    assert record["i"] == 19 and len(record["payload"]) == 2000
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["shared.json"]


@pytest.mark.parametrize("text, reason", [
    ('{"kind": "train", "stat', "truncated JSON (ends after 23 characters)"),
    ('{"kind": "train", "status": "ok",', "truncated JSON (ends after 33 characters)"),
    ('{"kind": "train"} trailing', "not valid JSON (Extra data: line 1, column 19)"),
    ('[1, 2]', "not a record: a JSON list, not an object"),
])
def test_each_unreadable_file_says_why(tmp_path, text, reason):
    write_record(_record("good"), root=tmp_path)
    (tmp_path / "train" / "bad.json").write_text(text)
    with pytest.warns(UserWarning, match=r"unreadable record file .*bad\.json: " + reason.replace("(", r"\(")
                      .replace(")", r"\)")):
        df = load_records(tmp_path)
    assert list(df["record_id"]) == ["good"]
    assert df.attrs["unreadable_why"] == {str(tmp_path / "train" / "bad.json"): reason}


def test_nested_stores_are_found_but_not_read(tmp_path):
    from harness.store import nested_stores

    write_record(_record("smoke"), root=tmp_path / "smoke")
    (tmp_path / "report").mkdir()  # a built report: no records
    (tmp_path / "report" / "report.md").write_text("# report")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert nested_stores(tmp_path) == [tmp_path / "smoke"]
    assert load_records(tmp_path).empty
