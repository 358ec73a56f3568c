"""Miniature, faithful replicas of the files LRA users have: an extracted ``lra_release/`` plus IMDb and CIFAR-10.

Same folders, file names, headers, separators, line ends and file types as the real ones:

* ``listops-1000/basic_{train,val,test}.tsv``: header ``Source<TAB>Target``, written by ``csv.writer`` with its
  default ``\\r\\n`` line ends, as LRA's ``lra_benchmarks/data/listops.py`` does;
* ``tsv_data/new_aan_pairs.{train,eval,test}.tsv``: no header, ``label<TAB>id1<TAB>id2<TAB>text1<TAB>text2``,
  labels written as floats, texts raw (some with double quotes, some wrapped as ``b'...'``);
* ``pathfinder32/curv_contour_length_14`` and ``pathfinder128/...``: ``metadata/<k>.npy`` that are *text*, one
  11-field line per image, 8-bit grayscale PNGs under ``imgs/<k>/``, and one zero-byte PNG;
* ``imdb/`` and ``cifar10/``: ``DatasetDict.save_to_disk`` folders made by ``datasets`` (``plain_text`` features:
  IMDb ``text``/``label`` with an ``unsupervised`` split; CIFAR-10 ``img`` Image + ``label`` ClassLabel).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from tasks.listops import generate_listops, to_lra_string

AAN_TEXTS = ['plain text about parsing .', '"quoted" text with a "quote" inside', "b'bytes repr text \\n with escapes'",
             "b\"a bytes repr in double quotes\"", "unicode caf\u00e9 na\u00efve", "x"]
IMDB_TEXTS = ["A fine film.", "Terrible; I left.", "Caf\u00e9 \u2014 naive \U0001F600", "ok", "<br />Great", "meh"]


def write_listops(folder: str, sizes=(12, 4, 4), max_length: int = 40) -> dict[str, list]:
    os.makedirs(folder, exist_ok=True)
    tokens, lengths, labels = generate_listops(sum(sizes), seed=3, min_length=4, max_length=max_length, max_depth=4,
                                               max_args=4, num_workers=1)
    rows = [[to_lra_string(t[:n]), int(y)] for t, n, y in zip(tokens, lengths, labels)]
    out, start = {}, 0
    for split, n in zip(("train", "val", "test"), sizes):
        with open(os.path.join(folder, f"basic_{split}.tsv"), "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")  # default lineterminator "\r\n", as LRA's writer
            writer.writerow(["Source", "Target"])
            writer.writerows(rows[start:start + n])
        out[split] = rows[start:start + n]
        start += n
    return out


def write_aan(folder: str, sizes=(8, 4, 4)) -> dict[str, list]:
    os.makedirs(folder, exist_ok=True)
    out = {}
    for s, (split, n) in enumerate(zip(("train", "eval", "test"), sizes)):
        rows = []
        for i in range(n):
            label = "1.0" if (i + s) % 2 else "0.0"
            rows.append([label, f"P{s:02d}-{i:04d}", f"Q{s:02d}-{i:04d}", AAN_TEXTS[i % len(AAN_TEXTS)],
                         AAN_TEXTS[(i + 1) % len(AAN_TEXTS)] + f" doc {i}"])
        with open(os.path.join(folder, f"new_aan_pairs.{split}.tsv"), "w", newline="") as f:
            f.write("".join("\t".join(r) + "\n" for r in rows))
        out[split] = rows
    return out


def write_pathfinder(folder: str, size: int, n: int = 20, per_file: int = 10, empty: int = 3) -> dict:
    """``n`` images in ``n / per_file`` metadata files; image ``empty`` is a zero-byte PNG (listed, skipped)."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "metadata"), exist_ok=True)
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 2, size=n)
    for k, start in enumerate(range(0, n, per_file)):
        sub = f"imgs/{k}"
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        lines = []
        for i in range(start, min(start + per_file, n)):
            name = f"sample_{i}.png"
            path = os.path.join(folder, sub, name)
            if i == empty:
                open(path, "wb").close()
            else:
                Image.fromarray(images[i]).save(path)
            lines.append(f"{sub} {name} {i} {labels[i]} 1.0 14 2 2 0.5 1 1\n")
        with open(os.path.join(folder, "metadata", f"{k}.npy"), "w") as f:  # text, despite the extension
            f.write("".join(lines))
    keep = [i for i in range(n) if i != empty]
    return {"images": images[keep], "labels": labels[keep], "empty": f"imgs/{empty // per_file}/sample_{empty}.png"}


def imdb_dataset_dict(n_train: int = 20, n_test: int = 10):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})

    def part(n, offset):
        texts = [f"{IMDB_TEXTS[(i + offset) % len(IMDB_TEXTS)]} #{i}" for i in range(n)]
        return datasets.Dataset.from_dict({"text": texts, "label": [(i + offset) % 2 for i in range(n)]},
                                          features=features)

    return datasets.DatasetDict(train=part(n_train, 0), test=part(n_test, 1), unsupervised=part(4, 2))


def cifar_dataset_dict(n_train: int = 20, n_test: int = 10):
    import datasets
    from PIL import Image

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(10)

    def part(n):
        arrays = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        return datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in arrays],
                                           "label": [i % 10 for i in range(n)]}, features=features)

    return datasets.DatasetDict(train=part(n_train), test=part(n_test))


def make_lra_release(root: str) -> dict:
    """Write the whole miniature replica under ``root``; returns what was written, per task."""
    return {
        "listops": write_listops(os.path.join(root, "listops-1000")),
        "retrieval": write_aan(os.path.join(root, "tsv_data")),
        "pathfinder": write_pathfinder(os.path.join(root, "pathfinder32", "curv_contour_length_14"), 32),
        "pathx": write_pathfinder(os.path.join(root, "pathfinder128", "curv_contour_length_14"), 128),
        "text": imdb_dataset_dict().save_to_disk(os.path.join(root, "imdb")),
        "image": cifar_dataset_dict().save_to_disk(os.path.join(root, "cifar10")),
    }
