"""Pathfinder / Path-X generator: labels, determinism, marker semantics, geometry, rendering, errors."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from tasks.pathfinder_generator import (
    _point_segment_distance,
    _segment_distance,
    generate_pathfinder,
    pathfinder_params,
    render_sample,
)


def _sample(size: int, contour: int, label: int, seed: int):
    return render_sample(np.random.default_rng([seed, size, contour]), pathfinder_params(size, contour), label)


def _as_complex(yx: np.ndarray) -> np.ndarray:
    return yx[..., 1] + 1j * yx[..., 0]


def _snake_distance(s: np.ndarray, t: np.ndarray) -> float:
    """Exact minimum distance between two snakes' centre lines ((n, 2, 2) paddle arrays)."""
    a0, a1 = _as_complex(s[:, 0])[:, None], _as_complex(s[:, 1])[:, None]
    b0, b1 = _as_complex(t[:, 0])[None], _as_complex(t[:, 1])[None]
    return float(_segment_distance(a0, a1, b0, b1).min())


# ------------------------------------------------------------------------------------------------ labels, determinism


@pytest.mark.parametrize("n", [0, 1, 10, 11])
def test_labels_balanced_int64(n):
    images, labels = generate_pathfinder(n, 16, 4, seed=0, num_workers=1)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert images.shape == (n, 16, 16) and images.dtype == np.uint8
    assert labels.sum() == n // 2 and set(labels.tolist()) <= {0, 1}


