"""Text (LRA): byte-level IMDb sentiment classification, 2 classes.

Tokens are the UTF-8 bytes of a review, shifted by +1 so that 0 stays padding: byte ``b`` is token ``b + 1``,
``vocab_size = 257``. Reviews are truncated/padded to ``max_length`` bytes. The default 4096 follows the LRA
paper; LRA's released config used 1000 (pass ``max_length=1000`` to match the code).

Splits: LRA trains on the 25k IMDb train reviews and evaluates on the 25k test reviews, using the test set as
validation too. We reproduce that: ``validation`` is the ``test`` split (same arrays, stored once).

Sources (through ``datasets``): the hub dataset ``hub_name`` (default ``"imdb"``), or with ``data_dir`` local
files with columns ``text`` and ``label``: the hub's parquet layout (``plain_text/train-*.parquet``,
``plain_text/test-*.parquet``) or flat ``train.{parquet,csv,jsonl}`` / ``test.{...}`` files. Other files
(e.g. ``unsupervised-*``) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.base import (
    Arrays,
    Task,
    TaskConfig,
    bytes_to_rows,
    load_source,
    register_task,
    require,
    source_files_identity,
    subset_rows,
)

EXPECTED_FILES = ("train and test files with columns text,label: the hub parquet layout "
                  "(plain_text/train-*.parquet, plain_text/test-*.parquet) or train.csv/test.csv "
                  "(or .jsonl/.parquet)")


@dataclass(frozen=True)
class TextConfig(TaskConfig):
    """Byte-level IMDb. ``max_length`` 4096 as the LRA paper (LRA's code: 1000)."""

    max_length: int = 4096
    data_dir: str | None = None
    hub_name: str = "imdb"
    # Size knobs for small runs: a seeded random subset of each split (None: all 25k).
    num_train: int | None = None
    num_test: int | None = None

    def validate(self) -> None:
        require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1 or None, got {value}")


@register_task("text", config=TextConfig)
class Text(Task):
    """Text: byte-level IMDb review sentiment (LRA), train 25k / test 25k, test doubles as validation."""

    num_classes = 2
    token_offset = 1
    split_aliases = {"validation": "test"}
    config: TextConfig

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def source_identity(self) -> dict:
        if self.config.data_dir is None:
            return {"hub": self.config.hub_name}
        return source_files_identity(self.config.data_dir, ("train", "test"))

    def build(self) -> Arrays:
        ds = load_source(self.config.hub_name, self.config.data_dir, ("train", "test"), EXPECTED_FILES,
                         self.cache_dir)
        out = {}
        for split in ("train", "test"):
            part = ds[split]
            k = self.config.num_train if split == "train" else self.config.num_test
            part = part.select(subset_rows(len(part), k, self.config.seed))
            missing = {"text", "label"} - set(part.column_names)
            if missing:
                raise ValueError(f"IMDb split {split!r} lacks column(s) {sorted(missing)}; "
                                 f"has {part.column_names}; expected text,label")
            labels = np.asarray(part["label"], dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() > 1):
                raise ValueError(f"IMDb split {split!r}: labels must be 0/1, got {np.unique(labels)[:10]}")
            tokens, lengths = bytes_to_rows(list(part["text"]), self.config.max_length)
            out[split] = {"tokens": tokens, "lengths": lengths, "labels": labels}
        return out
