"""Retrieval (LRA): byte-level ACL Anthology Network document pairs; does document 1 cite document 2? 2 classes.

Input: the LRA release TSV files in ``data_dir`` (``data_root``: ``<data_root>/tsv_data``): ``new_aan_pairs.train.tsv``,
``new_aan_pairs.eval.tsv`` (our ``validation``) and ``new_aan_pairs.test.tsv``; tab-separated, no header,
columns ``label, id1, id2, text1, text2`` (label written as a number, e.g. ``1`` or ``1.0``). Read with the
``datasets`` "csv" builder (delimiter tab, no quoting: the texts are raw, as LRA's ``use_quote_delim=False``
reads them: quotes and the ``b'...'`` wrappers some rows carry are part of the bytes). There is no hub copy, so
``data_dir`` (or ``data_root``) is required.

Each document is encoded as UTF-8 bytes, truncated/padded to ``max_length`` (LRA: 4000 per document, 8K in
all), and shifted by +1 so that 0 stays padding (``vocab_size = 257``). Two sequences per example
(``tokens``/``mask`` and ``tokens2``/``mask2``); the model must encode them separately (dual encoder, no
cross-attention).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from tasks.base import Arrays, Task, TaskConfig, bytes_to_rows, register_task, require, subset_rows
from tasks.cache import file_identity

RELEASE_DIR = "tsv_data"  # inside an extracted lra_release
TSV_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
             "test": "new_aan_pairs.test.tsv"}
COLUMNS = ("label", "id1", "id2", "text1", "text2")


@dataclass(frozen=True)
class RetrievalConfig(TaskConfig):
    """Byte-level AAN pairs from the LRA TSV files in ``data_dir``; ``max_length`` bytes per document."""

    max_length: int = 4000
    data_dir: str | None = None
    # Size knobs for small runs: a seeded random subset of each split (None: all rows).
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None

    def validate(self) -> None:
        require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1 or None, got {value}")


def _expected() -> str:
    return f"the LRA AAN files {', '.join(TSV_FILES.values())} (tab-separated label,id1,id2,text1,text2, no header)"


@register_task("retrieval", config=RetrievalConfig)
class Retrieval(Task):
    """Retrieval: byte-level AAN citation-link classification between two documents (LRA)."""

    num_classes = 2
    two_sequence = True
    token_offset = 1
    config: RetrievalConfig

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict) -> str:
        return os.path.join(data_root, RELEASE_DIR)

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def _paths(self) -> dict[str, str]:
        data_dir = self.config.data_dir
        if data_dir is None:
            raise ValueError(f"task 'retrieval' has no hub source: set the task parameter data_dir to the directory "
                             f"with {_expected()}")
        paths = {s: os.path.join(data_dir, f) for s, f in TSV_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"invalid task parameter 'data_dir': missing {', '.join(missing)}; expected {_expected()}")
        return paths

    def source_identity(self) -> dict:
        if self.config.data_dir is None:
            return {}
        try:
            return {s: file_identity(p) for s, p in self._paths().items()}
        except ValueError:
            return {"data_dir": os.path.abspath(self.config.data_dir), "missing": True}

    def build(self) -> Arrays:
        import datasets

        paths = self._paths()
        features = datasets.Features({"label": datasets.Value("float64"), "id1": datasets.Value("string"),
                                      "id2": datasets.Value("string"), "text1": datasets.Value("string"),
                                      "text2": datasets.Value("string")})
        ds = datasets.load_dataset("csv", data_files=paths, delimiter="\t", header=None, column_names=list(COLUMNS),
                                   quoting=csv.QUOTE_NONE, keep_default_na=False, features=features,
                                   cache_dir=os.path.join(self.cache_dir or _cache_dir(), "hf"))
        out = {}
        for split in TSV_FILES:
            part = ds[split]
            k = {"train": self.config.num_train, "validation": self.config.num_val, "test": self.config.num_test}[split]
            part = part.select(subset_rows(len(part), k, self.config.seed))
            raw = np.asarray(part["label"], dtype=np.float64)
            labels = raw.astype(np.int64)
            if not np.array_equal(labels, raw) or (labels.size and not np.isin(labels, (0, 1)).all()):
                raise ValueError(f"{paths[split]}: label must be 0 or 1, got {np.unique(raw)[:10]}")
            tokens, lengths = bytes_to_rows(list(part["text1"]), self.config.max_length)
            tokens2, lengths2 = bytes_to_rows(list(part["text2"]), self.config.max_length)
            out[split] = {"tokens": tokens, "lengths": lengths, "tokens2": tokens2, "lengths2": lengths2,
                          "labels": labels}
        self.build_notes = {"source": paths}
        return out


def _cache_dir() -> str:
    from tasks.cache import default_cache_dir

    return default_cache_dir()
