"""Pathfinder / Path-X images: the "snakes" task of Linsley et al. (2018), as used by Long Range Arena.

An image holds two *target* snakes grown from nearby seeds (``seed_distance`` apart), a number of shorter
*distractor* snakes, and two marker discs. A snake is a chain of ``contour_length`` short line segments
("paddles") separated by small gaps; each paddle turns from the previous one by a random angle drawn with the
continuity weight ``cos(continuity * delta)**2`` (zero beyond ``pi / (2 * continuity)``), so higher continuity
means straighter snakes. Snakes keep a clearance of ``margin`` pixels from everything else (candidate turns
that would collide are removed before sampling; a target snake that runs into a dead end backs up two paddles,
and after ten dead ends both target snakes are regrown from new seeds; ``snakes2`` always regrows, which needs
~20 attempts per 32 px "hard" image instead of ~2.6, for a slightly different but equally valid snake law).

Markers: the first disc sits on the *origin* tip of target snake ``o`` (``o`` chosen at random); the second disc
sits on the *terminal* tip of the same snake (label 1, "connected") or of the other target snake (label 0).
Because both target snakes start next to each other, marker distance is no cue to the label.

This is our own generator (vectorised numpy, anti-aliased by 4x supersampling and area downsampling), not a
byte-for-byte port of ``snakes2``; it keeps the task: the same difficulty knob (``contour_length``, LRA "hard"
= 14), label semantics, markers on snake ends, and distractors of ``contour_length // 3`` paddles.

Public API::

    images, labels = generate_pathfinder(num_images, image_size, contour_length, seed, num_workers=2)

(Released LRA folders are read by :mod:`tasks.pathfinder_release`.)

``images`` is uint8 ``(N, H, W)`` (background 0, strokes bright), ``labels`` int64 ``(N,)``. Labels are
balanced (exactly ``N // 2`` positives) and image ``i`` is a pure function of ``(seed, i, image_size,
contour_length)`` and its label, independent of ``num_workers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.base import process_pool

# ---------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 256
AA_SCALE = 4  # supersampling factor of the renderer
BACKTRACK = 2  # paddles undone when a target snake runs into a dead end
MAX_BACKTRACKS = 10  # dead ends tolerated before both target snakes are regrown from new seeds

# Anchor settings (pixels). 32 px follows LRA's pathfinder32; 128 px follows LRA's pathfinder128 (Path-X), with
# paddle length and distractor budget chosen so long snakes fill the image as in the released Path-X images.
_ANCHOR_32 = dict(padding=1.0, paddle_length=2.0, margins=(1.0, 1.0), thickness=0.5, marker_radius=1.5,
                  seed_distance=7.0, continuity=1.0, distractor_paddles=20.0)
_ANCHOR_128 = dict(padding=2.0, paddle_length=5.0, margins=(2.0, 3.0), thickness=1.5, marker_radius=3.0,
                   seed_distance=20.0, continuity=1.8, distractor_paddles=60.0)


@dataclass(frozen=True)
class PathfinderParams:
    """Geometry of one Pathfinder variant. Lengths are in output pixels.

    ``thickness`` is the stroke half-width; ``margins`` are the per-image choices of paddle margin (gap between
    a paddle and its pivot, and the clearance kept between strokes); ``paddle_contrast`` is the lowest
    per-paddle brightness (each paddle draws its brightness uniformly from ``[paddle_contrast, 1]``; markers are
    always at full brightness).
    """

    image_size: int
    contour_length: int
    padding: float
    paddle_length: float
    margins: tuple[float, ...]
    thickness: float
    marker_radius: float
    seed_distance: float
    continuity: float
    distractor_length: int
    num_distractors: int
    paddle_contrast: float = 0.75
    num_turn_candidates: int = 12
    max_attempts: int = 500


def _check_sizes(image_size: int, contour_length: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if not isinstance(contour_length, (int, np.integer)) or contour_length < 2:
        raise ValueError(f"contour_length must be an int >= 2 (LRA uses 6, 9, 14), got {contour_length!r}")


def pathfinder_params(image_size: int, contour_length: int) -> PathfinderParams:
    """Parameters for ``image_size`` in [16, 256] and a snake of ``contour_length`` paddles.

    Sizes up to 32 use the 32 px geometry (pixel-level strokes stay visible) on a smaller canvas; sizes between
    32 and 128 interpolate linearly between the pathfinder32 and pathfinder128 settings; larger sizes scale the
    128 px settings. The distractor budget scales with the canvas area (in units of paddle steps).
    """
    _check_sizes(image_size, contour_length)
    s = int(image_size)
    if s <= 128:
        t = min(max((s - 32) / 96.0, 0.0), 1.0)
        p = {k: (np.array(v) * (1 - t) + np.array(_ANCHOR_128[k]) * t) for k, v in _ANCHOR_32.items()}
    else:  # an upscaled Path-X: same layout, so the same number of distractors and the same continuity
        p = {k: np.array(v) * (s / 128.0) for k, v in _ANCHOR_128.items()}
        p["continuity"] = np.array(_ANCHOR_128["continuity"])
        p["distractor_paddles"] = np.array(_ANCHOR_128["distractor_paddles"])
    if s < 32:  # 32 px strokes on a smaller canvas: fewer distractors (by area), seeds a little closer
        p["seed_distance"] = np.array(max(7.0 * s / 32.0, 4.0))
        p["distractor_paddles"] = p["distractor_paddles"] * ((s - 2 * p["padding"]) / (32 - 2 * p["padding"])) ** 2
    budget = float(p["distractor_paddles"])  # paddles of distractor snakes, as in snakes2's 30 / distractor_length
    distractor_length = max(1, contour_length // 3)
    margins = tuple(sorted({round(float(m), 3) for m in p["margins"]}))
    return PathfinderParams(
        image_size=s, contour_length=int(contour_length), padding=float(p["padding"]),
        paddle_length=float(p["paddle_length"]), margins=margins, thickness=float(p["thickness"]),
        marker_radius=float(p["marker_radius"]), seed_distance=float(p["seed_distance"]),
        continuity=float(p["continuity"]), distractor_length=distractor_length,
        num_distractors=int(round(budget / distractor_length)),
    )


@dataclass(frozen=True)
class SampleInfo:
    """What was drawn in one image (coordinates are (y, x) in output pixels, pixel (i, j) spans [i, i+1)).

    ``snakes[0]`` and ``snakes[1]`` are the target snakes, the rest distractors; each is an array
    ``(n_paddles, 2, 2)`` = [paddle, (start, end), (y, x)] in growth order, so ``snake[0, 0]`` is its origin
    tip and ``snake[-1, 1]`` its terminal tip. ``markers[i]`` is the centre of marker disc ``i``, which sits on
    ``marker_ends[i]`` ("origin" or "terminal") of ``snakes[marker_snakes[i]]``.
    """

    label: int
    snakes: tuple[np.ndarray, ...]
    markers: np.ndarray
    marker_snakes: tuple[int, int]
    marker_ends: tuple[str, str]
    margin: float


# ---------------------------------------------------------------------------------------------------------------
# Geometry. Points are complex numbers x + 1j*y: the growth loop works on arrays of ~10 x ~10 elements, where the
# number of numpy calls, not arithmetic, is the cost, and complex arithmetic needs far fewer calls than (..., 2).
# ---------------------------------------------------------------------------------------------------------------


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact distance from points ``p`` to segments ``[a, b]`` (complex, broadcast; a == b is a point)."""
    ab = b - a
    ap = p - a
    t = (ap * np.conj(ab)).real / np.maximum(ab.real * ab.real + ab.imag * ab.imag, 1e-12)
    return np.abs(ap - np.minimum(np.maximum(t, 0.0), 1.0) * ab)