def test_deterministic_and_independent_of_workers():
    # 70 images: above the size where generate_pathfinder uses a process pool.
    x1, y1 = generate_pathfinder(70, 24, 5, seed=3, num_workers=1)
    x2, y2 = generate_pathfinder(70, 24, 5, seed=3, num_workers=2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, y3 = generate_pathfinder(70, 24, 5, seed=4, num_workers=1)
    assert not np.array_equal(x1, x3) and not np.array_equal(y1, y3)
    # A prefix of a larger set is the smaller set with the same seed only if labels agree; images are per index.
    x4, y4 = generate_pathfinder(10, 24, 5, seed=3, num_workers=1)
    same = y4 == y1[:10]
    np.testing.assert_array_equal(x4[same], x1[:10][same])


def test_labels_are_shuffled_not_blocked():
    _, labels = generate_pathfinder(40, 16, 4, seed=1, num_workers=1)
    assert 0 < labels[:20].sum() < 20  # a permutation, not 20 ones then 20 zeros


# ------------------------------------------------------------------------------------------------ task semantics


@pytest.mark.parametrize("size,contour", [(32, 14), (32, 6), (16, 4), (128, 14)])
@pytest.mark.parametrize("label", [0, 1])
def test_markers_sit_on_the_right_snake_ends(size, contour, label):
    for seed in range(3):
        image, info = _sample(size, contour, label, seed)
        o, t = info.marker_snakes
        assert info.label == label and info.marker_ends == ("origin", "terminal")
        assert o in (0, 1) and t in (0, 1)
        assert (o == t) == (label == 1)  # positive: same target snake; negative: the other target snake
        np.testing.assert_allclose(info.markers[0], info.snakes[o][0, 0])  # origin tip
        np.testing.assert_allclose(info.markers[1], info.snakes[t][-1, 1])  # terminal tip
        # The discs are really drawn there: a disc of radius >= 1.5 covers its centre pixel fully.
        rows, cols = np.floor(info.markers).astype(int).T
        assert (image[rows, cols] == 255).all()
        # The two origin tips are seed_distance apart, so marker distance is no label cue.
        gap = np.linalg.norm(info.snakes[0][0, 0] - info.snakes[1][0, 0])
        assert gap == pytest.approx(pathfinder_params(size, contour).seed_distance)


def test_label_changes_only_the_second_marker():
    """Same random stream, both labels: identical snakes and first marker; only the second disc moves, from the
    other target's terminal tip to the marked snake's own. Nothing else in the image can carry the label."""
    p = pathfinder_params(32, 14)
    for seed in range(3):
        img0, info0 = render_sample(np.random.default_rng(seed), p, 0)
        img1, info1 = render_sample(np.random.default_rng(seed), p, 1)
        assert len(info0.snakes) == len(info1.snakes)
        for s0, s1 in zip(info0.snakes, info1.snakes):
            np.testing.assert_array_equal(s0, s1)
        np.testing.assert_array_equal(info0.markers[0], info1.markers[0])
        o = info0.marker_snakes[0]
        np.testing.assert_array_equal(info0.markers[1], info0.snakes[1 - o][-1, 1])
        np.testing.assert_array_equal(info1.markers[1], info1.snakes[o][-1, 1])
        # Pixels differ only near the two possible terminal markers.
        diff = np.argwhere(img0 != img1) + 0.5
        near = [np.linalg.norm(diff - c, axis=1) <= p.marker_radius + 1.5 for c in (info0.markers[1], info1.markers[1])]
        assert diff.size and (near[0] | near[1]).all()


@pytest.mark.parametrize("size,contour", [(32, 14), (128, 14), (24, 5)])
def test_snakes_are_chains_and_never_touch_each_other(size, contour):
    """Targets cannot be connected through a touching stroke: every pair of snakes keeps the stroke clearance,
    and each snake's paddles follow each other across a gap of at most 2 * margin."""
    p = pathfinder_params(size, contour)
    for seed in range(3):
        _, info = _sample(size, contour, seed % 2, seed)
        need = 2 * p.thickness + info.margin
        for s, t in itertools.combinations(info.snakes, 2):
            assert _snake_distance(s, t) >= need - 1e-9
        for s in info.snakes:
            lengths = np.linalg.norm(s[:, 1] - s[:, 0], axis=-1)
            np.testing.assert_allclose(lengths, p.paddle_length)
            gaps = np.linalg.norm(s[1:, 0] - s[:-1, 1], axis=-1)
            assert (gaps <= 2 * info.margin + 1e-9).all()
            assert (s >= p.padding).all() and (s <= size - p.padding).all()


@pytest.mark.parametrize("contour", [4, 9, 14])
def test_contour_length_sets_snake_lengths(contour):
    _, info = _sample(32, contour, 1, 0)
    assert [len(s) for s in info.snakes[:2]] == [contour, contour]
    assert all(len(s) == max(1, contour // 3) for s in info.snakes[2:])
    assert len(info.snakes) > 2  # there are distractors


def test_turns_respect_continuity():
    """Consecutive paddles turn by at most pi / (2 * continuity); higher continuity gives straighter snakes."""
    turns = {}
    for size in (32, 128):
        p = pathfinder_params(size, 14)
        all_turns = []
        for seed in range(4):
            _, info = _sample(size, 14, 1, seed)
            for s in info.snakes[:2]:
                d = s[:, 1] - s[:, 0]
                ang = np.unwrap(np.arctan2(d[:, 0], d[:, 1]))
                all_turns.append(np.abs(np.diff(ang)))
        all_turns = np.concatenate(all_turns)
        assert all_turns.max() <= np.pi / (2 * p.continuity) + 1e-9
        turns[size] = all_turns.mean()
    assert turns[128] < turns[32]  # continuity 1.8 vs 1.0


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("size,contour", [(32, 14), (16, 4), (64, 9), (128, 14)])
def test_image_size_dtype_and_values(size, contour):
    image, info = _sample(size, contour, 0, 1)
    p = pathfinder_params(size, contour)
    assert image.shape == (size, size) and image.dtype == np.uint8
    assert image.max() == 255 and len(np.unique(image)) > 10  # anti-aliased, not binary
    # Every paddle is visible at its midpoint pixel.
    for s in info.snakes:
        mid = np.floor(s.mean(axis=1)).astype(int)
        assert (image[mid[:, 0], mid[:, 1]] >= 40).all()
    # Background is exactly 0: a pixel whose centre is farther than radius + half a diagonal from every stroke
    # and marker cannot be touched by any stroke.
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    centres = (xs + 1j * ys).ravel()[:, None]
    segs = np.concatenate(info.snakes)
    d_stroke = _point_segment_distance(centres, _as_complex(segs[:, 0])[None], _as_complex(segs[:, 1])[None])
    d_marker = np.abs(centres - _as_complex(info.markers)[None])
    far = (d_stroke.min(1) > p.thickness + 0.71) & (d_marker.min(1) > p.marker_radius + 0.71)
    assert far.mean() > 0.3
    assert (image.ravel()[far] == 0).all()


def test_segment_distance_is_exact():
    rng = np.random.default_rng(0)
    a0, a1, b0, b1 = (rng.uniform(0, 4, size=(200, 2)) @ np.array([1, 1j]) for _ in range(4))
    b1[:20] = b0[:20]  # zero-length segments are points (marker discs)
    got = _segment_distance(a0, a1, b0, b1)
    t = np.linspace(0, 1, 201)  # point spacing <= 4 * sqrt(2) / 200 < 0.03 on segments inside [0, 4]^2
    pa = a0[:, None] + t[None] * (a1 - a0)[:, None]
    pb = b0[:, None] + t[None] * (b1 - b0)[:, None]
    brute = np.abs(pa[:, :, None] - pb[:, None, :]).min(axis=(1, 2))
    assert (got <= brute + 1e-9).all()  # never over-estimates
    np.testing.assert_allclose(got, brute, atol=0.03)
    crossing = _segment_distance(np.array([0j]), np.array([2 + 2j]), np.array([2 + 0j]), np.array([0 + 2j]))
    assert crossing[0] == 0.0


def test_params_follow_lra_at_32_and_128():
    p32, p128, p80 = pathfinder_params(32, 14), pathfinder_params(128, 14), pathfinder_params(80, 14)
    assert (p32.paddle_length, p32.margins, p32.thickness, p32.marker_radius, p32.seed_distance, p32.continuity) == (
        2.0, (1.0,), 0.5, 1.5, 7.0, 1.0)
    assert (p128.margins, p128.thickness, p128.marker_radius, p128.seed_distance, p128.continuity) == (
        (2.0, 3.0), 1.5, 3.0, 20.0, 1.8)
    assert p32.distractor_length == p128.distractor_length == 4
    assert p32.seed_distance < p80.seed_distance < p128.seed_distance
    assert p32.continuity < p80.continuity < p128.continuity
    for size in (16, 20, 48, 100):
        image, _ = render_sample(np.random.default_rng(size), pathfinder_params(size, 4), 1)
        assert image.shape == (size, size)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,name", [
    (dict(contour_length=1), "contour_length"),
    (dict(contour_length=0), "contour_length"),
    (dict(contour_length=3.5), "contour_length"),
    (dict(image_size=8), "image_size"),
    (dict(image_size=512), "image_size"),
    (dict(num_images=-1), "num_images"),
    (dict(num_workers=0), "num_workers"),
    (dict(seed=-1), "seed"),
])
def test_bad_parameters_raise_naming_them(kwargs, name):
    args = dict(num_images=2, image_size=32, contour_length=6, seed=0, num_workers=1) | kwargs
    with pytest.raises(ValueError, match=name):
        generate_pathfinder(**args)


def test_bad_label_and_impossible_geometry():
    with pytest.raises(ValueError, match="label"):
        render_sample(np.random.default_rng(0), pathfinder_params(32, 6), 2)
    cramped = dataclasses.replace(pathfinder_params(16, 14), max_attempts=3)
    with pytest.raises(RuntimeError, match="contour_length=14"):
        render_sample(np.random.default_rng(0), cramped, 1)


# ------------------------------------------------------------------------------------------------ LRA reader


def test_preview_writes_a_png(tmp_path):
    from tasks.pathfinder_preview import main

    out = tmp_path / "grid.png"
    main(["--out", str(out), "--n32", "2", "--n128", "1", "--contour-length", "6"])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
