"""Read a released LRA Pathfinder / Path-X folder, e.g. ``lra_release/pathfinder32/curv_contour_length_14``.

Layout (``lra_benchmarks/data/pathfinder.py`` in google-research/long-range-arena; the PyTorch ports read it the
same way)::

    <folder>/metadata/0.npy, 1.npy, ...      one line per image, despite the extension (see below)
    <folder>/imgs/<k>/sample_<i>.png         8-bit grayscale PNGs

A metadata line has 11 space-separated fields, e.g. ``imgs/0 sample_0.png 0 1 1.0 14 2 2 0.5 1 1``: the image is
``<folder>/<field 1>/<field 2>`` and the label is the 4th field. In the release these ``.npy`` files are plain
text; the public generator (``snakes2``) writes the same rows with ``np.save`` as a string array, so both are read.
The release holds some zero-byte PNGs: LRA's input pipeline filters them out (``tf.strings.length(image) > 0``)
and the ports skip them; we skip them too and report each one (path and reason). A listed image that is missing
or cannot be decoded is an error naming it.
"""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# LRA's difficulty folders by contour length ("easy", "intermediate", "hard").
DIFFICULTY_DIRS = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}
NPY_MAGIC = b"\x93NUMPY"


def release_dir(data_root: str, image_size: int, contour_length: int) -> str:
    """``<data_root>/pathfinder<image_size>/<difficulty folder>`` (``curv_contour_length_14`` for LRA)."""
    difficulty = DIFFICULTY_DIRS.get(contour_length, f"curv_contour_length_{contour_length}")
    return os.path.join(data_root, f"pathfinder{image_size}", difficulty)


def metadata_files(path: str) -> list[str]:
    """``<path>/metadata/*.npy`` in numeric order (``10.npy`` after ``2.npy``); FileNotFoundError if none."""
    files = glob.glob(os.path.join(path, "metadata", "*.npy"))
    if not files:
        raise FileNotFoundError(f"no metadata/*.npy under {path!r}; expected the LRA pathfinder layout "
                                "(e.g. lra_release/pathfinder32/curv_contour_length_14)")

    def order(f: str) -> tuple[int, int | str]:
        stem = os.path.splitext(os.path.basename(f))[0]
        return (0, int(stem)) if stem.isdigit() else (1, stem)

    return sorted(files, key=order)


def read_metadata(path: str) -> list[tuple[str, str, int]]:
    """Rows ``(subdir, filename, label)`` of one metadata file, text (the release) or binary ``np.save``."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(NPY_MAGIC):
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array of rows [subdir, filename, index, label, ...], "
                             f"got shape {array.shape}")
        rows = [[str(x) for x in r] for r in array]
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: neither a .npy array nor text metadata ({err})") from err
        rows = [line.split() for line in text.splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        if len(row) < 4:
            raise ValueError(f"{path}: line {i + 1} has {len(row)} fields, expected >= 4 "
                             f"(subdir filename index label ...): {' '.join(row)!r}")
        try:
            label = int(float(row[3]))
        except ValueError as err:
            raise ValueError(f"{path}: line {i + 1}: label (4th field) {row[3]!r} is not a number") from err
        if label not in (0, 1):
            raise ValueError(f"{path}: line {i + 1}: label must be 0 or 1, got {row[3]!r}")
        out.append((row[0], row[1], label))
    return out


def _read_png_gray(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot be decoded as an image ({err})") from err


def list_release_dir(path: str, skip_missing: bool = False) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """The readable images listed in ``<path>/metadata`` in metadata order, ``[(file, label)]``, and the skipped.

    ``skipped`` lists ``{"path", "reason"}`` for each zero-byte PNG (and each missing one with
    ``skip_missing=True``; otherwise a missing image raises FileNotFoundError naming it and its metadata file).
    """
    keep: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    for meta in metadata_files(path):
        for sub, name, label in read_metadata(meta):
            rel = os.path.join(sub, name)
            full = os.path.join(path, rel)
            try:
                size = os.path.getsize(full)
            except OSError:
                if not skip_missing:
                    raise FileNotFoundError(f"{full} is listed in {meta} but missing "
                                            "(pass skip_missing=True to skip it)") from None
                skipped.append({"path": rel, "reason": f"missing (listed in metadata/{os.path.basename(meta)})"})
                continue
            if size == 0:
                skipped.append({"path": rel, "reason": "empty file (0 bytes)"})
                continue
            keep.append((full, label))
    return keep, skipped


def read_release_dir(path: str, image_size: int | None = None, skip_missing: bool = False, num_workers: int = 1,
                     shuffle_seed: int | None = None) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Every readable image listed in ``<path>/metadata``: ``(images, labels, skipped)``.

    ``images`` uint8 ``(N, H, W)``, ``labels`` int64 ``(N,)``, in metadata order, or in the order of a permutation
    seeded by ``(shuffle_seed, N)`` when ``shuffle_seed`` is given; ``skipped`` as :func:`list_release_dir`.
    ``image_size`` checks every image is that size (ValueError naming the first that is not; without it all must
    share the first one's size). ``num_workers`` threads decode the PNGs (PIL releases the GIL while decoding),
    straight into one preallocated array: the peak memory is the images once (3.3 GB for Path-X).
    """
    keep, skipped = list_release_dir(path, skip_missing)
    if shuffle_seed is not None:
        keep = [keep[i] for i in np.random.default_rng([shuffle_seed, len(keep)]).permutation(len(keep))]
    labels = np.asarray([lab for _, lab in keep], dtype=np.int64)
    if not keep:
        size = image_size or 0
        return np.zeros((0, size, size), dtype=np.uint8), labels, skipped
    shape = (image_size, image_size) if image_size is not None else _read_png_gray(keep[0][0]).shape
    images = np.empty((len(keep), *shape), dtype=np.uint8)

    def decode(i: int) -> None:
        img = _read_png_gray(keep[i][0])
        if img.shape != shape:
            what = f"image_size={image_size}" if image_size is not None else f"{shape[0]}x{shape[1]} like the first"
            raise ValueError(f"{keep[i][0]} is {img.shape[0]}x{img.shape[1]}, expected {what}")
        images[i] = img

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for _ in pool.map(decode, range(len(keep)), chunksize=256):
            pass
    return images, labels, skipped
