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

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.errors import CorruptObject, StoreError
from pipelines.housekeeping import driver_gone, mark_interrupted
from pipelines.integrity import describe_files, find_problem, listed_files
from pipelines.params import is_uri
from pipelines.status import RunStatus, StepRecord

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


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


def json_object(text: str | bytes) -> dict[str, Any]:
    """The JSON object in `text`; ValueError if it is not JSON or holds no object (a list, a number…)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found a {type(value).__name__}")
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to `path` so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise


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
        return json_object((self.dir / "manifest.json").read_text(encoding="utf-8"))

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
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"store {self.root}: is a file, not a folder; give a folder (--store or run.store)"
            )

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

    def prepare(self) -> None:
        """Create the store's folders before a run; StoreError naming the folder if it cannot."""
        for part in ("runs", "objects", "tmp"):
            folder = self.root / part
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test.{uuid.uuid4().hex}"
                probe.touch()
                probe.unlink()
            except OSError as exc:
                raise StoreError(
                    f"store {self.root}: cannot write {part}/ ({exc.strerror or exc}); choose a folder "
                    "you can write (--store or run.store)"
                ) from None

    # objects ------------------------------------------------------------------
    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key

    def object_keys(self) -> list[str]:
        """The key of every folder in objects/ (objects, and folders that are not: see `has`)."""
        folder = self.root / "objects"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def has(self, key: str) -> bool:
        """True if `objects/<key>` is an object: a folder whose manifest lists its files with checksums.
        A folder without one (a deleted manifest, an older version's object) is not, and is replaced."""
        return listed_files(self.manifest(key)) is not None

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of object `key` (None if there is none), without materialising the object."""
        try:
            return json_object((self.object_dir(key) / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # unreadable: not an object
            return None

    def get(self, key: str) -> StoredObject:
        """The object, its files checked against the manifest (sizes, and sha256 once per process);
        a mismatch quarantines it and raises CorruptObject naming the file."""
        self.verify(key, hashes=True)
        return StoredObject(self.object_dir(key))

    def check(self, key: str, hashes: bool = False) -> bool:
        """Is `key` a complete object (its files present with their sizes, and with their sha256 if
        `hashes`)? A damaged one is quarantined, so the step that makes it runs again."""
        try:
            self.verify(key, hashes=hashes)
        except StoreError:  # no object, or a damaged one (CorruptObject)
            return False
        return True

    def verify(self, key: str, hashes: bool = True, memo: bool = True) -> dict[str, Any]:
        """Check object `key` against its manifest and return the manifest; StoreError if there is no
        object, CorruptObject (after quarantining it) if its files differ from the manifest."""
        retried = False
        while True:
            manifest = self.manifest(key)
            files = listed_files(manifest)
            if manifest is None or files is None:
                raise StoreError(f"{self.location}: no object {key} in the store")
            problem = find_problem(self.object_dir(key), files, hashes, memo)
            if problem is None:
                return manifest
            if retried or self.manifest(key) == manifest:  # else a forced re-run replaced it: look again
                raise self._corrupt(key, manifest, problem)
            retried = True

    def _corrupt(self, key: str, manifest: dict[str, Any], problem: str) -> CorruptObject:
        where = self.quarantine(key)
        step = f" (step {manifest['name']!r})" if manifest.get("name") else ""
        gone = self.locate("objects", key)
        fate = (
            f"moved to {where}; the next run recomputes it"
            if where
            else f"it could not be moved out of the store: delete {gone} to recompute it"
        )
        shown = key if len(key) <= 16 else f"{key[:16]}…"
        return CorruptObject(
            f"{self.location}: object {shown}{step} is corrupt: {problem}; {fate}", key, problem
        )

    def quarantine(self, key: str) -> str | None:
        """Move object `key` out of `objects/` into `quarantine/`; returns where (None if the store is
        read-only to us)."""
        stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        target = self.root / "quarantine" / f"{key}.{stamp}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.object_dir(key), target)
        except FileNotFoundError:  # another reader quarantined it first
            return str(target.parent)
        except OSError:
            return None
        return str(target)

    def scratch_dir(self, key: str) -> Path:
        """A folder that survives failed attempts of the step with this key (for resumable work)."""
        path = self.root / "scratch" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, key: str, owner: str = "_") -> Path:
        """A fresh folder in `tmp/<owner>/` (the run id of the step): what a dead run leaves there is
        removed by the next run (pipelines/housekeeping.py)."""
        path = self.root / "tmp" / owner / f"{key}.{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    def commit(
        self, key: str, staging: Path, manifest: dict[str, Any], replace: bool = False
    ) -> StoredObject:
        """Write the manifest (with every file's size and sha256) into `staging`, then rename it to
        `objects/<key>` atomically.

        If another writer committed the same key meanwhile, its (equivalent) object is kept and ours
        discarded, so readers of it are never disturbed; `replace` (a forced re-run) swaps it out. A
        folder at `objects/<key>` that is not an object (no manifest) is replaced.
        """
        write_json_atomic(staging / "manifest.json", {**manifest, "files": describe_files(staging)})
        target = self.object_dir(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(100):
            if self.has(key) and not replace:
                self.discard(staging)
                return StoredObject(target)
            self._move_aside(target, staging.parent)
            try:
                os.replace(staging, target)
                break
            except OSError as exc:  # a racing writer renamed its folder in between: theirs stands
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                replace = False
        else:
            raise StoreError(f"{self.location}: could not commit object {key}: the folder keeps changing")
        shutil.rmtree(self.root / "scratch" / key, ignore_errors=True)
        return StoredObject(target)

    def _move_aside(self, target: Path, tmp: Path) -> None:
        """Rename `target` (if any) into `tmp` and delete it there; a reader never sees it half-gone."""
        old = tmp / f"{target.name}.old.{uuid.uuid4().hex[:12]}"
        try:
            os.replace(target, old)
        except FileNotFoundError:
            return
        shutil.rmtree(old, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # runs ---------------------------------------------------------------------
    def run_path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def write_run(self, record: RunRecord) -> None:
        write_json_atomic(self.run_path(record.run_id), record.to_json())

    def run_ids(self) -> list[str]:
        """Every run id, oldest first (ids sort by start time)."""
        folder = self.root / "runs"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def read_run(self, run_id: str | None = None) -> RunRecord:
        """A run record by id (a unique prefix works), or the latest run with a readable record.

        A `running` record whose driver has stopped reads as `interrupted` (pipelines/housekeeping.py).
        """
        ids = self.run_ids()
        if not ids:
            raise StoreError(f"{self.location}: no runs in this store; run a spec with `tda run SPEC`")
        if run_id is None or run_id == "latest":
            return self._latest(ids)
        matches = [i for i in ids if i == run_id] or [i for i in ids if i.startswith(run_id)]
        if len(matches) != 1:
            what = "no run" if not matches else "several runs"
            raise StoreError(f"{self.location}: {what} matching {run_id!r}; see `tda runs`")
        return self.read_record(matches[0])

    def _latest(self, ids: list[str]) -> RunRecord:
        """The last started run: ids sort by their start second; runs of the same second are told apart
        by the millisecond start time in their records (their random suffixes do not order them).
        Unreadable records are skipped, each named in a warning."""
        for second in sorted({i[:15] for i in ids}, reverse=True):
            records = []
            for run_id in (i for i in ids if i[:15] == second):
                try:
                    records.append(self.read_record(run_id))
                except StoreError as exc:
                    log.warning("skipped %s", exc)
            if records:
                return max(records, key=lambda r: r.started)
        raise StoreError(f"{self.location}: no readable run record in runs/; run a spec with `tda run SPEC`")

    def read_record(self, run_id: str) -> RunRecord:
        """The record of run `run_id` (its exact id: no listing of runs/), read as `read_run` does."""
        where = self.locate("runs", f"{run_id}.json")
        try:
            data = self._run_data(run_id)
            record = RunRecord.from_json(data)
        except (ValueError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"{where}: unreadable run record ({first}); delete it, or restore it from a backup "
                "(the objects it names stay in the store)"
            ) from None
        if driver_gone(record):
            mark_interrupted(record)
        return record

    def _run_data(self, run_id: str) -> dict[str, Any]:
        return json_object(self.run_path(run_id).read_text(encoding="utf-8"))


@dataclass
class RunRecord:
    """What `runs/<run_id>.json` holds."""

    run_id: str
    spec_name: str
    spec_path: str
    store: str
    spec: dict[str, Any]
    status: RunStatus = RunStatus.RUNNING
    started: str = field(default_factory=now_iso)
    finished: str | None = None
    seconds: float | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    mlflow: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # ray_start, execute (seconds)
    overrides: list[str] = field(default_factory=list)
    driver: dict[str, Any] = field(default_factory=dict)  # host, pid, pid_start: who runs it
    heartbeat: str | None = None  # refreshed while the driver schedules steps

    def __post_init__(self) -> None:
        """Statuses and steps given as the JSON holds them (strings, dicts) become typed."""
        self.status = RunStatus(self.status)
        self.steps = {
            name: step if isinstance(step, StepRecord) else StepRecord.from_json(step)
            for name, step in self.steps.items()
        }

    def move_to(self, new: RunStatus) -> None:
        """Change the run's status; IllegalTransition if pipelines/status.py has no such move."""
        self.status = self.status.check_move(RunStatus(new))

    def to_json(self) -> dict[str, Any]:
        """What `runs/<run_id>.json` holds: plain JSON values, each step as `StepRecord.to_json`."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(status=self.status.value, steps={n: s.to_json() for n, s in self.steps.items()})
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record as read from JSON (of this or an older version: keys it does not know are
        skipped); ValueError or TypeError if it is not one."""
        if not isinstance(data, dict):
            raise TypeError(f"a run record is an object, not {type(data).__name__}")
        return cls(**{k: v for k, v in data.items() if k in RUN_FIELDS})


RUN_FIELDS = frozenset(RunRecord.__dataclass_fields__)


def new_run_id() -> str:
    """Sortable by start time: 20261128-140755-3fa2c1."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
