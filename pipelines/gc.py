"""`tda gc`: what a store holds that nothing needs any more, listed first (`plan`), then deleted (`apply`).

What goes, by category:

    staging     tmp/<run_id>/ of a run that is not alive (what a killed or failed step left); a tmp/
                entry of no run once a day old (as pipelines/housekeeping.py has it); tmp/gc-trash.*
                (what an interrupted gc left)
    scratch     scratch/<key>/ whose key is an object (the step has committed: its partial work is
                done) or that no run record names; the resumable work of a step that a recorded run
                tried and did not finish is kept: the next run of that spec resumes from it
    object      objects/<key>/ that nothing references (below)
    quarantine  quarantine/<key>.<time>/: corrupt copies that a read moved out of objects/ (their steps
                recompute them); listed by the dry run, so move one away first to keep it

What is referenced: the key of every step that a run record names, whatever the step's status (a
failed or interrupted run's finished steps are what its next run resumes from), and, transitively, the
`inputs` of a referenced object's manifest (a step may read its inputs' inputs, and provenance stays
whole). runs/, exports/, mlflow.db and mlartifacts/ are never touched.

How it stays safe:

- A run record that cannot be read might name any object: gc refuses, and deletes nothing.
- Runs and gc exclude each other through `<store>/.gc.lock`. Every run holds it shared (`run_lock`,
  taken by `pipelines.runner.run` before it plans and released once its record is final); `apply`
  takes it exclusively without waiting and refuses while a run holds it; a run that starts while gc
  deletes waits for it. A `running` record whose driver is alive (a driver on another host of a shared
  volume, whose lock may not reach us) is live as well, lock or not.
- `apply` plans again under the lock and deletes only what both plans list. Each entry is first renamed
  into `tmp/gc-trash.<random>/` (one rename: `objects/<key>` is an object or gone, never half of one),
  then deleted there; what an interrupted gc leaves in the trash, the next one deletes.
- A store at a URI (an FsStore, file:// included) is refused: a run through a URI holds no lock (the
  URI's folder holds objects/, runs/ and exports/ only), so gc cannot know that no run has just
  planned to reuse an object. Its `running` record protects such a run only once written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pipelines.errors import StoreError
from pipelines.housekeeping import dead_staging
from pipelines.status import RunStatus
from pipelines.store import RunRecord, Store

log = logging.getLogger(__name__)

LOCK_NAME = ".gc.lock"
TRASH_PREFIX = "gc-trash."


class Category(str, Enum):
    """What kind of leftover an entry is; the value is what `tda gc` shows."""

    STAGING = "staging"
    SCRATCH = "scratch"
    OBJECT = "object"
    QUARANTINE = "quarantine"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Garbage:
    """One entry of the store that nothing needs: a folder (or a file) and why it can go."""

    category: Category
    path: Path
    size: int  # bytes: the apparent sizes of its files
    reason: str


@dataclass
class GcPlan:
    """What `apply` would delete from `store`, and why it could not now (`live`)."""

    store: Store
    items: list[Garbage]
    live: list[str]  # the live runs, in words; while there is one, `apply` deletes nothing
    runs: int  # run records read
    kept: int  # objects kept (referenced)

    @property
    def size(self) -> int:
        return sum(g.size for g in self.items)


def summary(items: Iterable[Garbage]) -> dict[Category, tuple[int, int]]:
    """Category -> (entries, bytes), every category listed (in Category's order)."""
    totals = {c: (0, 0) for c in Category}
    for g in items:
        count, size = totals[g.category]
        totals[g.category] = (count + 1, size + g.size)
    return totals


# ---------------------------------------------------------------- the lock runs share and gc takes


def lock_path(store: Store) -> Path | None:
    """The lock file of a store folder; None for a store at a URI (whose folder holds only objects/,
    runs/ and exports/)."""
    return store.root / LOCK_NAME if store.is_local else None


def _open_lock(store: Store) -> int | None:
    path = lock_path(store)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder we cannot write: the run's own check names it
        return None


@contextlib.contextmanager
def run_lock(store: Store) -> Iterator[None]:
    """Hold the store's gc lock shared, for a run's lifetime: gc deletes nothing meanwhile; a run that
    starts while gc deletes waits for it. Without a lock file (a remote URI store, an unwritable
    folder, a filesystem without flock) the run goes on unlocked."""
    fd = _open_lock(store)
    try:
        if fd is not None:
            _share(fd, store)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _share(fd: int, store: Store) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("%s: waiting for `tda gc` to finish deleting", store.location)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as exc:  # e.g. ENOLCK on a network filesystem without locks
        log.warning("%s: no gc lock (%s); do not run `tda gc` during this run", store.location, exc)


@contextlib.contextmanager
def gc_lock(store: Store) -> Iterator[None]:
    """Hold the store's gc lock exclusively; StoreError naming the live runs if a run holds it."""
    path = lock_path(store)
    fd = _open_lock(store)
    if path is None or fd is None:
        raise StoreError(
            f"{store.location}: cannot open {path or LOCK_NAME}; run tda gc as the store's owner"
        )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(live_message(store, _lock_holders(path))) from None
        except OSError as exc:
            raise StoreError(
                f"{path}: cannot lock ({exc.strerror or exc}); tda gc deletes nothing where it cannot "
                "keep runs out"
            ) from None
        yield
    finally:
        os.close(fd)


def _lock_busy(store: Store) -> bool:
    """Does a process hold the store's gc lock (a run, or a gc)? False where it cannot be told."""
    fd = _open_lock(store)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _lock_holders(path: Path) -> list[str]:
    """The pids holding `path` locked, from /proc/locks (Linux; best effort)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return [f"a process holds {path}"]
    fields = [line.split() for line in lines]  # "1: FLOCK ADVISORY READ <pid> <dev>:<inode> 0 EOF"
    pids = sorted({f[4] for f in fields if len(f) > 5 and f[5].endswith(f":{inode}")})
    pids = [p for p in pids if p != str(os.getpid())] or pids
    return [f"pid {p} holds {path}" for p in pids] or [f"a process holds {path}"]


def live_message(store: Store, live: list[str]) -> str:
    return f"a run is live in {store.location} ({'; '.join(live)}); run tda gc when it ends"


# ---------------------------------------------------------------- what is referenced


def read_records(store: Store) -> list[RunRecord]:
    """Every run record of the store (driverless `running` ones read as interrupted); StoreError
    (gc's refusal) if one cannot be read."""
    records = []
    for run_id in store.run_ids():
        try:
            records.append(store.read_record(run_id))
        except FileNotFoundError:  # deleted meanwhile: it names nothing any more
            continue
        except (StoreError, OSError) as exc:
            why = str(exc) if isinstance(exc, StoreError) else f"{store.run_path(run_id)}: {exc}"
            raise StoreError(
                f"{why}; tda gc deletes nothing while a record it cannot read might name any object"
            ) from None
    return records


def describe_live(record: RunRecord) -> str:
    driver = record.driver or {}
    return f"run {record.run_id}, pid {driver.get('pid', '?')} on {driver.get('host', '?')}"


def referenced_keys(store: Store, records: list[RunRecord]) -> set[str]:
    """The keys every record names, and the manifest inputs of those objects, transitively."""
    todo = [info.key for record in records for info in record.steps.values()]
    seen: set[str] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        inputs = (store.manifest(key) or {}).get("inputs")
        if isinstance(inputs, dict):
            todo.extend(k for k in inputs.values() if isinstance(k, str))
    return seen


# ---------------------------------------------------------------- the plan


def plan(store: Store) -> GcPlan:
    """What gc would delete from `store` now; `live` names the runs that stop it from deleting.
    StoreError if a run record cannot be read, or the store is at a URI (see the module docstring)."""
    return _plan(_folder(store), probe_lock=True)


def _folder(store: Store) -> Store:
    """`store`; StoreError if it is at a URI, or no folder is there."""
    if not store.is_local:
        raise StoreError(
            f"{store.location}: tda gc works on store folders only: a run through a URI holds no lock "
            "that gc could see, so gc cannot know that no run is about to reuse an object; delete from "
            "a URI store with its own tools while no run uses it"
        )
    if not store.root.is_dir():
        raise StoreError(
            f"{store.root}: no store folder here; give the store with --store, --spec or $TDA_STORE"
        )
    return store


def _plan(store: Store, probe_lock: bool) -> GcPlan:
    records = read_records(store)
    alive = [r for r in records if r.status == RunStatus.RUNNING]
    live = [describe_live(r) for r in alive]
    if probe_lock and not live and _lock_busy(store):
        live = _lock_holders(store.root / LOCK_NAME)
    referenced = referenced_keys(store, records)
    named = {info.key for r in records for info in r.steps.values()}
    working = {info.key for r in alive for info in r.steps.values()}
    items = [
        *_staging(store, {r.run_id for r in alive}, {r.run_id for r in records}),
        *_scratch(store, named, working),
        *_objects(store, referenced),
        *_quarantined(store),
    ]
    return GcPlan(store, items, live, len(records), len(store.object_keys()) - _count(items, Category.OBJECT))


def _count(items: list[Garbage], category: Category) -> int:
    return sum(g.category == category for g in items)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _staging(store: Store, alive: set[str], known: set[str]) -> list[Garbage]:
    tmp = store.root / "tmp"
    found = dict(dead_staging(tmp, alive, known))
    for entry in _entries(tmp):
        if entry.name.startswith(TRASH_PREFIX):
            found.setdefault(entry, "left by an interrupted tda gc")
    return [Garbage(Category.STAGING, e, _disk_size(e), why) for e, why in sorted(found.items())]


def _scratch(store: Store, named: set[str], working: set[str]) -> list[Garbage]:
    found = []
    for entry in _entries(store.root / "scratch"):
        key = entry.name
        if key in working:
            continue
        if store.has(key):
            reason = "its step has committed the object"
        elif key not in named:
            reason = "no run record names its step"
        else:
            continue  # an unfinished step of a recorded run: its next run resumes from here
        found.append(Garbage(Category.SCRATCH, entry, _disk_size(entry), reason))
    return found


def _objects(store: Store, referenced: set[str]) -> list[Garbage]:
    return [
        Garbage(
            Category.OBJECT, store.object_dir(key), _disk_size(store.object_dir(key)), "no run references it"
        )
        for key in store.object_keys()
        if key not in referenced
    ]


def _quarantined(store: Store) -> list[Garbage]:
    return [
        Garbage(Category.QUARANTINE, entry, _disk_size(entry), "a corrupt copy, moved out of objects/")
        for entry in _entries(store.root / "quarantine")
    ]


def _disk_size(path: Path) -> int:
    """The apparent size of the files under `path` (links not followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(_disk_size(Path(entry.path)) for entry in os.scandir(path))
    except OSError:
        return 0


# ---------------------------------------------------------------- deleting


def apply(
    plan: GcPlan, progress: Callable[[list[Garbage]], Iterable[Garbage]] | None = None
) -> list[Garbage]:
    """Delete what `plan` lists and still is garbage, holding the store's gc lock; returns what went.
    StoreError, with nothing deleted, while a run is live or if a record became unreadable."""
    store = plan.store
    with gc_lock(store):
        fresh = _plan(store, probe_lock=False)
        if fresh.live:
            raise StoreError(live_message(store, fresh.live))
        still = {(g.category, g.path) for g in fresh.items}
        doomed = [g for g in plan.items if (g.category, g.path) in still]
        trash = store.root / "tmp" / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
        removed = [g for g in (progress or list)(doomed) if _remove(g, trash)]
        _delete(trash)
    return removed


def _remove(item: Garbage, trash: Path) -> bool:
    """Rename `item` into `trash` (atomic) and delete it there; False if it was gone already."""
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{item.category}.{item.path.name}"
    try:
        os.replace(item.path, target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise StoreError(f"{item.path}: cannot remove ({exc.strerror or exc})") from None
        target = item.path  # on another filesystem (a linked folder): deleted where it is
        if item.category == Category.OBJECT:  # no longer an object from here on
            (target / "manifest.json").unlink(missing_ok=True)
    _delete(target)
    return True


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists() or path.is_symlink():
        log.warning("could not delete all of %s; the next tda gc tries again", path)
