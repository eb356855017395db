"""The engine: YAML specs → a DAG of Ray tasks → a content-addressed Parquet store → MLflow.

It knows nothing about attribution; step kinds come from the entry-point group `pipelines.steps`.

    import pipelines
    spec = pipelines.load_spec("specs/quickstart.yaml")
    run = pipelines.run(spec)
    run.table("lds").collect()
"""

from __future__ import annotations

from typing import Any

from pipelines.context import Reporter, StepContext
from pipelines.errors import PipelineError, RunFailed, SpecError, StepFailed, StoreError
from pipelines.params import InputPath, Resources, StepParams, StepRef, StorePath
from pipelines.query import Run, open_run
from pipelines.registry import StepKind, register
from pipelines.spec import load_spec, loads_spec
from pipelines.status import RunStatus, StepRecord, StepStatus

__version__ = "0.1.0"


def run(spec: Any, **options: Any) -> Run:
    """Run a spec (a path or a loaded spec). Options: store, ray_address, tracking_uri, num_cpus,
    force (step names), progress (bool), raise_on_failure (bool)."""
    from pipelines import runner  # Ray is imported only when a run starts

    if not hasattr(spec, "steps"):
        spec = load_spec(spec, options.pop("overrides", ()))
    return runner.run(spec, **options)


__all__ = [
    "InputPath",
    "PipelineError",
    "Reporter",
    "Resources",
    "Run",
    "RunFailed",
    "RunStatus",
    "SpecError",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepParams",
    "StepRecord",
    "StepRef",
    "StepStatus",
    "StorePath",
    "StoreError",
    "load_spec",
    "loads_spec",
    "open_run",
    "register",
    "run",
]
