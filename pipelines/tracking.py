"""The MLflow side: one parent run per pipeline run, one nested run per step.

The only module of `pipelines` that imports mlflow. Logging happens on a background thread, so a
slow tracking server never holds up the scheduling of steps; `close()` waits for it.

A SQLite tracking database is opened under an exclusive file lock beside it (`mlflow.db.lock`):
MLflow creates and migrates its tables on first open with DDL that SQLite does not roll back, so two
runs that create one at once leave `_alembic_tmp_*` tables behind and every later open fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import queue
import re
import shlex
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import DatabaseBusy, TrackingError, disk_full_message

MAX_PARAM_LENGTH = 6000
_NOT_IN_METRIC_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow accepts in a metric name


def metric_name(key: str) -> str:
    """`key` with each character MLflow refuses in a metric name (e.g. the + of a label such as
    "kfac-logra64+head") replaced by "_", so one odd label cannot fail a step's whole batch."""
    return _NOT_IN_METRIC_NAMES.sub("_", key)


LOCK_TIMEOUT_S = 300.0  # creating a new database takes seconds; a held lock this long is a hung run


def default_tracking_uri(store_root: Path) -> str:
    return f"sqlite:///{store_root / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI; None for a server or an in-memory database."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def database_lock(db: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive inter-process lock of SQLite database `db` (flock on `db`.lock).

    Raises DatabaseBusy if another process holds it for `timeout` seconds (0: do not wait). Without
    a writable folder there is no lock, and no database can be created there either.
    """
    lock_path = db.with_name(db.name + ".lock")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        fd = None
    try:
        if fd is not None:
            _acquire(fd, db, lock_path, timeout)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _acquire(fd: int, db: Path, lock_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DatabaseBusy(
                    f"tracking database {db}: another process has held {lock_path} for {timeout:.0f} s; "
                    f"let it finish, or find it with `fuser {shlex.quote(str(lock_path))}`"
                ) from None
            time.sleep(0.05)


def _opening(tracking_uri: str) -> contextlib.AbstractContextManager[None]:
    """The lock to hold while MLflow first opens `tracking_uri` (none for a server)."""
    db = sqlite_path(tracking_uri)
    return database_lock(db) if db is not None else contextlib.nullcontext()


def database_damage(db: Path) -> str | None:
    """What is wrong with the existing SQLite file `db`, found with the stdlib in milliseconds; None
    if it looks sound (or cannot be read for another reason, which MLflow then reports)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            leftover = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_alembic\\_tmp\\_%' "
                "ESCAPE '\\' ORDER BY name"
            ).fetchone()
            verdict = None if leftover else conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        return text if "not a database" in text or "malformed" in text else None
    if leftover:
        return f"a schema migration was interrupted: table {leftover[0]} exists"
    return None if verdict == "ok" else f"PRAGMA quick_check: {verdict}"


def _aside(db: Path) -> Path:
    """A free name to move a damaged database to: mlflow.db.broken, mlflow.db.broken-2, …"""
    names = (f"{db.name}.broken" + ("" if i == 1 else f"-{i}") for i in itertools.count(1))
    return next(path for name in names if not (path := db.with_name(name)).exists())


def _move_aside(db: Path) -> str:
    aside = _aside(db)
    return (
        f"move it aside (mv {shlex.quote(str(db))} {shlex.quote(str(aside))}) and run again — the "
        "store's tables are not affected; MLflow history of earlier runs stays in the moved file"
    )


