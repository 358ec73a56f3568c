"""Save a labelled grid of Pathfinder (32 px) and Path-X (128 px) samples for eyeballing the generator.

    python -m tasks.pathfinder_preview --out grid.png [--seed 0] [--contour-length 14] [--n32 8] [--n128 4]
"""

from __future__ import annotations

import argparse

import numpy as np

from tasks.pathfinder_generator import pathfinder_params, render_sample


def save_grid(out: str, seed: int = 0, contour_length: int = 14, n32: int = 8, n128: int = 4,
              extra_sizes: tuple[int, ...] = ()) -> None:
    """Render ``n32`` 32 px and ``n128`` 128 px samples (alternating labels) into a titled PNG grid at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(32, n32), (128, n128)] + [(s, n32) for s in extra_sizes]
    rows = [(s, n) for s, n in rows if n > 0]
    cols = max(n for _, n in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.7 * len(rows)), squeeze=False)
    for r, (size, n) in enumerate(rows):
        params = pathfinder_params(size, contour_length)
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= n:
                continue
            label = (c + 1) % 2
            try:
                image, info = render_sample(np.random.default_rng([seed, size, c]), params, label)
            except RuntimeError:  # snakes too long for this canvas: say so in the cell
                ax.set_title(f"{size}px: contour_length={contour_length}\ndoes not fit", fontsize=8)
                continue
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{size}px {'connected' if label else 'not connected'}\n"
                         f"label={label}, {len(info.snakes) - 2} distractors", fontsize=8)
    fig.suptitle(f"Pathfinder samples, contour_length={contour_length}, seed={seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG path to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contour-length", type=int, default=14)
    parser.add_argument("--n32", type=int, default=8, help="number of 32 px samples")
    parser.add_argument("--n128", type=int, default=4, help="number of 128 px samples")
    parser.add_argument("--extra-sizes", type=int, nargs="*", default=[], help="more image sizes to show")
    args = parser.parse_args(argv)
    save_grid(args.out, args.seed, args.contour_length, args.n32, args.n128, tuple(args.extra_sizes))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
