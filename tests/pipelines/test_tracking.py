"""MLflow: a parent run per pipeline run, a nested run per step; SQLite and a live server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

import pipelines
from pipelines import load_spec

SPEC = """
version: 1
name: tracked
steps:
  base:
    kind: numbers
    n: 3
  sq:
    kind: fanout
    n: 4
"""


def runs_of(tracking_uri: str, experiment: str):
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")


def test_default_tracking_is_sqlite_in_the_store(ray_session, write_spec, tmp_path):
    store = tmp_path / "store"
    result = pipelines.run(load_spec(write_spec(SPEC)), store=str(store), progress=False)
    assert result.record.mlflow["tracking_uri"] == f"sqlite:///{store / 'mlflow.db'}"
    runs = runs_of(result.record.mlflow["tracking_uri"], "tracked")
    parent = runs[runs["run_id"] == result.record.mlflow["run_id"]].iloc[0]
    assert parent["tags.run_id"] == result.run_id and parent["status"] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    by_step = {row["tags.mlflow.runName"]: row for _, row in children.iterrows()}
    assert set(by_step) == {"base", "sq"}
    sq = by_step["sq"]
    assert sq["tags.kind"] == "fanout" and sq["tags.cached"] == "false"
    assert sq["tags.cache_key"] == result.steps["sq"]["key"]
    assert sq["params.n"] == "4" and sq["metrics.rows"] == 4 and sq["metrics.wall_seconds"] > 0
    client = mlflow.MlflowClient(result.record.mlflow["tracking_uri"])
    history = client.get_metric_history(sq["run_id"], "square")
    assert [(m.step, m.value) for m in history] == [(0, 0), (1, 1), (2, 4), (3, 9)]
    assert [a.path for a in client.list_artifacts(sq["run_id"])] == ["note.txt"]
    assert (store / "mlartifacts").is_dir()
    experiment = client.get_experiment_by_name("tracked")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's run table


def test_an_experiment_made_before_the_kind_tag_gets_it(tmp_path):
    """Experiments of older runs open on the GenAI overview until they are tagged; the next run tags them."""
    from pipelines.tracking import _experiment_id

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = client.create_experiment("older", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(made).tags
    assert _experiment_id(client, "older", None) == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"


TICKING = """
version: 1
name: ticking
steps:
  ticking:
    kind: ticking
    n: 4
    seconds: 1.2