def damaged_message(db: Path, why: str) -> str:
    return f"tracking database {db} is damaged ({why}); {_move_aside(db)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # SQLAlchemy leads with its own context ("(raised as a result of Query-invoked autoflush …")
    # and puts the database's error on a line of its own: "(sqlite3.OperationalError) …"
    driver = [line for line in lines if re.match(r"^\(\w+(\.\w+)*Error\) ", line)]
    return f"{type(exc).__name__}: {(driver or lines or [''])[0]}"


def logging_failure(tracking_uri: str, exc: BaseException) -> str:
    """One line for a failed logging call; a full disk names the database and says to free space."""
    db = sqlite_path(tracking_uri)
    full = disk_full_message(exc, f"the tracking database {db}" if db else tracking_uri)
    return f"MLflow: {full}" if full else _first_line(exc)


def connect_failure(tracking_uri: str, exc: Exception) -> str:
    """One line for a failure to open `tracking_uri`: a SQLite database names its file and the fix."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return f"MLflow at {tracking_uri}: {_first_line(exc)}"
    why = database_damage(db) if db.is_file() else None
    if why:
        return damaged_message(db, why)
    cause = _first_line(exc)
    return f"tracking database {db} cannot be opened ({cause}); to start a new one, {_move_aside(db)}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested params → {'resources.num_cpus': '1.0', …}, values cut to MLflow's limit."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(value)[:MAX_PARAM_LENGTH]}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Tracker:
    """Logs a pipeline run to MLflow: `start`, `log_step` per step, `finish`, `close`.

    A damaged SQLite database raises TrackingError at once (a stdlib check, no mlflow). Connecting
    (importing mlflow, opening the store, getting or creating the experiment) happens on the logging
    thread, so it overlaps with the start of Ray; `ready()` waits for it and raises a TrackingError if
    the tracking URI does not work, before any step executes.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None) -> None:
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._connect_error: TrackingError | None = None
        self._connected = threading.Event()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._live: dict[str, str] = {}  # step name -> its nested run, made while the step runs
        self._streamed: dict[str, set[tuple[str, float, int | None]]] = {}
        self._errors: list[str] = []
        check_database(tracking_uri)
        self._thread = threading.Thread(
            target=self._drain, args=(experiment, artifact_root), name="mlflow-logger", daemon=True
        )
        self._thread.start()

    def _connect(self, experiment: str, artifact_root: Path | None) -> None:
        # against a server, MLflow prints "🏃 View run … at: URL" and "🧪 View experiment" for every
        # run it ends: two lines per step in the run's output; the run prints its experiment's page once
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):  # after the import, which sets up mlflow's logging
            logging.getLogger(name).setLevel(logging.WARNING)
        # it logs each database error with a traceback before raising it, which we report in one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        if sqlite_path(self.tracking_uri) is not None:  # seconds of imports, better outside the lock
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        location = (artifact_root / experiment).as_uri() if artifact_root else None
        with _opening(self.tracking_uri):  # the first open creates or migrates a SQLite database
            try:
                self.client = MlflowClient(tracking_uri=self.tracking_uri)
                self.experiment_id = _experiment_id(self.client, experiment, location)
            except Exception as exc:  # diagnosed under the lock, while no other run migrates
                raise TrackingError(connect_failure(self.tracking_uri, exc)) from exc

    def _drain(self, experiment: str, artifact_root: Path | None) -> None:
        try:
            self._connect(experiment, artifact_root)
        except TrackingError as exc:
            self._connect_error = exc
        except Exception as exc:  # mlflow failed to import
            self._connect_error = TrackingError(f"MLflow at {self.tracking_uri}: {_first_line(exc)}")
            self._connect_error.__cause__ = exc
        finally:
            self._connected.set()
        while (job := self._jobs.get()) is not None:
            if self._connect_error:
                continue
            try:
                job()
            except Exception as exc:  # tracking must not take the pipeline down
                self._errors.append(logging_failure(self.tracking_uri, exc))

    @property
    def connect_error(self) -> TrackingError | None:
        """Why connecting failed (what `ready()` raises), once it did; None while connecting or after
        it worked."""
        return self._connect_error

    def ready(self) -> None:
        """Wait until connected; raise TrackingError if the tracking URI did not work."""
        self._connected.wait()
        if self._connect_error:
            raise self._connect_error

    def start(
        self, run_name: str, tags: dict[str, str], params: dict[str, Any], at: float | None = None
    ) -> None:
        """Queue the parent run (started `at`, a time.time(); default now); its id is `parent_id` once
        `close()` returned."""
        stamp = _ms(time.time() if at is None else at)
        self._jobs.put(lambda: self._start(run_name, tags, params, stamp))

    def _start(self, run_name: str, tags: dict[str, str], params: dict[str, Any], stamp: int) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, start_time=stamp, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=[Param(k, v) for k, v in flatten(params).items()])

    def log_step(
        self,
        name: str,
        *,
        tags: dict[str, str],
        params: dict[str, Any],
        metrics: list[tuple[str, float, int | None]],
        start: float,
        end: float,
        status: str,
        artifacts: str | None = None,
    ) -> None:
        """Queue a nested run for one step: params, tags, metrics (with steps), artifacts."""
        self._jobs.put(lambda: self._log_step(name, tags, params, metrics, start, end, status, artifacts))

    def log_live(
        self,
        name: str,
        *,
        tags: dict[str, str],
        params: dict[str, Any],
        start: float,
        metrics: list[tuple[str, float, int | None]],
        stamp: float,
    ) -> None:
        """Queue metrics a running step sent (stamped when it sent them) into its nested run, which is
        made on first use; `log_step` later completes that run and skips the metrics already logged."""
        self._jobs.put(lambda: self._log_live(name, tags, params, start, metrics, stamp))

    def _log_live(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        start: float,
        metrics: list[tuple[str, float, int | None]],
        stamp: float,
    ) -> None:
        from mlflow.entities import Metric

        run_id = self._step_run(name, tags, params, start)
        seen = self._streamed.setdefault(name, set())
        new = [m for m in metrics if m not in seen]
        seen.update(new)
        self.client.log_batch(
            run_id, metrics=[Metric(metric_name(k), v, _ms(stamp), s or 0) for k, v, s in new]
        )

    def _step_run(self, name: str, tags: dict[str, str], params: dict[str, Any], start: float) -> str:
        """The nested run of step `name`: the one made while it ran, else a new one (with its params)."""
        from mlflow.entities import Param

        if name not in self._live:
            all_tags = {**tags, "mlflow.parentRunId": self.parent_id}
            run = self.client.create_run(
                self.experiment_id, start_time=_ms(start), tags=all_tags, run_name=name
            )
            params_list = [Param(k, v) for k, v in flatten(params).items()]
            self.client.log_batch(run.info.run_id, params=params_list)
            self._live[name] = run.info.run_id
        return self._live[name]

    def _log_step(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        metrics: list[tuple[str, float, int | None]],
        start: float,
        end: float,
        status: str,
        artifacts: str | None,
    ) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._step_run(name, tags, params, start)
        self._live.pop(name)
        seen = self._streamed.pop(name, set())
        stamp = _ms(end)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(metric_name(k), v, stamp, s or 0) for k, v, s in metrics if (k, v, s) not in seen
            ],
            tags=[RunTag(k, v) for k, v in tags.items()],  # `cached` may differ from the live run's
        )
        if artifacts and Path(artifacts).is_dir():
            self.client.log_artifacts(run_id, artifacts)
        self.client.set_terminated(run_id, status=status, end_time=stamp)

    def finish(self, status: str, metrics: dict[str, float], at: float | None = None) -> None:
        """Queue the parent run's final metrics and status (ended `at`; default now)."""
        stamp = _ms(time.time() if at is None else at)
        self._jobs.put(lambda: self._finish(status, metrics, stamp))

    def _finish(self, status: str, metrics: dict[str, float], stamp: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(metric_name(k), v, stamp, 0) for k, v in metrics.items()]
        self.client.log_batch(self.parent_id, metrics=batch)
        self.client.set_terminated(self.parent_id, status=status, end_time=stamp)

    def close(self) -> list[str]:
        """Wait for queued logging to finish; return the errors it met (as one-line strings)."""
        self._jobs.put(None)
        self._thread.join()
        return [str(self._connect_error)] if self._connect_error else self._errors


