"""Start-up: what each command imports, a fully cached run without Ray or MLflow in the process (its
MLflow run recorded by a detached process), the dashboard only for steps that declare it, and the
warm local Ray of `tda ray up` that runs attach to (and the fallback when it is gone).

Timings are measured by benchmarks/startup.py, never asserted here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar, Literal

import pytest

import pipelines
from pipelines import StepParams, load_spec, local_ray
from pipelines.runner import PlannedStep, needs_dashboard
from pipelines.store import Store

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "mlflow", "torch", "transformers", "sqlalchemy")

SPEC = """
version: 1
name: startup
steps:
  base:
    kind: numbers
    n: 4
  plus:
    kind: add
    data: base
    amount: 10
"""


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> dict:
    """`cli.main(args)` in a fresh interpreter: its exit status and which heavy packages it imported."""
    code = (
        "import json, sys\n"
        "from pipelines.cli import main\n"
        f"rc = main({args!r})\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print('@@' + json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("@@")), None)
    assert line, f"no result:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return {**json.loads(line[2:]), "stdout": done.stdout, "stderr": done.stderr}


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """A spec and a store holding its finished run (run in this process's Ray)."""
    root = tmp_path_factory.mktemp("startup")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    pipelines.run(load_spec(spec), store=str(root / "store"), progress=False)
    return spec, root / "store"


def test_validate_imports_neither_ray_mlflow_nor_torch():
    result = _run_cli(["validate", "specs/quickstart.yaml"])
    assert result["rc"] == 0 and "valid; 19 steps" in result["stdout"]
    assert result["heavy"] == []


def test_query_imports_neither_ray_mlflow_nor_torch(finished):
    _, store = finished
    result = _run_cli(["query", "SELECT SUM(x) AS s FROM plus", "--store", str(store), "--format", "csv"])
    assert result["rc"] == 0 and "s\n46" in result["stdout"]
    assert result["heavy"] == []


def _wait_for_mlflow_ids(store: Store, run_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mlflow = store.read_run(run_id).mlflow
        if "deferred" not in mlflow:
            return mlflow
        time.sleep(0.5)
    raise AssertionError(f"the MLflow run of {run_id} was not recorded within {timeout:.0f} s")


def test_a_fully_cached_run_starts_no_ray_and_is_recorded_in_mlflow_after(finished):
    spec, store_path = finished
    result = _run_cli(["run", str(spec), "--store", str(store_path), "-q"])
    assert result["rc"] == 0, result["stderr"]
    assert result["heavy"] == []  # no Ray started, no MLflow imported in the run's own process
    assert "recorded in MLflow by a background process" in result["stdout"]
    store = Store.open(store_path)
    record = store.read_run(store.run_ids()[-1])
    assert {s["status"] for s in record.steps.values()} == {"cached"} and "ray_start" not in record.timings
    ids = _wait_for_mlflow_ids(store, record.run_id)
    assert not ids.get("errors") and ids["run_id"] and ids["experiment_id"]

    import mlflow

    client = mlflow.MlflowClient(ids["tracking_uri"])
    parent = client.get_run(ids["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["steps_cached"] == 2
    assert parent.info.run_name == record.run_id and parent.data.tags["spec"] == "startup"
    steps = client.search_runs(
        [ids["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{ids['run_id']}'"
    )
    assert sorted((r.info.run_name, r.data.tags["cached"]) for r in steps) == [
        ("base", "true"),
        ("plus", "true"),
    ]
    assert {r.info.run_name: r.data.metrics["rows"] for r in steps} == {"base": 4, "plus": 4}


class _TrainerParams(StepParams):
    kind: Literal["startup_trainer"] = "startup_trainer"
    needs_ray_dashboard: ClassVar[bool] = True


class _PlainParams(StepParams):
    kind: Literal["startup_plain"] = "startup_plain"


def _planned(params: StepParams, cached: bool) -> PlannedStep:
    class Job:  # only what needs_dashboard reads
        pass

    job = Job()
    job.params = params  # type: ignore[attr-defined]
    return PlannedStep("s", job, cached, ())  # type: ignore[arg-type]


def test_the_dashboard_is_wanted_only_for_a_step_to_execute_that_declares_it():
    plain, trainer = _PlainParams(), _TrainerParams()
    assert not needs_dashboard({"a": _planned(plain, cached=False)})
    assert not needs_dashboard({"a": _planned(plain, False), "t": _planned(trainer, cached=True)})
    assert needs_dashboard({"a": _planned(plain, False), "t": _planned(trainer, cached=False)})


def test_ray_train_steps_declare_the_dashboard():
    from tda.steps.train_airrep import TrainAirRepParams

    assert TrainAirRepParams.needs_ray_dashboard and not StepParams.needs_ray_dashboard


def test_a_warm_ray_whose_process_is_gone_is_forgotten_with_a_warning(tmp_path, monkeypatch, caplog):
    from pipelines.runner import _attach_warm_ray

    monkeypatch.setenv(local_ray.RAY_DIR_ENV, str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = local_ray.WarmRay("127.0.0.1:1", dead.pid, None, str(tmp_path / "t"), "", "", 2, "")
    local_ray.write_record(gone)
    with caplog.at_level(logging.WARNING, logger="pipelines.runner"):
        assert _attach_warm_ray() is None
    assert f"(pid {dead.pid}) is gone; starting an embedded Ray" in caplog.text
    assert local_ray.recorded() is None  # a later run does not try it again
    assert local_ray.down() is None


@pytest.mark.slow
def test_runs_attach_to_a_warm_ray_until_it_is_stopped(tmp_path):
    """`tda ray up`, a run that attaches (and says so), `tda ray down`, a run that starts its own."""
    env = {local_ray.RAY_DIR_ENV: str(tmp_path / "warm")}
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nname: warm\nsteps:\n  t:\n    kind: read\n    path: t.csv\n")

    def tda(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pipelines.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)

    up = tda("ray", "up", "--num-cpus", "2")
    assert up.returncode == 0, up.stderr
    try:
        os.environ[local_ray.RAY_DIR_ENV] = env[local_ray.RAY_DIR_ENV]
        warm = local_ray.recorded()
        assert warm is not None and warm.alive() and warm.address.startswith("127.0.0.1:")
        assert "already up" in tda("ray", "up").stdout
        run = tda("run", str(spec), "--store", str(tmp_path / "store"), "-q")
        assert run.returncode == 0, run.stderr
        assert f"ray:      attached to the warm Ray at {warm.address}" in run.stdout
        record = Store.open(tmp_path / "store").read_run(Store.open(tmp_path / "store").run_ids()[-1])
        assert record.steps["t"]["status"] == "done" and record.driver["ray"].startswith("attached")
    finally:
        down = tda("ray", "down")
        os.environ.pop(local_ray.RAY_DIR_ENV, None)
    assert down.returncode == 0 and "stopped the warm Ray" in down.stdout
    assert not warm.alive() and not Path(warm.temp_dir).exists()
    assert not (tmp_path / "warm" / "cluster.json").exists()
    again = tda("run", str(spec), "--store", str(tmp_path / "store2"), "-q")
    assert again.returncode == 0 and "ray:      started an embedded Ray" in again.stdout


def test_a_deferred_mlflow_record_whose_recorder_died_is_recorded_by_the_next_run(finished, monkeypatch):
    """The recording process of a cached run killed before it wrote anything (here: never started):
    the record keeps `mlflow.deferred`, and the next run into the store starts it again."""
    import pipelines.runner

    spec, store_path = finished
    monkeypatch.setattr(pipelines.runner, "_record_tracking_later", lambda store, run_id: None)
    orphan = pipelines.run(load_spec(spec), store=str(store_path), progress=False, defer_tracking=True)
    store = Store.open(store_path)
    assert "deferred" in store.read_run(orphan.record.run_id).mlflow
    monkeypatch.undo()

    pipelines.run(load_spec(spec), store=str(store_path), progress=False)  # records in MLflow itself
    ids = _wait_for_mlflow_ids(store, orphan.record.run_id)
    assert not ids.get("errors") and ids["run_id"]
    assert not (store_path / "runs" / f".{orphan.record.run_id}.mlflow.lock").exists()
    import mlflow

    parent = mlflow.MlflowClient(ids["tracking_uri"]).get_run(ids["run_id"])
    assert parent.info.run_name == orphan.record.run_id and parent.info.status == "FINISHED"
