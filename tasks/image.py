"""Image (LRA): CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Grayscale exactly as LRA's pipeline (``tf.image.rgb_to_grayscale`` then cast to int): pixels scaled to [0, 1]
in float32, weighted ``0.2989 R + 0.5870 G + 0.1140 B``, then converted back to uint8 as TensorFlow does
(multiply by 255.5 and truncate). Rows are read top to bottom, left to right.

Tokens: pixel value ``p`` is token ``p + 1`` (0 stays padding, although no position is padded: every mask is
all True), so ``vocab_size = 257``; LRA's 256 pixel ids map one-to-one onto 1..256.

Splits (LRA, ``tfds.load("cifar10", split="train[:90%]")`` / ``"train[90%:]"``): the 50k CIFAR-10 train images in
their stored order, the first 90% (45k) train and the last 10% (5k) validate (``validation_size``, None = 10%);
the 10k test images are the test split. See ``docs/DATA.md``.

Sources (through ``datasets``): with ``data_dir`` (or ``data_root``: ``<data_root>/cifar10`` when present) any
layout :mod:`tasks.sources` reads (``save_to_disk`` folders, Arrow caches, hub parquet in its three namings) with an
image column (``img`` or ``image``) and a ``label`` column. Without it, the hub dataset ``hub_name`` (default
``"cifar10"``) from the user's own cache, offline if need be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.base import Arrays, Task, TaskConfig, register_task, require, subset_rows
from tasks.sources import folder_beside_release, open_splits, source_identity

EXPECTED_FILES = ("CIFAR-10 train and test splits with an image column (img) and label: a datasets save_to_disk "
                  "folder, a datasets Arrow cache, or hub parquet (plain_text/train-*.parquet, "
                  "plain_text/train/0000.parquet, plain_text/cifar10-train.parquet)")
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


@dataclass(frozen=True)
class ImageConfig(TaskConfig):
    """Grayscale CIFAR-10, 1024 tokens. LRA: 45k/5k/10k (``validation_size`` None = the last 10% of train)."""

    validation_size: int | None = None
    data_dir: str | None = None
    hub_name: str = "cifar10"
    # Size knobs for small runs: seeded random subsets of train (after the split) and test (None: all).
    num_train: int | None = None
    num_test: int | None = None

    def validate(self) -> None:
        require(self.validation_size is None or self.validation_size >= 1, "validation_size",
                f"must be >= 1 or None, got {self.validation_size}")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1 or None, got {value}")


def rgb_to_gray_lra(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 (...) gray, as ``tf.image.rgb_to_grayscale`` on uint8 images."""
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (..., 3), got {images.dtype} {images.shape}")
    flt = images.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = flt @ GRAY_WEIGHTS
    return np.clip(np.floor(gray * np.float32(255.5)), 0, 255).astype(np.uint8)


def _image_column(part) -> str:
    import datasets

    for name, feature in part.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("img", "image"):
        if name in part.column_names:
            return name
    raise ValueError(f"CIFAR-10 source has no image column (img/image); columns: {part.column_names}")


def _to_rgb_array(part, column: str) -> np.ndarray:
    """Decode a split's images to uint8 (N, 32, 32, 3)."""
    import datasets

    if isinstance(part.features[column], datasets.Image):
        part = part.cast_column(column, datasets.Image(mode="RGB"))
    images = np.asarray(part.with_format("numpy")[column])
    if images.dtype == object or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"CIFAR-10 images must all be 32x32 RGB, got array {images.shape} {images.dtype}")
    return images.astype(np.uint8, copy=False)


@register_task("image", config=ImageConfig)
class Image(Task):
    """Image: CIFAR-10 grayscale pixel sequences, 10 classes (LRA)."""

    num_classes = 10
    token_offset = 1
    config: ImageConfig

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict[str, Any]) -> str | None:
        return folder_beside_release(data_root, params["hub_name"])

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def max_length(self) -> int:
        return 1024

    def source_identity(self) -> dict:
        return source_identity(self.config.hub_name, self.config.data_dir, ("train", "test"))

    def build(self) -> Arrays:
        c = self.config
        ds, where = open_splits(c.hub_name, c.data_dir, ("train", "test"), EXPECTED_FILES, self.cache_dir)
        self.build_notes = {"source": where}
        out = {}
        for split in ("train", "test"):
            part = ds[split]
            if "label" not in part.column_names:
                raise ValueError(f"CIFAR-10 split {split!r} has no 'label' column; columns: {part.column_names}")
            gray = rgb_to_gray_lra(_to_rgb_array(part, _image_column(part))).reshape(len(part), 1024)
            labels = np.asarray(part["label"], dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() > 9):
                raise ValueError(f"CIFAR-10 split {split!r}: labels must be in 0..9")
            out[split] = {"tokens": gray, "labels": labels}
        n = out["train"]["labels"].size
        size = c.validation_size if c.validation_size is not None else n - round(0.9 * n)  # TFDS rounds percents
        if not 1 <= size < n:
            raise ValueError(f"invalid task parameter 'validation_size': {size} is not in 1..{n - 1} "
                             f"({n} train images)")
        full = out.pop("train")
        cut = n - size
        self.build_notes["validation"] = f"the last {size} of {n} train images (LRA: train[90%:])"
        train_rows = subset_rows(cut, c.num_train, c.seed)
        test_rows = subset_rows(out["test"]["labels"].size, c.num_test, c.seed)
        return {
            "train": {k: v[:cut][train_rows] for k, v in full.items()},
            "validation": {k: v[cut:] for k, v in full.items()},
            "test": {k: v[test_rows] for k, v in out["test"].items()},
        }
