"""Find and open the splits of a dataset that ``datasets`` can read, in every layout a user has on disk.

Layouts recognised under a directory (searched recursively; see ``docs/DATA.md``):

* ``DatasetDict.save_to_disk`` folder: ``dataset_dict.json`` with one sub-folder per split;
* ``Dataset.save_to_disk`` folders named after the split (``<dir>/train/state.json``, ``<dir>/test/...``);
* a ``datasets`` Arrow cache: a folder with ``dataset_info.json`` and ``<builder>-<split>[-NNNNN-of-NNNNN].arrow``
  (e.g. ``~/.cache/huggingface/datasets/stanfordnlp___imdb/plain_text/0.0.0/<hash>/imdb-train.arrow``);
* data files (parquet, csv, json, jsonl) whose name has the split as a ``-``/``_``/``.``-separated word or that
  sit in a folder named after it: the hub's ``plain_text/train-00000-of-00001.parquet``, the converted
  ``plain_text/train/0000.parquet``, the older ``plain_text/imdb-train.parquet``, flat ``train.csv``.

Without a directory, the hub dataset is read from the user's own ``datasets``/hub cache (never redirected to our
cache folder): through ``datasets.load_dataset`` when the hub answers, else by finding the cached files above in
``HF_DATASETS_CACHE`` and ``HF_HUB_CACHE`` offline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
# Names of files that describe a dataset folder rather than holding its rows.
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass
class SplitSource:
    """Where one split lives: ``kind`` is ``save_to_disk``, ``arrow_cache`` or a builder name (``parquet``...)."""

    kind: str
    files: list[str] = field(default_factory=list)
    directory: str = ""

    def describe(self) -> str:
        where = self.directory or os.path.dirname(self.files[0])
        return f"{self.kind} {where} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"


def _words(stem: str) -> set[str]:
    return set(re.split(r"[-_.]", stem.lower()))


def _arrow_cache_split(name: str, splits: tuple[str, ...]) -> str | None:
    """Split of an Arrow cache file ``<builder>-<split>[-NNNNN-of-NNNNN].arrow`` (None if not one of ``splits``)."""
    stem = _SHARD.sub("", name[: -len(".arrow")])
    for split in splits:
        if stem.endswith("-" + split):
            return split
    return None


def _candidates(data_dir: str, splits: tuple[str, ...]) -> dict[str, list[SplitSource]]:
    """Every place under ``data_dir`` that holds one of ``splits``, in walk order (sorted)."""
    found: dict[str, list[SplitSource]] = {}
    for root, dirs, names in os.walk(data_dir, followlinks=True):
        # Unfinished `datasets` writes and the hub cache's content-addressed blobs are never data.
        dirs[:] = sorted(d for d in dirs if not d.endswith(".incomplete") and d not in ("blobs", ".cache"))
        names_set = set(names)
        if "dataset_dict.json" in names_set or "state.json" in names_set:
            dirs[:] = []  # a save_to_disk folder: its files are read through load_from_disk only
            if "dataset_dict.json" in names_set:
                for split in splits:
                    sub = os.path.join(root, split)
                    if os.path.isfile(os.path.join(sub, "state.json")):
                        found.setdefault(split, []).append(_saved(sub))
            elif os.path.basename(root) in splits:
                found.setdefault(os.path.basename(root), []).append(_saved(root))
            continue
        arrows = sorted(n for n in names if n.endswith(".arrow"))
        if arrows and "dataset_info.json" in names_set:
            per_split: dict[str, list[str]] = {}
            for n in arrows:
                if (split := _arrow_cache_split(n, splits)) is not None:
                    per_split.setdefault(split, []).append(os.path.join(root, n))
            for split, files in per_split.items():
                found.setdefault(split, []).append(SplitSource("arrow_cache", files, root))
            continue
        per_split = {}
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if ext.lower() not in DATA_FILE_BUILDERS or n in _METADATA_FILES:
                continue
            words = _words(stem) | {os.path.basename(root).lower()}
            for split in splits:
                if split in words:
                    per_split.setdefault(split, []).append(os.path.join(root, n))
        for split, files in per_split.items():
            kinds = {DATA_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
            if len(kinds) > 1:
                raise ValueError(f"{root!r}: split {split!r} has files of several formats: {files}")
            found.setdefault(split, []).append(SplitSource(kinds.pop(), files, root))
    return found


def _saved(directory: str) -> SplitSource:
    files = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                   if n.endswith(".arrow") or n in _METADATA_FILES)
    return SplitSource("save_to_disk", files, directory)


def locate_splits(data_dir: str, splits: tuple[str, ...], expected: str) -> dict[str, SplitSource]:
    """The one source of each of ``splits`` under ``data_dir``.

    Raises a ValueError naming ``data_dir`` when a split is missing (with what was ``expected``) or is found in
    several places (ambiguous: the message lists them).
    """
    if not os.path.isdir(data_dir):
        raise ValueError(f"invalid task parameter 'data_dir': {data_dir!r} is not a directory; expected {expected}")
    found = _candidates(data_dir, splits)
    missing = [s for s in splits if s not in found]
    if missing:
        raise ValueError(f"invalid task parameter 'data_dir': no files for split(s) {', '.join(missing)} "
                         f"under {data_dir!r}; expected {expected}")
    for split in splits:
        if len(found[split]) > 1:
            places = "; ".join(s.describe() for s in found[split])
            raise ValueError(f"invalid task parameter 'data_dir': split {split!r} is found in several places under "
                             f"{data_dir!r} ({places}); point data_dir at one of them")
    return {s: found[s][0] for s in splits}


def open_split(source: SplitSource, hf_cache: str) -> Any:
    """A ``datasets.Dataset`` for one located split: memory-mapped (save_to_disk, Arrow cache), in memory (parquet),
    or converted by ``datasets`` into ``hf_cache`` (csv, json)."""
    import datasets

    if source.kind == "save_to_disk":
        return datasets.load_from_disk(source.directory)
    if source.kind == "arrow_cache":
        parts = [datasets.Dataset.from_file(f) for f in source.files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if source.kind == "parquet":
        # Read in memory (the features travel in the schema metadata): no converted copy in any cache folder.
        import pyarrow as pa
        import pyarrow.parquet as pq

        return datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in source.files]))
    return datasets.load_dataset(source.kind, data_files={"split": source.files}, cache_dir=hf_cache)["split"]


def files_identity(sources: dict[str, SplitSource]) -> dict[str, Any]:
    """Cache-key identity (path, size, mtime) of every file the located splits are read from."""
    from tasks.cache import file_identity

    return {s: [file_identity(f) for f in src.files] for s, src in sorted(sources.items())}


# ---- the hub and the user's own caches ------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``timeout`` s (False when offline mode is set).

    The check runs in a daemon thread so that a hanging DNS lookup cannot stall the caller either.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result = [False]

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0]


def user_cache_dirs(hub_name: str) -> list[str]:
    """Folders of the user's ``datasets`` Arrow cache and hub download cache that belong to ``hub_name``.

    ``imdb`` matches ``imdb`` and ``stanfordnlp___imdb`` (Arrow cache) and ``datasets--stanfordnlp--imdb``
    (hub cache); an ``owner/name`` hub name matches only that owner. Newest first.
    """
    import datasets

    try:
        from huggingface_hub import constants

        hub_cache = constants.HF_HUB_CACHE
    except (ImportError, AttributeError):  # pragma: no cover - old huggingface_hub
        hub_cache = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
    owner, _, name = hub_name.rpartition("/")

    def arrow_match(entry: str) -> bool:
        if owner:
            return entry == hub_name.replace("/", "___")
        return entry == name or (entry.endswith(f"___{name}") and entry.count("___") == 1)

    def hub_match(entry: str) -> bool:
        if owner:
            return entry == f"datasets--{hub_name.replace('/', '--')}"
        return entry.startswith("datasets--") and entry.endswith(f"--{name}") and entry.count("--") <= 2

    out = []
    for base, match in ((datasets.config.HF_DATASETS_CACHE, arrow_match), (hub_cache, hub_match)):
        if os.path.isdir(base):
            out += [p for e in os.listdir(base) if match(e) and os.path.isdir(p := os.path.join(base, e))]
    return sorted(out, key=os.path.getmtime, reverse=True)


def locate_in_user_cache(hub_name: str, splits: tuple[str, ...]) -> dict[str, SplitSource] | None:
    """The splits of ``hub_name`` from the newest cached copy in the user's caches that holds them all, or None.

    Within one cached dataset, several versions (hashes, snapshots) may hold a split: the newest is used.
    """
    for directory in user_cache_dirs(hub_name):
        try:
            found = _candidates(directory, splits)
        except ValueError:
            continue
        if all(s in found for s in splits):
            return {s: max(found[s], key=lambda src: max(os.path.getmtime(f) for f in src.files)) for s in splits}
    return None


def folder_beside_release(data_root: str, hub_name: str) -> str | None:
    """``<data_root>/<name>`` for hub dataset ``[owner/]name`` (``imdb/``, ``cifar10/``) if it exists, else None."""
    path = os.path.join(data_root, str(hub_name).rpartition("/")[2])
    return path if os.path.isdir(path) else None


def open_splits(hub_name: str, data_dir: str | None, splits: tuple[str, ...], expected: str,
                cache_dir: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``({split: datasets.Dataset}, {split: where it was read from})`` from ``data_dir``, else the hub.

    Without ``data_dir``: the user's own caches first when the hub is unreachable (offline), else
    ``datasets.load_dataset(hub_name)`` with the user's default cache. Never waits on an unreachable hub: without a
    cached copy it fails at once with a ValueError that names ``data_dir``/``data_root`` and the files ``expected``.
    """
    from tasks.cache import default_cache_dir

    hf_cache = os.path.join(cache_dir or default_cache_dir(), "hf")  # only for converting local files
    if data_dir is not None:
        located = locate_splits(data_dir, splits, expected)
        return {s: open_split(src, hf_cache) for s, src in located.items()}, \
            {s: src.describe() for s, src in located.items()}
    if not hub_reachable():
        cached = locate_in_user_cache(hub_name, splits)
        if cached is None:
            raise ValueError(f"the hub dataset {hub_name!r} cannot be reached (no network or HF offline mode) and is "
                             f"not in the local datasets/hub cache; set data_root (with {hub_name}/ in it) or the "
                             f"task parameter data_dir to a local directory with {expected}")
        return {s: open_split(src, hf_cache) for s, src in cached.items()}, \
            {s: f"user cache: {src.describe()}" for s, src in cached.items()}
    import datasets

    try:
        ds = datasets.load_dataset(hub_name)
    except Exception as err:
        raise ValueError(f"loading {hub_name!r} from the hub failed ({type(err).__name__}: {err}); "
                         f"or set the task parameter data_dir to a local directory with {expected}") from err
    return {s: ds[s] for s in splits}, {s: f"hub {hub_name}" for s in splits}


def source_identity(hub_name: str, data_dir: str | None, splits: tuple[str, ...]) -> dict[str, Any]:
    """Cache-key identity of a ``datasets`` source: the files under ``data_dir`` (path, size, mtime), or hub name."""
    if data_dir is None:
        return {"hub": hub_name}
    try:
        return files_identity(locate_splits(data_dir, splits, ""))
    except ValueError:
        return {"data_dir": os.path.abspath(data_dir), "missing": True}
