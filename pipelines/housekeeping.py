"""Runs that ended without saying so (a driver killed mid-run), and what they left behind.

A run record names its driver (host, pid, and the pid's start time, so a reused pid is told apart) and
carries a heartbeat that the driver refreshes every HEARTBEAT_S seconds while it schedules steps. A
`running` record whose driver is gone reads as `interrupted` (`Store.read_run`):

- on the driver's own host, its pid is gone or now belongs to another process;
- from any other host, its heartbeat is older than STALE_S seconds.

The next run into the store (`clean_store`) writes such records back as interrupted and removes the
staging folders of every run that is not alive (`tmp/<run_id>/`). Every run on a host also stops what
dead embedded Rays of that host left running and removes their temp folders (`sweep_ray_temp_dirs`);
a driver that exits normally removes its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.status import RunStatus, StepStatus

if TYPE_CHECKING:  # the store reads records through this module
    from pipelines.store import RunRecord, Store

HEARTBEAT_S = 30.0
STALE_S = 300.0
ORPHAN_STAGING_S = 86400.0  # tmp entries of no run (an older layout, a download) go after this
RAY_TEMP_PREFIX = "tda-ray-"
_RAY_TEMP = re.compile(rf"^{RAY_TEMP_PREFIX}(\d+)-(\d+)-")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (Linux), None where /proc has no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def driver_info() -> dict[str, Any]:
    """Who this driver is: host, pid and the pid's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid())}


def process_alive(pid: int, start: str | None) -> bool:
    """Is `pid` alive and (where the start time is known) the same process that was recorded?"""
    if Path("/proc").is_dir() and start is not None:
        return _start_ticks(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(stamp: str | None) -> float:
    if not stamp:
        return float("inf")
    try:
        then = datetime.fromisoformat(stamp)
    except ValueError:
        return float("inf")
    return (datetime.now(timezone.utc) - then).total_seconds()


def driver_gone(record: RunRecord) -> bool:
    """True if the record is `running` but its driver has stopped without finishing it."""
    if record.status != RunStatus.RUNNING:
        return False
    driver = record.driver or {}
    if driver.get("host") == socket.gethostname() and driver.get("pid"):
        return not process_alive(int(driver["pid"]), driver.get("pid_start"))
    return _age(record.heartbeat or record.started) > STALE_S


def mark_interrupted(record: RunRecord) -> None:
    """Turn a record whose driver is gone into an `interrupted` one (in place)."""
    driver = record.driver or {}
    who = f"pid {driver.get('pid', '?')} on {driver.get('host', '?')}"
    record.move_to(RunStatus.INTERRUPTED)
    for info in record.steps.values():
        if not info.status.is_terminal:
            info.move_to(StepStatus.INTERRUPTED)
            info.error = f"the run's driver ({who}) stopped before this step finished"


def clean_store(store: Store) -> list[RunRecord]:
    """Write back records of dead runs as interrupted and remove staging of runs that are not alive;
    returns every readable record (as written back)."""
    records, alive = [], set()
    for run_id in store.run_ids():
        try:
            record = store.read_record(run_id)
        except Exception:  # an unreadable record is skipped here and named where it is read
            continue
        if record.status == RunStatus.INTERRUPTED and record.finished is None:
            record.finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            store.write_run(record)
        elif record.status == RunStatus.RUNNING:
            alive.add(run_id)
        records.append(record)
    _remove_dead_staging(store.root / "tmp", alive, set(store.run_ids()))
    return records


def dead_staging(tmp: Path, alive: set[str], known: set[str]) -> list[tuple[Path, str]]:
    """The entries of `tmp` no live run uses, each with why: the staging of a run (`known`) that is
    not `alive`, or an entry of no run untouched for ORPHAN_STAGING_S."""
    found = []
    for entry in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if entry.name in alive:
            continue
        if entry.name in known:
            found.append((entry, f"staging of run {entry.name}, which is not running"))
        elif (age := _age_of(entry)) > ORPHAN_STAGING_S:
            found.append((entry, f"of no run, untouched for {age / 86400:.0f} day(s)"))
    return found


def _remove_dead_staging(tmp: Path, alive: set[str], known: set[str]) -> None:
    for entry, _why in dead_staging(tmp, alive, known):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _age_of(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------- embedded Ray's temp folders


def ray_temp_dir() -> str:
    """A new temp folder for an embedded Ray, named after this driver so a later run can tell when
    it died: tda-ray-<pid>-<start ticks>-XXXX."""
    me = driver_info()
    return tempfile.mkdtemp(prefix=f"{RAY_TEMP_PREFIX}{me['pid']}-{me['pid_start'] or 0}-")


def remove_ray_temp_dir(path: str) -> None:
    """Stop every process still using `path` (an embedded Ray's leftovers) and remove the folder."""
    for pid in _processes_using(path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def sweep_ray_temp_dirs() -> list[str]:
    """Remove the temp folders of embedded Rays whose driver is dead (with their leftover processes)."""
    removed = []
    for entry in Path(tempfile.gettempdir()).glob(f"{RAY_TEMP_PREFIX}*"):
        match = _RAY_TEMP.match(entry.name)
        if not entry.is_dir():
            continue
        if match is None:  # an older version's name, without its driver: removed once nothing uses it
            dead = _age_of(entry) > ORPHAN_STAGING_S and not _processes_using(str(entry))
        else:
            pid, start = int(match.group(1)), match.group(2)
            dead = not process_alive(pid, None if start == "0" else start)
        if dead:
            remove_ray_temp_dir(str(entry))
            removed.append(str(entry))
    return removed


def _processes_using(path: str) -> list[int]:
    """Pids (Linux) whose command line or environment names `path`."""
    needle = path.encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]