class TrackingJournal:
    """Stands in for a Tracker where the MLflow run is recorded later, by another process: it notes
    each call (with its time) as JSON-ready data, `entries`, that `replay` feeds to a real Tracker.

    A run whose every step is cached does only milliseconds of work, and importing MLflow and its SQL
    store costs seconds (docs/startup.md); `tda run` hands such a run's MLflow record to a detached
    process. The SQLite database is still checked here first (stdlib, milliseconds).
    """

    experiment_id: str | None = None
    parent_id: str | None = None
    connect_error: TrackingError | None = None

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.entries: list[dict[str, Any]] = []
        check_database(tracking_uri)

    def _note(self, call: str, **kwargs: Any) -> None:
        self.entries.append({"call": call, **kwargs})

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        self._note("start", run_name=run_name, tags=tags, params=params, at=time.time())

    def log_step(self, name: str, **kwargs: Any) -> None:
        self._note("log_step", name=name, **kwargs)

    def log_live(self, name: str, **kwargs: Any) -> None:
        self._note("log_live", name=name, **kwargs)

    def finish(self, status: str, metrics: dict[str, float]) -> None:
        self._note("finish", status=status, metrics=metrics, at=time.time())

    def ready(self) -> None:
        """Nothing to wait for: nothing connects in this process."""

    def close(self) -> list[str]:
        return []


