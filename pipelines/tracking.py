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
    """Logs a pipeline run to MLflow: `start`, `log_step` per step, `finish`, `close`."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):  # after the import, which sets up mlflow's logging
            logging.getLogger(name).setLevel(logging.WARNING)

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            self.experiment_id = self._experiment(experiment, artifact_root)
        except Exception as exc:
            raise TrackingError(f"MLflow at {tracking_uri}: {type(exc).__name__}: {exc}") from None
        self.parent_id: str | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (artifact_root / name).as_uri() if artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    def _drain(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception as exc:  # tracking must not take the pipeline down
                self._errors.append(f"{type(exc).__name__}: {exc}")

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """Create the parent run (synchronously: its id goes into the run record)."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        flat = [Param(k, v) for k, v in flatten(params).items()]
        self._jobs.put(lambda: self.client.log_batch(self.parent_id, params=flat))
        return self.parent_id

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
        from mlflow.entities import Metric

        stamp = _ms(time.time())
        parent = self.parent_id
        batch = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
        self._jobs.put(lambda: self.client.log_batch(parent, metrics=batch))
        self._jobs.put(lambda: self.client.set_terminated(parent, status=status, end_time=stamp))

    def close(self) -> list[str]:
        """Wait for queued logging to finish; return the errors it met (as one-line strings)."""
        self._jobs.put(None)
        self._thread.join()
        return self._errors


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
