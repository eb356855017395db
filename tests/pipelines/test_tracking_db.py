"""The SQLite tracking database under concurrency: runs that create it at once, and damaged files."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

from pipelines.errors import TrackingError
from pipelines.tracking import Tracker

RACERS = 4


def _connect_at_once(uri: str, barrier: Any, results: Any) -> None:
    """One racer (a spawned process): open the tracking database when all racers are ready."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  imports first, so the opens race

    barrier.wait(timeout=120)
    tracker = Tracker(uri, "race", None)
    tracker.start(f"racer-{os.getpid()}", {}, {"pid": os.getpid()})
    results.put(tracker.close())


def _race(uri: str, n: int) -> list[list[str]]:
    """The errors each of `n` processes met opening `uri` at the same moment."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run Ray
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_connect_at_once, args=(uri, barrier, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    errors = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return errors


def test_runs_that_create_the_database_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    assert _race(uri, RACERS) == [[]] * RACERS
    later = Tracker(uri, "race", None)
    later.start("later", {}, {})
    assert later.close() == []
    runs = mlflow.MlflowClient(uri).search_runs([later.experiment_id])
    assert len(runs) == RACERS + 1


class _LateClient:
    """An MLflow client whose experiment another run creates between our look-up and our create."""

    tagged: ClassVar[list[tuple[str, str, str]]] = []

    def __init__(self, tracking_uri: str) -> None:
        self.lookups = 0

    def get_experiment_by_name(self, name: str) -> SimpleNamespace | None:
        self.lookups += 1
        return None if self.lookups == 1 else SimpleNamespace(experiment_id="7", tags={})

    def create_experiment(
        self, name: str, artifact_location: str | None = None, tags: dict[str, str] | None = None
    ) -> str:
        raise MlflowException(f"Experiment(name={name}) already exists.", RESOURCE_ALREADY_EXISTS)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.tagged.append((experiment_id, key, value))


def test_an_experiment_created_by_another_run_meanwhile_is_used(monkeypatch):
    monkeypatch.setattr("mlflow.tracking.MlflowClient", _LateClient)
    tracker = Tracker("http://127.0.0.1:1", "shared", None)
    tracker.ready()
    assert tracker.experiment_id == "7" and tracker.close() == []
    assert _LateClient.tagged == [("7", "mlflow.experimentKind", "custom_model_development")]  # the other's


def _interrupted_migration(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE model_version_tags (key TEXT)")
        conn.execute("CREATE TABLE _alembic_tmp_model_version_tags (key TEXT)")
    return r"a schema migration was interrupted: table _alembic_tmp_model_version_tags exists"


def _not_sqlite(db: Path) -> str:
    db.write_bytes(b"these are not the tables you are looking for\n" * 100)
    return r"file is not a database"


@pytest.mark.parametrize("damage", [_interrupted_migration, _not_sqlite], ids=["migration", "not-sqlite"])
def test_a_damaged_database_stops_the_tracker_at_once_in_one_line(damage, tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    why = damage(db)
    connects: list[object] = []
    monkeypatch.setattr(Tracker, "_drain", lambda self, *args: connects.append(args))
    started = time.perf_counter()
    with pytest.raises(TrackingError) as caught:
        Tracker(f"sqlite:///{db}", "x", None)
    assert time.perf_counter() - started < 1.0 and not connects  # before mlflow is even imported
    assert str(caught.value) == (
        f"tracking database {db} is damaged ({why}); move it aside (mv {db} {db}.broken) and run "
        "again — the store's tables are not affected; MLflow history of earlier runs stays in the moved file"
    )


def test_the_suggested_name_does_not_overwrite_an_earlier_broken_database(tmp_path):
    db = tmp_path / "mlflow.db"
    _not_sqlite(db)
    (tmp_path / "mlflow.db.broken").write_text("moved aside last week")
    with pytest.raises(TrackingError, match=rf"\(mv {db} {db}.broken-2\)"):
        Tracker(f"sqlite:///{db}", "x", None)


def test_mlflow_failing_on_a_sqlite_file_is_one_line_naming_it(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # passes the quick check; MLflow's migrations then fail on it
        conn.execute("CREATE TABLE experiments (unrelated TEXT)")
    tracker = Tracker(f"sqlite:///{db}", "x", None)
    with pytest.raises(TrackingError) as caught:
        tracker.ready()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"tracking database {db} ")
    assert f"move it aside (mv {db} {db}.broken) and run again" in message
    assert caught.value.__cause__ is not None


SPEC = """
version: 1
name: twins
steps:
  base:
    kind: numbers
    n: {n}
"""


def _tda_run(spec: Path, store: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(spec), "-q", "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_tda_run_on_a_damaged_database_says_what_to_do_before_starting_ray(tmp_path):
    spec, store = tmp_path / "spec.yaml", tmp_path / "store"
    spec.write_text(SPEC.format(n=3))
    store.mkdir()
    _interrupted_migration(store / "mlflow.db")
    started = time.perf_counter()
    proc = _tda_run(spec, store)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        f"tracking database {store / 'mlflow.db'} is damaged (a schema migration was interrupted: table "
        f"_alembic_tmp_model_version_tags exists); move it aside (mv {store / 'mlflow.db'} "
        f"{store / 'mlflow.db.broken'}) and run again — the store's tables are not affected; MLflow "
        "history of earlier runs stays in the moved file"
    ]
    assert time.perf_counter() - started < 10  # starting Ray alone takes longer


@pytest.mark.slow
def test_two_tda_runs_into_a_new_store_at_once_both_succeed(tmp_path):
    store = tmp_path / "store"
    runs = []
    for n in (3, 4):
        spec = tmp_path / f"spec{n}.yaml"
        spec.write_text(SPEC.format(n=n))
        runs.append(_tda_run(spec, store))
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert len(mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_runs(["1"])) == 4
