"""A real cluster on 127.0.0.1: deploy/local-cluster.sh starts a Ray head, a worker node and an MLflow
server; `tda submit --wait` runs the reduced quickstart (specs/cluster.yaml) through the Ray Jobs API
with token auth; the tables land in the shared store, the runs in the MLflow server, and the steps on
both nodes. A failing step is reported by `tda status`, and a resubmission resumes from the store.

Run with `make test-cluster` (CI does); ~4–5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster.sh"
TDA = [sys.executable, "-m", "pipelines.cli"]


def free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Ray's worker ports are 10002-19999; keep clear of them and of each other
        if port not in avoid and not 10000 <= port < 20000:
            avoid.add(port)
            return port


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            if key != "PATH":  # the tests call this venv's Python directly
                env[key] = value.strip("'")
    return env


def own_processes(folder: Path) -> list[str]:
    """Processes of the cluster: Ray hands RAY_AUTH_TOKEN_PATH=<folder>/auth_token down to all it starts
    (agents too, whose command lines Ray rewrites), and local-cluster.sh sets it on MLflow."""
    marker = f"RAY_AUTH_TOKEN_PATH={folder}/auth_token".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{proc.name} {command!r}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("local-cluster")
    ports: set[int] = set()
    settings = {
        "TDA_CLUSTER_DIR": str(folder),
        "TDA_RAY_PORT": str(free_port(ports)),
        "TDA_DASHBOARD_PORT": str(free_port(ports)),
        "TDA_MLFLOW_PORT": str(free_port(ports)),
        "TDA_CLIENT_PORT": str(free_port(ports)),
        "TDA_VENV": str(Path(sys.executable).parent.parent),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PIPELINES_", "TDA_"))}
    base.update(settings, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=base, capture_output=True, text=True, timeout=600
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        env = {**base, **read_env_file(folder / "env")}
        yield {"folder": folder, "env": env, "store": Path(env["TDA_STORE"])}
    finally:
        stopped = subprocess.run(["bash", str(SCRIPT), "stop"], env=base, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        left = own_processes(folder)
        assert not left, f"local-cluster.sh stop left processes behind: {left}"


def tda(cluster: dict, *args: str, timeout: float = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TDA, *args], env=cluster["env"], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def ray_node_ids(cluster: dict) -> set[str]:
    ray_bin = Path(sys.executable).parent / "ray"
    listed = subprocess.run(
        [
            str(ray_bin),
            "list",
            "nodes",
            "--format",
            "json",
            "--address",
            cluster["env"]["RAY_API_SERVER_ADDRESS"],
        ],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    return {n["node_id"] for n in json.loads(listed.stdout) if n["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def submitted(cluster: dict) -> dict:
    """The README's command: the reduced quickstart, submitted and followed to the end."""
    done = tda(cluster, "submit", "specs/cluster.yaml", "--wait")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    from pipelines.query import open_run

    run = open_run(cluster["store"], None)
    return {"out": done.stdout, "run": run}


def test_submit_runs_the_study_on_both_nodes_into_the_store_and_mlflow(
    cluster: dict, submitted: dict
) -> None:
    run = submitted["run"]
    assert run.status == "succeeded"
    assert f"job tda-{run.run_id}: SUCCEEDED" in submitted["out"]
    # the tables are in the shared store
    summary = run.table("summary").collect()
    assert set(summary["method"]) == {"airrep", "graddot"}
    assert summary["lds"].is_not_null().all() and summary.height == 12
    assert run.table("effects").collect().height == 960
    # every step was executed (not cached) by a Ray task, and the steps' tasks ran on both nodes
    steps = run.record.steps
    assert {s["status"] for s in steps.values()} == {"done"}
    nodes = ray_node_ids(cluster)
    assert len(nodes) == 2
    used = {s["node"] for s in steps.values()}
    assert used == nodes, f"steps ran on {used}, the cluster has {nodes}"
    for name, info in steps.items():
        assert run.store.get(info["key"]).manifest["node"] == info["node"], name
    # the runs are in the MLflow server: one parent for the run and a child per step
    import mlflow

    client = mlflow.MlflowClient(cluster["env"]["MLFLOW_TRACKING_URI"])
    assert run.record.mlflow["tracking_uri"] == cluster["env"]["MLFLOW_TRACKING_URI"]
    experiment = client.get_experiment_by_name("cluster")
    runs = client.search_runs([experiment.experiment_id], f"tags.run_id = '{run.run_id}'")
    parent = [r for r in runs if r.info.run_id == run.record.mlflow["run_id"]]
    children = {r.data.tags.get("step"): r for r in runs if r.info.run_id != run.record.mlflow["run_id"]}
    assert parent and parent[0].info.status == "FINISHED"
    assert set(children) == set(steps)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert "val_lds" in client.get_run(children["airrep"].info.run_id).data.metrics
    # AirRep's model went to the server's artifact store, through the server
    artifacts = [a.path for a in client.list_artifacts(children["airrep"].info.run_id)]
    assert "airrep" in artifacts


