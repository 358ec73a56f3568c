"""Pathfinder and Path-X (LRA): are the two marker discs connected by one path? 2 classes.

``pathfinder``: 32x32 images, 1024 tokens; ``pathx``: 128x128 images, 16384 tokens. Images come from our
generator (:mod:`tasks.pathfinder_generator`, balanced labels, deterministic in ``seed``) or, with ``data_dir``
(``data_root``: ``<data_root>/pathfinder32/curv_contour_length_14``, ``pathfinder128/...`` for Path-X), from a
released LRA folder (read by :mod:`tasks.pathfinder_release`; zero-byte PNGs are skipped and reported).

Splits: LRA used ``contour_length`` 14 ("hard") and 200k images split 80/10/10 (160k/20k/20k) in the order TFDS
stored them (TFDS orders a split by a hash of each example's key: a fixed pseudo-random order). Generated images
are already in random order, so we split them as they come: first 80% train, next 10% validation, last 10% test.
Released images are read in metadata order and then put in a fixed pseudo-random order (a permutation seeded by
``seed``) before the same 80/10/10 cut, our stand-in for TFDS's hash order. See ``docs/DATA.md``.

Tokens: pixel value ``p`` is token ``p + 1`` (0 stays padding, though nothing is padded: masks are all True),
``vocab_size = 257``; rows are read top to bottom. ``num_workers`` only sets generation parallelism (the data do
not depend on it). The cache key includes a hash of the generator's source, so a changed generator regenerates.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tasks.base import Arrays, Task, TaskConfig, register_task, require
from tasks.cache import file_identity


@dataclass(frozen=True)
class PathfinderConfig(TaskConfig):
    """Pathfinder sizes and difficulty. LRA: 200k images, contour length 14 (hard), 80/10/10."""

    NON_DATA_FIELDS = ("num_workers",)

    num_examples: int = 200_000
    # LRA's difficulties are 6, 9 and 14 ("hard", the LRA setting); shorter contours (>= 2) make the easy
    # variants that small CPU recipes can learn.
    contour_length: int = 14
    # None = the task's LRA size (32 for pathfinder, 128 for pathx); 16..256 for small or custom variants.
    image_size: int | None = None
    data_dir: str | None = None
    num_workers: int = 2

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        if self.image_size is not None:
            require(16 <= self.image_size <= 256, "image_size", f"must be in 16..256 or None, got {self.image_size}")
        if self.data_dir is not None:
            # Reading released files: the generation knobs (num_examples, contour_length) are unused, not checked.
            require(os.path.isdir(os.path.join(self.data_dir, "metadata")), "data_dir",
                    f"{self.data_dir!r} has no metadata/ folder; expected a released LRA Pathfinder directory "
                    "(e.g. lra_release/pathfinder32/curv_contour_length_14 with metadata/*.npy and the PNGs)")
            return
        require(self.num_examples >= 10, "num_examples", f"must be >= 10 (80/10/10 split), got {self.num_examples}")
        require(self.contour_length >= 2, "contour_length",
                f"must be >= 2 (LRA uses 6, 9, 14), got {self.contour_length}")


def _generator_module():
    # Imported lazily: the generator is another module's business, and tests swap it for a stand-in.
    from tasks import pathfinder_generator

    return pathfinder_generator


def _release_module():
    from tasks import pathfinder_release

    return pathfinder_release


def _split(images: np.ndarray, labels: np.ndarray) -> Arrays:
    """80/10/10 in the given order (``int`` boundaries: 160k/20k/20k at LRA's 200k)."""
    n = labels.shape[0]
    a, b = int(0.8 * n), int(0.9 * n)
    tokens = images.reshape(n, -1)
    return {"train": {"tokens": tokens[:a], "labels": labels[:a]},
            "validation": {"tokens": tokens[a:b], "labels": labels[a:b]},
            "test": {"tokens": tokens[b:], "labels": labels[b:]}}


class _PathfinderBase(Task):
    num_classes = 2
    token_offset = 1
    default_image_size: ClassVar[int] = 32
    config: PathfinderConfig

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict[str, Any]) -> str:
        size = params.get("image_size") or cls.default_image_size
        return _release_module().release_dir(data_root, size, int(params["contour_length"]))

    @property
    def image_size(self) -> int:
        return self.config.image_size or self.default_image_size

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def max_length(self) -> int:
        return self.image_size * self.image_size

    def source_identity(self) -> dict:
        if self.config.data_dir is not None:
            try:
                meta = _release_module().metadata_files(self.config.data_dir)
            except FileNotFoundError:
                meta = []
            # "reader" names how the files become arrays (text/binary metadata, empty PNGs skipped, seeded order).
            return {"data_dir": os.path.abspath(self.config.data_dir), "metadata": [file_identity(m) for m in meta],
                    "reader": "release-v2"}
        module = _generator_module()
        path = getattr(module, "__file__", None)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16] if path else module.__name__
        return {"generator": digest, "image_size": self.image_size}

    def build(self) -> Arrays:
        c = self.config
        if c.data_dir is not None:
            images, labels, skipped = _release_module().read_release_dir(
                c.data_dir, image_size=self.image_size, num_workers=c.num_workers, shuffle_seed=c.seed)
            self.build_notes = {"source": os.path.abspath(c.data_dir), "skipped": skipped,
                                "order": f"metadata order, then a permutation seeded by {c.seed}, then 80/10/10"}
        else:
            images, labels = _generator_module().generate_pathfinder(c.num_examples, self.image_size,
                                                                     c.contour_length, c.seed,
                                                                     num_workers=c.num_workers)
            self.build_notes = {"source": "generated", "order": "generation order, then 80/10/10"}
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
        n = labels.shape[0]
        if images.dtype != np.uint8 or images.shape != (n, self.image_size, self.image_size):
            raise RuntimeError(f"{self.name}: expected uint8 images ({n}, {self.image_size}, {self.image_size}), "
                               f"got {images.dtype} {images.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise RuntimeError(f"{self.name}: labels must be 0/1")
        return _split(images, labels)


@register_task("pathfinder", config=PathfinderConfig)
class Pathfinder(_PathfinderBase):
    """Pathfinder: 32x32 path-connectivity images as 1024 pixel tokens (LRA)."""

    default_image_size = 32


@register_task("pathx", config=PathfinderConfig)
class PathX(_PathfinderBase):
    """Path-X: 128x128 path-connectivity images as 16384 pixel tokens (LRA)."""

    default_image_size = 128
