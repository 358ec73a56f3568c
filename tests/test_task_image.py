"""Image: CIFAR-10 grayscale through the real `datasets` parquet loader on small files in the hub layout."""

from __future__ import annotations

import os
import time

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage

from tasks import build_task
from tasks.image import rgb_to_gray_lra


def test_grayscale_matches_tensorflow_conversion():
    # tf.image.rgb_to_grayscale on uint8: x/255 in float32, weights .2989/.5870/.1140, *255.5, truncate.
    # (128,128,128) tells it apart from a plain int(weighted sum), which gives 127.
    rgb = np.array([[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0],
                    [100, 100, 100]], dtype=np.uint8)
    assert rgb_to_gray_lra(rgb).tolist() == [255, 76, 149, 29, 128, 0, 100]
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_gray_lra(rgb.astype(np.float32))


def _images(n: int, seed: int) -> tuple[list, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return [PILImage.fromarray(a) for a in arrays], arrays, labels


def _write(tmp_path, n_train: int = 8, n_test: int = 4):
    root = tmp_path / "cifar"
    os.makedirs(root / "plain_text")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        pil, arrays, labels = _images(n, seed)
        datasets.Dataset.from_dict({"img": pil, "label": labels}, features=features).to_parquet(
            str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
        out[split] = (arrays, labels)
    return str(root), out


def test_local_parquet_split_tokens_and_masks(tmp_path):
    data_dir, raw = _write(tmp_path)
    task = build_task("image", cache_dir=str(tmp_path / "c"), data_dir=data_dir, validation_size=2)
    assert (task.vocab_size, task.max_length, task.num_classes) == (257, 1024, 10)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [6, 2, 4]
    arrays, labels = raw["train"]
    # Deterministic LRA split: the first images train, the last `validation_size` validate.
    np.testing.assert_array_equal(task.labels("train"), labels[:6])
    np.testing.assert_array_equal(task.labels("validation"), labels[6:])
    b = next(task.batches("validation", 2))
    assert b["tokens"].shape == (2, 1024) and b["mask"].all()
    expected = rgb_to_gray_lra(arrays[6:]).reshape(2, 1024).astype(np.int64) + 1  # pixel p -> token p + 1
    np.testing.assert_array_equal(b["tokens"].numpy(), expected)
    assert b["tokens"].min() >= 1 and b["tokens"].max() <= 256
    test = next(task.batches("test", 4))
    np.testing.assert_array_equal(test["labels"].numpy(), raw["test"][1])
    np.testing.assert_array_equal(test["tokens"].numpy(), rgb_to_gray_lra(raw["test"][0]).reshape(4, 1024) + 1)


def test_subsets_and_bad_validation_size(tmp_path):
    data_dir, _ = _write(tmp_path)
    task = build_task("image", cache_dir=str(tmp_path / "c"), data_dir=data_dir, validation_size=2, num_train=3,
                      num_test=2)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [3, 2, 2]
    with pytest.raises(ValueError, match="validation_size"):
        build_task("image", cache_dir=str(tmp_path / "c"), data_dir=data_dir, validation_size=8).prepare()


def test_no_data_dir_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="data_dir"):
        build_task("image", cache_dir=str(tmp_path), hub_name="no-such/cifar-copy").prepare()
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("layout", ["dataset_dict", "converted_parquet", "old_converted_parquet"])
def test_other_local_layouts_and_default_validation(tmp_path, layout):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    raw = {}
    parts = {}
    for split, n, seed in (("train", 20, 0), ("test", 4, 1)):
        pil, arrays, labels = _images(n, seed)
        raw[split] = (arrays, labels)
        parts[split] = datasets.Dataset.from_dict({"img": pil, "label": labels}, features=features)
    root = tmp_path / "cifar10"
    if layout == "dataset_dict":  # DatasetDict.save_to_disk
        datasets.DatasetDict(parts).save_to_disk(str(root))
    elif layout == "converted_parquet":  # refs/convert/parquet: plain_text/train/0000.parquet
        for split, part in parts.items():
            os.makedirs(root / "plain_text" / split)
            part.to_parquet(str(root / "plain_text" / split / "0000.parquet"))
    else:  # older converted names: plain_text/cifar10-train.parquet
        os.makedirs(root / "plain_text")
        for split, part in parts.items():
            part.to_parquet(str(root / "plain_text" / f"cifar10-{split}.parquet"))
    # Through data_root, as a user with an lra_release folder holding cifar10/ next to it.
    task = build_task("image", cache_dir=str(tmp_path / "c"), data_root=str(tmp_path))
    assert task.config.data_dir == str(root)
    # LRA: train[:90%] / train[90%:] in stored order.
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [18, 2, 4]
    np.testing.assert_array_equal(task.labels("validation"), raw["train"][1][18:])
    b = next(task.batches("validation", 2))
    np.testing.assert_array_equal(b["tokens"].numpy(), rgb_to_gray_lra(raw["train"][0][18:]).reshape(2, 1024) + 1)
    assert "train[90%:]" in task.notes["validation"]
