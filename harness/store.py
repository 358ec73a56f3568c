"""Results store: one JSON file per record, written atomically, read back as a DataFrame.

Layout: ``<root>/<kind>/<record_id>.json``. One file per record means many processes
(a joblib pool, a SLURM array) can finish at the same time without a shared file to
lock; each write goes to a temporary file in the same directory and is moved into place
with :func:`os.replace`, which is atomic on POSIX, so a reader never sees half a record.

    write_record({"kind": "train", "record_id": h, "status": "ok", "created_at": now_iso(), ...})
    df = load_records("results", kind="train")
    export_records("results", "train.csv", kind="train")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

REQUIRED_FIELDS = ("kind", "record_id", "status", "created_at")
STATUSES = ("ok", "oom", "diverged", "error", "unsupported", "skipped_budget")
# skipped_budget: a benchmark cell not run because its predicted memory or time exceeds the budget.
KINDS = ("train", "bench", "approx", "peer", "decode")  # decode: arena-bench mode=decode's cells (issue 24)
# Config keys that say where things go or how to report them, not what is computed: left out of a
# training run's hash and of its recipe, so moving the results or going quiet still finds the same run.
# ``plugins`` only says where a mechanism came from (its name is hashed): a suite run with a plug-in keeps
# the hashes and the recipe of the built-in mechanisms' runs.
NON_SEMANTIC_KEYS = ("results_dir", "cache_dir", "checkpoint_dir", "keep_checkpoints", "force", "quiet",
                     "log_every", "fault", "num_threads", "cpu_allocator", "plugins")
# What varies inside one comparison (recipe): the mechanism and the seed. Everything else, the mechanism's
# command-line parameters included, makes another recipe.
WITHIN_RECIPE_KEYS = ("seed", "attention.name")
# Record ids and kinds become file and directory names: keep them to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def now_iso() -> str:
    """Current UTC time as an ISO-8601 string (the ``created_at`` of a record)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become None so every file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    # numpy / torch scalars
    item = getattr(value, "item", None)
    if callable(item):
        return _jsonable(item())
    raise TypeError(f"record value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def record_path(root: str | Path, kind: str, record_id: str) -> Path:
    """Where the record ``(kind, record_id)`` lives under ``root``."""
    return Path(root) / kind / f"{record_id}.json"


def write_record(record: dict, root: str | Path = "results") -> Path:
    """Write ``record`` atomically to ``<root>/<kind>/<record_id>.json`` and return the path.

    Required fields: ``kind``, ``record_id``, ``status`` (one of :data:`STATUSES`) and
    ``created_at``. A record with the same kind and id replaces the previous one.
    """
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"record is missing required field(s) {missing}; required: {list(REQUIRED_FIELDS)}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record status {record['status']!r} is not one of {STATUSES}")
    for field in ("kind", "record_id"):
        value = record[field]
        if not isinstance(value, str) or not _SAFE_NAME.match(value):
            raise ValueError(
                f"record field '{field}' must be a non-empty string of letters, digits and ._=+- "
                f"(it becomes a file name); got {value!r}"
            )
    text = json.dumps(_jsonable(record), indent=1, sort_keys=True, allow_nan=False)
    path = record_path(root, record["kind"], record["record_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | Path) -> dict:
    """One record file as a dict (raises on an unreadable or truncated file)."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError(f"not a record: a JSON {type(record).__name__}, not an object")
    return record


def find_record(root: str | Path, kind: str, record_id: str) -> dict | None:
    """The record ``(kind, record_id)`` or None when absent or unreadable."""
    path = record_path(root, kind, record_id)
    if not path.exists():
        return None
    try:
        return read_record(path)
    except (OSError, ValueError):
        return None


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list):
            # Lists stay one cell (JSON text) so every row has the same columns.
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def load_records(root: str | Path = "results", kind: str | None = None) -> pd.DataFrame:
    """Every readable record under ``root`` (or ``root/kind``) as one DataFrame row.

    Nested dicts are flattened with ``.`` separators (``config.model.embed_dim``). Files
    that cannot be read (truncated by a killed process, not JSON) are reported with one
    ``warnings.warn`` each, listed in ``df.attrs["unreadable"]`` (paths) with the reason of each in
    ``df.attrs["unreadable_why"]`` (path -> :func:`unreadable_reason`); they never hide the readable ones.
    """
    root = Path(root)
    if kind is not None:
        kinds = [kind]
    else:
        kinds = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    # Only <root>/<kind>/*.json: a store nested inside this one (results/smoke in results) is another store.
    files = sorted(p for k in kinds for p in (root / k).glob("*.json") if not p.name.startswith("."))
    rows, unreadable, why = [], [], {}
    for path in files:
        try:
            record = read_record(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            why[str(path)] = unreadable_reason(exc)
            warnings.warn(f"unreadable record file {path}: {why[str(path)]}", stacklevel=2)
            unreadable.append(str(path))
            continue
        if record.get("kind") != path.parent.name:
            continue  # not a record of this kind (a stray JSON file in the folder)
        row = _flatten(record)
        row["_path"] = str(path)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["unreadable"] = unreadable
    df.attrs["unreadable_why"] = why
    return df


def unreadable_reason(exc: BaseException) -> str:
    """Why a record file could not be read, in words: ``truncated JSON (ends after 25 bytes)`` for a file cut
    short (a copy or a writer killed mid-file), else what the parser or the system said."""
    if isinstance(exc, json.JSONDecodeError):
        # The parser ran out of text (a string left open counts): the file was cut short.
        if exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string"):
            return f"truncated JSON (ends after {len(exc.doc)} characters)"
        return f"not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    return str(exc)


def nested_stores(root: str | Path) -> list[Path]:
    """The folders directly inside ``root`` that hold records of their own (``results/smoke`` in ``results``):
    another store, read only when named, so a report of ``root`` does not include them."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name not in KINDS
                  and any(next((d / k).glob("*.json"), None) for k in KINDS if (d / k).is_dir()))


def export_records(root: str | Path, path: str | Path, kind: str) -> Path:
    """Export the records of one ``kind`` under ``root`` to ``path`` (``.csv`` or ``.parquet`` by suffix).

    One kind per file: a training run and a benchmark cell share no columns worth a table.
    Raises ValueError for an unknown kind or suffix.
    """
    if kind not in KINDS:
        raise ValueError(f"export_records needs the kind of record to export, one of {KINDS}; got {kind!r}")
    path = Path(path)
    df = load_records(root, kind=kind)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise ValueError(f"export path {str(path)!r} must end in .csv or .parquet")
    return path


def recipe_columns(columns) -> list[str]:
    """The flattened ``config.*`` columns of training records that define a recipe (see :data:`WITHIN_RECIPE_KEYS`)."""
    skip = tuple(f"config.{k}" for k in (*NON_SEMANTIC_KEYS, *WITHIN_RECIPE_KEYS, "hydra"))
    return sorted(c for c in columns if c.startswith("config.") and not any(
        c == s or c.startswith(s + ".") for s in skip))


def recipe_of(row: pd.Series, columns: list[str]) -> dict[str, Any]:
    """One training record's recipe as a flat dict; ``auto`` device/precision read as what the run used
    (records written before they were resolved at hashing)."""
    recipe = {c[len("config."):]: _plain(row[c]) for c in columns if not _missing(row[c]) and row[c] != {}}
    if recipe.get("device") == "auto" and not _missing(row.get("device.device")):
        recipe["device"] = str(row["device.device"])
    if recipe.get("precision") == "auto" and not _missing(row.get("precision")):
        recipe["precision"] = str(row["precision"])
    return recipe


def _plain(value: Any) -> Any:
    """A whole float back to int (a column with gaps turns 128 into 128.0)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def config_hash(config: dict) -> str:
    """Stable hash of a config: sha256 of its canonical JSON (sorted keys), first 16 hex chars."""
    canonical = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
