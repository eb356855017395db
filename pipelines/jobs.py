"""Specs run on a Ray cluster through the Ray Jobs API: `tda submit | jobs | status | logs | stop`.

    tda submit specs/quickstart.yaml --address http://HEAD:8265 --store /mnt/store --wait

`submit` validates the spec here first (a bad spec never reaches the cluster), then sends the project
folder (the nearest folder above the spec with a pyproject.toml, else the spec's folder; .gitignored
files, .git and .venv left out) as the job's `working_dir`, and the entrypoint

    python -m pipelines.cli run <spec> --ray-address auto --store <store> --run-id <id> …

The job id is `tda-<run id>`, and the job's metadata names the store and the run, so `tda status`
reads the run record (every step's status, node and error) from the shared store, and falls back to
the job's log when the store cannot be read from here.

Token authentication: Ray 2.60 clusters started with RAY_AUTH_MODE=token answer only requests that
carry their token. It is read from --token-file, else $RAY_AUTH_TOKEN, else the file
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token when RAY_AUTH_MODE=token (Ray's own order), and sent as a
bearer header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ClusterError, SpecError
from pipelines.fingerprint import find_input_paths
from pipelines.params import is_uri
from pipelines.spec import SpecBase, load_spec
from pipelines.status import StepStatus
from pipelines.store import RunRecord, Store, new_run_id

# left out of the working_dir on top of what .gitignore excludes (Ray honours .gitignore files)
EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".local-cluster",
    "tda-store",
]
# Ray Train's worker group waits this long for CPUs other steps hold (its default, 60 s, is too short
# when steps share the cluster); a job's env_vars reach every task and actor it starts
JOB_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400", "RAY_USAGE_STATS_ENABLED": "0"}
PASS_THROUGH_ENV = ("PIPELINES_PLUGINS",)  # kinds the spec was validated with here
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


# ---------------------------------------------------------------- connection


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS (as the `ray job` CLI)."""
    if address:
        return address
    for name in ADDRESS_ENV:
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    raise ClusterError(
        "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard's Jobs API) or set "
        "RAY_API_SERVER_ADDRESS"
    )


def auth_token(token_file: str | None = None) -> str | None:
    """The Ray auth token to send, in Ray's own order of sources (see the module docstring)."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClusterError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({exc.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text(encoding="utf-8").strip()
    return None


def connect(address: str | None = None, token_file: str | None = None) -> Any:
    """A JobSubmissionClient for the cluster; one-line ClusterError when it is unreachable or refuses."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as exc:
        raise ClusterError(_explain(url, exc)) from None


