"""arena-data: check the LRA data a user has, and build the task caches ahead of a sweep.

    arena-data check /data/lra_release            # every LRA task: found? split sizes, labels, skipped, example
    arena-data check                               # without a root: Text/Image from the user's datasets cache
    arena-data prepare --data-root /data/lra_release listops pathfinder
    arena-data prepare listops                     # generated ListOps at LRA size, into .arena_cache

Both build each task with the task parameters of its training recipe (``conf/experiment/<recipe>/<task>.yaml``,
``--recipe lra`` by default; ``--param name=value`` adds or overrides), so the caches they write are the ones
``arena-train experiment=<recipe>/<task>`` with the same ``data_root`` and ``cache_dir`` loads. Building
takes a file lock per cache entry, so several processes never build the same entry twice.
``check`` exits non-zero, naming the tasks whose data are missing or unreadable. See ``docs/DATA.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.base import Task, available_tasks, build_task
from tasks.cache import default_cache_dir, entry_dir

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
GENERATED = ("listops", "pathfinder", "pathx")  # generated here when no release folder is given
# The recipes: harness/conf beside this package in an installed wheel, else conf/ of a clone (the same folder
# harness.plugins.conf_dir finds; tasks may not import the harness).
_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = next((d for d in (_ROOT / "harness" / "conf", _ROOT / "conf") if d.is_dir()), _ROOT / "conf")
_RAMP = " .:-=+*#%@"


def recipe_params(task: str, recipe: str) -> tuple[dict[str, Any], int]:
    """``(task.params, task.data_seed)`` of ``conf/experiment/<recipe>/<task>.yaml`` (empty, 0 when absent)."""
    path = CONF_DIR / "experiment" / recipe / f"{task}.yaml"
    if not path.is_file():
        return {}, 0
    node = (yaml.safe_load(path.read_text()) or {}).get("task") or {}
    return dict(node.get("params") or {}), int(node.get("data_seed", 0))


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"arena-data: --param takes name=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def make(name: str, args: argparse.Namespace) -> Task:
    params, data_seed = recipe_params(name, args.recipe)
    params.update(_parse_params(args.param))
    params.setdefault("seed", data_seed)
    return build_task(name, cache_dir=args.cache_dir, data_root=args.data_root, **params)


# ---- showing one example --------------------------------------------------------------------------------------


def _thumbnail(pixels: np.ndarray, width: int = 32) -> list[str]:
    """A square image (flattened pixel values 0..255) as ASCII rows, ``width`` characters wide."""
    side = int(round(np.sqrt(pixels.size)))
    img = pixels[: side * side].reshape(side, side).astype(np.float64)
    step = max(1, side // width)
    small = img[: side - side % step, : side - side % step].reshape(side // step, step, side // step, step).mean((1, 3))
    small = small[::2]  # characters are about twice as tall as wide
    return ["".join(_RAMP[min(len(_RAMP) - 1, int(v * len(_RAMP) / 256))] for v in row) for row in small]


def _text(tokens: np.ndarray, limit: int = 100) -> str:
    raw = bytes((tokens - 1).astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return repr(raw[:limit] + ("..." if len(raw) > limit else ""))


def decode_example(task: Task) -> list[str]:
    """Lines showing the first training example of ``task`` decoded back to its source form."""
    batch = next(task.batches("train", 1))
    label = int(batch["labels"][0])
    tokens = batch["tokens"][0][batch["mask"][0]].numpy()
    head = f"example (train[0], label {label}):"
    if task.name == "listops":
        from tasks.listops import VOCAB

        shown = " ".join(VOCAB[t] for t in tokens[:40]) + (" ..." if tokens.size > 40 else "")
        return [f"{head} {shown}  ({tokens.size} tokens)"]
    if task.name in ("text", "retrieval"):
        lines = [f"{head} {_text(tokens)}"]
        if task.two_sequence:
            second = batch["tokens2"][0][batch["mask2"][0]].numpy()
            lines.append(f"  document 2: {_text(second)}")
        return lines
    if task.name in ("image", "pathfinder", "pathx"):
        return [head] + ["  " + row for row in _thumbnail(tokens - 1)]
    return [f"{head} token ids {tokens[:20].tolist()}"]


# ---- check / prepare ----------------------------------------------------------------------------------------


def _size_on_disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)) \
        if os.path.isdir(directory) else 0


def report(task: Task, seconds: float) -> list[str]:
    """What ``check`` prints for a prepared task."""
    lines = []
    source = task.notes.get("source", task.config.data_settings().get("data_dir"))
    if isinstance(source, dict):
        lines += [f"source {split}: {where}" for split, where in source.items()]
    else:
        lines.append(f"source: {source}")
    for key in ("validation", "order"):
        if key in task.notes:
            lines.append(f"{key}: {task.notes[key]}")
    sizes = " | ".join(f"{s} {task.num_examples(s)}" for s in ("train", "validation", "test"))
    lines.append(f"splits: {sizes}" + ("   (validation IS the test split: LRA's alias)"
                                       if task.validation_is_test else ""))
    for split in ("train", "validation", "test"):
        counts = np.bincount(task.labels(split), minlength=task.num_classes)
        share = ", ".join(f"{c}: {n}" for c, n in enumerate(counts.tolist()))
        lines.append(f"labels {split}: {share}")
    skipped = task.notes.get("skipped") or []
    lines.append(f"skipped: {len(skipped)} file(s)" + "".join(f"\n    {s['path']}: {s['reason']}" for s in skipped[:20])
                 + ("\n    ..." if len(skipped) > 20 else ""))
    directory = entry_dir(task.cache_dir, task.name, task.cache_settings())
    lines.append(f"cache: {directory} ({_size_on_disk(directory) / 2**20:.1f} MiB, ready in {seconds:.1f} s)")
    lines += decode_example(task)
    return lines


READ_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)


def _prepared(name: str, args: argparse.Namespace) -> tuple[Task, float]:
    """Build ``name`` and its cache entry now; returns the task and the seconds it took."""
    start = time.perf_counter()
    task = make(name, args)
    task.prepare()
    return task, time.perf_counter() - start


def check(args: argparse.Namespace) -> int:
    names = args.tasks or list(LRA_TASKS)
    failed: list[str] = []
    for name in names:
        print(f"== {name}")
        if args.data_root is None and name in GENERATED:
            print("   generated (no data_root given): built on first use; `arena-data prepare "
                  f"{name}` builds it now")
            continue
        try:
            task, seconds = _prepared(name, args)
        except READ_ERRORS as err:
            print(f"   NOT READY: {err}")
            failed.append(name)
            continue
        for line in report(task, seconds):
            print("   " + line.replace("\n", "\n   "))
        print("   READY")
    if failed:
        print(f"not ready: {', '.join(failed)} (the reasons are above)", file=sys.stderr)
        return 1
    print(f"all {len(names)} task(s) ready")
    return 0


def prepare(args: argparse.Namespace) -> int:
    failed = []
    for name in args.tasks or LRA_TASKS:
        try:
            task, seconds = _prepared(name, args)
        except READ_ERRORS as err:
            print(f"{name}: FAILED: {err}")
            failed.append(name)
            continue
        directory = entry_dir(task.cache_dir, task.name, task.cache_settings())
        print(f"{name}: ready in {seconds:.1f} s: {directory} ({_size_on_disk(directory) / 2**20:.1f} MiB)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None, help="task cache folder (default $ARENA_CACHE_DIR or "
                        ".arena_cache, as arena-train's cache_dir)")
    common.add_argument("--recipe", default="lra", help="take task parameters from conf/experiment/<recipe>/<task>"
                        ".yaml (default lra)")
    common.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a task parameter (repeatable), e.g. --param max_length=4096")
    c = sub.add_parser("check", parents=[common], help="report what each task finds; non-zero exit if any is "
                       "missing or unreadable")
    c.add_argument("data_root", nargs="?", default=None, help="extracted lra_release folder")
    c.add_argument("--tasks", nargs="+", default=None, choices=available_tasks(), help="default: the six LRA tasks")
    pr = sub.add_parser("prepare", parents=[common], help="build the task caches now (ahead of a sweep)")
    pr.add_argument("tasks", nargs="*", help=f"default: the six LRA tasks; any of {', '.join(available_tasks())}")
    pr.add_argument("--data-root", default=None, help="extracted lra_release folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import datasets

    datasets.disable_progress_bars()  # the report is the output; per-file progress bars only bury it
    args.cache_dir = args.cache_dir or default_cache_dir()
    if args.data_root is not None:
        args.data_root = os.path.abspath(args.data_root)
    return check(args) if args.command == "check" else prepare(args)


if __name__ == "__main__":
    sys.exit(main())
