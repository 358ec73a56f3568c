"""Task registry and batching contract: names, errors, shapes, dtypes, masks, deterministic shuffling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks import available_tasks, build_task, get_task_info

SMALL = dict(num_train=103, num_val=20, num_test=20, min_length=10, max_length=64, num_workers=1)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = build_task("listops", cache_dir=str(tmp_path_factory.mktemp("c")), **SMALL)
    t.prepare()
    return t


def test_available_tasks():
    assert available_tasks() == ["image", "listops", "mqar", "pathfinder", "pathx", "retrieval", "text"]
    assert available_tasks("path*") == ["pathfinder", "pathx"]


def test_static_attributes_without_building():
    expect = {"listops": (10, 16, 2000, False), "text": (2, 257, 4096, False), "retrieval": (2, 257, 4000, True),
              "image": (10, 257, 1024, False), "pathfinder": (2, 257, 1024, False),
              "pathx": (2, 257, 16384, False)}
    for name, (classes, vocab, length, two) in expect.items():
        t = build_task(name)  # lazy: nothing is loaded, so no data or network is needed
        assert (t.num_classes, t.vocab_size, t.max_length, t.two_sequence, t.pad_id) == (classes, vocab, length, two, 0)
        assert t.name == name and t._data is None
        assert get_task_info(name).defaults()["seed"] == 0


def test_unknown_name_and_parameter_errors():
    with pytest.raises(ValueError, match="unknown task 'lisops'.*listops"):
        build_task("lisops")
    with pytest.raises(ValueError, match="'num_exemples'.*allowed:.*num_train"):
        build_task("listops", num_exemples=3)
    with pytest.raises(ValueError, match="'contour_length'"):
        build_task("pathfinder", contour_length=0)
    with pytest.raises(ValueError, match="'seed'"):
        build_task("listops", seed=-1)
    with pytest.raises(ValueError, match="split 'val'"):
        build_task("listops", **SMALL).num_examples("val")


def test_batch_shapes_dtypes_masks(task):
    batches = list(task.batches("train", 16))
    assert [b["tokens"].shape[0] for b in batches] == [16] * 6 + [7]
    for b in batches:
        assert set(b) == {"tokens", "mask", "labels"}
        assert b["tokens"].dtype == torch.int64 and b["mask"].dtype == torch.bool and b["labels"].dtype == torch.int64
        assert b["tokens"].shape == b["mask"].shape == (b["labels"].shape[0], 64)
        assert ((b["tokens"] == 0) == ~b["mask"]).all()  # 0 is padding and only padding
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    np.testing.assert_array_equal(labels, task.labels("train"))
    assert len(list(task.batches("train", 16, drop_last=True))) == 6


def _order(task, **kw):
    # Each example is identified by its token row.
    return [tuple(r.tolist()) for b in task.batches("train", 10, **kw) for r in b["tokens"]]


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch(task):
    plain = _order(task)
    e0 = _order(task, shuffle=True, seed=1, epoch=0)
    assert e0 == _order(task, shuffle=True, seed=1, epoch=0)
    assert sorted(e0) == sorted(plain) and e0 != plain
    e1 = _order(task, shuffle=True, seed=1, epoch=1)
    assert e1 != e0 and sorted(e1) == sorted(plain)
    assert _order(task, shuffle=True, seed=2, epoch=0) != e0
    # Labels follow their examples through the shuffle.
    rows = {tuple(r.tolist()): int(y) for b in task.batches("train", 50) for r, y in zip(b["tokens"], b["labels"])}
    for b in task.batches("train", 10, shuffle=True, seed=1, epoch=3):
        for r, y in zip(b["tokens"], b["labels"]):
            assert rows[tuple(r.tolist())] == int(y)


def test_bad_batch_arguments(task):
    with pytest.raises(ValueError, match="batch_size"):
        next(task.batches("train", 0))
    with pytest.raises(ValueError, match="epoch"):
        next(task.batches("train", 4, shuffle=True, epoch=-1))


def test_data_root_must_be_a_directory_and_data_dir_wins(tmp_path):
    with pytest.raises(ValueError, match="data_root.*not a directory"):
        build_task("listops", data_root=str(tmp_path / "nope"))
    # A task's own data_dir is kept; data_root only fills it in when it is not given.
    (tmp_path / "mine").mkdir()
    for f in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        (tmp_path / "mine" / f).write_text("Source\tTarget\r\n")
    task = build_task("listops", data_root=str(tmp_path), data_dir=str(tmp_path / "mine"))
    assert task.config.data_dir == str(tmp_path / "mine")


def test_generator_pool_workers_leave_ctrl_c_to_the_parent():
    # A Ctrl-C reaches the whole process group: workers that handled it would each print a traceback (and could
    # hang the pool); the parent terminates them instead.
    import signal

    from tasks.base import process_pool

    with process_pool(2) as pool:
        handlers = pool.map(signal.getsignal, [signal.SIGINT] * 2)
    assert handlers == [signal.SIG_IGN] * 2
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the parent keeps its own handler