def test_jobs_lists_the_job_and_logs_show_its_output(cluster: dict, submitted: dict) -> None:
    run_id = submitted["run"].run_id
    listed = tda(cluster, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert f"tda-{run_id}" in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = tda(cluster, "logs", f"tda-{run_id}")
    assert logs.returncode == 0, logs.stderr
    assert "summary: done" in logs.stdout + logs.stderr or "summary" in logs.stdout


def test_a_failed_step_is_reported_and_a_resubmission_resumes_from_the_store(
    cluster: dict, submitted: dict, tmp_path: Path
) -> None:
    # the same study plus a check whose SQL names a column the summary does not have
    project = tmp_path / "study"
    project.mkdir()
    text = (REPO / "specs" / "cluster.yaml").read_text()
    text += (
        "  check:\n    kind: sql\n    inputs: [summary]\n"
        "    query: SELECT method, AVG(no_such_column) AS x FROM summary GROUP BY method\n"
    )
    (project / "study.yaml").write_text(text)
    failed = tda(cluster, "submit", "study.yaml", "--wait", cwd=project)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]

    status = tda(cluster, "status", cwd=project)
    assert status.returncode == 1
    lines = [line for line in status.stdout.splitlines() if "check failed:" in line]
    assert lines and "no_such_column" in lines[0], status.stdout
    assert "FAILED" in status.stdout

    from pipelines.query import open_run

    first = open_run(cluster["store"], None)
    assert first.record.steps["check"]["status"] == "failed"
    cached = {n for n, s in first.record.steps.items() if s["status"] == "cached"}
    assert cached == set(first.record.steps) - {"check"}, "the study's steps came from the store"

    fixed = tda(
        cluster,
        "submit",
        "study.yaml",
        "--wait",
        "--set",
        "steps.check.query=SELECT method, AVG(lds) AS lds FROM summary GROUP BY method",
        cwd=project,
    )
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    again = open_run(cluster["store"], None)
    assert again.run_id != first.run_id and again.status == "succeeded"
    assert again.record.steps["check"]["status"] == "done"
    assert all(s["status"] == "cached" for n, s in again.record.steps.items() if n != "check")
    assert again.table("check").collect().height == 2


def test_a_uri_store_works_across_nodes_with_node_local_caches(cluster: dict) -> None:
    """The store as a pyarrow filesystem URI: each node reads and writes it through its own cache
    (local-cluster.sh gives the nodes separate TDA_CACHE folders, as separate disks)."""
    uri = f"file://{cluster['folder']}/uri-store"
    done = tda(
        cluster,
        "submit",
        "specs/cluster.yaml",
        "--store",
        uri,
        "--set",
        "steps.airrep.num_workers=1",
        "--wait",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    from pipelines.query import open_run

    run = open_run(uri, None)
    assert run.status == "succeeded" and run.record.store == uri
    assert {s["status"] for s in run.record.steps.values()} == {"done"}
    assert len({s["node"] for s in run.record.steps.values()}) == 2
    assert run.table("summary").collect()["lds"].is_not_null().all()
    root = Path(uri.removeprefix("file://"))
    for info in run.record.steps.values():
        assert (root / "objects" / info["key"] / "manifest.json").is_file()
    caches = cluster["folder"] / "cache"
    for node in ("head", "worker"):
        assert any((caches / node).glob("stores/*/objects/*/manifest.json")), f"the {node}'s cache is empty"


def test_requests_without_the_token_are_refused_with_a_clear_error(cluster: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    env["HOME"] = str(home)
    address = cluster["env"]["RAY_API_SERVER_ADDRESS"]
    refused = subprocess.run([*TDA, "jobs", "--address", address], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "requires a token" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    refused = subprocess.run(
        [*TDA, "jobs", "--address", address, "--token-file", str(wrong)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "refused the token" in refused.stderr, refused.stderr


def test_submit_refuses_a_relative_store_before_contacting_the_cluster(cluster: dict) -> None:
    env = {k: v for k, v in cluster["env"].items() if k != "TDA_STORE"}
    done = subprocess.run(
        [*TDA, "submit", "specs/cluster.yaml"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "run.store" in line and "--store" in line


def test_stop_stops_a_running_job(cluster: dict, submitted: dict) -> None:
    started = tda(cluster, "submit", "specs/cluster.yaml", "--force", "corpus")
    assert started.returncode == 0, started.stderr
    job = next(w for w in started.stdout.split() if w.startswith("tda-"))
    stopped = tda(cluster, "stop", job, "--wait")
    assert "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert stopped.returncode == 1