def _segment_distance(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Exact minimum distance between segments [a0, a1] and [b0, b1] (complex, broadcast); 0 where they cross."""
    d = np.minimum(np.minimum(_point_segment_distance(a0, b0, b1), _point_segment_distance(a1, b0, b1)),
                   np.minimum(_point_segment_distance(b0, a0, a1), _point_segment_distance(b1, a0, a1)))
    da, db = (a1 - a0).conj(), (b1 - b0).conj()
    # Proper crossing: each segment's endpoints lie strictly on both sides of the other's line.
    a_splits_b = ((da * (b0 - a0)).imag * (da * (b1 - a0)).imag) < 0
    b_splits_a = ((db * (a0 - b0)).imag * (db * (a1 - b0)).imag) < 0
    crosses = a_splits_b & b_splits_a
    return np.where(crosses, 0.0, d)


class _Obstacles:
    """Everything drawn so far: segments (and marker discs as zero-length segments) with their stroke radius."""

    def __init__(self, capacity: int = 64) -> None:
        self.a = np.zeros(capacity, dtype=complex)
        self.b = np.zeros(capacity, dtype=complex)
        self.radius = np.zeros(capacity)
        self.n = 0

    def add(self, a: complex, b: complex, radius: float) -> int:
        if self.n == len(self.radius):
            self.a = np.concatenate([self.a, np.zeros_like(self.a)])
            self.b = np.concatenate([self.b, np.zeros_like(self.b)])
            self.radius = np.concatenate([self.radius, np.zeros_like(self.radius)])
        self.a[self.n], self.b[self.n], self.radius[self.n] = a, b, radius
        self.n += 1
        return self.n - 1

    def truncate(self, n: int) -> None:
        self.n = n

    def remove(self, i: int) -> None:
        self.radius[i] = -np.inf  # never near, never in the way

    def clear_of(self, a: np.ndarray, b: np.ndarray, radius: float, margin: float, center: complex | None = None,
                 reach: float = 0.0, skip: int = -1) -> np.ndarray:
        """Bool (K,): candidate segments [a[k], b[k]] with stroke ``radius`` keep ``margin`` between their stroke
        and every obstacle's, except obstacle ``skip`` (the snake's previous paddle, met at the pivot).

        If given, all candidates lie within ``reach`` of ``center``; obstacles farther than ``need + reach`` from
        it cannot violate the clearance (triangle inequality) and are skipped before the exact K x S test.
        """
        n = self.n
        ok = np.ones(len(a), dtype=bool)
        if n == 0:
            return ok
        oa, ob = self.a[:n], self.b[:n]
        need = self.radius[:n] + (radius + margin)
        if center is None:
            near = np.isfinite(need)
        else:
            near = _point_segment_distance(center, oa, ob) < need + reach
        if 0 <= skip < n:
            near[skip] = False
        idx = np.flatnonzero(near)
        if idx.size == 0:
            return ok
        dist = _segment_distance(a[:, None], b[:, None], oa[idx][None], ob[idx][None])
        return (dist >= need[idx][None]).all(axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Snake growth
# ---------------------------------------------------------------------------------------------------------------


class _Snake:
    """A growing snake: paddle k spans pivot_k + [m, m + L] * u(theta_k); pivot_{k+1} = pivot_k + (L + 2m) u."""

    def __init__(self) -> None:
        self.starts: list[complex] = []
        self.ends: list[complex] = []
        self.obstacle_ids: list[int] = []
        self.pivots: list[complex] = []  # pivot and direction of each paddle, to undo the last ones
        self.thetas: list[float] = []
        self.pivot = 0j
        self.theta = 0.0

    def __len__(self) -> int:
        return len(self.starts)

    def as_array(self) -> np.ndarray:
        """(n_paddles, 2, 2) = [paddle, (start, end), (y, x)]."""
        z = np.stack([np.asarray(self.starts), np.asarray(self.ends)], axis=1)
        return np.stack([z.imag, z.real], axis=-1)


class _Grower:
    """Places snakes on one canvas; every method returns False on a dead end so the caller can retry."""

    def __init__(self, rng: np.random.Generator, params: PathfinderParams, margin: float) -> None:
        self.rng, self.p, self.m = rng, params, margin
        self.obstacles = _Obstacles()
        self.lo = params.padding + params.thickness
        self.hi = params.image_size - params.padding - params.thickness
        self.max_turn = np.pi / (2.0 * params.continuity)

    def in_bounds(self, z: np.ndarray) -> np.ndarray:
        lo, hi = self.lo, self.hi
        return (z.real >= lo) & (z.real <= hi) & (z.imag >= lo) & (z.imag <= hi)

    def _seed_candidates(self, tips: np.ndarray, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First-paddle candidates from origin ``tips`` along ``thetas``: (starts, ends, feasible)."""
        ends = tips + self.p.paddle_length * np.exp(1j * thetas)
        ok = self.in_bounds(tips) & self.in_bounds(ends)
        ok &= self.obstacles.clear_of(tips, ends, self.p.thickness, self.m)
        return tips, ends, ok

    def _commit_seed(self, snake: _Snake, tip: complex, end: complex, theta: float) -> None:
        snake.starts.append(tip)
        snake.ends.append(end)
        snake.obstacle_ids.append(self.obstacles.add(tip, end, self.p.thickness))
        snake.pivot, snake.theta = tip - self.m * complex(np.cos(theta), np.sin(theta)), float(theta)
        snake.pivots.append(snake.pivot)
        snake.thetas.append(snake.theta)

    def seed_at(self, snake: _Snake, tip: complex, theta: float) -> bool:
        """First paddle from origin ``tip`` in direction ``theta``, if it fits."""
        tips, ends, ok = self._seed_candidates(np.array([tip]), np.array([theta]))
        if ok[0]:
            self._commit_seed(snake, tip, complex(ends[0]), theta)
        return bool(ok[0])

    def seed_random(self, snake: _Snake, tries: int = 20) -> bool:
        """First paddle at a uniform position and direction: the first of ``tries`` i.i.d. draws that fits
        (drawn and tested as one batch, which is the same distribution as trying them one by one)."""
        y, x = self.rng.uniform(self.lo, self.hi, size=(2, tries))
        thetas = self.rng.uniform(-np.pi, np.pi, size=tries)
        tips, ends, ok = self._seed_candidates(x + 1j * y, thetas)
        if not ok.any():
            return False
        j = int(np.argmax(ok))
        self._commit_seed(snake, complex(tips[j]), complex(ends[j]), float(thetas[j]))
        return True

    def extend(self, snake: _Snake, tip_radius: float | None = None) -> bool:
        """Add one paddle with a continuity-weighted turn, sampled among the collision-free candidates.

        ``tip_radius``: for a target snake's last paddle, the new terminal tip must also leave room for a marker
        disc of this radius.
        """
        p, m, rng = self.p, self.m, self.rng
        k = p.num_turn_candidates
        # A jittered grid over the allowed turn range (the weight is zero beyond it), so every angle is reachable.
        delta = (np.arange(k) + rng.random()) * (2 * self.max_turn / k) - self.max_turn
        weight = np.cos(delta * p.continuity) ** 2
        pivot = snake.pivot + (p.paddle_length + 2 * m) * complex(np.cos(snake.theta), np.sin(snake.theta))
        theta = snake.theta + delta
        u = np.exp(1j * theta)
        a = pivot + m * u
        b = pivot + (m + p.paddle_length) * u
        reach = m + p.paddle_length
        skip = snake.obstacle_ids[-1]
        ok = self.in_bounds(a) & self.in_bounds(b)
        ok &= self.obstacles.clear_of(a, b, p.thickness, m, pivot, reach, skip=skip)
        if tip_radius is not None:
            ok &= self.obstacles.clear_of(b, b, tip_radius, m, pivot, reach, skip=skip)
        cdf = np.cumsum(weight * ok)
        if cdf[-1] <= 0:
            return False
        j = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), k - 1)
        snake.starts.append(complex(a[j]))
        snake.ends.append(complex(b[j]))
        snake.obstacle_ids.append(self.obstacles.add(a[j], b[j], p.thickness))
        snake.pivot, snake.theta = pivot, float(theta[j])
        snake.pivots.append(snake.pivot)
        snake.thetas.append(snake.theta)
        return True

    def pop(self, snake: _Snake) -> None:
        """Undo the snake's last paddle."""
        for seq in (snake.starts, snake.ends, snake.pivots, snake.thetas):
            seq.pop()
        self.obstacles.remove(snake.obstacle_ids.pop())
        snake.pivot, snake.theta = snake.pivots[-1], snake.thetas[-1]