def replay(tracker: Tracker, entries: list[dict[str, Any]]) -> list[str]:
    """Feed a TrackingJournal's `entries` to `tracker`; returns the errors `close()` met."""
    for entry in entries:
        args = {k: v for k, v in entry.items() if k != "call"}
        if entry["call"] in ("log_step", "log_live"):
            args["metrics"] = [tuple(m) for m in args["metrics"]]
        getattr(tracker, entry["call"])(**args)
    return tracker.close()


def check_database(tracking_uri: str) -> None:
    """TrackingError if `tracking_uri` is a SQLite file that MLflow cannot open (milliseconds).

    Skipped while another process holds the lock: it may be creating the database, whose
    `_alembic_tmp_*` tables are then in flight; the logging thread reports a failure after it.
    """
    db = sqlite_path(tracking_uri)
    if db is None or not db.is_file():
        return
    try:
        with database_lock(db, timeout=0):
            why = database_damage(db)
    except DatabaseBusy:
        return
    if why:
        raise TrackingError(damaged_message(db, why))


# MLflow 3's UI opens an experiment without this tag on its GenAI overview ("No data available"); with
# it, on the run table with the nested step runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: Any, name: str, location: str | None) -> str:
    """The id of experiment `name`, created if missing (another run may create it at the same time),
    tagged as model development."""
    from mlflow.exceptions import MlflowException

    if (found := client.get_experiment_by_name(name)) is None:
        try:
            return str(client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND))
        except MlflowException as exc:
            already = exc.error_code == "RESOURCE_ALREADY_EXISTS"
            if not already or (found := client.get_experiment_by_name(name)) is None:
                raise
    for key, value in EXPERIMENT_KIND.items():  # experiments made before the tag existed
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return str(found.experiment_id)


def download_artifacts(tracking_uri: str, run_id: str, path: str, dst: Path) -> Path:
    """Artifacts `path` of MLflow run `run_id` (a folder or file), downloaded under `dst`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        client = mlflow.MlflowClient(tracking_uri)
        client.get_run(run_id)
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow run {run_id} at {tracking_uri}: cannot fetch artifact {path!r} "
            f"({str(exc).splitlines()[0]}); check the run id (`mlflow ui`) and the tracking URI"
        ) from None


def read_step_metrics(tracking_uri: str, parent_run_id: str) -> dict[str, dict[str, float]]:
    """Latest metrics of a pipeline run's nested step runs, step name → {metric: value}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    with _opening(tracking_uri):
        try:
            parent = client.get_run(parent_run_id)
            children = client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                max_results=5000,
            )
        except Exception as exc:
            raise TrackingError(connect_failure(tracking_uri, exc)) from exc
    return {run.info.run_name: dict(run.data.metrics) for run in children}