"""


def test_a_running_step_shows_progress_and_streams_metrics(ray_session, write_spec, tmp_path, capfd):
    """Without a terminal, progress lines come before the step ends; its metrics reach MLflow live."""
    result = pipelines.run(load_spec(write_spec(TICKING)), store=str(tmp_path / "store"), progress=True)
    lines = capfd.readouterr().err.splitlines()
    shown = [i for i, line in enumerate(lines) if re.search(r"ticking: [1-3]/4$", line)]
    ended = [i for i, line in enumerate(lines) if line.endswith("ticking: done (4 rows)")]
    assert shown and ended and shown[0] < ended[0]
    assert len(lines) == len(set(lines))  # no line twice
    client = mlflow.MlflowClient(result.record.mlflow["tracking_uri"])
    runs = runs_of(result.record.mlflow["tracking_uri"], "ticking")
    step = runs[runs["tags.mlflow.runName"] == "ticking"].iloc[0]
    assert step["tags.mlflow.parentRunId"] == result.record.mlflow["run_id"] and step["status"] == "FINISHED"
    history = sorted(client.get_metric_history(step["run_id"], "tick"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 1), (2, 2), (3, 3), (4, 4)]  # each once
    end = client.get_run(step["run_id"]).info.end_time
    assert history[0].timestamp <= end - 2000  # logged while the step ran, not at its end
    assert history[0].timestamp < history[2].timestamp


def test_cached_steps_are_tracked_as_cached(ray_session, write_spec, tmp_path, tracking_uri):
    path = write_spec(SPEC.replace("name: tracked", "name: tracked_cached"))
    for _ in range(2):
        result = pipelines.run(
            load_spec(path), store=str(tmp_path / "s"), tracking_uri=tracking_uri, progress=False
        )
    runs = runs_of(tracking_uri, "tracked_cached")
    children = runs[runs["tags.mlflow.parentRunId"] == result.record.mlflow["run_id"]]
    assert set(children["tags.cached"]) == {"true"} and len(children) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, stopped after the module."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_tracking_uri_against_a_live_mlflow_server(ray_session, write_spec, tmp_path, mlflow_server):
    path = write_spec(SPEC.replace("name: tracked", "name: served"))
    result = pipelines.run(
        load_spec(path), store=str(tmp_path / "store"), tracking_uri=mlflow_server, progress=False
    )
    assert not (tmp_path / "store" / "mlflow.db").exists()
    runs = runs_of(mlflow_server, "served")
    assert result.record.mlflow["run_id"] in set(runs["run_id"])
    assert len(runs[runs["tags.mlflow.parentRunId"] == result.record.mlflow["run_id"]]) == 2
    client = mlflow.MlflowClient(mlflow_server)
    sq = runs[runs["tags.mlflow.runName"] == "sq"].iloc[0]
    assert [a.path for a in client.list_artifacts(sq["run_id"])] == ["note.txt"]


def test_an_unreachable_tracking_server_stops_the_run_before_any_step(
    ray_session, write_spec, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries take minutes
    path = write_spec(SPEC)
    with pytest.raises(pipelines.PipelineError, match=r"MLflow at http://127.0.0.1:\d+: "):
        pipelines.run(
            load_spec(path),
            store=str(tmp_path / "s"),
            progress=False,
            tracking_uri=f"http://127.0.0.1:{_free_port()}",
        )
    record = pipelines.open_run(tmp_path / "s").record
    assert {s["status"] for s in record.steps.values()} == {"skipped"}
    assert not any((tmp_path / "s" / "objects").glob("*"))


def test_metric_names_mlflow_refuses_are_made_acceptable(tmp_path):
    """A step's metric named after a user's label ("kfac-logra64+head") is logged, not a failed batch."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipelines.tracking import metric_name

    assert metric_name("lds.kfac-logra64+head.sum") == "lds.kfac-logra64_head.sum"
    assert metric_name("lds.heldout/all: x-1.5") == "lds.heldout/all: x-1.5"  # allowed characters stay
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("names", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    name = metric_name("lds.ekfac-logra128+head.attention")
    client.log_batch(run.info.run_id, metrics=[Metric(name, 0.5, 0, 0)])
    assert client.get_run(run.info.run_id).data.metrics == {name: 0.5}


def test_the_mlflow_ui_opens_on_the_run_table(mlflow_server, tmp_path):
    """In a real browser, the page a run prints opens on its runs, not MLflow 3's empty GenAI overview
    (which the experiment's kind tag alone does not avoid in MLflow 3.17: the URL names the workflow)."""
    from tests.tda.report_browser import chromium_missing, open_browser

    if why := chromium_missing():
        pytest.skip(why)
    from pipelines.tracking import Tracker

    tracker = Tracker(mlflow_server, "ui_kind", None)
    tracker.start("run-shown-in-ui", {"spec": "ui_kind"}, {"seed": 0})
    now = time.time()
    tracker.log_step(
        "featurise",
        tags={"step": "featurise"},
        params={},
        metrics=[("rows", 3.0, None)],
        start=now - 1,
        end=now,
        status="FINISHED",
    )
    tracker.finish("FINISHED", {"wall_seconds": 1.0})
    assert not tracker.close()
    driver = open_browser()
    try:
        driver.execute_cdp_cmd(  # open_browser is offline for report pages; the UI is on loopback
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        driver.get(f"{mlflow_server}/#/experiments/{tracker.experiment_id}?workflowType=machine_learning")
        deadline, text = time.time() + 60, ""
        while time.time() < deadline and "run-shown-in-ui" not in text:
            time.sleep(1)
            text = driver.find_element("tag name", "body").text
        assert "run-shown-in-ui" in text, text[:500]  # the run table, with the pipeline's run
        assert "No data available" not in text
    finally:
        driver.quit()