def _grow_targets(grower: _Grower) -> tuple[_Snake, _Snake] | None:
    """Two target snakes seeded ``seed_distance`` apart, grown alternately (neither has priority)."""
    p, rng, obstacles = grower.p, grower.rng, grower.obstacles
    r = p.marker_radius
    a, b = _Snake(), _Snake()
    if not grower.seed_random(a):
        return None
    obstacles.add(a.starts[0], a.starts[0], r)  # origin marker disc of A
    for _ in range(20):
        tip = a.starts[0] + p.seed_distance * np.exp(1j * rng.uniform(-np.pi, np.pi))
        z = np.array([tip])
        if grower.in_bounds(z)[0] and obstacles.clear_of(z, z, r, grower.m, tip, 0.0)[0]:
            if grower.seed_at(b, tip, rng.uniform(-np.pi, np.pi)):
                break
    else:
        return None
    obstacles.add(tip, tip, r)  # origin marker disc of B
    # Grow alternately (the shorter snake next). A dead end undoes the last BACKTRACK paddles of that snake
    # instead of discarding both snakes: far cheaper in crowded 32 px images; after MAX_BACKTRACKS the caller
    # starts over.
    n, backtracks = p.contour_length, 0
    while len(a) < n or len(b) < n:
        snake = a if len(a) <= len(b) else b
        last = len(snake) == n - 1
        if grower.extend(snake, tip_radius=r if last else None):
            if last:  # terminal marker disc, so the other snake and distractors keep clear of it
                obstacles.add(snake.ends[-1], snake.ends[-1], r)
            continue
        backtracks += 1
        if backtracks > MAX_BACKTRACKS or len(snake) <= BACKTRACK:
            return None
        for _ in range(BACKTRACK):
            grower.pop(snake)
    return a, b


