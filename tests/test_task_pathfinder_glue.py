"""Pathfinder / Path-X task glue: calls into tasks.pathfinder_generator, 80/10/10 split, pixel tokens, caching."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tasks import build_task, pathfinder_generator, pathfinder_release


@pytest.fixture
def calls(monkeypatch):
    """Replace the generator and the reader by stand-ins whose images encode their index."""
    log = []

    def fake_generate(num_images, image_size, contour_length, seed, num_workers=2):
        log.append(("generate", num_images, image_size, contour_length, seed, num_workers))
        images = np.zeros((num_images, image_size, image_size), dtype=np.uint8)
        images[:, 0, 0] = np.arange(num_images) % 256  # which image
        images[:, -1, -1] = 255  # a full-range pixel
        images[:, 1, 1] = seed
        return images, (np.arange(num_images) % 2).astype(np.int64)

    def fake_read(path, image_size=None, num_workers=1, shuffle_seed=None):
        images, labels = fake_generate(20, image_size, 14, 99)
        log[-1] = ("read", path, image_size, shuffle_seed)
        return images, labels, [{"path": "imgs/0/x.png", "reason": "empty file (0 bytes)"}]

    monkeypatch.setattr(pathfinder_generator, "generate_pathfinder", fake_generate)
    monkeypatch.setattr(pathfinder_release, "read_release_dir", fake_read)
    return log


@pytest.mark.parametrize("name,size", [("pathfinder", 32), ("pathx", 128)])
def test_generated_split_tokens_and_masks(tmp_path, calls, name, size):
    task = build_task(name, cache_dir=str(tmp_path), num_examples=50, contour_length=9, seed=4, num_workers=3)
    assert (task.max_length, task.vocab_size, task.num_classes) == (size * size, 257, 2)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert calls == [("generate", 50, size, 9, 4, 3)]
    for split, first in (("train", 0), ("validation", 40), ("test", 45)):
        b = next(task.batches(split, 64))
        assert b["tokens"].shape == (task.num_examples(split), size * size) and b["mask"].all()
        # Row-major flattening, pixel p -> token p + 1, images in generator order.
        assert b["tokens"][:, 0].tolist() == [i + 1 for i in range(first, first + len(b["labels"]))]
        assert (b["tokens"][:, -1] == 256).all() and (b["tokens"][:, size + 1] == 5).all()
        assert (b["tokens"][:, 1] == 1).all()  # a black pixel is a real token 1, not padding
        assert b["labels"].tolist() == [i % 2 for i in range(first, first + len(b["labels"]))]


def test_cached_and_keyed_by_settings(tmp_path, calls):
    kw = dict(cache_dir=str(tmp_path), num_examples=20)
    build_task("pathfinder", **kw).prepare()
    build_task("pathfinder", num_workers=1, **kw).prepare()  # workers do not change the data
    assert len(calls) == 1
    build_task("pathfinder", contour_length=6, **kw).prepare()
    build_task("pathfinder", seed=1, **kw).prepare()
    build_task("pathx", **kw).prepare()
    assert len(calls) == 4


def test_data_dir_uses_the_reader(tmp_path, calls):
    os.makedirs(tmp_path / "pf" / "metadata")
    np.save(tmp_path / "pf" / "metadata" / "0.npy", np.array([["imgs/0", "sample_0.png", "0", "1"]]))
    task = build_task("pathfinder", cache_dir=str(tmp_path / "c"), data_dir=str(tmp_path / "pf"), seed=3)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [16, 2, 2]
    assert calls == [("read", str(tmp_path / "pf"), 32, 3)]  # shuffled by the data seed before the 80/10/10 cut
    assert task.notes["skipped"] == [{"path": "imgs/0/x.png", "reason": "empty file (0 bytes)"}]
    # With data_dir the generation knobs are not used, so they are not validated either.
    build_task("pathfinder", data_dir=str(tmp_path / "pf"), num_examples=1, contour_length=1)


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="contour_length"):
        build_task("pathfinder", contour_length=1)
    with pytest.raises(ValueError, match="data_dir"):
        build_task("pathx", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_examples"):
        build_task("pathfinder", num_examples=5)


def test_real_generator_small(tmp_path):
    task = build_task("pathfinder", cache_dir=str(tmp_path), num_examples=20, contour_length=6, num_workers=1)
    b = next(task.batches("train", 16))
    assert b["tokens"].shape == (16, 1024) and b["tokens"].min() >= 1 and b["tokens"].max() <= 256
    assert b["tokens"].max() > 1  # something is drawn
    assert set(task.labels("train").tolist()) <= {0, 1}


def test_image_size_parameter_sets_length(tmp_path):
    assert build_task("pathfinder").max_length == 32 * 32
    assert build_task("pathx").max_length == 128 * 128
    assert build_task("pathfinder", image_size=16, contour_length=3).max_length == 16 * 16
    with pytest.raises(ValueError, match="image_size"):
        build_task("pathfinder", image_size=8)