def _explain(url: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "401" in text or "Authentication required" in text:
        return (
            f"the Ray cluster at {url} requires a token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
            "or pass --token-file (deploy/local-cluster.sh writes one; `source .local-cluster/env`)"
        )
    if "403" in text or "Authentication failed" in text:
        return f"the Ray cluster at {url} refused the token: check RAY_AUTH_TOKEN / --token-file"
    if "Failed to connect" in text or "Connection" in text or "Cannot connect" in text:
        return (
            f"cannot reach the Ray Jobs API at {url}: is the cluster up (`ray status` on the head) and "
            "the dashboard port forwarded?"
        )
    return f"the Ray Jobs API at {url} failed: {text[:300]}"


def _call(client: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise ClusterError(f"no job {args[0]!r} on {client.get_address()}; see `tda jobs`") from None
        raise ClusterError(_explain(client.get_address(), exc)) from None
    except Exception as exc:  # connection errors of requests/aiohttp
        raise ClusterError(_explain(client.get_address(), exc)) from None


# ---------------------------------------------------------------- submission


@dataclass
class Submission:
    job_id: str
    run_id: str
    store: str
    tracking_uri: str | None
    project: Path
    spec: str  # the spec's path inside the project
    entrypoint: str
    warnings: list[str]


def project_root(spec_path: Path) -> Path:
    """The nearest folder at or above the spec holding a pyproject.toml; else the spec's folder."""
    spec_dir = spec_path.resolve().parent
    for folder in (spec_dir, *spec_dir.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return spec_dir


def cluster_store(spec: SpecBase, store: str | None) -> str:
    """Where the job keeps its outputs: --store, else $TDA_STORE, else the spec's run.store when it is
    an absolute path or a URI. A relative store would land inside Ray's copy of the project."""
    chosen = store or os.environ.get("TDA_STORE") or spec.run.store
    if is_uri(chosen) or Path(chosen).expanduser().is_absolute():
        return chosen if is_uri(chosen) else str(Path(chosen).expanduser())
    raise SpecError(
        spec.source.error(
            ("run", "store"),
            f"{chosen!r} is relative, and a job runs in Ray's copy of the project: pass --store (or set "
            "TDA_STORE) to a folder every node mounts, or a URI such as s3://bucket/store",
        )
    )


def git_ignored(project: Path) -> list[str]:
    """What git ignores in `project` (.gitignore, .git/info/exclude, global excludes), as working_dir
    excludes; Ray itself reads only .gitignore files. Empty when `project` is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listed.returncode != 0:
        return []
    return ["/" + line for line in listed.stdout.splitlines() if line]  # anchored at the project


def _outside_project(spec: SpecBase, project: Path) -> Iterator[str]:
    for name, params in spec.steps.items():
        for loc, path in find_input_paths(params):
            if is_uri(path) or Path(path).is_relative_to(project):
                continue
            where = ".".join(map(str, ("steps", name, *loc)))
            yield (
                f"{where}: {path} is outside the project folder sent to the cluster ({project}); "
                "every node must see it at that path"
            )


def submit(
    spec_path: str | Path,
    address: str | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    store: str | None = None,
    tracking_uri: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    token_file: str | None = None,
) -> Submission:
    """Validate `spec_path` here, then submit it as a Ray job; returns the job's ids at once."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path, list(overrides))
    project = project_root(spec_path)
    store = cluster_store(spec, store)
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.run.tracking_uri
    unknown = [f for f in force if f not in spec.steps]
    if unknown:
        raise SpecError(f"{spec_path}: --force: no step {unknown[0]!r}; steps: {', '.join(spec.steps)}")
    rel_spec = spec_path.resolve().relative_to(project).as_posix()
    run_id = new_run_id()
    args = ["python", "-m", "pipelines.cli", "run", rel_spec, "--ray-address", "auto", "--store", store]
    args += ["--run-id", run_id]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    for assignment in overrides:
        args += ["--set", assignment]
    for step in force:
        args += ["--force", step]
    entrypoint = shlex.join(args)
    env_vars = {**JOB_ENV, **{k: os.environ[k] for k in PASS_THROUGH_ENV if os.environ.get(k)}, **(env or {})}
    client = connect(address, token_file)
    job_id = f"tda-{run_id}"
    metadata = {
        "tda_run_id": run_id,
        "tda_spec": spec.name,
        "tda_spec_path": rel_spec,
        "tda_store": store,
        "tda_tracking_uri": tracking_uri or "",
    }
    excludes = [*EXCLUDES, *git_ignored(project)]
    runtime_env = {"working_dir": str(project), "excludes": excludes, "env_vars": env_vars}
    # Ray logs every file it skips while packaging at INFO; keep its warnings
    logging.getLogger("ray").setLevel(logging.WARNING)
    _call(
        client,
        client.submit_job,
        entrypoint=entrypoint,
        submission_id=job_id,
        runtime_env=runtime_env,
        metadata=metadata,
    )
    return Submission(
        job_id, run_id, store, tracking_uri, project, rel_spec, entrypoint, [*_outside_project(spec, project)]
    )


# ---------------------------------------------------------------- inspection


@dataclass
class JobState:
    """A job as the Jobs API reports it, with the run record when the store is readable from here."""

    job_id: str
    status: str
    message: str
    entrypoint: str
    metadata: dict[str, str]
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    record: RunRecord | None = None
    record_error: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time

    def failed_steps(self) -> dict[str, str]:
        if self.record is None:
            return {}
        return {n: s.error or "" for n, s in self.record.steps.items() if s.status == StepStatus.FAILED}


def _status(status: Any) -> str:
    """A JobStatus enum (or its string) as its name, e.g. "SUCCEEDED"."""
    return str(getattr(status, "value", status))


def _state(info: Any) -> JobState:
    def secs(ms: int | None) -> float | None:
        return ms / 1000 if ms else None

    return JobState(
        job_id=info.submission_id or info.job_id or "",
        status=_status(info.status),
        message=info.message or "",
        entrypoint=info.entrypoint or "",
        metadata=dict(info.metadata or {}),
        start_time=secs(info.start_time),
        end_time=secs(info.end_time),
    )


def list_jobs(client: Any) -> list[JobState]:
    """Every job of the cluster, oldest first."""
    jobs = [_state(info) for info in _call(client, client.list_jobs)]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def resolve_job(client: Any, job: str | None) -> str:
    """A job id from an id, a unique prefix (with or without `tda-`), or None for the latest tda job."""
    jobs = list_jobs(client)
    if not job or job == "latest":
        tda_jobs = [j for j in jobs if "tda_run_id" in j.metadata]
        if not tda_jobs:
            raise ClusterError(f"no tda jobs on {client.get_address()}; submit one with `tda submit SPEC`")
        return tda_jobs[-1].job_id
    ids = [j.job_id for j in jobs]
    if job in ids:
        return job
    matches = [i for i in ids if i.startswith(job) or i.startswith(f"tda-{job}")]
    if len(matches) != 1:
        what = "no job" if not matches else f"{len(matches)} jobs"
        raise ClusterError(f"{what} matching {job!r} on {client.get_address()}; see `tda jobs`")
    return matches[0]


def job_state(client: Any, job_id: str) -> JobState:
    """The job's status, with its run record read from the store named in its metadata."""
    state = _state(_call(client, client.get_job_info, job_id))
    store, run_id = state.metadata.get("tda_store"), state.metadata.get("tda_run_id")
    if store and run_id:
        try:
            state.record = Store.open(store).read_run(run_id)
        except Exception as exc:  # not mounted here, no credentials, or the run never started
            state.record_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return state


FAILED_LINE = re.compile(r"^(?P<step>[\w.-]+) failed: (?P<error>.+)$")


def failed_steps_from_log(text: str) -> dict[str, str]:
    """`step failed: error` lines that `tda run` prints at the end, for when the store is unreadable."""
    found = {}
    for line in text.splitlines():
        match = FAILED_LINE.match(line.strip())
        if match:
            found[match["step"]] = match["error"]
    return found


def job_logs(client: Any, job_id: str) -> str:
    return str(_call(client, client.get_job_logs, job_id))


def follow_logs(client: Any, job_id: str, write: Callable[[str], Any] = sys.stdout.write) -> None:
    """Stream the job's log until it ends (the Jobs API's websocket tail)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise ClusterError(_explain(client.get_address(), exc)) from None


def wait(client: Any, job_id: str, poll: float = 1.0) -> JobState:
    """Poll until the job reaches a terminal state."""
    while True:
        if _status(_call(client, client.get_job_status, job_id)) in TERMINAL:
            return job_state(client, job_id)
        time.sleep(poll)


def stop(client: Any, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    return bool(_call(client, client.stop_job, job_id))