def _grow_distractor(grower: _Grower, tries: int = 4) -> _Snake | None:
    for _ in range(tries):
        mark = grower.obstacles.n
        snake = _Snake()
        if grower.seed_random(snake, tries=10) and all(
            grower.extend(snake) for _ in range(grower.p.distractor_length - 1)
        ):
            return snake
        grower.obstacles.truncate(mark)  # remove the partial snake
    return None


# ---------------------------------------------------------------------------------------------------------------
# Rendering: supersampled distance fields, area downsampling
# ---------------------------------------------------------------------------------------------------------------


def _draw_segment(canvas: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, value: float) -> None:
    """max-composite a capsule of ``radius`` around [a, b] ((y, x), output pixels) into the supersampled canvas."""
    s = AA_SCALE
    lo = np.maximum(np.floor((np.minimum(a, b) - radius) * s).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(a, b) + radius) * s).astype(int), canvas.shape[0])
    if (hi <= lo).any():
        return
    ys = (np.arange(lo[0], hi[0]) + 0.5) / s
    xs = (np.arange(lo[1], hi[1]) + 0.5) / s
    pts = xs[None, :] + 1j * ys[:, None]  # subpixel centres
    inside = _point_segment_distance(pts, complex(a[1], a[0]), complex(b[1], b[0])) <= radius
    window = canvas[lo[0]:hi[0], lo[1]:hi[1]]
    np.maximum(window, np.where(inside, np.float32(value), np.float32(0.0)), out=window)


