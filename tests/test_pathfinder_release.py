"""Reading released LRA Pathfinder / Path-X folders: text metadata, binary np.save metadata, zero-byte PNGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from lra_replica import write_pathfinder
from PIL import Image

from tasks import build_task
from tasks.pathfinder_release import read_metadata, read_release_dir, release_dir


def test_text_metadata_with_11_fields_and_an_empty_png(tmp_path):
    folder = tmp_path / "pathfinder32" / "curv_contour_length_14"
    written = write_pathfinder(str(folder), 32, n=25, per_file=10, empty=3)
    # The release's metadata are text files despite the .npy extension.
    assert not open(folder / "metadata" / "0.npy", "rb").read().startswith(b"\x93NUMPY")
    assert read_metadata(str(folder / "metadata" / "0.npy"))[0] == ("imgs/0", "sample_0.png", written["labels"][0])
    images, labels, skipped = read_release_dir(str(folder), image_size=32, num_workers=2)
    np.testing.assert_array_equal(images, written["images"])  # metadata order: 0.npy, 1.npy, 2.npy
    np.testing.assert_array_equal(labels, written["labels"])
    assert skipped == [{"path": "imgs/0/sample_3.png", "reason": "empty file (0 bytes)"}]


def test_metadata_files_in_numeric_order_and_seeded_shuffle(tmp_path):
    folder = tmp_path / "pf"
    written = write_pathfinder(str(folder), 16, n=12, per_file=1, empty=99)  # 0.npy .. 11.npy: 10 after 2
    images, labels, _ = read_release_dir(str(folder))
    np.testing.assert_array_equal(images, written["images"])
    shuffled, shuffled_labels, _ = read_release_dir(str(folder), shuffle_seed=5)
    order = np.random.default_rng([5, 12]).permutation(12)
    np.testing.assert_array_equal(shuffled, written["images"][order])
    np.testing.assert_array_equal(shuffled_labels, written["labels"][order])


def test_binary_np_save_metadata_still_read(tmp_path):
    # The public generator (snakes2) writes the same rows with np.save as a string array.
    folder = tmp_path / "pf"
    os.makedirs(folder / "metadata")
    os.makedirs(folder / "imgs" / "0")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    rows = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / "imgs" / "0" / f"sample_{i}.png")
        rows.append(["imgs/0", f"sample_{i}.png", str(i), str(i % 2), "1.8", "14", "4", "2", "0.5", "1", "1"])
    np.save(folder / "metadata" / "0.npy", np.array(rows))
    got, labels, skipped = read_release_dir(str(folder), image_size=16)
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [0, 1, 0] and skipped == []


def test_errors_name_the_file(tmp_path):
    folder = tmp_path / "pf"
    write_pathfinder(str(folder), 16, n=4, per_file=4, empty=99)
    with pytest.raises(ValueError, match="image_size=32"):
        read_release_dir(str(folder), image_size=32)
    os.remove(folder / "imgs" / "0" / "sample_2.png")
    with pytest.raises(FileNotFoundError, match="sample_2.png.*metadata"):
        read_release_dir(str(folder))
    _, labels, skipped = read_release_dir(str(folder), skip_missing=True)
    assert labels.size == 3 and skipped[0]["path"] == "imgs/0/sample_2.png" and "missing" in skipped[0]["reason"]
    (folder / "imgs" / "0" / "sample_1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="sample_1.png.*decoded"):
        read_release_dir(str(folder), skip_missing=True)
    (folder / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 2 1.0 14 2 2 0.5 1 1\n")
    with pytest.raises(ValueError, match="0.npy.*label must be 0 or 1"):
        read_release_dir(str(folder))
    (folder / "metadata" / "0.npy").write_text("imgs/0 sample_0.png\n")
    with pytest.raises(ValueError, match="0.npy.*line 1 has 2 fields"):
        read_release_dir(str(folder))
    with pytest.raises(FileNotFoundError, match="metadata"):
        read_release_dir(str(folder / "imgs"))


@pytest.mark.parametrize("name,size,folder", [("pathfinder", 32, "pathfinder32"), ("pathx", 128, "pathfinder128")])
def test_task_reads_release_under_data_root(tmp_path, name, size, folder):
    root = tmp_path / "lra_release"
    written = write_pathfinder(str(root / folder / "curv_contour_length_14"), size, n=20, per_file=10, empty=3)
    task = build_task(name, cache_dir=str(tmp_path / "c"), data_root=str(root))
    assert task.config.data_dir == release_dir(str(root), size, 14)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [15, 2, 2]  # 19 readable, 80/10/10
    # Every readable image once, as pixel p -> token p + 1, with its own label; the empty PNG is reported.
    tokens = np.concatenate([next(task.batches(s, 99))["tokens"].numpy() for s in ("train", "validation", "test")])
    labels = np.concatenate([task.labels(s) for s in ("train", "validation", "test")])
    expected = {row.tobytes(): int(y) for row, y in zip(written["images"].reshape(19, -1).astype(np.int64) + 1,
                                                        written["labels"])}
    assert {row.tobytes(): int(y) for row, y in zip(tokens, labels)} == expected
    assert task.notes["skipped"] == [{"path": written["empty"], "reason": "empty file (0 bytes)"}]
    # The difficulty folder follows contour_length (LRA: 6 curv_baseline, 9, 14): absent here, and named.
    with pytest.raises(ValueError, match="curv_contour_length_9"):
        build_task(name, data_root=str(root), contour_length=9)
