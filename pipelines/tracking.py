"""The MLflow side: one parent run per pipeline run, one nested run per step.

The only module of `pipelines` that imports mlflow. Logging happens on a background thread, so a
slow tracking server never holds up the scheduling of steps; `close()` waits for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

MAX_PARAM_LENGTH = 6000


class TrackingError(PipelineError):
    """The tracking server could not be reached or refused a request."""

    exit_code = 2


def default_tracking_uri(store_root: Path) -> str:
    return f"sqlite:///{store_root / 'mlflow.db'}"


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

    Connecting (importing mlflow, opening the store, creating the parent run) happens on the
    logging thread, so it overlaps with the start of Ray; `ready()` waits for it and raises a
    TrackingError if the tracking URI does not work, before any step executes.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None) -> None:
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._connect_error: str | None = None
        self._connected = threading.Event()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(
            target=self._drain, args=(experiment, artifact_root), name="mlflow-logger", daemon=True
        )
        self._thread.start()

    def _connect(self, experiment: str, artifact_root: Path | None) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):  # after the import, which sets up mlflow's logging
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = (artifact_root / experiment).as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def _drain(self, experiment: str, artifact_root: Path | None) -> None:
        try:
            self._connect(experiment, artifact_root)
        except Exception as exc:
            self._connect_error = f"MLflow at {self.tracking_uri}: {type(exc).__name__}: {exc}"
        finally:
            self._connected.set()
        while (job := self._jobs.get()) is not None:
            if self._connect_error:
                continue
            try:
                job()
            except Exception as exc:  # tracking must not take the pipeline down
                self._errors.append(f"{type(exc).__name__}: {exc}")

    def ready(self) -> None:
        """Wait until connected; raise TrackingError if the tracking URI did not work."""
        self._connected.wait()
        if self._connect_error:
            raise TrackingError(self._connect_error)

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        """Queue the parent run; its id is `parent_id` once `close()` returned."""
        self._jobs.put(lambda: self._start(run_name, tags, params))

    def _start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
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
        from mlflow.entities import Metric, Param

        all_tags = {**tags, "mlflow.parentRunId": self.parent_id}
        run = self.client.create_run(self.experiment_id, start_time=_ms(start), tags=all_tags, run_name=name)
        run_id = run.info.run_id
        stamp = _ms(end)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, stamp, s or 0) for k, v, s in metrics],
            params=[Param(k, v) for k, v in flatten(params).items()],
        )
        if artifacts and Path(artifacts).is_dir():
            self.client.log_artifacts(run_id, artifacts)
        self.client.set_terminated(run_id, status=status, end_time=stamp)

    def finish(self, status: str, metrics: dict[str, float]) -> None:
        """Queue the parent run's final metrics and status."""
        self._jobs.put(lambda: self._finish(status, metrics, _ms(time.time())))

    def _finish(self, status: str, metrics: dict[str, float], stamp: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
        self.client.log_batch(self.parent_id, metrics=batch)
        self.client.set_terminated(self.parent_id, status=status, end_time=stamp)

    def close(self) -> list[str]:
        """Wait for queued logging to finish; return the errors it met (as one-line strings)."""
        self._jobs.put(None)
        self._thread.join()
        return [self._connect_error] if self._connect_error else self._errors


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
    try:
        parent = client.get_run(parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=5000,
        )
    except Exception as exc:
        raise TrackingError(f"MLflow at {tracking_uri}: {type(exc).__name__}: {exc}") from None
    return {run.info.run_name: dict(run.data.metrics) for run in children}