def _render(params: PathfinderParams, snakes: list[np.ndarray], brightness: list[np.ndarray],
            markers: np.ndarray) -> np.ndarray:
    n, s = params.image_size, AA_SCALE
    canvas = np.zeros((n * s, n * s), dtype=np.float32)
    for paddles, values in zip(snakes, brightness):
        for (a, b), v in zip(paddles, values):
            _draw_segment(canvas, a, b, params.thickness, float(v))
    for c in markers:
        _draw_segment(canvas, c, c, params.marker_radius, 1.0)
    image = canvas.reshape(n, s, n, s).mean(axis=(1, 3))
    return np.rint(image * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# One sample, many samples
# ---------------------------------------------------------------------------------------------------------------


def render_sample(rng: np.random.Generator, params: PathfinderParams, label: int) -> tuple[np.ndarray, SampleInfo]:
    """Draw one image with the given label (1 = markers on the same snake, 0 = on different target snakes)."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    for _ in range(params.max_attempts):
        margin = float(params.margins[rng.integers(len(params.margins))])
        grower = _Grower(rng, params, margin)
        targets = _grow_targets(grower)
        if targets is not None:
            break
    else:
        raise RuntimeError(
            f"could not place two target snakes of contour_length={params.contour_length} in a "
            f"{params.image_size} px image after {params.max_attempts} attempts; use shorter snakes or larger images"
        )
    distractors = [d for d in (_grow_distractor(grower) for _ in range(params.num_distractors)) if d is not None]
    snakes = [s.as_array() for s in (*targets, *distractors)]
    brightness = [rng.uniform(params.paddle_contrast, 1.0, size=len(s)) for s in snakes]
    origin = int(rng.integers(2))
    other = origin if label == 1 else 1 - origin
    markers = np.stack([snakes[origin][0, 0], snakes[other][-1, 1]])
    image = _render(params, snakes, brightness, markers)
    info = SampleInfo(label=int(label), snakes=tuple(snakes), markers=markers, marker_snakes=(origin, other),
                      marker_ends=("origin", "terminal"), margin=grower.m)
    return image, info


def balanced_labels(num_images: int, seed: int) -> np.ndarray:
    """int64 labels with exactly ``num_images // 2`` ones, in an order fixed by ``seed``."""
    labels = (np.arange(num_images) < num_images // 2).astype(np.int64)
    return np.random.default_rng([seed, 0x1AB]).permutation(labels)


def _render_range(job: tuple[PathfinderParams, int, int, int, np.ndarray]) -> tuple[int, np.ndarray]:
    params, seed, start, stop, labels = job
    out = np.empty((stop - start, params.image_size, params.image_size), dtype=np.uint8)
    for i in range(start, stop):
        # Per-image stream from (seed, index): results do not depend on how indices are split among workers.
        out[i - start] = render_sample(np.random.default_rng([seed, i]), params, int(labels[i - start]))[0]
    return start, out


def generate_pathfinder(num_images: int, image_size: int, contour_length: int, seed: int,
                        num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_images`` Pathfinder images: uint8 ``(N, H, W)`` and balanced int64 labels ``(N,)``.

    ``image_size`` in [16, 256] (32: Pathfinder, 128: Path-X), ``contour_length`` >= 2 paddles per target snake
    (LRA: 6, 9, 14 = easy, medium, hard), ``seed`` >= 0. Deterministic in ``(seed, image_size, contour_length)``
    and independent of ``num_workers`` (worker processes are used when ``num_workers > 1`` and N >= 64).
    """
    if not isinstance(num_images, (int, np.integer)) or num_images < 0:
        raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    params = pathfinder_params(image_size, contour_length)
    num_images, seed = int(num_images), int(seed)
    labels = balanced_labels(num_images, seed)
    images = np.empty((num_images, params.image_size, params.image_size), dtype=np.uint8)
    # Small chunks balance the load across workers; results are keyed by index, so chunking never changes them.
    chunk = int(min(256, max(16, -(-num_images // (4 * num_workers)))))
    jobs = [(params, seed, a, min(a + chunk, num_images), labels[a:a + chunk]) for a in range(0, num_images, chunk)]
    if num_workers == 1 or num_images < 64:
        results = map(_render_range, jobs)
        for start, part in results:
            images[start:start + len(part)] = part
    else:
        with process_pool(num_workers) as pool:
            for start, part in pool.imap_unordered(_render_range, jobs):  # filled in place: no 2x peak memory
                images[start:start + len(part)] = part
    return images, labels
