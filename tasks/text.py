"""Text (LRA): byte-level IMDb sentiment classification, 2 classes.

Tokens are the UTF-8 bytes of a review, shifted by +1 so that 0 stays padding: byte ``b`` is token ``b + 1``,
``vocab_size = 257``. Reviews are truncated/padded to ``max_length`` bytes. The default 4096 follows the LRA
paper; LRA's released config used 1000 (pass ``max_length=1000`` to match the code).

Splits: LRA trained on the 25k IMDb train reviews and used the 25k test reviews both as validation and as test,
so "test accuracy at the best validation checkpoint" was a best-of-many test score. Our default
(``validation="holdout"``) is honest: ``validation_size`` reviews (None: 10% of train, i.e. 2,500) are held out of
train by a permutation seeded with ``seed`` and validate; train keeps the rest; test only gives the final score.
``validation="test"`` reproduces LRA's alias (validation *is* test, stored once); a run record says which was used
(``validation_is_test``) and the report marks such runs. See ``docs/DATA.md``.

Sources (through ``datasets``): with ``data_dir`` (or ``data_root``: ``<data_root>/imdb`` when present) any
layout :mod:`tasks.sources` reads (``save_to_disk`` folders, Arrow caches, hub parquet in its three namings, flat
``train.csv``/``test.csv``), with columns ``text`` and ``label``; other splits (``unsupervised``) are ignored.
Without it, the hub dataset ``hub_name`` (default ``"imdb"``) from the user's own cache, offline if need be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.base import Arrays, Task, TaskConfig, bytes_to_rows, register_task, require, subset_rows
from tasks.sources import folder_beside_release, open_splits, source_identity

EXPECTED_FILES = ("IMDb train and test splits with columns text,label: a datasets save_to_disk folder, a datasets "
                  "Arrow cache, hub parquet (plain_text/train-*.parquet, plain_text/train/0000.parquet, "
                  "plain_text/imdb-train.parquet) or train.csv/test.csv (or .jsonl/.parquet)")
VALIDATION_PROTOCOLS = ("holdout", "test")


@dataclass(frozen=True)
class TextConfig(TaskConfig):
    """Byte-level IMDb. ``max_length`` 4096 as the LRA paper (LRA's code: 1000)."""

    max_length: int = 4096
    data_dir: str | None = None
    hub_name: str = "imdb"
    # "holdout": validation_size train reviews held out (seeded); "test": LRA's alias, validation = test.
    validation: str = "holdout"
    validation_size: int | None = None  # None: 10% of train (rounded; 2,500 of 25k)
    # Size knobs for small runs: a seeded random subset of train (after the hold-out) and test (None: all).
    num_train: int | None = None
    num_test: int | None = None

    def validate(self) -> None:
        require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        require(self.validation in VALIDATION_PROTOCOLS, "validation",
                f"must be one of {', '.join(VALIDATION_PROTOCOLS)}, got {self.validation!r}")
        require(self.validation_size is None or self.validation_size >= 1, "validation_size",
                f"must be >= 1 or None, got {self.validation_size}")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1 or None, got {value}")


@register_task("text", config=TextConfig)
class Text(Task):
    """Text: byte-level IMDb review sentiment (LRA), train 25k (validation held out of it) / test 25k."""

    num_classes = 2
    token_offset = 1
    config: TextConfig

    def __init__(self, config: TextConfig, cache_dir: str | None = None) -> None:
        super().__init__(config, cache_dir)
        self.split_aliases = {"validation": "test"} if config.validation == "test" else {}

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict[str, Any]) -> str | None:
        return folder_beside_release(data_root, params["hub_name"])

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def source_identity(self) -> dict:
        return source_identity(self.config.hub_name, self.config.data_dir, ("train", "test"))

    def build(self) -> Arrays:
        c = self.config
        parts, where = open_splits(c.hub_name, c.data_dir, ("train", "test"), EXPECTED_FILES, self.cache_dir)
        read = {}
        for split, part in parts.items():
            missing = {"text", "label"} - set(part.column_names)
            if missing:
                raise ValueError(f"IMDb split {split!r} ({where[split]}) lacks column(s) {sorted(missing)}; "
                                 f"has {part.column_names}; expected text,label")
            labels = np.asarray(part["label"], dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() > 1):
                raise ValueError(f"IMDb split {split!r}: labels must be 0/1, got {np.unique(labels)[:10]}")
            read[split] = (part, labels)
        self.build_notes = {"source": where}
        train_rows = np.arange(len(read["train"][1]))
        out = {}
        if c.validation == "holdout":
            n = train_rows.size
            size = c.validation_size if c.validation_size is not None else max(1, round(0.1 * n))
            if size >= n:
                raise ValueError(f"invalid task parameter 'validation_size': {size} >= {n} train reviews")
            order = np.random.default_rng([c.seed, n]).permutation(n)
            out["validation"] = np.sort(order[:size])
            train_rows = np.sort(order[size:])
            self.build_notes["validation"] = f"{size} of {n} train reviews held out (permutation seeded by {c.seed})"
        else:
            self.build_notes["validation"] = "LRA alias: validation is the test split"
        out["train"] = train_rows[subset_rows(train_rows.size, c.num_train, c.seed)]
        out["test"] = subset_rows(len(read["test"][1]), c.num_test, c.seed)
        arrays = {}
        for split, rows in out.items():
            part, labels = read["test" if split == "test" else "train"]
            tokens, lengths = bytes_to_rows(list(part.select(rows)["text"]), c.max_length)
            arrays[split] = {"tokens": tokens, "lengths": lengths, "labels": labels[rows]}
        return arrays
