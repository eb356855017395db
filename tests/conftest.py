"""Shared fixtures: one embedded Ray per test session, toy step kinds, spec files in tmp folders."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# toy kinds for subprocesses (`tda …`) too; this process registers them below
os.environ["PIPELINES_PLUGINS"] = "tests.pipelines.toy_steps"
# a warm Ray of `tda ray up` on this machine is not the tests' (they start their own, of 4 CPUs)
os.environ["TDA_RAY_DIR"] = os.path.join(os.path.dirname(__file__), ".no-warm-ray")

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.pipelines import toy_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """The embedded Ray of this test session (4 logical CPUs, so concurrency is observable)."""
    import ray

    from pipelines.runner import ensure_ray

    ensure_ray(None, 4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow SQLite database for the session (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(text, name="spec.yaml") -> path of a dedented spec file in tmp_path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


def pytest_configure(config):
    from pipelines import registry

    for kind in toy_steps.STEPS:
        registry.register(kind)


@pytest.fixture
def failed_error(ray_session, tmp_path, tracking_uri):
    """failed_error(spec_text, step) -> the one-line error of `step`, which must fail in a real run."""
    import pipelines

    def run(text: str, step: str) -> str:
        (tmp_path / "spec.yaml").write_text(text)
        result = pipelines.run(
            pipelines.load_spec(tmp_path / "spec.yaml"),
            store=str(tmp_path / "store"),
            tracking_uri=tracking_uri,
            progress=False,
            raise_on_failure=False,
        )
        assert result.steps[step]["status"] == "failed", result.steps
        error = result.steps[step]["error"]
        assert "\n" not in error
        return error

    return run
