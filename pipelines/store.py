"""The content-addressed store: `objects/<key>/` outputs with manifests, and `runs/<id>.json` records.

    <store>/objects/<key>/manifest.json   written last: an object exists iff its manifest does
    <store>/objects/<key>/data/*.parquet  the step's table (if it has one)
    <store>/objects/<key>/model/ …        anything else the step wrote (models, artifacts/)
    <store>/runs/<run_id>.json            spec as resolved, step -> key, status, timings, MLflow ids
    <store>/scratch/<key>/                resumable partial work of an unfinished step
    <store>/tmp/                          staging: outputs are built here and renamed into place

A reader never sees a partial object: a step writes into a staging folder in the same filesystem,
the manifest goes in last, and the folder is renamed to `objects/<key>` in one atomic step.

`Store.open(location)` takes such a folder, or a pyarrow filesystem URI (s3://bucket/prefix, gs://…,
file:///abs/path) for which it returns an `FsStore` (pipelines/store_fs.py) with the same methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.errors import StoreError
from pipelines.params import is_uri

SCHEMA_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(kind: str, version: str, params: dict[str, Any], fingerprint: str | None = None) -> str:
    """sha256 of (kind, semantic params, code version, schema version, input fingerprint).

    `params` carry the upstream steps' cache keys in place of their names, so renaming a step
    keeps its descendants' keys, and any change upstream changes every key below it.
    """
    payload = {
        "kind": kind,
        "version": version,
        "params": params,
        "fingerprint": fingerprint,
        "schema_version": SCHEMA_VERSION,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to `path` so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class StoredObject:
    """One step output in the store."""

    dir: Path

    @property
    def key(self) -> str:
        return self.dir.name

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def has_table(self) -> bool:
        return self.data_dir.is_dir() and any(self.data_dir.glob("*.parquet"))

    def table(self) -> pl.LazyFrame:
        """The step's table as a lazy scan over its Parquet files."""
        if not self.has_table:
            raise StoreError(f"object {self.key} ({self.manifest.get('name')}) has no table")
        return pl.scan_parquet(str(self.data_dir / "*.parquet"))


class Store:
    """A store rooted at a local folder (a shared volume on a cluster).

    `root` is always a local folder: the store itself here, the node-local cache in an FsStore.
    """

    is_local = True  # False for an FsStore: `root` is then a cache, not the store

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @staticmethod
    def open(location: str | Path) -> Store:
        """A Store over a folder, or an FsStore over a pyarrow filesystem URI (`scheme://…`)."""
        if is_uri(location):
            from pipelines.store_fs import FsStore

            return FsStore(str(location))
        return Store(location)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __str__(self) -> str:
        return self.location

    @property
    def location(self) -> str:
        """The store as the user names it: its folder, or its URI."""
        return str(self.root)

    def locate(self, *parts: str) -> str:
        """Where `parts` (e.g. "runs", "<id>.json") lie: a path, or a URI for an FsStore."""
        return str(self.root.joinpath(*parts))

    # objects ------------------------------------------------------------------
    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key

    def has(self, key: str) -> bool:
        return (self.object_dir(key) / "manifest.json").is_file()

    def get(self, key: str) -> StoredObject:
        if not self.has(key):
            raise StoreError(f"{self.location}: no object {key} in the store")
        return StoredObject(self.object_dir(key))

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of object `key` (None if there is none), without materialising the object."""
        try:
            return json.loads((self.object_dir(key) / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def scratch_dir(self, key: str) -> Path:
        """A folder that survives failed attempts of the step with this key (for resumable work)."""
        path = self.root / "scratch" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, key: str) -> Path:
        path = self.root / "tmp" / f"{key}.{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    def commit(
        self, key: str, staging: Path, manifest: dict[str, Any], replace: bool = False
    ) -> StoredObject:
        """Write the manifest into `staging` and rename it to `objects/<key>` atomically.

        If another run committed the same key meanwhile, its (equivalent) object is kept and ours
        discarded, so readers of it are never disturbed; `replace` (a forced re-run) swaps it out.
        """
        write_json_atomic(staging / "manifest.json", manifest)
        target = self.object_dir(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not replace:
            self.discard(staging)
            return StoredObject(target)
        if target.exists():
            old = self.root / "tmp" / f"{key}.old.{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, target)
        shutil.rmtree(self.root / "scratch" / key, ignore_errors=True)
        return StoredObject(target)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # runs ---------------------------------------------------------------------
    def run_path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def write_run(self, record: RunRecord) -> None:
        write_json_atomic(self.run_path(record.run_id), asdict(record))

    def run_ids(self) -> list[str]:
        """Every run id, oldest first (ids sort by start time)."""
        folder = self.root / "runs"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def read_run(self, run_id: str | None = None) -> RunRecord:
        """A run record by id (a unique prefix works), or the latest run."""
        ids = self.run_ids()
        if not ids:
            raise StoreError(f"{self.location}: no runs in this store; run a spec with `tda run SPEC`")
        if run_id in (None, "latest"):
            # ids sort by their start second; runs started within the same second are told apart by
            # the millisecond start time in their records (their random suffixes do not order them)
            tied = [i for i in ids if i[:15] == ids[-1][:15]]
            chosen = tied[0] if len(tied) == 1 else max(tied, key=lambda i: self._run_data(i)["started"])
        else:
            matches = [i for i in ids if i == run_id] or [i for i in ids if i.startswith(run_id)]
            if len(matches) != 1:
                what = "no run" if not matches else "several runs"
                raise StoreError(f"{self.location}: {what} matching {run_id!r}; see `tda runs`")
            chosen = matches[0]
        return RunRecord(**self._run_data(chosen))

    def _run_data(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.run_path(run_id).read_text(encoding="utf-8"))


@dataclass
class RunRecord:
    """What `runs/<run_id>.json` holds."""

    run_id: str
    spec_name: str
    spec_path: str
    store: str
    spec: dict[str, Any]
    status: str = "running"
    started: str = field(default_factory=now_iso)
    finished: str | None = None
    seconds: float | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # ray_start, execute (seconds)
    overrides: list[str] = field(default_factory=list)


def new_run_id() -> str:
    """Sortable by start time: 20261128-140755-3fa2c1."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
